"""Requests: an OpenAI JSON body -> GenerationRequest, every field's type and range checked here (tokens
are counted by the worker, which knows the tokenizer). A refused request is a RequestError that names the
field, with the HTTP status and OpenAI's error fields.
"""

import json
from dataclasses import dataclass, field, replace
from typing import List, Optional, Union

from ..cache import MAX_DRAFT_TOKENS
from ..sampling import SamplingError, SamplingParams, check_seed

MAX_STOP_STRINGS = 16


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields to send back."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# Requests: JSON body -> GenerationRequest (types and ranges checked here, tokens counted by the worker)


@dataclass(frozen=True)
class RequestDefaults:
    """What a request gets for the fields it leaves out: the server's flags."""

    sampling: SamplingParams = SamplingParams()
    draft: bool = True
    num_draft_tokens: Union[int, str] = 3


@dataclass
class GenerationRequest:
    kind: str  # "chat" or "text"
    messages: Optional[List[dict]] = None
    prompt: Union[str, List[int], None] = None
    max_tokens: Optional[int] = None  # None: the server's default, clipped to the context
    sampling: SamplingParams = SamplingParams()
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    draft: bool = True
    num_draft_tokens: Union[int, str] = 3
    chat_template_kwargs: dict = field(default_factory=dict)


def _get(body: dict, name: str, types, default=None, check=None, expect: str = ""):
    """body[name] if present and of the right type (bools are not numbers here), else RequestError."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise RequestError(f"'{name}' must be {expect}, got {json.dumps(value)[:80]}", param=name)
    if check is not None and not check(value):
        raise RequestError(f"'{name}' must be {expect}, got {json.dumps(value)[:80]}", param=name)
    return value


def _message_text(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                   "are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def parse_request(body, kind: str, defaults: RequestDefaults = RequestDefaults()) -> GenerationRequest:
    """Validate an OpenAI request body for `kind` ("chat" or "text"); `defaults` holds the server's flags."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    req = GenerationRequest(kind=kind, sampling=defaults.sampling, draft=defaults.draft,
                            num_draft_tokens=defaults.num_draft_tokens)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                               param="messages")
        req.messages = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
            req.messages.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not (ids and prompt):
            raise RequestError("'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                               param="prompt")
        req.prompt = prompt
    if _get(body, "n", (int,), 1, expect="1") != 1:
        raise RequestError("'n' must be 1: one completion per request", param="n")
    max_tokens = _get(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
    req.max_tokens = max_tokens
    req.sampling, req.seed = _sampling(body, defaults.sampling)
    stop = _get(body, "stop", (str, list), [], expect="a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")
    req.stop = [s for s in stop if s]
    req.stream = _get(body, "stream", (bool,), False, expect="true or false")
    options = _get(body, "stream_options", (dict,), {}, expect="an object")
    req.include_usage = bool(options.get("include_usage", False))
    req.draft = _get(body, "draft", (bool,), req.draft, expect="true or false")
    req.num_draft_tokens = _get(body, "num_draft_tokens", (int, str), req.num_draft_tokens,
                                lambda v: v == "auto" or isinstance(v, int) and 0 <= v <= MAX_DRAFT_TOKENS,
                                f"an integer from 0 to {MAX_DRAFT_TOKENS} or \"auto\"")
    if kind == "chat":
        req.chat_template_kwargs = _get(body, "chat_template_kwargs", (dict,), {}, expect="an object")
    return req




# OpenAI's field names for SamplingParams' (and the seed's)
FIELDS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "acceptance": "acceptance",
          "seed": "seed"}


def _sampling(body: dict, default: SamplingParams):
    """(SamplingParams, seed) from the body's fields over the server's defaults; a bad one is a 400 naming it."""
    values = {}
    for ours, theirs in FIELDS.items():
        if body.get(theirs) is not None:
            values[ours] = body[theirs]
    seed = values.pop("seed", None)
    try:
        sampling = replace(default, **values).validate()
        if seed is not None:
            check_seed(seed)
    except SamplingError as e:
        raise RequestError(f"'{FIELDS[e.field]}' {e.message}", param=FIELDS[e.field]) from None
    return sampling, seed

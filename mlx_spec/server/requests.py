"""Requests: an OpenAI JSON body -> GenerationRequest, every field's type and range checked here (tokens
are counted by the worker, which knows the tokenizer). A refused request is a RequestError that names the
field, with the HTTP status and OpenAI's error fields.

A client's values are untrusted: text must be valid Unicode (a lone surrogate is refused, not passed to the
tokenizer), error messages quote a bounded rendering of what was sent, and `chat_template_kwargs` takes
only the switches in TEMPLATE_KWARGS (never template text: the server renders only the model's own).
"""

import json
import re
from dataclasses import dataclass, field, replace
from typing import List, Optional, Union

from ..cache import MAX_DRAFT_TOKENS
from ..sampling import SamplingError, SamplingParams, check_seed

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # top_logprobs (chat) / logprobs (completions) at most, as OpenAI's chat API
# chat_template_kwargs a client may set: (type, longest string) per key; switches the model's template reads
TEMPLATE_KWARGS = {"enable_thinking": (bool, 0), "reasoning_effort": (str, 32)}
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    tree_nodes: Union[int, str] = 0


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
    tree_nodes: Union[int, str] = 0  # a tree of N nodes per round, or "auto" (docs/TREES.md); 0: chains
    chat_template_kwargs: dict = field(default_factory=dict)
    logprobs: Optional[int] = None  # None: none; N: each token's log-probability and the top N alternatives


def _show(value) -> str:
    """A client's value for an error message: short whatever its size or depth (a repr could recurse)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return json.dumps(value[:60]) + ("..." if len(value) > 60 else "")
    text = json.dumps(value)  # numbers (NaN and Infinity too), booleans
    return text if len(text) <= 60 else text[:60] + "..."


def _get(body: dict, name: str, types, default=None, check=None, expect: str = ""):
    """body[name] if present and of the right type (bools are not numbers here), else RequestError."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise RequestError(f"'{name}' must be {expect}, got {_show(value)}", param=name)
    if check is not None and not check(value):
        raise RequestError(f"'{name}' must be {expect}, got {_show(value)}", param=name)
    return value


def _text(value: str, where: str, param: str) -> str:
    """`value`, if it is valid Unicode: a lone surrogate ("\\udc80" in JSON) cannot be encoded for the tokenizer."""
    bad = _SURROGATE.search(value)
    if bad:
        raise RequestError(f"{where} holds a lone surrogate (\\u{ord(bad.group()):04x}) at character {bad.start()}: "
                           "send valid Unicode text", param=param)
    return value


def _message_text(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return _text(content or "", f"messages[{i}].content", "messages")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                   "are supported", param="messages")
            parts.append(_text(part["text"], f"messages[{i}].content", "messages"))
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def _template_kwargs(body: dict) -> dict:
    """chat_template_kwargs, only the known switches: a client never supplies template text or other inputs
    (a `chat_template` here would make the server render the client's Jinja)."""
    kwargs = _get(body, "chat_template_kwargs", (dict,), {}, expect="an object")
    allowed = ", ".join(TEMPLATE_KWARGS)
    for key, value in kwargs.items():
        if key not in TEMPLATE_KWARGS:
            raise RequestError(f"chat_template_kwargs key {_show(key)} is not accepted; this server takes only "
                               f"{allowed}", param="chat_template_kwargs")
        kind, longest = TEMPLATE_KWARGS[key]
        if kind is bool and not isinstance(value, bool) or kind is str and not (
                isinstance(value, str) and len(value) <= longest and value.isprintable()):
            expect = "true or false" if kind is bool else f"a string of at most {longest} printable characters"
            raise RequestError(f"chat_template_kwargs.{key} must be {expect}, got {_show(value)}",
                               param="chat_template_kwargs")
    return dict(kwargs)


def _logprobs(body: dict, kind: str) -> Optional[int]:
    """How many alternatives per token the client asked for (0: the token's own only), None for none.
    Chat: "logprobs": true + "top_logprobs": N; completions: "logprobs": N."""
    expect = f"an integer from 0 to {MAX_LOGPROBS}"
    if kind == "text":
        return _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS, expect)
    wanted = _get(body, "logprobs", (bool,), False, expect="true or false")
    top = _get(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS, expect)
    if top is not None and not wanted:
        raise RequestError("'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
    return (top or 0) if wanted else None


def parse_request(body, kind: str, defaults: RequestDefaults = RequestDefaults()) -> GenerationRequest:
    """Validate an OpenAI request body for `kind` ("chat" or "text"); `defaults` holds the server's flags."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    req = GenerationRequest(kind=kind, sampling=defaults.sampling, draft=defaults.draft,
                            num_draft_tokens=defaults.num_draft_tokens, tree_nodes=defaults.tree_nodes)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                               param="messages")
        req.messages = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
            role = _text(m["role"], f"messages[{i}].role", "messages")
            req.messages.append({"role": role, "content": _message_text(m.get("content"), i)})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not (ids and prompt):
            raise RequestError("'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                               param="prompt")
        req.prompt = _text(prompt, "'prompt'", "prompt") if isinstance(prompt, str) else prompt
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
    req.stop = [_text(s, "'stop'", "stop") for s in stop if s]
    req.stream = _get(body, "stream", (bool,), False, expect="true or false")
    options = _get(body, "stream_options", (dict,), {}, expect="an object")
    req.include_usage = bool(options.get("include_usage", False))
    req.draft = _get(body, "draft", (bool,), req.draft, expect="true or false")
    req.num_draft_tokens = _get(body, "num_draft_tokens", (int, str), req.num_draft_tokens,
                                lambda v: v == "auto" or isinstance(v, int) and 0 <= v <= MAX_DRAFT_TOKENS,
                                f"an integer from 0 to {MAX_DRAFT_TOKENS} or \"auto\"")
    req.tree_nodes = _get(body, "tree_nodes", (int, str), req.tree_nodes,
                          lambda v: v == "auto" or isinstance(v, int) and 0 <= v <= MAX_DRAFT_TOKENS,
                          f"an integer from 0 to {MAX_DRAFT_TOKENS} or \"auto\"")
    if req.tree_nodes == "auto" and req.num_draft_tokens != "auto":
        raise RequestError("'tree_nodes': \"auto\" chooses chains or trees each round; it needs "
                           "\"num_draft_tokens\": \"auto\"", param="tree_nodes")
    if kind == "chat":
        req.chat_template_kwargs = _template_kwargs(body)
    req.logprobs = _logprobs(body, kind)
    return req


# OpenAI's field names for SamplingParams' (and the seed's)
FIELDS = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "acceptance": "acceptance",
          "seed": "seed"}


def _sampling(body: dict, default: SamplingParams):
    """(SamplingParams, seed) from the body's fields over the server's defaults; a bad one is a 400 naming it."""
    values = {}
    for ours, theirs in FIELDS.items():
        value = body.get(theirs)
        if value is None:
            continue
        expect = {"acceptance": "a string", "seed": "an integer", "top_k": "an integer"}.get(ours, "a number")
        if isinstance(value, (dict, list)) or isinstance(value, str) != (ours == "acceptance"):
            raise RequestError(f"'{theirs}' must be {expect}, got {_show(value)}", param=theirs)
        values[ours] = value
    seed = values.pop("seed", None)
    try:
        sampling = replace(default, **values).validate()
        if seed is not None:
            check_seed(seed)  # any integer: mapped into the seed's range, as the engine does
    except SamplingError as e:
        message = e.message if len(e.message) <= 200 else e.message[:200] + "..."
        raise RequestError(f"'{FIELDS[e.field]}' {message}", param=FIELDS[e.field]) from None
    return sampling, seed

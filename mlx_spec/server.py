"""`mlx_spec.server`: an OpenAI-compatible HTTP server with speculative decoding.

    mlx_spec.server --model M [--drafter D | --draft-model M2 | --ngram [N]] [--host 127.0.0.1] [--port 8080]
                    [--max-tokens N] [--num-draft-tokens K|auto] [--no-draft] [--max-context N]
                    [--max-request-bytes B] [--no-prompt-cache] [--prompt-cache-slots N]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both stream with server-sent events when
"stream": true), GET /v1/models, GET /health. Besides OpenAI's fields a request may set "draft" (bool) and
"num_draft_tokens"; every response carries "usage" and a "speculative" object (rounds, drafted, accepted,
tau, acceptance_rate, acceptance_by_position, plain_steps, proposer).

One worker thread owns the model: it tokenizes and generates one request at a time, in arrival order,
keeping the last request's K/V so that a follow-up (the same conversation, resent) prefills only what is
new (usage.prompt_tokens_details.cached_tokens; --no-prompt-cache turns it off).
HTTP handler threads (standard library only) parse and validate requests, queue them, and write out what
the worker produces; a client that goes away cancels its request, queued or running.
"""

import argparse
import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional, Tuple, Union

from .api import encode_prompt, stream_generate
from .chat import model_context
from .loading import materialize
from .cli import (DEFAULT_MAX_TOKENS, DEFAULT_TEMP, ArgumentParser, add_model_args, check_length_args,
                  check_sampling_args, load_models, run)
from .engine import DEFAULT_NUM_DRAFT_TOKENS, MAX_DRAFT_TOKENS
from .errors import MlxSpecError
from .prompt_cache import PromptCache
from .proposers.draft_model import DraftModelProposer

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_STOP_STRINGS = 16
POLL_S = 0.05  # how often a waiting handler checks that its client is still there
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body, so the client sees the 413
PROPOSER_NAMES = {"drafter": "mtp", "draft_model": "draft_model", "ngram": "ngram"}


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


@dataclass
class GenerationRequest:
    kind: str  # "chat" or "text"
    messages: Optional[List[dict]] = None
    prompt: Union[str, List[int], None] = None
    max_tokens: Optional[int] = None  # None: the server's default, clipped to the context
    temp: float = DEFAULT_TEMP
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
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


def parse_request(body, kind: str, defaults: dict) -> GenerationRequest:
    """Validate an OpenAI request body for `kind` ("chat" or "text"); `defaults` holds the server's flags."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    req = GenerationRequest(kind=kind, temp=defaults["temp"], top_p=defaults["top_p"], top_k=defaults["top_k"],
                            min_p=defaults["min_p"], draft=defaults["draft"],
                            num_draft_tokens=defaults["num_draft_tokens"])
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
    number = (int, float)
    req.temp = float(_get(body, "temperature", number, req.temp, lambda v: v >= 0, "a number >= 0"))
    req.top_p = float(_get(body, "top_p", number, req.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"))
    req.top_k = _get(body, "top_k", (int,), req.top_k, lambda v: v >= 0, "an integer >= 0")
    req.min_p = float(_get(body, "min_p", number, req.min_p, lambda v: 0 <= v <= 1, "a number in [0, 1]"))
    req.seed = _get(body, "seed", (int,), None, expect="an integer")
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


# ---------------------------------------------------------------------------------------------------------
# Generation: one worker thread, one request at a time


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that may still become one."""

    def __init__(self, stops: List[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> Tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Job:
    request: GenerationRequest
    events: "queue.Queue" = field(default_factory=queue.Queue)  # ("start", n) ("text", s) ("done", r) ("error", e)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class JobResult:
    finish_reason: str  # "stop", "length", or "cancelled" (the client went away)
    prompt_tokens: int
    completion_tokens: int
    speculative: dict
    cached_tokens: int = 0  # prompt tokens whose K/V came from the previous request (not prefilled again)


class Worker(threading.Thread):
    """Runs queued jobs one after another on the one model; never dies on a failing job."""

    def __init__(self, model, tokenizer, draft: dict, *, max_context: Optional[int], max_tokens: int, log=None,
                 prompt_cache: bool = True, prompt_cache_slots: int = 1):
        super().__init__(name="mlx_spec-generation", daemon=True)
        self.model, self.tokenizer, self.draft = model, tokenizer, dict(draft)
        self.max_context, self.max_tokens = max_context, max_tokens
        self.log = log
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.current: Optional[Job] = None
        self.finished: deque = deque(maxlen=256)  # recent JobResults, newest last (tests and logs read it)
        args = getattr(model, "text_args", None) or getattr(model, "args", None)
        self.vocab_size = getattr(args, "vocab_size", None)
        materialize(model, *(m for m in self.draft.values() if hasattr(m, "modules")))
        self._proposer = next((PROPOSER_NAMES[k] for k in self.draft), None)
        # A client resends the whole conversation with each request: keep the last one's K/V (the base's,
        # and a draft model's) and prefill only what is new. Exact: see PromptCache.
        self.prompt_cache = PromptCache(model, enabled=prompt_cache, slots=prompt_cache_slots)

    @property
    def proposer(self) -> Optional[str]:
        return self._proposer

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        """Cancel the running and queued jobs and end the thread (join it: see Server.close)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
        if self.current is not None:
            self.current.cancelled.set()
        self.jobs.put(None)

    def run(self) -> None:
        while True:
            job = self.current = self.jobs.get()
            if job is None:
                _release_thread_streams()
                return
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except RequestError as e:
                job.events.put(("error", e))
            except Exception as e:  # a bug: report it to this client, keep serving the others
                if self.log:
                    import traceback

                    traceback.print_exc(file=self.log)
                job.events.put(("error", RequestError(f"generation failed: {type(e).__name__}: {e}", status=500)))
            finally:
                _synchronize()

    def _tokens(self, req: GenerationRequest) -> List[int]:
        tok = self.tokenizer
        if req.kind == "chat":
            if not getattr(tok, "has_chat_template", False):
                raise RequestError("this model has no chat template; use /v1/completions with a raw prompt")
            try:
                text = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False,
                                               **req.chat_template_kwargs)
            except Exception as e:  # jinja raises TemplateError (and anything a template raises itself)
                raise RequestError(f"the chat template cannot render these messages: {e}", param="messages") from e
            return encode_prompt(tok, text)
        if isinstance(req.prompt, str):
            return encode_prompt(tok, req.prompt)
        if self.vocab_size and not all(0 <= t < self.vocab_size for t in req.prompt):
            raise RequestError(f"'prompt' token ids must be in [0, {self.vocab_size})", param="prompt")
        return list(req.prompt)

    def _max_tokens(self, req: GenerationRequest, n_prompt: int) -> int:
        if not self.max_context:
            return req.max_tokens or self.max_tokens
        room = self.max_context - n_prompt
        if room <= 0 or req.max_tokens is not None and req.max_tokens > room:
            asked = f" + {req.max_tokens} max_tokens" if req.max_tokens else ""
            raise RequestError(f"the prompt is {n_prompt} tokens{asked}, more than this server's context of "
                               f"{self.max_context} tokens (--max-context); shorten the prompt or lower max_tokens",
                               code="context_length_exceeded", param="messages" if req.kind == "chat" else "prompt")
        return min(req.max_tokens or self.max_tokens, room)

    def _run(self, job: Job) -> None:
        req = job.request
        start = time.perf_counter()
        prompt = self._tokens(req)
        max_tokens = self._max_tokens(req, len(prompt))
        if req.draft and not self.draft:
            req.draft = False  # nothing to draft with: plain decoding, reported as proposer None
        draft = self.draft if req.draft else {}
        job.events.put(("start", len(prompt)))
        stops = StopMatcher(req.stop)
        cached = self.prompt_cache.prepare(prompt)
        if "draft_model" in draft and self.prompt_cache.enabled:
            # the draft model's own cache goes with the conversation's slot, so it is reused as the base's is
            attached = self.prompt_cache.attached
            if "draft_proposer" not in attached:
                attached["draft_proposer"] = DraftModelProposer(draft["draft_model"], self.model)
            draft = {"drafter": attached["draft_proposer"]}
        gen = stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens, temp=req.temp,
                              top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
                              num_draft_tokens=req.num_draft_tokens, should_stop=job.cancelled.is_set,
                              prompt_cache=self.prompt_cache.cache, **draft)
        finish, n, stats, generated, torn = "length", 0, None, [], False
        try:
            for r in gen:
                n, stats = n + 1, r.stats
                generated.append(r.token)
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                text, hit = stops.feed(r.text)
                if hit:
                    finish = "stop"
                elif r.finish_reason:
                    finish = r.finish_reason
                    text += stops.flush()
                if text:
                    job.events.put(("text", text))
                if hit or r.finish_reason:
                    break
        except BaseException:
            torn = True  # it escaped the engine mid-step: the caches may be half-updated
            raise
        finally:
            gen.close()  # stops the engine at once (cancel, stop string)
            self.prompt_cache.settle(prompt + generated, torn)  # a torn request's slot goes, its proposer too
        if n == 0 and job.cancelled.is_set():  # the client went away during the prefill, which stopped there
            finish = "cancelled"
        spec = {"proposer": self.proposer if req.draft else None,
                "num_draft_tokens": req.num_draft_tokens if req.draft else 0}
        if stats is not None:
            d = stats.as_dict()
            spec.update({k: d[k] for k in ("rounds", "drafted", "accepted", "tau", "acceptance_rate",
                                           "acceptance_by_position", "plain_steps")})
        result = JobResult(finish, len(prompt), n, spec, cached)
        self.finished.append(result)
        job.events.put(("done", result))
        if self.log and stats is not None:
            tau = f", τ {stats.tau:.2f}, acceptance {stats.acceptance_rate:.0%}" if stats.rounds else ""
            _log(self.log, f"{req.kind}: {len(prompt)} prompt ({cached} cached) + {n} tokens, "
                 f"{stats.generation_tps:.1f} tok/s{tau}, {finish}, {time.perf_counter() - start:.2f} s")


def _log(stream, line: str) -> None:
    stream.write(line + "\n")  # one write per line, so lines from different threads do not interleave
    stream.flush()


def _synchronize() -> None:
    """Finish this thread's queued MLX work (an interrupted generation leaves a step in flight)."""
    import mlx.core as mx

    mx.synchronize()


def _release_thread_streams() -> None:
    """Destroy this thread's MLX streams before it ends; left to thread exit, they can abort the process
    at interpreter shutdown (seen with mlx 0.32 on CPU, about one exit in four)."""
    import mlx.core as mx

    mx.synchronize()
    if hasattr(mx, "clear_streams"):
        mx.clear_streams()


# ---------------------------------------------------------------------------------------------------------
# HTTP


class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    server_version = "mlx_spec"

    def log_message(self, format, *args):
        if self.server.access_log is not None:
            _log(self.server.access_log, f"{self.address_string()} - {format % args}")

    # -- plumbing
    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_error(self, e: RequestError) -> None:
        self._send_json(e.status, e.body())

    def _client_gone(self) -> bool:
        """The client closed its end (readable with nothing to read), checked without blocking."""
        try:
            if hasattr(socket, "MSG_DONTWAIT"):  # no fd-number limit, unlike select (the socket has no timeout)
                return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False  # nothing to read: still connected
        except (OSError, ValueError):
            return True

    def _next_event(self, job: Job):
        """The worker's next event for this job; raises ClientGone, checked every POLL_S even while tokens flow."""
        while True:
            now = time.monotonic()
            if now - self._checked >= POLL_S:
                self._checked = now
                if self._client_gone():
                    raise ClientGone
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                pass

    def _sse(self, obj) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()

    # -- routes
    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self.server.model_card()]})
        elif path.startswith("/v1/models/") and path[len("/v1/models/"):] == self.server.model_name:
            self._send_json(200, self.server.model_card())
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(RequestError(f"no such endpoint: GET {path}", status=404))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        kind = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text",
                "/completions": "text"}.get(path)
        if kind is None:
            self._send_error(RequestError(f"no such endpoint: POST {path}", status=404))
            return
        try:
            body = self._read_json()
            req = parse_request(body, kind, self.server.defaults)
        except RequestError as e:
            self._send_error(e)
            return
        self._generate(req)

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a Content-Length header is required", status=411)
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except ValueError:
            raise RequestError(f"invalid Content-Length header: {length!r}") from None
        limit = self.server.max_request_bytes
        if length > limit:
            self.close_connection = True
            self._send_error(RequestError(f"the request body is {length} bytes; this server accepts at most {limit} "
                                          "(--max-request-bytes)", status=413))
            self._drain(length)
            raise _AlreadyAnswered
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    def _drain(self, length: int) -> None:
        """Read and drop a refused body (bounded), so that closing does not reset the connection under the 413."""
        self.connection.settimeout(2.0)
        try:
            left = min(length, DRAIN_LIMIT)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except _AlreadyAnswered:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _generate(self, req: GenerationRequest) -> None:
        job = Job(req)
        self._checked = time.monotonic()
        self.server.worker.submit(job)
        try:
            kind, value = self._next_event(job)
            if kind == "error":
                self._send_error(value)
                return
            prompt_tokens = value
            if req.stream:
                self._stream(req, job)
            else:
                self._complete(req, job, prompt_tokens)
        except (ClientGone, BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        finally:
            job.cancelled.set()  # no-op when done; stops the worker when the client went away

    def _complete(self, req: GenerationRequest, job: Job, prompt_tokens: int) -> None:
        text = []
        while True:
            kind, value = self._next_event(job)
            if kind == "text":
                text.append(value)
            elif kind == "error":
                self._send_error(value)
                return
            elif kind == "done":
                self._send_json(200, self.server.response(req, "".join(text), value))
                return

    def _stream(self, req: GenerationRequest, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        srv = self.server
        ident, created = srv.new_id(req), int(time.time())
        if req.kind == "chat":
            self._sse(srv.chunk(req, ident, created, {"role": "assistant", "content": ""}))
        pending = None
        while True:
            kind, value = pending or self._next_event(job)
            pending = None
            if kind == "text":
                pieces = [value]
                while True:  # a verify round emits several tokens at once: send them as one chunk
                    try:
                        more = job.events.get_nowait()
                    except queue.Empty:
                        break
                    if more[0] != "text":
                        pending = more
                        break
                    pieces.append(more[1])
                text = "".join(pieces)
                self._sse(srv.chunk(req, ident, created, {"content": text} if req.kind == "chat" else text))
            elif kind == "error":
                self._sse(value.body())
                break
            elif kind == "done":
                empty = {} if req.kind == "chat" else ""
                final = srv.chunk(req, ident, created, empty, value.finish_reason)
                final.update(srv.usage(value))  # usage and speculative on the last chunk, always
                self._sse(final)
                if req.include_usage:
                    usage = srv.chunk(req, ident, created, empty)
                    usage["choices"] = []
                    usage.update(srv.usage(value))
                    self._sse(usage)
                break
        self._sse("[DONE]")


class _AlreadyAnswered(Exception):
    """The handler has sent its answer already (a refused body); nothing more to do."""


class Server(ThreadingHTTPServer):
    """The HTTP server plus the generation worker; `serve_forever()` in any thread, `close()` to stop."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, model, tokenizer, draft: Optional[dict] = None, *, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, model_name: str = "default", max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_context: Optional[int] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 num_draft_tokens=DEFAULT_NUM_DRAFT_TOKENS, draft_by_default: bool = True,
                 temp: float = DEFAULT_TEMP, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, log=None, access_log=None, prompt_cache: bool = True,
                 prompt_cache_slots: int = 1):
        draft = dict(draft or {})
        self.model_name = model_name
        self.max_request_bytes = max_request_bytes
        self.access_log = access_log
        self.created = int(time.time())
        self.defaults = dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, num_draft_tokens=num_draft_tokens,
                             draft=draft_by_default and bool(draft))
        self.worker = Worker(model, tokenizer, draft, max_context=max_context or model_context(model),
                             max_tokens=max_tokens, log=log, prompt_cache=prompt_cache,
                             prompt_cache_slots=prompt_cache_slots)
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family  # IPv6 hosts (::1) too
        super().__init__(address, Handler)
        self.worker.start()

    def close(self) -> None:
        """Stop serving and join the worker: an MLX thread still running at interpreter exit aborts the process."""
        self.shutdown()
        self.server_close()
        self.worker.stop()
        self.worker.join(timeout=60)

    # -- response bodies (OpenAI schema + "speculative")
    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mlx_spec"}

    def new_id(self, req: GenerationRequest) -> str:
        return ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex

    @staticmethod
    def usage(result: JobResult) -> dict:
        return {"usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "total_tokens": result.prompt_tokens + result.completion_tokens,
                          "prompt_tokens_details": {"cached_tokens": result.cached_tokens}},
                "speculative": result.speculative}

    def response(self, req: GenerationRequest, text: str, result: JobResult) -> dict:
        if req.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": result.finish_reason}
        body = {"id": self.new_id(req), "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice]}
        body.update(self.usage(result))
        return body

    def chunk(self, req: GenerationRequest, ident: str, created: int, delta, finish_reason=None) -> dict:
        if req.kind == "chat":
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": ident, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
                "created": created, "model": self.model_name, "choices": [choice]}


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.server", description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this "
                   "machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"completion length when a request does not say (default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--max-context", type=int, default=None,
                   help="most prompt + completion tokens per request (default: the model's max_position_embeddings)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default: {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="default temperature (requests override)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--quiet", action="store_true", help="no per-request log lines on stderr")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="prefill every request from scratch (default: keep the last request's K/V and prefill "
                   "only what a follow-up adds; the output is the same)")
    p.add_argument("--prompt-cache-slots", type=int, default=1,
                   help="conversations whose K/V are kept at once, least recently used dropped first (default: 1; "
                   "each holds up to a context's worth of K/V)")
    return p


def main_args(args) -> int:
    check_sampling_args(args)
    check_length_args(args)
    if args.max_request_bytes < 1:
        raise MlxSpecError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.prompt_cache_slots < 1:
        raise MlxSpecError(f"--prompt-cache-slots must be >= 1, got {args.prompt_cache_slots}")
    if not 0 <= args.port <= 65535:
        raise MlxSpecError(f"--port must be between 0 and 65535, got {args.port}")
    # load the proposer even with --no-draft, so that requests can turn drafting on
    model, tokenizer, draft = load_models(argparse.Namespace(**{**vars(args), "no_draft": False}))
    log = None if args.quiet else sys.stderr
    try:
        server = Server(model, tokenizer, draft, host=args.host, port=args.port, model_name=args.model,
                        max_tokens=args.max_tokens, max_context=args.max_context,
                        max_request_bytes=args.max_request_bytes, num_draft_tokens=args.num_draft_tokens,
                        draft_by_default=not args.no_draft, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                        min_p=args.min_p, log=log, access_log=log, prompt_cache=not args.no_prompt_cache,
                        prompt_cache_slots=args.prompt_cache_slots)
    except OSError as e:
        raise MlxSpecError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port "
                           "or --host") from e
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    proposer = server.worker.proposer
    drafting = f"{proposer}, k={args.num_draft_tokens}" + (" (off by default)" if args.no_draft else "") \
        if proposer else "off"
    print(f"mlx_spec.server: {args.model} on http://{host}:{port}/v1 (drafting: {drafting})", file=sys.stderr,
          flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine; the server has no authentication", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: finish as on Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.close()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

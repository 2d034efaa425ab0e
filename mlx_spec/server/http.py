"""HTTP: standard-library handler threads parse and validate requests, queue them for the worker, and write
out what it produces (JSON, or server-sent events when streaming); a client that goes away cancels its
request, queued or running. `Server` is the HTTP server plus the worker.
"""

import json
import queue
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from ..cli import DEFAULT_MAX_TOKENS, DEFAULT_NUM_DRAFT_TOKENS
from ..models.base import context_length
from ..proposers.base import Proposer
from ..sampling import SamplingParams
from ..tuning.tuner import AutoTuner
from .requests import GenerationRequest, RequestDefaults, RequestError, parse_request
from .worker import Job, JobResult, Worker, _log

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
POLL_S = 0.05  # how often a waiting handler checks that its client is still there
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body, so the client sees the 413


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

    def __init__(self, model, tokenizer, proposer: Optional[Proposer] = None, *, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, model_name: str = "default", max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_context: Optional[int] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 num_draft_tokens=DEFAULT_NUM_DRAFT_TOKENS, draft_by_default: bool = True,
                 sampling: SamplingParams = SamplingParams(), log=None, access_log=None, prompt_cache: bool = True,
                 prompt_cache_slots: int = 1, tuner: Optional[AutoTuner] = None, strict: bool = False):
        self.model_name = model_name
        self.max_request_bytes = max_request_bytes
        self.access_log = access_log
        self.created = int(time.time())
        self.defaults = RequestDefaults(sampling.validate(), draft_by_default and proposer is not None,
                                        num_draft_tokens)
        self.worker = Worker(model, tokenizer, proposer, max_context=max_context or context_length(model),
                             max_tokens=max_tokens, log=log, prompt_cache=prompt_cache,
                             prompt_cache_slots=prompt_cache_slots, tuner=tuner, strict=strict)
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

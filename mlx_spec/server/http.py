"""HTTP: standard-library handler threads parse and validate requests, queue them for the worker, and write
out what it produces (JSON, or server-sent events when streaming); a client that goes away cancels its
request, queued or running. `Server` is the HTTP server plus the worker.

What a client cannot do: hold a connection without sending its request (each read waits at most
--request-timeout, and the whole request must arrive within it: a 408 or a closed connection), hold more
than --max-connections at once (connections.py: beyond them a 503 with Retry-After), or make the server
fail on malformed JSON (too deep, too long a number: a 400), or frame a body two ways (a repeated
Content-Length, a Transfer-Encoding: 400 or 501 and the connection closed, so nothing is smuggled behind a
proxy). Every error, the standard library's own included, has a JSON body.
"""

import json
import queue
import re
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from ..cache import KVQuant
from ..cli import DEFAULT_MAX_TOKENS, DEFAULT_NUM_DRAFT_TOKENS
from ..models.base import context_length
from ..proposers.base import Proposer
from ..sampling import SamplingParams
from ..tuning.tuner import AutoTuner
from .connections import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT, ConnectionGuard
from .requests import GenerationRequest, RequestDefaults, RequestError, parse_request
from ..batch.scheduler import DEFAULT_DECODE_CONCURRENCY, DEFAULT_PROMPT_CONCURRENCY
from .worker import Job, JobResult, TokenLogprob, Worker, _log

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
POLL_S = 0.05  # how often a waiting handler checks that its client is still there
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body, so the client sees the 413
_DIGITS = re.compile(r"[0-9]+")  # a Content-Length (RFC 9110: 1*DIGIT; int() would also take "+5", "1_0", "²")


class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    server_version = "mlx_spec"

    def log_message(self, format, *args):
        if self.server.access_log is not None:
            _log(self.server.access_log, f"{self.address_string()} - {format % args}")

    def setup(self):
        self.timeout = self.server.request_timeout  # StreamRequestHandler sets it on the socket: every read and write
        super().setup()

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

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (414, 431, 501, 505, a malformed request line) in our JSON,
        like every other error, with a status line even when the line's version was unreadable (HTTP/0.9 has
        none); the connection is closed (what follows cannot be trusted to be a request)."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        short = self.responses.get(code, ("Error",))[0]
        message = (message or short)[:200]  # it may quote the client's request line
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        data = json.dumps(RequestError(message, status=code).body()).encode()
        self.send_response(code, short)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _client_gone(self) -> bool:
        """The client closed its end (readable with nothing to read), checked without blocking. Polled first:
        on a socket with a timeout, recv waits for data however it is flagged."""
        try:
            if hasattr(select, "poll"):  # no fd-number limit, unlike select
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                readable = bool(poller.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            return readable and self.connection.recv(1, socket.MSG_PEEK) == b""
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
    def _late(self) -> bool:
        """This request took --request-timeout to arrive (the deadline cut it off, or it is about to)."""
        return time.monotonic() - self._started >= self.server.request_timeout - POLL_S

    def _timed_out(self, what: str) -> RequestError:
        self.close_connection = True
        return RequestError(f"{what} did not arrive within {self.server.request_timeout:g} s (--request-timeout)",
                            status=408)

    def parse_request(self):
        if self._late():  # the deadline cut the request line off: answer as HTTP/1.0 (a cut line has no version)
            self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
            self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")[:200]
            self._send_error(self._timed_out("the request"))
            return False
        return super().parse_request()

    def do_GET(self):
        self.server.request_arrived(self.connection)
        if self._late():  # its headers were cut off at the deadline
            self._send_error(self._timed_out("the request"))
            return
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self.server.model_card()]})
        elif path.startswith("/v1/models/") and path[len("/v1/models/"):] == self.server.model_name:
            self._send_json(200, self.server.model_card())
        elif path == "/health":
            worker = self.server.worker
            self._send_json(200, {"status": "ok", "running": worker.running, "waiting": worker.waiting,
                                  "decode_concurrency": worker.scheduler.decode_concurrency})
        else:
            self._send_error(RequestError(f"no such endpoint: GET {path}", status=404))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        kind = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text",
                "/completions": "text"}.get(path)
        if kind is None:
            self.server.request_arrived(self.connection)
            self._send_error(RequestError(f"no such endpoint: POST {path}", status=404))
            return
        try:
            if self._late():
                raise self._timed_out("the request")
            body = self._read_json()
            req = parse_request(body, kind, self.server.defaults)
        except RequestError as e:
            self._send_error(e)
            return
        finally:
            self.server.request_arrived(self.connection)
        self._generate(req)

    def _read_json(self):
        length = self._content_length()
        limit = self.server.max_request_bytes
        if length > limit:
            self.close_connection = True
            self._send_error(RequestError(f"the request body is {length} bytes; this server accepts at most {limit} "
                                          "(--max-request-bytes)", status=413))
            self._drain(length)
            raise _AlreadyAnswered
        try:
            raw = self.rfile.read(length)
        except (TimeoutError, ConnectionError):
            raw = b""
        if len(raw) < length:  # the client stopped sending, or --request-timeout ran out
            self.close_connection = True
            if self._late():
                raise self._timed_out(f"the request body ({len(raw)} of {length} bytes, Content-Length)")
            raise RequestError(f"the request body ended at {len(raw)} of {length} bytes (Content-Length)")
        try:
            return json.loads(raw)
        except RecursionError:
            raise RequestError("the request body is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a number over Python's digit limit
            raise RequestError(f"the request body is not valid JSON: {str(e)[:200]}") from None

    def _content_length(self) -> int:
        """The body's length from its one Content-Length header. Framing a proxy could read otherwise is
        refused and the connection closed (RFC 9112 6.3: request smuggling): a repeated Content-Length, even
        with the same value, and any Transfer-Encoding (501: bodies here have a Content-Length)."""
        values = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None:
            self._refuse_framing(RequestError("Transfer-Encoding is not supported; send the body with one "
                                              "Content-Length header", status=501), values)
        if len(values) > 1:
            self._refuse_framing(RequestError(f"{len(values)} Content-Length headers; send exactly one"), values)
        if not values:
            raise RequestError("a Content-Length header is required", status=411)
        if not _DIGITS.fullmatch(values[0].strip()):
            self.close_connection = True
            raise RequestError(f"invalid Content-Length header: {values[0][:40]!r}")
        return int(values[0])

    def _refuse_framing(self, e: RequestError, lengths: List[str]) -> None:
        """Answer `e`, read (and drop) what the client may have sent as the body, and close."""
        self.close_connection = True
        self._send_error(e)
        self._drain(max((int(v) for v in lengths if _DIGITS.fullmatch(v.strip())), default=0))
        raise _AlreadyAnswered

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
        self._started = time.monotonic()
        self.server.request_expected(self.connection)  # the whole request must arrive within --request-timeout
        try:
            super().handle_one_request()
        except _AlreadyAnswered:
            self.close_connection = True
        except OSError:  # BrokenPipe, ConnectionReset, a write that timed out: nobody to answer
            self.close_connection = True
        finally:
            self.server.request_arrived(self.connection)

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
        text, logprobs = [], []
        while True:
            kind, value = self._next_event(job)
            if kind == "text":
                text.append(value)
            elif kind == "logprobs":
                logprobs += value
            elif kind == "error":
                self._send_error(value)
                return
            elif kind == "done":
                self._send_json(200, self.server.response(req, "".join(text), value, logprobs))
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
            if kind in ("text", "logprobs"):
                pieces, logprobs = [], []
                while True:  # a verify round emits several tokens at once: send them as one chunk
                    if kind == "text":
                        pieces.append(value)
                    elif kind == "logprobs":  # the text event that releases these tokens comes right after
                        logprobs += value
                        kind, value = self._next_event(job)
                        continue
                    else:
                        pending = (kind, value)
                        break
                    try:
                        kind, value = job.events.get_nowait()
                    except queue.Empty:
                        break
                text = "".join(pieces)
                if not text and not logprobs:
                    continue
                self._sse(srv.chunk(req, ident, created, {"content": text} if req.kind == "chat" else text,
                                    logprobs=srv.logprobs(req, logprobs)))
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


class Server(ConnectionGuard, ThreadingHTTPServer):
    """The HTTP server plus the generation worker; `serve_forever()` in any thread, `close()` to stop."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, model, tokenizer, proposer: Optional[Proposer] = None, *, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT, model_name: str = "default", max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_context: Optional[int] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 num_draft_tokens=DEFAULT_NUM_DRAFT_TOKENS, draft_by_default: bool = True,
                 sampling: SamplingParams = SamplingParams(), log=None, access_log=None, prompt_cache: bool = True,
                 prompt_cache_slots: int = 1, tuner: Optional[AutoTuner] = None, strict: bool = False,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 kv: Optional[KVQuant] = None, session: Optional[tuple] = None,
                 decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY,
                 prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY, lockstep=None, tree_nodes=0):
        """`lockstep`: the model is split over ranks (distributed/serving.py): rank 0's worker tells the other
        ranks each step what to run. `tree_nodes`: a request's default (its own "tree_nodes" overrides it)."""
        self.guard_connections(request_timeout, max_connections)
        self.model_name = model_name
        self.max_request_bytes = max_request_bytes
        self.access_log = access_log
        self.created = int(time.time())
        self.defaults = RequestDefaults(sampling.validate(), draft_by_default and proposer is not None,
                                        num_draft_tokens, tree_nodes)
        self.worker = Worker(model, tokenizer, proposer, max_context=max_context or context_length(model),
                             max_tokens=max_tokens, log=log, prompt_cache=prompt_cache,
                             prompt_cache_slots=prompt_cache_slots, tuner=tuner, strict=strict, kv=kv,
                             session=session, decode_concurrency=decode_concurrency,
                             prompt_concurrency=prompt_concurrency, lockstep=lockstep)
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.address_family = family  # IPv6 hosts (::1) too
        super().__init__(address, Handler)
        self.worker.start()

    def close(self) -> None:
        """Stop serving and join the worker: an MLX thread still running at interpreter exit aborts the process."""
        self.shutdown()
        self.server_close()
        self.close_refused()
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

    def response(self, req: GenerationRequest, text: str, result: JobResult,
                 logprobs: Optional[List[TokenLogprob]] = None) -> dict:
        lp = self.logprobs(req, logprobs or [])
        if req.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": result.finish_reason}
        body = {"id": self.new_id(req), "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice]}
        body.update(self.usage(result))
        return body

    def chunk(self, req: GenerationRequest, ident: str, created: int, delta, finish_reason=None,
              logprobs: Optional[dict] = None) -> dict:
        if req.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"id": ident, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
                "created": created, "model": self.model_name, "choices": [choice]}

    @staticmethod
    def logprobs(req: GenerationRequest, tokens: List[TokenLogprob]) -> Optional[dict]:
        """OpenAI's logprobs object for these tokens (None when the request did not ask): chat's
        {"content": [...]}, or the completions API's parallel lists."""
        if req.logprobs is None:
            return None
        if req.kind == "chat":
            return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                                 "top_logprobs": [{"token": s, "logprob": v, "bytes": b} for s, b, v in t.top]}
                                for t in tokens]}
        return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{s: v for s, _, v in t.top} for t in tokens],
                "text_offset": [t.offset for t in tokens]}

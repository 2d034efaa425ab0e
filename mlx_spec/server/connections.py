"""Connections: a bounded number served at once, each with a deadline for its request.

`ConnectionGuard` is mixed into a socketserver.ThreadingMixIn server: at most `max_connections` handler
threads; a connection beyond them gets a 503 with Retry-After from the accepting thread itself (a
non-blocking send of a small response: never a thread, never a wait) and is closed a second later, once the
client could read it. A handler marks when it starts waiting for a request (`request_expected`) and when
the request has arrived (`request_arrived`); `service_actions`, which serve_forever calls between accepts,
stops reading a connection whose request is late, so its handler sees the end of its input and answers
408 or closes. The per-read socket timeout alone would let a client dribble a byte per timeout forever.

Knows sockets and deadlines; of HTTP only the 503 it writes.
"""

import json
import socket
import threading
import time
from collections import deque

from .requests import RequestError

DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds for a request to arrive, and for each write to a client to go out
DEFAULT_MAX_CONNECTIONS = 64
RETRY_AFTER_S = 1  # what a 503 (connection limit) tells the client
REFUSED_LINGER_S = 1.0  # a refused connection stays open this long, so the client can read its 503
MAX_LINGERING = 256  # refused connections held at once for that; beyond, the oldest is closed at once


class ConnectionGuard:
    """Mixin for a ThreadingMixIn server; call `guard_connections` in __init__ and `close_refused` on close."""

    request_queue_size = 128  # the listen backlog: connections past the limit still reach their 503

    def guard_connections(self, request_timeout: float, max_connections: int) -> None:
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0, got {request_timeout}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.request_timeout, self.max_connections = request_timeout, max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._deadlines = {}  # socket -> when its request must have arrived
        self._lingering: deque = deque()  # (close at, socket) of refused connections
        self.refused = 0  # connections answered 503 (tests and logs read it)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # a handler thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, sock) -> None:
        """503 on the accepting thread: never blocks (non-blocking send of a small response), and the socket
        is closed by service_actions once the client had time to read it."""
        body = json.dumps(RequestError(f"the server is at its limit of {self.max_connections} connections "
                                       "(--max-connections); retry shortly", status=503).body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {RETRY_AFTER_S}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.refused += 1
        try:
            sock.setblocking(False)
            sock.send(head + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._lingering.append((time.monotonic() + REFUSED_LINGER_S, sock))
        self._close_lingering()

    def close_refused(self) -> None:
        """Close every refused connection still lingering (the server is stopping)."""
        self._close_lingering(everything=True)

    def _close_lingering(self, everything: bool = False) -> None:
        now = time.monotonic()
        while self._lingering and (everything or self._lingering[0][0] <= now or len(self._lingering) > MAX_LINGERING):
            _, sock = self._lingering.popleft()
            try:  # read what the client sent (bounded), so closing sends FIN, not a reset that may eat the 503
                for _ in range(16):
                    if not sock.recv(1 << 16):
                        break
            except OSError:
                pass
            sock.close()

    def request_expected(self, sock) -> None:
        with self._lock:
            self._deadlines[sock] = time.monotonic() + self.request_timeout

    def request_arrived(self, sock) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def service_actions(self) -> None:
        """Called by serve_forever between accepts (every poll interval): connections whose request did not
        arrive in time stop being read (their handler sees the end of the input and answers 408 or closes),
        and refused connections are closed."""
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, deadline in self._deadlines.items() if deadline <= now]
            for sock in late:
                del self._deadlines[sock]
        for sock in late:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        self._close_lingering()

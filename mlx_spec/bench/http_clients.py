"""The check through a real server: `python -m mlx_spec.server` in its own process, and the same closed-loop
clients (clients.py) on threads here, each streaming /v1/completions with http.client.

What a client sees is text in chunks (a verify round's tokens come as one chunk), so an Answer here has
chunk arrival times, the text, and the token count and speculative statistics from the last chunk.

Knows the server only through its command line and the OpenAI wire format (no import of mlx_spec.server:
surfaces do not borrow from each other).
"""

import http.client
import json
import re
import subprocess
import sys
import threading
from collections import deque
from typing import List, Optional

from ..errors import MlxSpecError
from ..stats import GenerationStats
from .clients import Answer, Load, clock

READY_TIMEOUT_S = 600  # loading a large model from disk can take minutes
ANSWER_TIMEOUT_S = 3600


class ServerProcess:
    """`mlx_spec.server <argv> --port 0 --quiet` while the block runs; `port` is the one it chose."""

    def __init__(self, argv: List[str]):
        self.argv = [sys.executable, "-m", "mlx_spec.server", *argv, "--host", "127.0.0.1", "--port", "0", "--quiet"]
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.log: deque = deque(maxlen=40)  # its last stderr lines, for an error message

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        timer = threading.Timer(READY_TIMEOUT_S, self.proc.kill)  # a server that never says where it listens
        timer.start()
        try:
            for line in self.proc.stderr:
                self.log.append(line.rstrip())
                found = re.search(r"on http://[^ ]*:(\d+)/v1", line)
                if line.startswith("mlx_spec.server:") and found:
                    self.port = int(found.group(1))
                    break
        finally:
            timer.cancel()
        if not self.port:
            self.proc.wait()
            raise MlxSpecError("the server for --http did not start: " + " | ".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would stall the server
        return self

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def __exit__(self, *exc) -> None:
        self.proc.terminate()  # SIGTERM: the server finishes as on Ctrl-C
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ask(port: int, prompt: int, ids: List[int], body: dict) -> Answer:
    """One streamed completion of token ids `ids`; `body`: the request's other fields."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_TIMEOUT_S)
    answer = Answer(prompt, clock(), text="")
    try:
        conn.request("POST", "/v1/completions", json.dumps({"prompt": list(ids), "stream": True, **body}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise MlxSpecError(f"the server answered {resp.status}: {resp.read()[:300]!r}")
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise MlxSpecError(f"the server failed a request: {chunk['error']}")
            if chunk.get("choices"):
                answer.times.append(clock())
                answer.text += chunk["choices"][0].get("text") or ""
            if "usage" in chunk and chunk.get("choices"):  # the last chunk: usage and speculative
                answer.count = chunk["usage"]["completion_tokens"]
                answer.stats = _stats(chunk.get("speculative") or {})
    finally:
        conn.close()
    return answer


def _stats(spec: dict) -> GenerationStats:
    """The rounds, drafted and accepted counts the server reports (its `speculative` object)."""
    return GenerationStats(rounds=spec.get("rounds", 0), drafted=spec.get("drafted", 0),
                           accepted=spec.get("accepted", 0))


def through_http(port: int, clients: List[List[int]], ids: List[List[int]], body: dict, seed: int) -> Load:
    """The clients on threads, each asking for its prompts in turn (prompt i with seed + i)."""
    answers: List[Answer] = []
    errors: List[BaseException] = []

    def client(prompts: List[int]) -> None:
        try:
            for i in prompts:
                answers.append(ask(port, i, ids[i], {**body, "seed": seed + i}))
        except BaseException as e:  # noqa: BLE001 - raised again on the bench's thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p,), daemon=True) for p in clients]
    start = clock()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return Load(answers, max((a.times[-1] for a in answers if a.times), default=start) - start)

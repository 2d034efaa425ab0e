"""Closed-loop clients for `mlx_spec.bench --concurrency`: C clients, each sending its next prompt as soon as
its previous answer is complete, against the batch scheduler the server runs (in this process) or mlx-lm's
BatchGenerator (the peer, in this process); http_clients.py does the same against a real server.

Every client sends the whole prompt set once, starting at its own prompt (client c: c, c+1, ... mod N), so
the clients have the same work and finish together: aggregate tok/s (all tokens / first request to last
answer) is a rate with C requests in flight, not diluted by a tail with one.

Knows the Scheduler and Engines (the caller builds them) and mlx-lm's BatchGenerator; nothing of text.
"""

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence

from ..batch.scheduler import Scheduler
from ..engine import Engine
from ..errors import MlxSpecError
from ..stats import GenerationStats

clock = time.perf_counter


@dataclass
class Answer:
    """One request as its client saw it: when it was sent, when each token (over HTTP: each streamed chunk)
    arrived, and what came back."""

    prompt: int  # index into the prompt set
    sent: float
    tokens: List[int] = field(default_factory=list)  # ids (none over HTTP: see text)
    times: List[float] = field(default_factory=list)  # arrival of each token or chunk
    count: int = 0  # tokens generated (the end-of-sequence token too: it was computed)
    text: Optional[str] = None  # over HTTP
    stats: Optional[GenerationStats] = None  # rounds, drafted, accepted (not the peer's)
    k_counts: Optional[dict] = None  # auto: how often it chose each k

    @property
    def ttft(self) -> float:
        """Time to first token: from sending to the first token's arrival (queueing and prefill included)."""
        return self.times[0] - self.sent

    @property
    def itl(self) -> Optional[float]:
        """Inter-token latency: the time from the first to the last token over the tokens after the first
        (tokens a round emits together share one arrival; this is their mean spacing as a reader sees it)."""
        return (self.times[-1] - self.times[0]) / (self.count - 1) if self.count > 1 else None


@dataclass
class Load:
    """One closed-loop run: every answer, the wall time from the first request to the last answer, and this
    process's CPU time over the run (None where the work ran in another process: over HTTP)."""

    answers: List[Answer]
    seconds: float
    cpu_seconds: Optional[float] = None
    mean_rows: Optional[float] = None  # rows decoding between the scheduler's steps, on average (ours only)

    @property
    def tokens(self) -> int:
        return sum(a.count for a in self.answers)

    @property
    def tps(self) -> float:
        """Aggregate tokens/s: every client's tokens over the run's wall time."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_tps(self) -> Optional[float]:
        """Every client's tokens per second of this process's CPU time: steadier than wall time on a machine
        shared with other jobs, blind to cores working in parallel and to GPU time."""
        return self.tokens / self.cpu_seconds if self.cpu_seconds else None


def plan(n_prompts: int, clients: int) -> List[List[int]]:
    """Prompt indices per client: each sends all n, client c starting at prompt c (mod n)."""
    return [[(c + j) % n_prompts for j in range(n_prompts)] for c in range(clients)]


def percentile(xs: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0-100), interpolated; None for no values."""
    xs = sorted(xs)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    at = (len(xs) - 1) * q / 100
    lo = int(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


def median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def through_scheduler(model, clients: List[List[int]], make_engine: Callable[[int], Engine],
                      decode_concurrency: int, policy=None) -> Load:
    """Run `clients` (plan()) through a Scheduler as the server's worker runs it: requests that clients send
    are submitted before the next step, the step decodes every running row together. `make_engine(i)`: the
    Engine for prompt i (its caches, proposer fork, policy); `policy`: the batch's round policy (auto)."""
    scheduler = Scheduler(model, decode_concurrency=decode_concurrency, policy=policy)
    todo = [deque(c) for c in clients]
    ready: Deque[int] = deque(range(len(clients)))
    answers: List[Answer] = []
    start, cpu = clock(), time.process_time()

    def send(c: int) -> None:
        i = todo[c].popleft()
        engine = make_engine(i)
        answer = Answer(i, clock())

        def deliver(events, done) -> None:
            now = clock()
            answer.tokens += [e.token for e in events]
            answer.times += [now] * len(events)
            if done is None:
                return
            if done.reason == "error":
                raise MlxSpecError(f"request {i} failed in the batch: {done.error!r}") from done.error
            answer.count, answer.stats = len(answer.tokens), engine.stats
            summary = getattr(engine.policy, "summary", None)
            answer.k_counts = (summary() or {}).get("k_counts") if summary else None
            answers.append(answer)
            if todo[c]:
                ready.append(c)  # sends its next prompt when this answer is complete

        scheduler.submit(engine, deliver)

    rows = []
    while ready or not scheduler.idle:
        while ready:
            send(ready.popleft())
        scheduler.step()
        rows.append(scheduler.running)
    return Load(answers, clock() - start, time.process_time() - cpu, sum(rows) / max(1, len(rows)))


def through_mlx_lm(peer, clients: List[List[int]], ids: List[List[int]], max_tokens: int, eos_ids,
                   sampler=None) -> Load:
    """The same clients through mlx-lm's BatchGenerator (continuous batching, what its `batch_generate` and
    server run) on mlx-lm's own model `peer`: up to len(clients) rows decode together, new prompts prefill
    in batches between its steps."""
    from mlx_lm.generate import BatchGenerator

    width = len(clients)
    gen = BatchGenerator(peer, max_tokens=max_tokens, stop_tokens=[[t] for t in eos_ids], sampler=sampler,
                         completion_batch_size=width, prefill_batch_size=width)
    todo = [deque(c) for c in clients]
    live = {}  # uid -> (client, answer)
    answers: List[Answer] = []
    start, cpu = clock(), time.process_time()

    def send(c: int) -> None:
        i = todo[c].popleft()
        answer = Answer(i, clock())
        live[gen.insert([list(ids[i])], [max_tokens])[0]] = (c, answer)

    try:
        for c in range(width):
            send(c)
        while live:
            _, responses = gen.next()
            now = clock()
            for r in responses:
                c, answer = live[r.uid]
                answer.tokens.append(int(r.token))
                answer.times.append(now)
                if r.finish_reason is not None:
                    del live[r.uid]
                    answer.count = len(answer.tokens)
                    answers.append(answer)
                    if todo[c]:
                        send(c)
    finally:
        gen.close()
    return Load(answers, clock() - start, time.process_time() - cpu)

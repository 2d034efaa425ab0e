"""Continuous batching: requests join between rounds, prefill in chunks interleaved with the others'
rounds, and leave when they finish, are cancelled, or fail.

`submit(engine, deliver)` queues a request whose Engine (engine.py) was built by the caller with its own
caches (a prompt-cache slot's), proposer, policy and sampler. Each `step()`:
  1. rows whose request was cancelled leave (their caches hold what they emitted);
  2. up to `prompt_concurrency` waiting requests run one prefill chunk each (so a long prompt delays the
     running rows by at most one chunk per round); a request whose prefill is done emits its first token
     and joins the batch when there is room (`decode_concurrency` rows);
  3. the batch runs one round for all its rows.
Every event goes to its request's `deliver(events, finished)`, in order; `finished` is None while the
request runs, then a `Done` saying how it ended.

Draft lengths: the scheduler owns the batch's `RoundPolicy` when it is given one (tuning.BatchDraftPolicy:
each round's k for every auto row, for aggregate tokens/s at the batch's width); without one each row asks
its own policy.

K/V quantization (--kv-bits with --quantized-kv-start N): rows whose caches are still full precision and
rows already quantized cannot share a buffer, so they decode in two batches (one base pass each); a row
moves across when it reaches N positions (its rounds are cut to end exactly there, so no pass straddles
the switch, which is what a one-row engine's split pass computes).

Knows Engines and Batches; nothing of text, HTTP, prompt caches or threads (the caller owns the thread).
"""

from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional
from collections import deque

from ..engine import Engine, TokenEvent
from .engine import Batch, Row, RoundPolicy

DEFAULT_DECODE_CONCURRENCY = 8  # mlx-lm's server flag default
DEFAULT_PROMPT_CONCURRENCY = 1


@dataclass
class Done:
    """How a request ended: "stop" / "length" (the last token's finish reason), "cancelled" (stopped by the
    caller: its caches hold what it emitted), or "error" (`error` set; its caches may be half-updated, so
    the caller must not keep them)."""

    reason: str
    error: Optional[BaseException] = None


Deliver = Callable[[List[TokenEvent], Optional[Done]], None]


@dataclass(eq=False)
class Ticket:
    """A submitted request. `cancel()` from any thread: it leaves at the next step."""

    engine: Engine
    deliver: Deliver
    cancelled: bool = False
    row: Optional[Row] = None
    prefilled: bool = False  # its first token is out; it waits for room in the batch
    _begin: Optional[object] = None  # the engine's prefill generator while it prefills
    _hidden: Optional[object] = None  # the base's hidden at the last prompt position, for its first round

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, model, *, decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY,
                 prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY, memory_budget: Optional[int] = None,
                 row_bytes: Optional[Callable[[Engine], int]] = None, policy: Optional[RoundPolicy] = None):
        """`memory_budget` (bytes) with `row_bytes(engine)` (what a request's K/V take at its longest): a
        request starts only while the requests started so far, with it, fit the budget (it waits in the queue
        otherwise); one request alone always starts. `policy`: chooses each round's draft lengths for the
        batch (tuning/batch_policy.py); None: every row's own policy."""
        if decode_concurrency < 1 or prompt_concurrency < 1:
            raise ValueError("decode_concurrency and prompt_concurrency must be >= 1")
        self.model, self.policy = model, policy
        self.decode_concurrency, self.prompt_concurrency = decode_concurrency, prompt_concurrency
        self.memory_budget, self.row_bytes = memory_budget, row_bytes
        self.committed: Dict[int, int] = {}  # id(ticket) -> its bytes, from its prefill until it ends
        self.waiting: Deque[Ticket] = deque()  # not yet prefilled, or prefilled and waiting for a row
        self.batches: Dict[bool, Batch] = {}  # keyed by whether the rows' K/V are quantized
        self.tickets: Dict[int, Ticket] = {}  # id(row) -> ticket

    # -- what callers see
    def submit(self, engine: Engine, deliver: Deliver) -> Ticket:
        ticket = Ticket(engine, deliver)
        self.waiting.append(ticket)
        return ticket

    @property
    def running(self) -> int:
        """Rows decoding now."""
        return sum(len(b) for b in self.batches.values())

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self) -> None:
        """One scheduling iteration (see the module docstring)."""
        self._leave_cancelled()
        self._prefill()
        for quantized in list(self.batches):
            self._round(quantized)

    def drain(self) -> None:
        """Step until every submitted request has ended."""
        while not self.idle:
            self.step()

    # -- steps
    def _leave_cancelled(self) -> None:
        for t in [t for t in self.waiting if t.cancelled]:
            self.waiting.remove(t)
            if t._begin is not None:
                t._begin.close()
            self._end(t, [], Done("cancelled"))
        for batch in self.batches.values():
            for row in [r for r in batch.rows if self.tickets[id(r)].cancelled]:
                self._leave(batch, row, Done("cancelled"))

    def _prefill(self) -> None:
        """Prefilled requests join while there is room; up to prompt_concurrency others run a chunk each.
        Requests start in arrival order: one that must wait for memory holds back those behind it (no
        starving a long request with short ones)."""
        budget, blocked = self.prompt_concurrency, False
        for t in list(self.waiting):
            if t.prefilled:
                if self.running < self.decode_concurrency:
                    self.waiting.remove(t)
                    self._join(t)
                continue
            if budget == 0 or blocked and t._begin is None:
                continue
            if self._prefill_chunk(t):
                budget -= 1
            else:
                blocked = True

    def _prefill_chunk(self, t: Ticket) -> bool:
        """Run t's next prefill chunk; False when t must wait (memory) and used no budget."""
        if t._begin is None:
            if t.engine.max_tokens <= 0:
                self.waiting.remove(t)
                self._end(t, [], Done("length"))
                return True
            if not self._admit(t):
                return False
            t._begin = t.engine.begin()
        try:
            next(t._begin)
            return True  # one chunk done; more to come
        except StopIteration as done:
            started = done.value
        except Exception as e:  # noqa: BLE001 - one request's failure is its own
            self.waiting.remove(t)
            self._end(t, [], Done("error", e))
            return True
        t._begin = None
        if started is None:  # its should_stop ended it during the prefill
            self.waiting.remove(t)
            self._end(t, [], Done("cancelled"))
            return True
        event, hidden, _ = started
        if event.finish_reason:
            self.waiting.remove(t)
            self._end(t, [event], Done(event.finish_reason))
            return True
        t.deliver([event], None)
        t.prefilled, t._hidden = True, hidden
        if self.running < self.decode_concurrency:
            self.waiting.remove(t)
            self._join(t)
        return True

    def _admit(self, t: Ticket) -> bool:
        """Whether t may start now under the memory budget (and reserve its bytes if so)."""
        need = self.row_bytes(t.engine) if self.row_bytes is not None else 0
        if self.memory_budget is not None and self.committed and sum(self.committed.values()) + need > self.memory_budget:
            return False
        self.committed[id(t)] = need
        return True

    def _end(self, t: Ticket, events: List[TokenEvent], done: Done) -> None:
        self.committed.pop(id(t), None)
        t.deliver(events, done)

    def _join(self, t: Ticket) -> None:
        quantized = _quantized(t.engine.cache)
        batch = self.batches.setdefault(quantized, Batch(self.model, self.policy))
        t.row = batch.add(t.engine, t._hidden)
        t._hidden = None
        self.tickets[id(t.row)] = t

    def _round(self, quantized: bool) -> None:
        batch = self.batches[quantized]
        if not batch.rows:
            del self.batches[quantized]
            return
        try:
            results = batch.round()
        except Exception as e:  # noqa: BLE001 - the batch's caches are torn: every row ends with the error
            for row in list(batch.rows):
                self._end(self.tickets.pop(id(row)), [], Done("error", e))
            del self.batches[quantized]
            return
        for row, events in results:
            t = self.tickets[id(row)]
            if row.finished:
                self._leave(batch, row, Done(events[-1].finish_reason), events)
            else:
                t.deliver(events, None)
        if not quantized:
            for row in [r for r in batch.rows if _reached_kv_start(r)]:
                self._cross(batch, row)

    def _leave(self, batch: Batch, row: Row, done: Done, events: Optional[List[TokenEvent]] = None) -> None:
        batch.remove(row)
        self._end(self.tickets.pop(id(row)), events or [], done)

    def _cross(self, batch: Batch, row: Row) -> None:
        """A full-precision row reached --quantized-kv-start: its K/V are quantized and it moves batches."""
        t = self.tickets.pop(id(row))
        t._hidden = row.hidden
        batch.remove(row)
        for c in t.engine.cache:
            c._quantize_buffers()
        self._join(t)


def _quantized(caches: list) -> bool:
    return bool(caches) and bool(getattr(caches[0], "quantized", False))


def _reached_kv_start(row: Row) -> bool:
    """Whether a full-precision row's caches hold --quantized-kv-start positions (its next pass would
    quantize them)."""
    kv = row.engine.kv
    return kv is not None and row.position >= kv.start

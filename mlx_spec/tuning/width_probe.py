"""Timing probe by width: what a batched round of B rows costs on this machine, in plain batched steps.

Runs real `Batch.round()`s (batch/engine.py: rows-caches, per-row verify, the round's host sync and
bookkeeping) on B synthetic rows (random prompts of DEFAULT_PROBE_CONTEXT tokens, greedy), interleaved
over a few passes after one warm-up pass (compilation at this width):
    plain rounds (no drafts): the unit;
    rounds whose rows carry k canned drafts (random tokens, no drafter): verify[k];
    rounds drafted by the real proposer, its drafting timed inside the round (evaluated on its own): the
    drafter's cost for all rows at once (an MTP drafter's `propose_rows`) or per row.
Kept: the fastest of each kind's timings over the passes (a pass's plain reading is the median of its
plain rounds, so every kind is a best of as many readings), as ratios to the plain one (WidthCosts).
Other work on the machine only adds time, and one busy moment during the few plain rounds would otherwise
make every verify look cheap (the policy re-times rounds as it runs them, which corrects what is left).
What it costs: PLAIN_ROUNDS + the verify and draft lengths probed, in rounds per pass; 1 + WIDTH_PROBE_REPS
passes (stopped after WIDTH_PROBE_BUDGET_S once MIN_PROBE_REPS are in); B prefills of the synthetic prompt.

Knows the Batch, the Engine and the Proposer protocol; nothing of files or policies.
"""

import time
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np

from ..batch.engine import Batch
from ..cache import KVQuant
from ..draft_policy import FixedK
from ..engine import Engine
from ..models.base import vocab_size
from ..proposers.base import Draft
from ..request import Request
from .batch_costs import WidthCosts
from .costs import K_MAX, fit_line, isotonic
from .probe import DEFAULT_PROBE_CONTEXT, MIN_PROBE_REPS, PROBE_DRAFT_KS, PROBE_VERIFY_KS

WIDTH_PROBE_REPS = 3  # timed passes (plus the warm-up); the fastest of each kind is kept
WIDTH_PROBE_BUDGET_S = 2.0  # no more passes once this much time has gone and MIN_PROBE_REPS are in
PLAIN_ROUNDS = 3  # plain rounds per pass (the unit: timed most)


class _Canned:
    """A row's proposer for the probe: canned random drafts (`canned` True: a verify without a drafter's
    cost) or the real proposer's, its drafting timed into `seconds`. Everything else is the real one's (a
    block drafter's context is fed and rolled back as in a real round)."""

    def __init__(self, real, pool: mx.array, clock: Callable[[], float]):
        self.real, self.pool, self.clock, self.canned, self.seconds = real, pool, clock, True, 0.0

    def __getattr__(self, name):
        if name.startswith("propose"):  # only _CannedRows drafts rows together
            raise AttributeError(name)
        return getattr(self.real, name)

    def propose(self, ctx, k: int) -> Draft:
        if self.canned:
            return Draft(self.pool[:k])
        return self._timed(lambda: self.real.propose(ctx, k))

    def observe(self, result) -> None:
        if not self.canned:  # canned drafts were not the real proposer's (a draft model catches up next time)
            self.real.observe(result)

    def _timed(self, call):
        start = self.clock()
        out = call()
        mx.eval([d.tokens for d in (out if isinstance(out, list) else [out])])
        self.seconds += self.clock() - start
        return out


class _CannedRows(_Canned):
    """The same for a proposer that drafts all its rows in one pass per step."""

    def propose_rows(self, ctxs, ks, caches, rows):
        if self.canned:
            return [Draft(self.pool[:k]) for k in ks]
        return self._timed(lambda: self.real.propose_rows(ctxs, ks, caches, rows))


def _rows(model, proposer, rows: int, context: int, kv: Optional[KVQuant], seed: int, clock):
    """A Batch of `rows` synthetic greedy rows and their (shared, or per-row) probe proposers."""
    rng = np.random.default_rng(seed)
    vocab = vocab_size(model) or 256
    pool = mx.array(rng.integers(4, vocab, size=2 * K_MAX).tolist(), mx.int32)
    batch, wrappers = Batch(model), {}
    for _ in range(rows):
        prop = None
        if proposer is not None:
            real = proposer.fork()
            if id(real) not in wrappers:
                wrappers[id(real)] = (_CannedRows if hasattr(real, "propose_rows") else _Canned)(real, pool, clock)
            prop = wrappers[id(real)]
        prompt = rng.integers(4, vocab, size=context).tolist()
        engine = Engine(model, Request(prompt, max_tokens=1 << 30, kv=kv), proposer=prop, policy=FixedK(0))
        begin = engine.begin()
        while True:
            try:
                next(begin)
            except StopIteration as done:
                _, hidden, _ = done.value
                break
        batch.add(engine, hidden)
    return batch, list(wrappers.values())


def _round(batch: Batch, k: int, wrappers: List[_Canned], canned: bool, clock) -> float:
    for row in batch.rows:
        row.engine.policy.k = k
    for w in wrappers:
        w.canned, w.seconds = canned, 0.0
    start = clock()
    batch.round()
    return clock() - start


def measure_width(model, proposer, rows: int, *, kv: Optional[KVQuant] = None, k_max: int = K_MAX,
                  context: int = DEFAULT_PROBE_CONTEXT, reps: int = WIDTH_PROBE_REPS,
                  budget_s: float = WIDTH_PROBE_BUDGET_S, seed: int = 0,
                  clock: Callable[[], float] = time.perf_counter) -> WidthCosts:
    """Time plain, canned-draft and drafted rounds of `rows` synthetic rows (see the module docstring).
    `kv`: quantized K/V rows (measured quantized from the start). Without a proposer the draft cost is 0."""
    if kv is not None:
        kv = KVQuant(kv.bits, kv.group_size, 0)
    batch, wrappers = _rows(model, proposer, rows, context, kv, seed, clock)
    verify_ks = sorted({k for k in PROBE_VERIFY_KS if 0 < k <= k_max} | {k_max})
    draft_ks = [k for k in PROBE_DRAFT_KS if k <= k_max] if wrappers else []
    plain: List[float] = []
    verify = {k: [] for k in verify_ks}
    draft = {k: [] for k in draft_ks}
    started = time.perf_counter()
    for rep in range(reps + 1):  # pass 0 warms up (compiles at this width) and is not timed
        if rep > min(MIN_PROBE_REPS, reps) and time.perf_counter() - started > budget_s:
            break
        p = [_round(batch, 0, wrappers, True, clock) for _ in range(PLAIN_ROUNDS)]
        v = {k: _round(batch, k, wrappers, True, clock) for k in verify_ks}
        d = {}
        for k in draft_ks:
            _round(batch, k, wrappers, False, clock)
            d[k] = sum(w.seconds for w in wrappers)
        if rep:  # one plain reading per pass, as for each verify length: best-of-n over as many readings
            plain.append(float(np.median(p)))
            for k in verify_ks:
                verify[k].append(v[k])
            for k in draft_ks:
                draft[k].append(d[k])
    step = min(plain)
    measured = [0] + verify_ks
    # a pass with drafts costs at least a plain one: a faster reading is noise (and verify[0] is the unit)
    ratios = [1.0] + [max(1.0, min(verify[k]) / step) for k in verify_ks]
    verify_cost = isotonic(np.interp(range(k_max + 1), measured, ratios).tolist())
    per_row = bool(wrappers) and not isinstance(wrappers[0], _CannedRows)
    fixed, per_step = 0.0, 0.0
    if draft_ks:
        share = rows if per_row else 1  # per-row proposers: the mean row's drafting
        fixed, per_step = fit_line(draft_ks, [min(draft[k]) / share / step for k in draft_ks])
    return WidthCosts(verify_cost, fixed, per_step, per_row, step)

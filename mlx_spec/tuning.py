"""Self-tuning: how many drafts per round pay off on this machine, for this model and this proposer.

The cost model, in DESIGN.md's words. A round drafts k tokens and verifies them in one (k+1)-token base
pass. With α_i the chance that draft i is accepted given drafts 1..i-1 were, it emits on average

    τ(k) = 1 + Σ_{i=1..k} Π_{j≤i} α_j              tokens, and costs
    R(k) = verify[k] + draft[k]                     plain decode steps,

so its expected speedup over plain decoding is S(k) = τ(k) / R(k), and plain decoding is S(0) = 1. The
costs are measured once per machine + MLX version/device + model (+ proposer), by timing the base's
forward on a cache and the proposer's `propose` from outside the engine, and kept in a small JSON file
(`$XDG_CACHE_HOME/mlx_spec/tuning.json`, default `~/.cache/...`). The α_i are estimated while decoding.

`AutoDraftPolicy.next_k()` picks the k that maximises S(k) each round. When no k beats plain decoding
(a drafter that does not agree, a chip where verifying k+1 tokens costs much more than 1), it returns 0,
which the engine treats as "one plain step", and it re-probes with one drafted round after a number of
plain steps that doubles while probes keep failing. What a pair of (model, proposer) has learnt carries
over, down-weighted, to the next request with the same pair.

The file's costs are a starting point, not the truth: the policy also times each round and plain step as
the engine runs them (the time between `next_k()` calls), and while drafting it runs a few plain steps
every CALIBRATE_EVERY rounds to re-time one, so R(k) is scaled by the current measured/modelled ratio of
a round to a plain step (a machine that throttles or was busier when it measured shifts both).

Knows the base forward, the rewindable caches and the Proposer protocol (to time them); knows nothing of
text, and nothing of the engine beyond the `next_k()` / `observe(k, n_accepted)` contract.
"""

import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from . import acceptance
from .cache import rollback_all
from .proposers.base import RoundContext

K_MAX = 8  # the largest k the policy considers (and the probe measures)
CACHE_VERSION = 2  # 2: the compiled draft stepper made drafting cheaper; re-measure
DEFAULT_PROBE_CONTEXT = 64  # tokens in the probe's synthetic context (its prefill is most of a slow probe)
DEFAULT_PROBE_REPS = 5  # interleaved measurement passes (plus one warm-up pass); medians are kept
PROBE_BUDGET_S = 6.0  # ... but no more passes once this much time has gone and MIN_PROBE_REPS are in
MIN_PROBE_REPS = 2  # (a slow model on a CPU: a pass takes seconds; auto re-times rounds while decoding)
PROBE_PLAIN_STEPS = 8  # pipelined plain steps per pass
PROBE_DRAFT_KS = (1, 2, 4, 8)  # draft lengths timed; draft cost is fitted as fixed + per-step
PROBE_VERIFY_KS = (0, 1, 2, 3, 4, 6, 8)  # verify passes timed; k = 5, 7 are interpolated (cost grows smoothly)

PRIOR_ACCEPTANCE = 0.9  # first-draft acceptance assumed before any evidence: optimistic, so drafting is tried
PRIOR_WEIGHT = 1.0  # ... worth this many rounds of evidence
PRIOR_DEPTH_DECAY = 0.95  # an untried position is assumed a little worse than the one before it
FORGET = 0.97  # evidence decays per observation (about 30 rounds of memory), so k follows the content
FORGET_UNTRIED = 0.995  # a position the chosen k does not reach forgets slowly: re-explored every ~100s of rounds
CARRY_WEIGHT = 16.0  # a new request trusts at most this many rounds of an earlier request's evidence
PROBE_WEIGHT = 8.0  # before an auto-off probe, evidence shrinks to this, so one probe can change the verdict
OVERHEAD_SMOOTHING = 0.05  # per observed round, for its measured / modelled time
PLAIN_SMOOTHING = 0.3  # per observed plain step: they are rare while drafting, and each is a fresh reading
CALIBRATE_EVERY = 32  # drafted rounds in a row after which a few plain steps re-measure a plain step here
# ... stretched (doubling per calibration, up to CALIBRATE_MAX_EVERY) while the expected speedup clears 1 by
# a wide margin: the re-timing scales every R(k) alike, so it can change only the draft-or-not verdict, and
# 4 plain steps in 32 rounds cost a drafter at 3.7x (tau 6.3) about 7% of its speed. The interval at
# speedup S is at most CALIBRATE_EVERY * (S - 1) / CALIBRATION_MARGIN: it shrinks back with the margin.
CALIBRATE_MAX_EVERY = 256
CALIBRATION_MARGIN = 0.25
CALIBRATION_STEPS = 4  # ... (the first follows a round, so it is not timed); they cost what plain decoding does
OVERHEAD_MIN, OVERHEAD_MAX = 0.2, 5.0  # wide: machines drift 2.5x (thermal state, a shared VM); smoothing damps outliers
MIN_SPEEDUP = 1.02  # expected speedup needed to draft; a tie goes to plain decoding, which pipelines
FIRST_PROBE_AFTER = 16  # plain tokens before re-probing; doubles while probes fail
MAX_PROBE_AFTER = 512
RESET_BACKOFF_ROUNDS = 16  # drafted rounds in a row after which re-probing starts again from FIRST_PROBE_AFTER


# --- the cost model (pure) -------------------------------------------------------------------------

@dataclass
class Costs:
    """Measured costs in units of one plain decode step (pipelined, as the engine's plain loop runs it).

    verify[k]: one (k+1)-token base pass with its acceptance and host sync, k = 0..K_MAX.
    draft_fixed + draft_step * k: proposing k drafts (0 for k = 0).
    """

    verify: List[float]
    draft_fixed: float = 0.0
    draft_step: float = 0.0
    plain_step_s: float = 0.0  # seconds, for information: the ratios are what transfers between runs

    @property
    def k_max(self) -> int:
        return len(self.verify) - 1

    def draft(self, k: int) -> float:
        return self.draft_fixed + self.draft_step * k if k > 0 else 0.0

    def round_cost(self, k: int) -> float:
        """R(k) in plain steps; R(0) is a plain step (the engine runs k = 0 as plain decoding)."""
        return self.verify[k] + self.draft(k) if k > 0 else 1.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Costs":
        return cls([float(v) for v in d["verify"]], float(d.get("draft_fixed", 0.0)),
                   float(d.get("draft_step", 0.0)), float(d.get("plain_step_s", 0.0)))


def expected_tokens(alphas: Sequence[float], k: int) -> float:
    """τ(k) = 1 + Σ_{i=1..k} Π_{j≤i} α_j for conditional per-position acceptance α."""
    tau, survive = 1.0, 1.0
    for a in alphas[:k]:
        survive *= a
        tau += survive
    return tau


def expected_speedup(alphas: Sequence[float], costs: Costs, k: int, empty_rate: float = 0.0,
                     overhead: float = 1.0) -> float:
    """S(k) = τ(k) / R(k). A proposer that offers nothing in a fraction `empty_rate` of rounds (n-gram
    lookup with no match) gets a 1-token round for the price of a 1-token verify plus its lookup.
    `overhead` scales R(k): measured round time / predicted, as the policy observes it."""
    if k == 0:
        return 1.0
    e = empty_rate
    tokens = e * 1.0 + (1 - e) * expected_tokens(alphas, k)
    cost = costs.draft(k) + e * costs.verify[0] + (1 - e) * costs.verify[k]
    return tokens / (cost * overhead)


def best_k(alphas: Sequence[float], costs: Costs, *, k_max: Optional[int] = None, empty_rate: float = 0.0,
           min_speedup: float = MIN_SPEEDUP, min_k: int = 0, overhead: float = 1.0) -> Tuple[int, float]:
    """(k, S(k)) maximising the expected speedup over k = min_k..k_max; k = 0 unless some k ≥ 1 reaches
    `min_speedup` (only when min_k = 0)."""
    k_max = min(costs.k_max, len(alphas), k_max if k_max is not None else K_MAX)
    scored = [(expected_speedup(alphas, costs, k, empty_rate, overhead), k)
              for k in range(max(1, min_k), k_max + 1)]
    s, k = max(scored) if scored else (1.0, 0)
    if min_k == 0 and s < min_speedup:
        return 0, 1.0
    return k, s


def calibration_interval(interval: int, expected_speedup: float) -> int:
    """Drafted rounds between plain-step re-timings: `interval`, but no longer than the margin of the expected
    speedup over plain decoding allows (CALIBRATE_EVERY when the verdict is close)."""
    by_margin = CALIBRATE_EVERY * max(1.0, (expected_speedup - 1.0) / CALIBRATION_MARGIN)
    return int(min(interval, by_margin, CALIBRATE_MAX_EVERY))


def can_ever_pay(costs: Costs, min_speedup: float = MIN_SPEEDUP) -> bool:
    """Whether some k would beat plain decoding even if every draft were accepted."""
    return any((k + 1) / costs.round_cost(k) >= min_speedup for k in range(1, costs.k_max + 1))


def isotonic(values: Sequence[float]) -> List[float]:
    """Least-squares non-decreasing fit (pool adjacent violators): a (k+1)-token pass costs at least a
    k-token one, so a dip in the measurements is noise."""
    blocks = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(w)]


def fit_line(ks: Sequence[int], values: Sequence[float]) -> Tuple[float, float]:
    """(intercept, slope), both clamped at 0, least squares."""
    if len(ks) < 2:
        return 0.0, max(0.0, values[0] / ks[0]) if ks else 0.0
    slope, intercept = np.polyfit(np.asarray(ks, float), np.asarray(values, float), 1)
    slope = max(0.0, float(slope))
    intercept = max(0.0, float(np.mean(values) - slope * np.mean(ks)))
    return intercept, slope


# --- acceptance estimate and the policy ------------------------------------------------------------

@dataclass
class AcceptanceEstimate:
    """Per-position conditional acceptance with a prior and exponential forgetting.

    Draft i (0-based) is tried in a round when it was drafted and drafts 0..i-1 were accepted; it hits
    when it was accepted. α_i = (hits_i + w·prior_i) / (trials_i + w), where prior_0 is PRIOR_ACCEPTANCE
    and prior_i (i > 0) is α_{i-1} times PRIOR_DEPTH_DECAY.
    """

    k_max: int = K_MAX
    prior: float = PRIOR_ACCEPTANCE
    prior_weight: float = PRIOR_WEIGHT
    trials: List[float] = field(default_factory=list)
    hits: List[float] = field(default_factory=list)
    proposals: float = 0.0  # rounds in which drafts were asked for
    empty: float = 0.0  # ... and none came

    def __post_init__(self):
        self.trials = self.trials or [0.0] * self.k_max
        self.hits = self.hits or [0.0] * self.k_max

    def observe(self, k: int, n: int) -> None:
        """A round asked for drafts; the proposer gave k and the base accepted the first n."""
        self.proposals = self.proposals * FORGET + 1
        self.empty = self.empty * FORGET + (k == 0)
        # A position the round did not reach forgets too, slowly: it drifts back to its prior (the position
        # before it), so a k that looked bad once is tried again much later.
        tried = min(k, n + 1, self.k_max)
        for i in range(self.k_max):
            f = FORGET if i < tried else FORGET_UNTRIED
            self.trials[i] = self.trials[i] * f + (i < tried)
            self.hits[i] = self.hits[i] * f + (i < min(n, tried))

    def alphas(self) -> List[float]:
        out, prior = [], self.prior
        for t, h in zip(self.trials, self.hits):
            a = (h + self.prior_weight * prior) / (t + self.prior_weight)
            out.append(a)
            prior = a * PRIOR_DEPTH_DECAY
        return out

    @property
    def empty_rate(self) -> float:
        return self.empty / (self.proposals + 1.0)

    def shrink(self, max_weight: float) -> None:
        """Keep the estimate but trust it as at most `max_weight` rounds, so new evidence moves it."""
        for i, t in enumerate(self.trials):
            if t > max_weight:
                s = max_weight / t
                self.trials[i], self.hits[i] = t * s, self.hits[i] * s
        if self.proposals > max_weight:
            s = max_weight / self.proposals
            self.proposals, self.empty = self.proposals * s, self.empty * s


@dataclass
class PairState:
    """What a (model, proposer) pair has learnt; shared by the requests that use the pair."""

    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    plain_left: int = 0  # plain steps still to run before the next probe (auto-off)
    probe_due: bool = False
    backoff: int = FIRST_PROBE_AFTER
    rounds_on: int = 0
    # Measured / modelled time, smoothed: of a round (verify + drafting + the engine's bookkeeping) and of
    # a plain step as this engine runs it. Their ratio scales R(k), so decisions follow the real engine.
    round_overhead: float = 1.0
    plain_overhead: float = 1.0
    # Rounds since plain steps were last timed. Starts near the limit so a new pair calibrates early: the
    # costs file may come from minutes (or a thermal state) ago, and only the current ratio of a round to a
    # plain step says whether drafting pays now.
    rounds_since_plain: int = CALIBRATE_EVERY - CALIBRATION_STEPS
    calibrate_every: int = CALIBRATE_EVERY  # the current interval (stretched while drafting pays well)


class AutoDraftPolicy:
    """Draft-length policy for the engine: `next_k()` before each round, `observe(k, n)` after it.

    `next_k()` returning 0 means "decode this token plainly"; while auto-off, every call stands for one
    plain step (whether the engine runs it as a pipelined plain step or as a round with no drafts).
    """

    def __init__(self, costs: Costs, state: Optional[PairState] = None, *, k_max: int = K_MAX,
                 min_speedup: float = MIN_SPEEDUP):
        self.costs = costs
        self.state = state if state is not None else PairState(AcceptanceEstimate(k_max))
        self.k_max = min(k_max, costs.k_max, self.state.estimate.k_max)
        self.min_speedup = min_speedup
        self.never = not can_ever_pay(costs, min_speedup)
        self.k_counts: Dict[int, int] = {}  # what next_k() returned, for statistics
        self.probes = 0
        self.calibrations = 0
        self.expected_speedup = 1.0  # of the last decision
        self._asked = 0
        self._asked_before = None  # the give before that: a plain step or round right after the other
        self._drafted = 0  # drafts the proposer actually gave in the last round (observe)
        self._since = None  # clock() at the last next_k()

    def _give(self, k: int) -> int:
        self._asked_before, self._asked, self._drafted = self._asked, k, 0
        self.k_counts[k] = self.k_counts.get(k, 0) + 1
        return k

    def _measure(self) -> None:
        """Time from the previous next_k() to this one: a plain step or a round (with its tokens' emission),
        as this engine runs it, compared with the cost model. Only steady-state ones: the first plain step
        after a round (or round after plain steps) is not pipelined with its predecessor."""
        now = clock()
        since, self._since = self._since, now
        step = self.costs.plain_step_s
        if since is None or step <= 0 or self._asked_before is None or (self._asked == 0) != (self._asked_before == 0):
            return
        st = self.state
        if self._asked == 0:
            ratio, attr, rate = (now - since) / step, "plain_overhead", PLAIN_SMOOTHING
        elif self._drafted > 0:
            ratio, attr = (now - since) / (self.costs.round_cost(self._drafted) * step), "round_overhead"
            rate = OVERHEAD_SMOOTHING
        else:
            return
        ratio = min(max(ratio, OVERHEAD_MIN), OVERHEAD_MAX)
        setattr(st, attr, getattr(st, attr) + rate * (ratio - getattr(st, attr)))

    def _choose(self, min_k: int = 0) -> Tuple[int, float]:
        st = self.state
        return best_k(st.estimate.alphas(), self.costs, k_max=self.k_max, empty_rate=st.estimate.empty_rate,
                      min_speedup=self.min_speedup, min_k=min_k, overhead=st.round_overhead / st.plain_overhead)

    def next_k(self) -> int:
        self._measure()
        st = self.state
        if self.never:
            return self._give(0)
        if st.plain_left > 0:
            st.plain_left -= 1
            return self._give(0)
        if st.probe_due:  # one drafted round to see whether drafting pays again
            st.probe_due = False
            st.estimate.shrink(PROBE_WEIGHT)
            self.probes += 1
            k, self.expected_speedup = self._choose(min_k=1)
            return self._give(k)
        k, self.expected_speedup = self._choose()
        if k == 0:  # auto-off: this token and the next backoff-1 are plain; then probe
            st.plain_left, st.probe_due = st.backoff - 1, True
            st.backoff = min(2 * st.backoff, MAX_PROBE_AFTER)
            st.rounds_on = 0
            st.rounds_since_plain = 0
            return self._give(0)
        st.rounds_since_plain += 1
        if st.rounds_since_plain > calibration_interval(st.calibrate_every, self.expected_speedup):
            # a few plain steps to time one as things are now; the next interval doubles if the margin allows
            st.rounds_since_plain = 0
            st.plain_left = CALIBRATION_STEPS - 1
            st.calibrate_every = calibration_interval(2 * st.calibrate_every, self.expected_speedup)
            self.calibrations += 1
            return self._give(0)
        st.rounds_on += 1
        if st.rounds_on >= RESET_BACKOFF_ROUNDS:
            st.backoff = FIRST_PROBE_AFTER
        return self._give(k)

    def observe(self, k: int, n_accepted: int) -> None:
        if self._asked > 0:  # rounds the policy ran plainly teach nothing about acceptance
            self.state.estimate.observe(k, n_accepted)
            self._drafted = k

    def summary(self) -> dict:
        est = self.state.estimate
        return {"k_counts": dict(sorted(self.k_counts.items())), "probes": self.probes,
                "calibrations": self.calibrations,
                "alphas": [round(a, 4) for a in est.alphas()], "empty_rate": round(est.empty_rate, 4),
                "round_overhead": round(self.state.round_overhead, 4),
                "plain_overhead": round(self.state.plain_overhead, 4),
                "expected_speedup": round(self.expected_speedup, 4), "never": self.never}


# --- measuring costs -------------------------------------------------------------------------------

_CLOCK = [time.perf_counter]  # wall time; mlx_spec.bench --clock cpu swaps in process CPU time


def clock() -> float:
    return _CLOCK[0]()


def clock_name() -> str:
    return "wall" if _CLOCK[0] is time.perf_counter else "cpu"


def use_clock(fn) -> None:
    """Time probes with `fn` (time.perf_counter: wall time, the default; time.process_time: CPU time of
    this process, steadier on a busy shared machine with the CPU backend, blind to overlap)."""
    _CLOCK[0] = fn


def _vocab_size(model) -> int:
    for holder in (getattr(model, "text_args", None), getattr(model, "args", None)):
        v = getattr(holder, "vocab_size", None)
        if isinstance(v, int) and v > 4:
            return v
    return 256


def _time_plain(model, cache, token: int, steps: int) -> float:
    """Seconds per plain step, fully pipelined (mlx-lm's generate_step): step i+1 is queued on the lazy
    token i before the host reads token i, so graph building overlaps compute. The unit of every cost."""
    from .engine import base_forward

    def step(y):
        logits, _ = base_forward(model, y[None], cache)
        return mx.argmax(logits[0, -1], axis=-1).astype(mx.int32).reshape(1)

    start = clock()
    nxt = step(mx.array([token], mx.int32))
    mx.async_eval(nxt)
    for _ in range(steps):
        y = nxt
        nxt = step(y)
        mx.async_eval(nxt)
        int(y.item())
    elapsed = clock() - start
    mx.eval(nxt)
    rollback_all(cache, steps + 1)
    return elapsed / steps


def _time_verify(model, cache, token: int, drafts: mx.array) -> float:
    """Seconds for one (k+1)-token verify pass with greedy acceptance and the round's one host sync."""
    from .engine import base_forward

    k = drafts.shape[0]
    start = clock()
    verify_in = mx.concatenate([mx.array([token], mx.int32), drafts])
    logits, _ = base_forward(model, verify_in[None], cache)  # (1, k+1, V)
    n, nxt = acceptance.greedy_accept(drafts, mx.argmax(logits[0], axis=-1).astype(mx.int32))
    mx.concatenate([mx.stack([n, nxt]).astype(mx.int32), drafts]).tolist()
    elapsed = clock() - start
    rollback_all(cache, k + 1)
    return elapsed


def _time_sync() -> float:
    start = clock()
    (mx.array(1) + 1).item()
    return clock() - start


def _time_draft(proposer, ctx: RoundContext, k: int) -> float:
    """Seconds to propose k drafts, evaluated on their own (less an empty host sync)."""
    proposer.start(ctx.history[:-1])  # the engine's order: start(prompt), then rounds (a draft model prefills)
    start = clock()
    draft = proposer.propose(ctx, k)
    mx.eval(draft.tokens, *([draft.probs] if draft.probs is not None else []))
    elapsed = clock() - start
    proposer.observe(0, draft.k)
    return elapsed


def measure_costs(model, proposer=None, *, k_max: int = K_MAX, context: int = DEFAULT_PROBE_CONTEXT,
                  reps: Optional[int] = None, plain_steps: int = PROBE_PLAIN_STEPS, seed: int = 0,
                  budget_s: float = PROBE_BUDGET_S) -> Costs:
    """Time plain steps, (k+1)-token verify passes (k = 0..k_max) and the proposer's drafting on a
    synthetic context, interleaved over `reps` passes (default DEFAULT_PROBE_REPS) after one warm-up pass,
    fewer (at least MIN_PROBE_REPS) once `budget_s` seconds have gone; return medians as ratios to the
    plain step. Without a proposer the draft cost is 0."""
    from .engine import SamplingParams, base_forward, make_base_cache

    reps = DEFAULT_PROBE_REPS if reps is None else reps

    rng = np.random.default_rng(seed)
    history = rng.integers(4, _vocab_size(model), size=max(context, 2)).tolist()
    cache = make_base_cache(model, max(plain_steps, k_max) + 1)
    _, hidden = base_forward(model, mx.array(history[:-1], mx.int32)[None], cache)  # cache holds history[:-1]
    hidden = hidden[:, -1:] if hidden is not None else None  # (1, 1, H) at the bonus token's predecessor
    mx.eval([(c.keys, c.values) for c in cache], *([hidden] if hidden is not None else []))
    drafts = mx.array(rng.integers(4, _vocab_size(model), size=k_max).tolist(), mx.int32)
    probe_ks = {k for k in PROBE_VERIFY_KS if k <= k_max} | {k_max}  # the largest is always measured
    draft_ks = [k for k in PROBE_DRAFT_KS if k <= k_max]
    ctx = RoundContext(history, len(history) - 1, hidden, cache, SamplingParams(), mx.random.key(seed))

    plain, verify = [], [[] for _ in range(k_max + 1)]
    draft, sync = [[] for _ in draft_ks], []
    started = time.perf_counter()
    for rep in range(reps + 1):  # pass 0 warms up and is not timed
        if rep > min(MIN_PROBE_REPS, reps) and time.perf_counter() - started > budget_s:
            break
        if rep == 0:  # warm-up (compilation, allocation): each kind of work once, at its largest
            _time_plain(model, cache, history[-1], 2)
            _time_verify(model, cache, history[-1], drafts)
            if proposer is not None and draft_ks:
                _time_draft(proposer, ctx, draft_ks[-1])
            continue
        p = _time_plain(model, cache, history[-1], plain_steps)
        v = [_time_verify(model, cache, history[-1], drafts[:k]) if k in probe_ks else None
             for k in range(k_max + 1)]
        d = [_time_draft(proposer, ctx, k) for k in draft_ks] if proposer is not None else []
        s = _time_sync()
        plain.append(p)
        sync.append(s)
        for k, t in enumerate(v):
            if t is not None:
                verify[k].append(t)
        for i, t in enumerate(d):
            draft[i].append(t)
    step = float(np.median(plain))
    measured = [k for k in range(k_max + 1) if verify[k]]
    verify_cost = isotonic(np.interp(range(k_max + 1), measured,
                                     [float(np.median(verify[k])) / step for k in measured]).tolist())
    fixed, per_step = 0.0, 0.0
    if proposer is not None:
        overhead = float(np.median(sync))
        fixed, per_step = fit_line(draft_ks, [max(0.0, float(np.median(d)) - overhead) / step for d in draft])
    return Costs(verify_cost, fixed, per_step, step)


# --- identities: what a measurement is valid for ---------------------------------------------------

def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _chip_name() -> str:
    if platform.system() == "Darwin":
        try:
            import subprocess

            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_info() -> dict:
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:  # older MLX, or no such device  # noqa: BLE001
        return {}
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}


def machine_identity() -> dict:
    """The machine and MLX build a measurement was taken on."""
    from . import __version__

    # our own version too: a release that changes how a round is built changes what it costs
    return {"machine": platform.machine(), "system": platform.system(), "chip": _chip_name(),
            "cpus": os.cpu_count(), "mlx": mx.__version__, "mlx_spec": __version__, "device": str(mx.default_device()),
            "device_info": _device_info()}


def _quantization(model) -> Optional[dict]:
    found = set()
    for _, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size"):
            found.add((int(m.bits), int(m.group_size), str(getattr(m, "mode", "affine"))))
    if not found:
        return None
    bits, group, mode = max(found)
    out = {"bits": bits, "group_size": group, "mode": mode}
    if len(found) > 1:
        out["mixed"] = sorted([list(f) for f in found])
    return out


_IDENTITY_CACHE: Dict[int, Tuple[weakref.ref, dict]] = {}


def model_identity(model) -> dict:
    """What distinguishes one model from another for timing: config, dtype, quantization, a weight sample,
    and the path it was loaded from when the loader recorded it (`model.source_path`)."""
    hit = _IDENTITY_CACHE.get(id(model))
    if hit is not None and hit[0]() is model:
        return hit[1]
    from mlx.utils import tree_flatten

    args = getattr(model, "args", None)
    config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {"type": type(model).__name__}
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    by_dtype: Dict[str, int] = {}
    for _, p in params:
        if mx.issubdtype(p.dtype, mx.floating):
            by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.nbytes
    sample = [np.asarray(p.reshape(-1)[:64].astype(mx.float32)).round(6).tolist() for _, p in params[:4]]
    ident = {
        "path": str(getattr(model, "source_path", "") or ""),
        "model_type": getattr(model, "model_type", type(model).__name__),
        "config_hash": _short_hash(config),
        "dtype": max(by_dtype, key=by_dtype.get).replace("mlx.core.", "") if by_dtype else None,
        "quantization": _quantization(model),
        "parameter_bytes": int(sum(p.nbytes for _, p in params)),
        "weights_hash": _short_hash([[n, list(p.shape)] for n, p in params] + sample),
    }
    _IDENTITY_CACHE[id(model)] = (weakref.ref(model), ident)
    return ident


def proposer_identity(proposer) -> str:
    """A stable name for what the proposer costs and how well it agrees: its kind and its weights."""
    explicit = getattr(proposer, "identity", None)
    if isinstance(explicit, str):
        return explicit
    name = getattr(proposer, "name", type(proposer).__name__)
    inner = getattr(proposer, "drafter", None) or getattr(proposer, "model", None)
    if inner is not None and hasattr(inner, "parameters"):
        return f"{name}:{model_identity(inner)['weights_hash']}"
    if hasattr(proposer, "n"):
        return f"{name}:{proposer.n}"
    return name


# --- the cache file --------------------------------------------------------------------------------

def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx_spec" / "tuning.json"


def cache_key(model) -> str:
    m = machine_identity()
    return _short_hash([{k: v for k, v in m.items() if k != "device_info"}, model_identity(model)])


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
            return data
    except (OSError, ValueError):
        pass  # missing or unreadable: measure again and rewrite it
    return {"version": CACHE_VERSION, "entries": {}}


def _write_cache(path: Path, data: dict) -> None:
    """Atomically (a reader never sees half a file); a read-only cache directory is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


_LOCK = threading.Lock()
_COSTS: Dict[Tuple[str, str, str], Costs] = {}  # (cache file, model key, proposer id) -> costs, this process


def get_costs(model, proposer=None, *, refresh: bool = False, path: Optional[Path] = None, **measure_kw) -> Costs:
    """Costs for this machine + model + proposer: from memory, else the cache file, else measured (and
    saved). `refresh=True` measures again."""
    path = Path(path) if path is not None else cache_path()
    key, pid = cache_key(model), proposer_identity(proposer) if proposer is not None else "none"
    mem_key = (str(path), key, pid)
    with _LOCK:
        if not refresh and mem_key in _COSTS:
            return _COSTS[mem_key]
        data = _read_cache(path)
        entry = data["entries"].get(key)
        stored = (entry or {}).get("proposers", {}).get(pid)
        if not refresh and stored is not None:
            costs = Costs.from_json(stored)
        else:
            if not refresh:  # a first use pauses for seconds on a slow machine: say why, once
                print(f"[mlx_spec] measuring this machine for --num-draft-tokens auto (first use of this model "
                      f"and proposer here; cached in {path})", file=sys.stderr, flush=True)
            costs = measure_costs(model, proposer, **measure_kw)
            data = _read_cache(path)  # re-read: another process may have written meanwhile
            entry = data["entries"].setdefault(key, {"machine": machine_identity(), "model": model_identity(model),
                                                     "proposers": {}})
            entry["proposers"][pid] = dict(costs.to_json(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            _write_cache(path, data)
        _COSTS[mem_key] = costs
        return costs


def remember_costs(model, proposer, costs: Costs, path: Optional[Path] = None) -> None:
    """Use (and save) costs measured elsewhere, e.g. by the benchmark."""
    path = Path(path) if path is not None else cache_path()
    key, pid = cache_key(model), proposer_identity(proposer) if proposer is not None else "none"
    with _LOCK:
        data = _read_cache(path)
        entry = data["entries"].setdefault(key, {"machine": machine_identity(), "model": model_identity(model),
                                                 "proposers": {}})
        entry["proposers"][pid] = dict(costs.to_json(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _write_cache(path, data)
        _COSTS[(str(path), key, pid)] = costs


# --- the engine's entry point ----------------------------------------------------------------------

_STATES: Dict[Tuple[str, str], PairState] = {}


def pair_state(model, proposer) -> PairState:
    """The learnt state of this (model, proposer) pair, down-weighted for a new request: it keeps its
    verdict, but a new prompt re-probes within FIRST_PROBE_AFTER tokens and moves the estimate quickly."""
    key = (model_identity(model)["weights_hash"], proposer_identity(proposer))
    with _LOCK:
        st = _STATES.get(key)
        if st is None:
            st = _STATES[key] = PairState()
        else:
            st.estimate.shrink(CARRY_WEIGHT)
            if st.plain_left > FIRST_PROBE_AFTER:
                st.plain_left = FIRST_PROBE_AFTER
        return st


def reset_learnt_state() -> None:
    """Forget learnt acceptance and measured costs held in memory (tests; switching workloads)."""
    with _LOCK:
        _STATES.clear()
        _COSTS.clear()


def make_auto_policy(model, proposer) -> AutoDraftPolicy:
    """`--num-draft-tokens auto`: measure (first use) or load the costs, and join the pair's learnt state."""
    return AutoDraftPolicy(get_costs(model, proposer), pair_state(model, proposer))

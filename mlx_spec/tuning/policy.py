"""Draft-length policies: how many drafts the next round asks for.

The contract (`DraftPolicy`) and `FixedK`, which always asks for k, live beside the engine (draft_policy.py;
re-exported here). `AutoDraftPolicy` (`--num-draft-tokens auto`) picks the k that maximises the expected
speedup S(k) = τ(k) / R(k) (costs.py) from measured costs and a running estimate of acceptance per draft
position; when no k beats plain decoding (a drafter that does not agree, a chip where verifying k+1
tokens costs much more than 1) it returns 0 and re-probes with one drafted round after a number of plain
steps that doubles while probes keep failing. It also times each round and plain step as the engine runs
them (the time between `next_k()` calls), and while drafting runs a few plain steps every CALIBRATE_EVERY
rounds to re-time one, so R(k) is scaled by the current measured/modelled ratio of a round to a plain step
(a machine that throttles or was busier when it measured shifts both).

Policies hold state; whoever creates one owns it (tuner.py keeps what a pair learnt across requests).
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..draft_policy import DraftPolicy, FixedK  # noqa: F401  (the contract; re-exported for older imports)
from ..proposers.base import RoundResult
from .costs import (CALIBRATE_EVERY, K_MAX, MIN_SPEEDUP, Costs, best_k, calibration_interval,
                    can_ever_pay)

PRIOR_ACCEPTANCE = 0.9  # first-draft acceptance assumed before any evidence: optimistic, so drafting is tried
PRIOR_WEIGHT = 1.0  # ... worth this many rounds of evidence
PRIOR_DEPTH_DECAY = 0.95  # an untried position is assumed a little worse than the one before it
FORGET = 0.97  # evidence decays per observation (about 30 rounds of memory), so k follows the content
FORGET_UNTRIED = 0.995  # a position the chosen k does not reach forgets slowly: re-explored every ~100s of rounds
PROBE_WEIGHT = 8.0  # before an auto-off probe, evidence shrinks to this, so one probe can change the verdict
OVERHEAD_SMOOTHING = 0.05  # per observed round, for its measured / modelled time
PLAIN_SMOOTHING = 0.3  # per observed plain step: they are rare while drafting, and each is a fresh reading
CALIBRATION_STEPS = 4  # plain steps per re-timing (the first follows a round, so it is not timed)
OVERHEAD_MIN, OVERHEAD_MAX = 0.2, 5.0  # wide: machines drift 2.5x (thermal state, a shared VM); smoothing damps outliers
FIRST_PROBE_AFTER = 16  # plain tokens before re-probing; doubles while probes fail
MAX_PROBE_AFTER = 512
RESET_BACKOFF_ROUNDS = 16  # drafted rounds in a row after which re-probing starts again from FIRST_PROBE_AFTER


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
    trees: dict = field(default_factory=dict)  # tree budget -> its TreeEstimate (trees.py), when trees are on


class AutoDraftPolicy:
    """`--num-draft-tokens auto`: the k with the best expected speedup each round, 0 where none pays.

    `next_k()` returning 0 means "decode this token plainly"; while auto-off, every call stands for one
    plain step (whether the engine runs it as a pipelined plain step or as a round with no drafts).
    """

    def __init__(self, costs: Costs, state: Optional[PairState] = None, *, k_max: int = K_MAX,
                 min_speedup: float = MIN_SPEEDUP, clock: Callable[[], float] = time.perf_counter):
        """`state` is what earlier requests with this (model, proposer) pair learnt (AutoTuner keeps it);
        `clock` times rounds and plain steps as the engine runs them."""
        self.costs, self.clock = costs, clock
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
        now = self.clock()
        since, self._since = self._since, now
        step = self.costs.plain_step_s
        if since is None or step <= 0 or self._asked_before is None or (self._asked == 0) != (self._asked_before == 0):
            return
        st = self.state
        if self._asked == 0:
            ratio, attr, rate = (now - since) / step, "plain_overhead", PLAIN_SMOOTHING
        elif self._drafted > 0:
            ratio, attr = (now - since) / (self._modelled_round() * step), "round_overhead"
            rate = OVERHEAD_SMOOTHING
        else:
            return
        ratio = min(max(ratio, OVERHEAD_MIN), OVERHEAD_MAX)
        setattr(st, attr, getattr(st, attr) + rate * (ratio - getattr(st, attr)))

    def _modelled_round(self) -> float:
        """What the cost model says the last round cost, in plain steps (trees.py: a tree round's own)."""
        return self.costs.round_cost(self._drafted)

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

    def assign(self, k: int) -> None:
        """A batch policy chose this round's k for the request (instead of `next_k`): count it, and let
        `observe` learn from the round. Rounds are timed by the batch policy, not here."""
        self._give(k)
        self._since = None

    def observe(self, result: RoundResult) -> None:
        if self._asked > 0:  # rounds the policy ran plainly teach nothing about acceptance
            self.state.estimate.observe(result.drafted, result.accepted)
            self._drafted = result.drafted

    def summary(self) -> dict:
        est = self.state.estimate
        return {"k_counts": dict(sorted(self.k_counts.items())), "probes": self.probes,
                "calibrations": self.calibrations,
                "alphas": [round(a, 4) for a in est.alphas()], "empty_rate": round(est.empty_rate, 4),
                "round_overhead": round(self.state.round_overhead, 4),
                "plain_overhead": round(self.state.plain_overhead, 4),
                "expected_speedup": round(self.expected_speedup, 4), "never": self.never}

"""`--num-draft-tokens auto` in a batch: each round, every auto row's k, chosen for aggregate tokens/s.

A `BatchDraftPolicy` belongs to a Scheduler (batch/scheduler.py), as an AutoTuner belongs to a command. Each
round (`plan`) it reads every row:
    an auto row (its engine's policy is an AutoDraftPolicy) brings its own acceptance estimate per draft
    position (a copy of its pair's at joining; the pair's shared state learns from every row's rounds too,
    so what a pair learns survives across requests as AutoTuner keeps it);
    a row with a fixed k keeps it (its acceptance is estimated here, since its tokens count in the rate);
    a row without a proposer decodes one token;
and chooses the auto rows' K (each drafts min(K, its budget)) and which of them draft, maximising expected
aggregate tokens per plain batched step at this width (batch_costs.choose_round). Where no K pays it runs
a plain batched step. Costs by width come from the costs file (store.py): a width is measured (a second
or two) when a batch has stayed at it for STEADY_ROUNDS rounds, at most one per PROBE_SPACING rounds, or
at once when no width is measured yet; until then it is interpolated from measured ones (a batch draining
passes through every width below its own in a few rounds each: those are not worth a stop).

As AutoDraftPolicy does for one request, it keeps, per width, measured / modelled time of drafted rounds
and of plain steps (each round timed from the end of `plan` to `observe`: drafting, the base pass,
acceptance and emission, not the policy's own choosing) and scales round costs by their medians' ratio, re-timing
plain steps every so often while drafting, so a wrong or stale measurement corrects itself; and an auto row
that stops drafting (auto-off) is re-probed with one drafted round after a backoff that doubles while
probes fail.

Knows rows' engines and their policies (through the Batch it is handed), never text or scheduling.
"""

import copy
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Deque, Dict, Hashable, List, Optional, Tuple

from ..cache import KVQuant
from .batch_costs import Plan, RowView, WidthCosts, at_width, can_pay, choose_round, round_cost
from .costs import CALIBRATE_EVERY, K_MAX, calibration_interval
from .policy import (FIRST_PROBE_AFTER, MAX_PROBE_AFTER, OVERHEAD_MAX, OVERHEAD_MIN, PROBE_WEIGHT,
                     RESET_BACKOFF_ROUNDS, AcceptanceEstimate, AutoDraftPolicy, PairState)
from .tuner import AutoTuner

PROBE_SPACING = 32  # rounds between two width measurements (each stops the batch for a second or two)
STEADY_ROUNDS = 16  # rounds a batch stays at a width before that width is measured
CALIBRATION_STEPS = 2  # plain rounds per re-timing (a batch's rounds are not pipelined: each one is timed)
# Expected aggregate speedup a batch's drafting must reach. Wider than one request's MIN_SPEEDUP: measured
# on the tiny pair (CPU, 8 rows), rounds the model put at 1.05-1.17x ran at 0.96-0.97x of plain batching
# (switching pass shapes, rows' bookkeeping between rounds), and a batch must never be slower than plain.
MIN_BATCH_SPEEDUP = 1.10
PLAIN_READINGS, ROUND_READINGS = 15, 31  # recent timings kept per width
FRESH_ROUNDS = 96  # ... and how many rounds back they count (three re-timings where the verdict is close)
# Live timings may show rounds costing more than the probe's interleaved best-of timings (bookkeeping of
# accepted tokens, sampled rows), but hardly less: on a loaded machine their ratio still swung to 0.55-0.8,
# so they may make a round look at most this much cheaper than the costs file says.
MIN_OVERHEAD = 0.9


@dataclass
class _Row:
    """What the policy keeps for one request (by its engine, across batches: a row crossing to quantized K/V
    keeps it)."""

    state: Optional[PairState]  # an auto row's own state (its AutoDraftPolicy's, after joining)
    pair: Optional[PairState]  # ... and its pair's shared one, which learns from this row too
    fixed: Optional[AcceptanceEstimate] = None  # a fixed-k row's acceptance, estimated here


@dataclass
class _Width:
    """Timing at one width and K/V kind: measured / modelled time of recent plain steps and drafted rounds
    (PairState's overheads, per width), as (round number, ratio) readings.

    Medians, not averages: every round is timed, and time another process takes only ever adds, more of it
    to a short plain step than to a longer round, so averages lean towards drafting on a busy machine. Only
    readings of the last FRESH_ROUNDS rounds count: a plain step timed under other load than the rounds it
    is compared with would tip the ratio either way (without fresh ones, the costs file's ratios stand)."""

    plain: Deque[Tuple[int, float]] = field(default_factory=lambda: deque(maxlen=PLAIN_READINGS))
    drafted: Deque[Tuple[int, float]] = field(default_factory=lambda: deque(maxlen=ROUND_READINGS))
    rounds_since_plain: int = CALIBRATE_EVERY - CALIBRATION_STEPS  # calibrate early: the file may be stale
    calibrate_every: int = CALIBRATE_EVERY
    plain_left: int = 0  # calibration plain rounds still to run

    def overhead(self, now: int) -> float:
        """Measured / modelled time of a drafted round, relative to a plain step's, from fresh readings."""
        plain = [r for t, r in self.plain if now - t <= FRESH_ROUNDS]
        drafted = [r for t, r in self.drafted if now - t <= FRESH_ROUNDS]
        if not plain or not drafted:
            return 1.0
        return max(MIN_OVERHEAD, median(drafted) / median(plain))


@dataclass
class _Round:
    """What `plan` decided, for `observe` to time against."""

    rows: int
    views: List[RowView]
    verify: Optional[WidthCosts]
    drafting: Dict[Hashable, WidthCosts]
    started: float = 0.0  # clock() when the plan was handed over: the round's own time starts


class BatchDraftPolicy:
    """Chooses every row's k each round of a Batch (the batch/engine.py `RoundPolicy` contract)."""

    def __init__(self, model, tuner: Optional[AutoTuner] = None, *, k_max: int = K_MAX,
                 min_speedup: float = MIN_BATCH_SPEEDUP, probe_spacing: int = PROBE_SPACING,
                 clock: Optional[Callable[[], float]] = None):
        """`tuner`: where costs are filed and what pairs learnt (the scheduler owner's, shared with its
        one-request calls); a fresh one by default. `clock` times rounds (default: the tuner's, which
        its store's probes use too)."""
        self.model, self.tuner = model, tuner if tuner is not None else AutoTuner()
        self.clock = clock or self.tuner.clock or time.perf_counter
        self.k_max, self.min_speedup, self.probe_spacing = k_max, min_speedup, probe_spacing
        self._rows: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Engine -> _Row
        self._widths: Dict[Tuple[Optional[KVQuant], int], _Width] = {}
        self._tables: Dict[Tuple[str, Optional[KVQuant]], Dict[int, WidthCosts]] = {}  # by proposer, K/V
        self._last: Dict[bool, _Round] = {}  # by the batch's K/V kind: its latest round
        self._timed_width: Dict[bool, int] = {}  # ... and the width its last timed round had
        self._steady: Dict[bool, Tuple[int, int]] = {}  # ... and (its width, rounds in a row at that width)
        self._last_measured = -probe_spacing
        self.rounds = 0
        self.k_counts: Dict[int, Dict[int, int]] = {}  # by width: the auto rows' K per round (0: none drafted)
        self.probes = self.calibrations = self.widths_measured = 0

    # -- the RoundPolicy contract
    def plan(self, batch) -> List[int]:
        """Each row's k this round (in row order), within its budget (`batch.budget`)."""
        self.rounds += 1
        rows = batch.rows
        kinds = [self._row(r.engine) for r in rows]
        if all(k.state is None for k in kinds):  # no auto row: every row's own k, nothing to choose
            return [batch.budget(r, r.engine.policy.next_k()) for r in rows]
        kv, steady = _kv(batch), self._steady_rounds(batch)
        views, drafting = [], {}
        for row, kind in zip(rows, kinds):
            views.append(self._view(batch, row, kind, drafting, kv, steady))
        self._probes(views, kinds)
        verify = next((drafting[v.drafter] for v in views if v.fixed is None and v.drafter in drafting), None)
        last = self._last[batch.quantized] = _Round(len(rows), views, verify, drafting)
        if verify is None:
            return [v.fixed or 0 for v in views]
        width = self._width(kv, len(rows))
        plan, pays = self._choose(views, kinds, verify, drafting, width)
        ks, calibrating = self._calibrate(width, views, plan, verify.plain_step_s > 0)
        self._auto_off(views, kinds, ks, calibrating, not pays)
        for row, kind, k in zip(rows, kinds, ks):
            if kind.state is not None:
                row.engine.policy.assign(k)
        top = max((k for v, k in zip(views, ks) if v.fixed is None), default=0)
        counts = self.k_counts.setdefault(len(rows), {})
        counts[top] = counts.get(top, 0) + 1
        last.started = self.clock()  # after choosing (and any width measured meanwhile): the round's own time
        return ks

    def observe(self, batch, asked: List[int], results) -> None:
        """What the round got (per row: asked, RoundResult); the round ends here."""
        now = self.clock()
        for row, a, r in zip(batch.rows, asked, results):
            kind = self._rows.get(row.engine)
            if kind is None or a == 0 or r.tree:  # a tree's kept depth says nothing of a chain's acceptance
                continue
            if kind.pair is not None:  # the row's own estimate learns in its AutoDraftPolicy.observe
                kind.pair.estimate.observe(r.drafted, r.accepted)
            elif kind.fixed is not None:
                kind.fixed.observe(r.drafted, r.accepted)
        last = self._last.pop(batch.quantized, None)
        if last is None or last.verify is None or last.verify.plain_step_s <= 0 or last.rows != len(batch.rows):
            return
        if self._timed_width.get(batch.quantized) != last.rows:  # the first round at a new width compiles
            self._timed_width[batch.quantized] = last.rows
            return
        self._time(self._width(_kv(batch), last.rows), last, asked, [r.drafted for r in results], now - last.started)

    def summary(self) -> dict:
        return {"k_counts": {b: dict(sorted(c.items())) for b, c in sorted(self.k_counts.items())},
                "probes": self.probes,
                "calibrations": self.calibrations, "widths_measured": self.widths_measured,
                "overheads": {b: round(w.overhead(self.rounds), 4) for (kv, b), w in sorted(self._widths.items(),
                                                                              key=lambda x: x[0][1])}}

    # -- rows
    def _row(self, engine) -> _Row:
        kind = self._rows.get(engine)
        if kind is None:
            policy = engine.policy
            if isinstance(policy, AutoDraftPolicy) and engine.proposer is not None:
                pair = policy.state  # the row learns on a copy of its own; the pair learns from every row
                policy.state = own = PairState(copy.deepcopy(pair.estimate), plain_left=pair.plain_left,
                                               probe_due=pair.probe_due, backoff=pair.backoff,
                                               rounds_on=pair.rounds_on)  # the fields written back below
                kind = _Row(own, pair)
            else:
                kind = _Row(None, None, AcceptanceEstimate(self.k_max))
            self._rows[engine] = kind
        return kind

    def _view(self, batch, row, kind: _Row, drafting: dict, kv, steady: int) -> RowView:
        engine = row.engine
        if engine.proposer is None:
            return RowView(fixed=0)
        key = engine.proposer.identity
        if key not in drafting:
            drafting[key] = self._costs(engine.proposer, len(batch.rows), kv, steady)
        if kind.state is None:
            k = batch.budget(row, engine.policy.next_k())
            return RowView(kind.fixed.alphas(), kind.fixed.empty_rate, fixed=k, drafter=key)
        st, cap = kind.state, batch.budget(row, self.k_max)
        forced = st.probe_due and st.plain_left <= 0 and cap > 0
        return RowView((), st.estimate.empty_rate, cap=cap, forced=forced, drafter=key)  # alphas when weighed

    @staticmethod
    def _probes(views: List[RowView], kinds: List[_Row]) -> None:
        """A probe round costs the whole batch a drafted pass: every auto row waiting for a probe takes it
        now, so the rows' probes fall in the same rounds (B rows off would otherwise probe B times as
        often). Each probing row's evidence counts for more."""
        if not any(v.forced for v in views):
            return
        for view, kind in zip(views, kinds):
            st = kind.state
            if st is not None and st.probe_due and view.cap > 0:
                view.forced = True
                st.estimate.shrink(PROBE_WEIGHT)

    def _choose(self, views: List[RowView], kinds: List[_Row], verify: WidthCosts, drafting,
                width: _Width) -> Tuple[Plan, bool]:
        """(choose_round's plan, whether drafting could pay here at all). Checked first, cheaply: a wide batch
        where no acceptance could make drafting pay runs plain rounds without weighing every K or probing."""
        kw = dict(k_max=self.k_max, overhead=width.overhead(self.rounds), min_speedup=self.min_speedup)
        pays = can_pay(views, verify, drafting, **kw)
        if not pays:  # a probe here could not change the verdict: it waits for a width where it could
            for view in views:
                view.forced = False
            return Plan([v.fixed or 0 for v in views], 1.0, 1.0), False
        for view, kind in zip(views, kinds):
            if kind.state is not None:
                view.alphas = kind.state.estimate.alphas()
        return choose_round(views, verify, drafting, **kw), pays

    def _auto_off(self, views, kinds, ks, calibrating: bool, never: bool) -> None:
        """Auto rows' probe state, as AutoDraftPolicy keeps it: a row that stops drafting drafts again for one
        round after `backoff` plain ones (doubling while probes fail); none when no K could ever pay here."""
        for view, kind, k in zip(views, kinds, ks):
            st = kind.state
            if st is None or view.cap <= 0:
                continue
            if view.forced:
                st.probe_due, st.plain_left = False, 0
                self.probes += 1
            if k > 0:
                st.rounds_on += 1
                if st.rounds_on >= RESET_BACKOFF_ROUNDS:
                    st.backoff = FIRST_PROBE_AFTER
                continue
            if calibrating:
                continue
            if st.plain_left > 0:
                st.plain_left -= 1
                continue
            if not st.probe_due and not never:
                st.plain_left, st.probe_due = st.backoff - 1, True
                st.backoff = min(2 * st.backoff, MAX_PROBE_AFTER)
                st.rounds_on = 0
        for kind in kinds:  # the pair's verdict is its latest row's, as one request after another leaves it
            if kind.pair is not None:
                st, pair = kind.state, kind.pair
                pair.plain_left, pair.probe_due, pair.backoff, pair.rounds_on = (st.plain_left, st.probe_due,
                                                                                 st.backoff, st.rounds_on)

    # -- costs and timing
    def _steady_rounds(self, batch) -> int:
        """Rounds in a row this batch has run at its present width (this one included)."""
        width, n = self._steady.get(batch.quantized, (0, 0))
        n = n + 1 if width == len(batch.rows) else 1
        self._steady[batch.quantized] = (len(batch.rows), n)
        return n

    def _costs(self, proposer, rows: int, kv, steady: int) -> WidthCosts:
        """This width's costs: measured, else measured now (nothing measured yet; or the batch stays at this
        width, PROBE_SPACING rounds after the last measurement), else interpolated from measured widths."""
        table = self._tables.get((proposer.identity, kv))
        if table is None:  # the store's own dict (measuring adds to it): asked once, not every round
            table = self._tables[proposer.identity, kv] = self.tuner.store.widths(self.model, proposer, kv)
        if rows in table:
            return table[rows]
        if not table or (steady >= STEADY_ROUNDS and self.rounds - self._last_measured >= self.probe_spacing):
            self._last_measured = self.rounds
            self.widths_measured += 1
            return self.tuner.store.measure_width_now(self.model, proposer, rows, kv)
        return at_width(table, rows)

    def _width(self, kv, rows: int) -> _Width:
        return self._widths.setdefault((kv, rows), _Width())

    def _calibrate(self, width: _Width, views: List[RowView], plan, timed: bool) -> Tuple[List[int], bool]:
        """The plan, or a plain round instead while re-timing plain steps at this width (only where the
        round would be plain without the auto rows: no fixed row drafts, no row is probing; and only where
        rounds can be compared with a measured plain step: `timed`)."""
        auto_drafts = any(k > 0 for v, k in zip(views, plan.ks) if v.fixed is None)
        if not timed or not auto_drafts or any(v.forced for v in views) or any(v.fixed for v in views):
            if not auto_drafts:
                width.rounds_since_plain = 0
            return plan.ks, False
        if width.plain_left > 0:
            width.plain_left -= 1
            return [0] * len(views), True
        width.rounds_since_plain += 1
        if width.rounds_since_plain <= calibration_interval(width.calibrate_every, plan.speedup):
            return plan.ks, False
        width.rounds_since_plain, width.plain_left = 0, CALIBRATION_STEPS - 1
        width.calibrate_every = calibration_interval(2 * width.calibrate_every, plan.speedup)
        self.calibrations += 1
        return [0] * len(views), True

    def _time(self, width: _Width, last: _Round, asked: List[int], drafted: List[int], seconds: float) -> None:
        """Measured / modelled time of this round: a plain step's, or a drafted round's (rounds that asked but
        got no drafts, an n-gram without a match, are neither)."""
        step = last.verify.plain_step_s
        if not any(asked):
            readings, ratio = width.plain, seconds / step
        elif any(drafted):
            readings, ratio = width.drafted, seconds / (round_cost(last.views, drafted, last.verify, last.drafting) * step)
        else:
            return
        readings.append((self.rounds, min(max(ratio, OVERHEAD_MIN), OVERHEAD_MAX)))


def _kv(batch) -> Optional[KVQuant]:
    """The K/V quantization costs are filed under: the rows' when this batch's K/V are quantized."""
    if not batch.quantized:
        return None
    kv = batch.rows[0].engine.kv
    return KVQuant(kv.bits, kv.group_size) if kv is not None else None

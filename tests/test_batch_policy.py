"""The batch's draft-length policy: the cost model by width (table-driven, crafted costs and acceptance),
the policy's choices and state (auto-off and probes, calibration, rows keeping their own estimates), the
costs file's widths (round trip, old files, lazy measurement), and greedy output staying exact with the
policy choosing k. No timing in any assert: costs and round times are injected."""

import copy
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from tiny_models import make_base, make_drafter
from mlx_spec.batch.scheduler import Scheduler
from mlx_spec.draft_policy import FixedK
from mlx_spec.engine import Engine
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.base import RoundResult
from mlx_spec.proposers.oracle import OracleProposer
from mlx_spec.tuning import AutoTuner, BatchDraftPolicy, Costs, CostsStore, WidthCosts
from mlx_spec.tuning import batch_costs as bc
from mlx_spec.tuning import batch_policy as bp
from mlx_spec.tuning import policy as policies
from mlx_spec.tuning.policy import AutoDraftPolicy, AcceptanceEstimate, PairState
from mlx_spec.request import Request

K = 8
FLAT = WidthCosts([1.0] * (K + 1))  # extra verify tokens free, drafting free
HALF = WidthCosts([1.0 + 0.5 * k for k in range(K + 1)])  # each draft token costs half a plain step
LINEAR = WidthCosts([1.0 + 1.0 * k for k in range(K + 1)])  # each draft token costs a plain step: never pays
THREE = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # the first three drafts always accepted, the fourth never
SINGLE_COSTS = Costs([1.0 + 0.03 * k for k in range(K + 1)], 0.02, 0.1)  # a request's own costs (unused here)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def auto(alphas, cap=K, drafter="mtp", forced=False, empty=0.0):
    return bc.RowView(alphas, empty, cap, None, forced, drafter)


def fixed(k, alphas=(0.5,) * K, drafter="mtp"):
    return bc.RowView(alphas, 0.0, 0, k, False, drafter)


# --- the cost model by width ------------------------------------------------------------------------

CHOICE_CASES = [
    # (invariant, verify costs at this width, rows' alphas, chosen K)
    ("a flat verify: draft as far as drafts are accepted", FLAT, [THREE] * 4, 3),
    ("half a step per draft token: still the three sure drafts (4 tokens for 2.5 steps)", HALF, [THREE] * 4, 3),
    ("a step per draft token (a compute-bound width): a plain batched step", LINEAR, [THREE] * 4, 0),
    ("a drafter that never agrees: plain even where verifying is free", FLAT, [[0.0] * K] * 4, 0),
    ("a marginal gain below MIN_SPEEDUP stays plain", HALF, [[0.26] + [0.0] * 7] * 2, 0),
]


@pytest.mark.parametrize("invariant, verify, alphas, want", CHOICE_CASES)
def test_chosen_k_by_width(invariant, verify, alphas, want):
    rows = [auto(a) for a in alphas]
    plan = bc.choose_round(rows, verify, {"mtp": verify})
    assert plan.ks == [want] * len(rows), invariant
    if want == 0:
        assert plan.rate == plan.baseline == len(rows), "a plain batched step emits one token per row for 1 step"


def test_the_same_rows_draft_at_a_narrow_width_and_not_at_a_wide_one():
    """One acceptance, costs measured at two widths: the policy follows the width's costs."""
    rows = [auto([0.8, 0.6, 0.4] + [0.2] * 5)]
    narrow = WidthCosts([1.0 + 0.1 * k for k in range(K + 1)], 0.05, 0.05)
    wide = WidthCosts([1.0 + 0.9 * k for k in range(K + 1)], 0.05, 0.05)
    assert bc.choose_round(rows * 1, narrow, {"mtp": narrow}).ks[0] > 0, "verifying is cheap at B=1: draft"
    assert bc.choose_round(rows * 8, wide, {"mtp": wide}).ks == [0] * 8, "verifying costs ~k steps at B=8: plain"


def test_rows_with_a_fixed_k_keep_it_and_auto_rows_ride_along():
    """A fixed row's k=3 makes the pass (B, 4) anyway and runs the shared drafter: an auto row that would
    not pay alone drafts for free beside it."""
    weak = [0.3] * K
    alone = bc.choose_round([auto(weak), auto(weak)], HALF, {"mtp": HALF})
    assert alone.ks == [0, 0], "alone, weak acceptance at half a step per token does not pay"
    plan = bc.choose_round([fixed(3), auto(weak), fixed(0, drafter=None)], HALF, {"mtp": HALF})
    assert plan.ks[0] == 3 and plan.ks[2] == 0, "fixed rows keep their k"
    assert plan.ks[1] > 0, "an auto row drafts where the pass and the drafter are paid for by a fixed row"


def test_per_row_drafting_pays_per_row():
    """A per-row proposer (n-gram, a draft model) costs each drafting row its own time: a row whose
    acceptance cannot pay for its share drafts 0 while a good row drafts; a proposer that drafts all its
    rows together drafts them all."""
    per_row = WidthCosts(FLAT.verify, 0.3, 0.1, per_row=True)
    good, bad = auto([0.95] * K, drafter="ngram"), auto([0.05] * K, drafter="ngram")
    plan = bc.choose_round([good, bad, good], FLAT, {"ngram": per_row})
    assert plan.ks[0] > 0 and plan.ks[2] > 0 and plan.ks[1] == 0, "only the rows that pay draft"
    together = WidthCosts(FLAT.verify, 0.3, 0.1)
    good, bad = auto([0.95] * K), auto([0.05] * K)
    plan = bc.choose_round([good, bad, good], FLAT, {"mtp": together})
    assert plan.ks[1] == plan.ks[0] > 0, "a shared drafter's rows draft together: no saving in leaving one out"


def test_the_greedy_subset_is_the_best_subset():
    """Per-row costs: for every K, rows joined by gain per cost give the best rate any subset gives."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        costs = WidthCosts([1.0 + float(rng.uniform(0, 0.4)) * k for k in range(K + 1)],
                           float(rng.uniform(0, 0.4)), float(rng.uniform(0, 0.2)), per_row=True)
        rows = [auto(np.sort(rng.uniform(0, 1, K))[::-1].tolist(), cap=int(rng.integers(1, K + 1)), drafter="p")
                for _ in range(4)]
        plan = bc.choose_round(rows, costs, {"p": costs}, min_speedup=0.0)
        best = max(bc.round_rate(rows, [min(k, r.cap) if b in subset else 0 for b, r in enumerate(rows)], costs,
                                 {"p": costs})
                   for k in range(1, K + 1) for n in range(1, 5) for subset in itertools.combinations(range(4), n))
        assert math.isclose(plan.rate, best, rel_tol=1e-9), "the chosen rows are the best subset at the best K"


def test_can_pay_is_whether_perfect_acceptance_would_pay():
    weak = [auto([0.0] * K)] * 4
    assert bc.can_pay(weak, HALF, {"mtp": HALF}), "at half a step per token, all-accepted drafts would pay"
    assert not bc.can_pay(weak, LINEAR, {"mtp": LINEAR}), "at a step per token nothing can: no probes there"
    assert not bc.can_pay([fixed(3), fixed(0, drafter=None)], FLAT, {"mtp": FLAT}), "no auto row, nothing to pay"


def test_budgets_and_probes():
    plan = bc.choose_round([auto(THREE, cap=2), auto(THREE)], FLAT, {"mtp": FLAT})
    assert plan.ks == [2, 3], "a row drafts no more than its budget (max tokens, a K/V switch)"
    plan = bc.choose_round([auto([0.0] * K, forced=True), auto([0.0] * K)], LINEAR, {"mtp": LINEAR})
    assert plan.ks[0] >= 1, "a probing row drafts even where drafting does not pay"


def test_width_costs_interpolate_between_measured_widths():
    table = {2: WidthCosts([1.0, 2.0], 0.2, 0.1, False, 0.01), 6: WidthCosts([1.0, 4.0], 0.6, 0.3, False, 0.03)}
    assert bc.at_width(table, 2) is table[2], "a measured width is used as measured"
    mid = bc.at_width(table, 4)
    assert mid.verify == [1.0, 3.0] and math.isclose(mid.draft_fixed, 0.4) and math.isclose(mid.plain_step_s, 0.02), \
        "between measured widths: linear"
    assert bc.at_width(table, 1) == table[2] and bc.at_width(table, 8) == table[6], "beyond them: the nearest"
    assert bc.at_width({}, 3) is None


# --- the costs file's widths --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return make_base("e2b")


def fake_width(costs_by_rows, calls=None):
    def measure(model, proposer, rows, kv=None, clock=None):
        if calls is not None:
            calls.append(rows)
        return copy.deepcopy(costs_by_rows(rows) if callable(costs_by_rows) else costs_by_rows)
    return measure


def test_widths_round_trip_through_the_costs_file(model, tmp_path):
    calls, prop = [], SimpleNamespace(identity="mtp:abc")
    measured = WidthCosts([1.0, 1.2, 1.5], 0.1, 0.05, False, 0.004)
    store = CostsStore(measure_width=fake_width(measured, calls))
    assert store.widths(model, prop) == {}, "nothing measured yet"
    assert store.measure_width_now(model, prop, 4) == measured
    assert store.widths(model, prop) == {4: measured}, "remembered in memory"
    again = CostsStore(measure_width=fake_width(measured, calls))
    assert again.widths(model, prop) == {4: measured}, "a new store (a new process) reads the file"
    assert again.widths(model, SimpleNamespace(identity="ngram:3")) == {}, "filed per proposer"
    path = tmp_path / "xdg" / "mlx_spec" / "tuning.json"
    (entry,) = json.loads(path.read_text())["entries"].values()
    assert entry["widths"]["mtp:abc"]["4"]["verify"] == [1.0, 1.2, 1.5], "filed as {proposer: {B: costs}}"
    assert calls == [4], "measured once"


def test_an_old_costs_file_keeps_working(model, tmp_path):
    """A file written before batches has no widths: its request costs still load, the widths read as
    unmeasured, and measuring one keeps the rest of the entry."""
    prop = SimpleNamespace(identity="mtp:abc")
    store = CostsStore(measure=lambda *a, **kw: SINGLE_COSTS)
    store.get(model, prop)
    path = tmp_path / "xdg" / "mlx_spec" / "tuning.json"
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    assert "widths" not in entry, "a request's costs alone write no widths"
    fresh = CostsStore(measure=lambda *a, **kw: pytest.fail("stored costs must not be measured again"),
                       measure_width=fake_width(FLAT))
    assert fresh.get(model, prop) == SINGLE_COSTS and fresh.widths(model, prop) == {}
    fresh.measure_width_now(model, prop, 2)
    (entry,) = json.loads(path.read_text())["entries"].values()
    assert set(entry["proposers"]) == {"mtp:abc"} and set(entry["widths"]["mtp:abc"]) == {"2"}, \
        "a width measured later is added beside the request costs"
    entry["widths"]["mtp:abc"]["3"] = {"verify": "garbled"}
    path.write_text(json.dumps({"version": 2, "entries": {next(iter(json.loads(path.read_text())["entries"])): entry}}))
    assert set(CostsStore().widths(model, prop)) == {2}, "an unreadable width is measured again, the others kept"


# --- the policy -----------------------------------------------------------------------------------------

class FakeBatch:
    """What BatchDraftPolicy reads of a Batch: rows (with engines), each row's budget, the K/V kind."""

    quantized = False

    def __init__(self, engines, caps=None):
        self.rows = [SimpleNamespace(engine=e) for e in engines]
        self.caps = caps or {}

    def budget(self, row, k):
        return 0 if row.engine.proposer is None else max(0, min(k, self.caps.get(id(row.engine), k)))


class FakeEngine:
    """What the policy reads of a row's engine (compared by identity, as engines are)."""

    def __init__(self, policy, identity):
        self.policy, self.proposer, self.kv = policy, SimpleNamespace(identity=identity), None


def fake_engine(policy, identity="mtp"):
    return FakeEngine(policy, identity)


def auto_policy(state=None):
    return AutoDraftPolicy(SINGLE_COSTS, state if state is not None else PairState(AcceptanceEstimate()))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_policy(model, widths, **kw):
    store = CostsStore(measure=lambda *a, **k: SINGLE_COSTS, measure_width=fake_width(widths))
    return BatchDraftPolicy(model, AutoTuner(store), clock=FakeClock(), **kw)


def run_round(policy, batch, accepted=lambda b, k: k, seconds=0.0):
    """One round as Batch.round drives the policy; the round itself takes `seconds` on the policy's clock."""
    ks = policy.plan(batch)
    policy.clock.now += seconds
    results = [RoundResult(k, accepted(b, k)) for b, k in enumerate(ks)]
    for row, r, k in zip(batch.rows, results, ks):
        if k:
            row.engine.policy.observe(r)  # what engine.settle does
    policy.observe(batch, ks, results)
    return ks


def test_policy_drafts_at_a_narrow_width_and_decodes_plainly_at_a_wide_one(model):
    widths = lambda rows: FLAT if rows <= 2 else LINEAR  # noqa: E731
    policy = make_policy(model, widths)
    narrow = FakeBatch([fake_engine(auto_policy()) for _ in range(2)])
    assert all(k > 0 for k in run_round(policy, narrow)), "drafting pays at 2 rows"
    wide = FakeBatch([fake_engine(auto_policy()) for _ in range(8)])
    ks = [run_round(policy, wide) for _ in range(bp.PROBE_SPACING + bp.STEADY_ROUNDS)]
    assert policy.widths_measured == 2, "the batch stayed at 8 rows: that width was measured"
    for _ in range(200):
        assert run_round(policy, wide) == [0] * 8, "where no K can pay at this width: plain batched steps"
    assert policy.probes == 0, "and no probes: no acceptance could make drafting pay here"
    for e in wide.rows[:4]:  # rows that were off at a narrower width, a probe due
        e.engine.policy.state.probe_due, e.engine.policy.state.plain_left = True, 0
    assert run_round(policy, wide) == [0] * 8, "a probe waits for a width where it could change the verdict"
    assert wide.rows[0].engine.policy.state.probe_due, "... and is still due there"


def test_a_batch_drafts_only_for_a_clear_gain(model):
    """Expected 1.07x (K=1 at half a step per token, 60% acceptance): one request would draft, a batch runs
    plain rounds (MIN_BATCH_SPEEDUP: what the model misses of a batch's rounds must not make it slower)."""
    def rows():
        return [fake_engine(auto_policy(PairState(AcceptanceEstimate(trials=[50.0] * K, hits=[30.0] * K))))
                for _ in range(4)]

    views = [auto(r.policy.state.estimate.alphas()) for r in rows()]
    assert 1.02 < bc.choose_round(views, HALF, {"mtp": HALF}).speedup < bp.MIN_BATCH_SPEEDUP
    assert run_round(make_policy(model, HALF), FakeBatch(rows())) == [0] * 4, "a batch needs a clear gain"


def test_policy_turns_a_row_off_and_probes_it_after_a_backoff(model):
    """Per-row costs: a row whose drafts are all rejected stops drafting while a good row drafts on, and
    is re-probed after FIRST_PROBE_AFTER rounds, the backoff doubling while probes fail."""
    per_row = WidthCosts(FLAT.verify, 0.2, 0.1, per_row=True)
    policy = make_policy(model, per_row)
    good, bad = fake_engine(auto_policy(), "ngram"), fake_engine(auto_policy(), "ngram")
    batch = FakeBatch([good, bad])
    history = [run_round(policy, batch, accepted=lambda b, k: k if b == 0 else 0) for _ in range(300)]
    bad_ks = [ks[1] for ks in history]
    assert all(ks[0] > 0 for ks in history), "the good row drafts every round"
    off = bad_ks.index(0)
    probes = [i for i in range(off, len(bad_ks)) if bad_ks[i] > 0]
    assert probes[0] - off == policies.FIRST_PROBE_AFTER, "the first probe after FIRST_PROBE_AFTER plain rounds"
    assert probes[1] - (probes[0] + 1) == 2 * policies.FIRST_PROBE_AFTER, \
        "a failed probe (the round after it turns the row off again) doubles the backoff"


def test_a_new_request_starts_from_its_pairs_verdict(model):
    """What rows learnt about probing (the backoff) is the pair's, as for one request after another: the
    next request of the pair probes at the backoff its predecessors reached, not from the start."""
    store = CostsStore(measure=lambda *a, **k: SINGLE_COSTS, measure_width=fake_width(HALF))
    tuner = AutoTuner(store)
    policy = BatchDraftPolicy(model, tuner, clock=FakeClock())
    prop = SimpleNamespace(identity="mtp")
    first = FakeEngine(tuner.policy(model, prop), "mtp")
    for _ in range(200):
        run_round(policy, FakeBatch([first]), accepted=lambda b, k: 0)
    assert first.policy.state.backoff > 4 * policies.FIRST_PROBE_AFTER, "failed probes grew the backoff"
    second = tuner.policy(model, prop)
    assert second.state.backoff == first.policy.state.backoff, "the next request starts from it"


def test_a_joining_row_keeps_its_pairs_drafting_streak(model):
    """The pair's verdict goes to a row and comes back from it whole: a row joining mid-streak (rounds drafted
    in a row, which reset the probe backoff) must not write the streak back as zero."""
    store = CostsStore(measure=lambda *a, **k: SINGLE_COSTS, measure_width=fake_width(HALF))
    tuner = AutoTuner(store)
    policy = BatchDraftPolicy(model, tuner, clock=FakeClock())
    prop = SimpleNamespace(identity="mtp")
    tuner.policy(model, prop).state.rounds_on = 7  # earlier requests of the pair drafted 7 rounds in a row
    row = FakeEngine(tuner.policy(model, prop), "mtp")
    policy.plan(FakeBatch([row]))
    assert row.policy.state.rounds_on >= 7, "the row continues the pair's streak (a drafted round adds one)"


def test_rows_that_are_off_probe_in_the_same_rounds(model):
    """Rows that stopped drafting at different rounds take the first probe due together: a probe round
    costs the whole batch a drafted pass, so B rows must not probe B times as often."""
    policy = make_policy(model, HALF)
    engines = [fake_engine(auto_policy()) for _ in range(4)]
    history = []
    for n in range(1, 5):  # a row joins every 3 rounds; all drafts are rejected
        history += [run_round(policy, FakeBatch(engines[:n]), accepted=lambda b, k: 0) for _ in range(3)]
    history += [run_round(policy, FakeBatch(engines), accepted=lambda b, k: 0) for _ in range(300)]
    late = [ks for ks in history[40:]]
    probe_rounds = [ks for ks in late if any(ks)]
    assert probe_rounds and all(all(ks) for ks in probe_rounds), "every row probes in the same rounds"
    assert len(probe_rounds) <= 4, f"as one row would: {len(probe_rounds)} probe rounds in {len(late)}"


def test_rows_learn_on_their_own_and_the_pair_learns_from_all(model):
    pair = PairState(AcceptanceEstimate())
    a, b = fake_engine(auto_policy(pair)), fake_engine(auto_policy(pair))
    policy = make_policy(model, FLAT)
    batch = FakeBatch([a, b])
    for _ in range(20):
        run_round(policy, batch, accepted=lambda row, k: k if row == 0 else 0)
    alpha_a, alpha_b = a.policy.state.estimate.alphas()[0], b.policy.state.estimate.alphas()[0]
    assert alpha_a > 0.95 and alpha_b < 0.2, "each row keeps its own acceptance"
    assert a.policy.state is not pair and b.policy.state is not pair
    assert pair.estimate.trials[0] > 20, "the pair's shared state learnt from both rows' rounds"
    assert 0.3 < pair.estimate.alphas()[0] < 0.7, "... pooled"


def test_a_fixed_row_keeps_its_k_and_auto_rows_draft_beside_it(model):
    policy = make_policy(model, HALF)
    weak = PairState(AcceptanceEstimate(trials=[50.0] * K, hits=[15.0] * K))
    batch = FakeBatch([fake_engine(FixedK(3)), fake_engine(auto_policy(weak))])
    ks = run_round(policy, batch, accepted=lambda b, k: 0)
    assert ks[0] == 3 and ks[1] > 0, "the fixed row asks 3; the weak auto row rides along on its pass"
    alone = make_policy(model, HALF)
    assert run_round(alone, FakeBatch([fake_engine(auto_policy(copy.deepcopy(weak)))] * 2)) == [0, 0], \
        "alone, the same acceptance does not pay"


def test_budget_caps_an_auto_row(model):
    e1, e2 = fake_engine(auto_policy()), fake_engine(auto_policy())
    batch = FakeBatch([e1, e2], caps={id(e1): 1})
    ks = make_policy(model, FLAT).plan(batch)
    assert ks[0] == 1 and ks[1] > 1, "a row near its max tokens drafts at most what is left"


def test_calibration_corrects_a_wrong_measurement(model):
    """The file's plain step was timed at a busy moment (10 ms; it takes 3 ms) while its verify ratios hold
    (drafted rounds take what it says, in its 10 ms steps): drafting loses 3x, which only re-timing plain
    steps while drafting can show. Re-timed, the policy decodes plainly."""
    costs = WidthCosts([1.0 + 0.05 * k for k in range(K + 1)], plain_step_s=0.01)
    policy = make_policy(model, costs)
    rows = [fake_engine(auto_policy(PairState(AcceptanceEstimate(trials=[50.0] * K, hits=[35.0] * K))))
            for _ in range(4)]
    batch, history = FakeBatch(rows), []
    for _ in range(400):
        ks = policy.plan(batch)
        policy.clock.now += bc.round_cost([bc.RowView()] * 4, ks, costs, {}) * 0.01 if any(ks) else 0.003
        policy.observe(batch, ks, [RoundResult(k, int(k * 0.7)) for k in ks])
        history.append(max(ks))
    assert history[1] > 0, "the file's costs say draft"
    assert policy.calibrations >= 1, "plain steps are re-timed while drafting"
    assert sum(1 for k in history[-100:] if k) <= 2, "once a plain step's real cost is known: plain (but for probes)"


def test_busy_moments_do_not_make_drafting_look_cheap(model):
    """Rows at 60% acceptance where a K=1 round costs what the file says: plain rounds (1.07x expected from
    drafting, under MIN_BATCH_SPEEDUP). One plain round in four takes 4x (another process ran): an average of
    the readings would halve the plain step's measured cost relative to rounds and start drafting."""
    costs = WidthCosts(HALF.verify, plain_step_s=0.01)
    policy = make_policy(model, costs)
    rows = [fake_engine(auto_policy(PairState(AcceptanceEstimate(trials=[50.0] * K, hits=[30.0] * K))))
            for _ in range(4)]
    batch, drafted = FakeBatch(rows), 0
    for i in range(300):
        ks = policy.plan(batch)
        policy.clock.now += bc.round_cost([bc.RowView()] * 4, ks, costs, {}) * 0.01 * (4 if i % 4 == 3 and not any(ks)
                                                                                        else 1)
        policy.observe(batch, ks, [RoundResult(k, int(k * 0.6)) for k in ks])
        drafted += any(ks)
    assert drafted <= 300 // policies.FIRST_PROBE_AFTER, f"{drafted} drafted rounds: only probes"


def test_only_fresh_timings_are_compared():
    """Plain steps timed 3x slow under load long ago, drafted rounds timed now: not a 1/3 ratio."""
    width = bp._Width()
    width.plain.extend((t, 3.0) for t in range(10))
    width.drafted.extend((t, 1.0) for t in range(200, 210))
    assert width.overhead(210) == 1.0, "stale plain timings do not count: the file's ratios stand"
    width.plain.extend((t, 1.05) for t in range(205, 208))
    assert width.overhead(210) == 1.0 / 1.05, "fresh ones of both kinds do"
    width.plain.extend((t, 2.0) for t in range(207, 210))
    assert width.overhead(210) == bp.MIN_OVERHEAD, "a round looks at most MIN_OVERHEAD as costly as the file says"


def test_widths_are_measured_lazily(model):
    """The first width is measured when first needed; another is interpolated until the batch stays at it,
    then measured; a batch passing through a width (draining) never stops to measure it."""
    calls = []
    store = CostsStore(measure=lambda *a, **k: SINGLE_COSTS,
                       measure_width=fake_width(lambda rows: WidthCosts(FLAT.verify, plain_step_s=0.01 * rows), calls))
    policy = BatchDraftPolicy(model, AutoTuner(store), probe_spacing=4, clock=FakeClock())
    engines = [fake_engine(auto_policy()) for _ in range(8)]
    run_round(policy, FakeBatch(engines[:4]))
    assert calls == [4], "the first width is measured at once"
    for n in (3, 2, 1):  # draining: a round at each width
        run_round(policy, FakeBatch(engines[:n]))
    assert calls == [4], "passing widths are interpolated, not measured"
    for _ in range(bp.STEADY_ROUNDS):
        run_round(policy, FakeBatch(engines))
    assert calls == [4, 8], "a width the batch stays at is measured"


def test_a_round_that_stopped_to_measure_a_width_is_timed_without_the_measuring(model):
    """The probe's seconds are not the round's: taken as a plain step's, they would make drafting look cheap."""
    clock = FakeClock()

    def measure(model, proposer, rows, **kw):
        clock.now += 5.0  # a second or two on a real model; more here
        return WidthCosts(LINEAR.verify, plain_step_s=0.01)

    store = CostsStore(measure=lambda *a, **k: SINGLE_COSTS, measure_width=measure)
    policy = BatchDraftPolicy(model, AutoTuner(store), probe_spacing=1, clock=clock)
    run_round(policy, FakeBatch([fake_engine(auto_policy())]), seconds=0.01)  # width 1 measured
    wide = FakeBatch([fake_engine(auto_policy()) for _ in range(4)])
    for _ in range(bp.STEADY_ROUNDS - 1):  # interpolated from width 1, timed as plain steps
        assert run_round(policy, wide, seconds=0.01) == [0] * 4
    run_round(policy, wide, seconds=0.01)  # measures width 4 while planning
    assert policy.widths_measured == 2
    assert max(r for _, r in policy._widths[None, 4].plain) < 1.01, "the measuring is not a step's time"


# --- exactness with the policy choosing k -----------------------------------------------------------------

PROMPTS = [[1, 5, 9, 3], [2, 7] * 10, list(range(3, 40)), [4], [9, 9, 8], [6, 1, 6, 1, 6]]
MAX_TOKENS = [60, 30, 45, 25, 40, 35]


def plain_tokens(model, prompt, n):
    return [e.token for e in Engine(model, Request(prompt, max_tokens=n)).run()]


@pytest.mark.parametrize("varying", [False, True])
def test_greedy_rows_equal_alone_with_the_policy_choosing_k(model, varying):
    """Auto rows (oracle drafts at several acceptance rates, a random MTP drafter), a fixed-k row and a
    plain row in one batch: every request's tokens are plain greedy's, whatever K the policy chose. With
    `varying`, drafting pays only at 3 rows or fewer: the batch drafts while it is narrow and decodes
    plainly while it is wide (the fixed row asks 0 there, so a wide round is plain)."""
    widths = (lambda rows: FLAT if rows <= 3 else LINEAR) if varying else FLAT
    store = CostsStore(measure=lambda *a, **k: SINGLE_COSTS, measure_width=fake_width(widths))
    tuner = AutoTuner(store)
    policy = BatchDraftPolicy(model, tuner)
    sched = Scheduler(model, policy=policy)
    mtp = make_proposer(model, drafter=make_drafter(model))
    refs = [plain_tokens(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    proposers = [OracleProposer(PROMPTS[0] + refs[0], 0.1), OracleProposer(PROMPTS[1] + refs[1], 0.5),
                 OracleProposer(PROMPTS[2] + refs[2], 0.0), mtp, mtp, None]
    for prop in set(p for p in proposers if p is not None):  # as a machine's costs file holds after first use
        for rows in range(1, len(PROMPTS) + 1):
            store.measure_width_now(model, prop, rows)
    got = {i: [] for i in range(len(PROMPTS))}
    for i, (prompt, n, prop) in enumerate(zip(PROMPTS, MAX_TOKENS, proposers)):
        rule = FixedK(0 if varying else 2) if i == 4 else (tuner.policy(model, prop) if prop is not None else None)
        eng = Engine(model, Request(prompt, max_tokens=n), proposer=prop, policy=rule)
        sched.submit(eng, lambda events, finished, i=i: got[i].extend(e.token for e in events))
    sched.drain()
    for i in range(len(PROMPTS)):
        assert got[i] == refs[i], f"request {i}: with the batch policy its tokens differ from plain greedy"
    assert any(k for counts in policy.k_counts.values() for k in counts), f"it drafted: {policy.k_counts}"
    if varying:
        assert all(set(c) == {0} for b, c in policy.k_counts.items() if b > 3), \
            f"plain while the batch was wide: {policy.k_counts}"
        assert all(set(c) - {0} for b, c in policy.k_counts.items() if b <= 3), \
            f"drafting while it was narrow: {policy.k_counts}"


# --- the width probe ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mtp", "ngram", "draft_model", "dflash"])
def test_the_width_probe_times_real_rounds_of_every_proposer_family(model, kind):
    """It runs Batch rounds on synthetic rows for each family (a block drafter's context fed and rolled back
    through the canned rounds, a draft model's cache through its timed ones); what it returns is shaped as
    the policy reads it. (Values are this machine's timings: only their form is asserted.)"""
    from tiny_models import dflash_config, make_block_drafter
    from mlx_spec.tuning.width_probe import measure_width

    if kind == "mtp":
        prop = make_proposer(model, drafter=make_drafter(model))
    elif kind == "ngram":
        prop = make_proposer(model, ngram=2)
    elif kind == "draft_model":
        prop = make_proposer(model, draft_model=make_base("dense_keqv", seed=3))
    else:
        prop = make_proposer(model, drafter=make_block_drafter(dflash_config(model)))
    costs = measure_width(model, prop, 2, reps=1, context=16)
    assert len(costs.verify) == K + 1 and costs.verify[0] == 1.0, "verify[k] for k = 0..K_MAX, in plain steps"
    assert costs.verify == sorted(costs.verify), "a longer pass costs at least a shorter one"
    assert costs.plain_step_s > 0 and costs.draft_fixed >= 0 and costs.draft_step >= 0
    assert costs.per_row == (kind != "mtp"), "an MTP drafter drafts its rows together; the others per row"


def test_the_width_probe_times_everything_on_its_clock(model):
    """Drafting is timed on the probe's clock like the rounds (a CPU-seconds clock on a shared machine must
    not meet wall seconds): with a clock that ticks once per reading, a plain round is one tick and every
    drafting one tick, whatever k."""
    from mlx_spec.tuning.width_probe import measure_width

    ticks = itertools.count()
    costs = measure_width(model, make_proposer(model, drafter=make_drafter(model)), 2, reps=1, context=16,
                          clock=lambda: float(next(ticks)))
    assert math.isclose(costs.plain_step_s, 1.0) and math.isclose(costs.draft_fixed + costs.draft_step, 1.0) \
        and costs.draft_step < 1e-9, f"drafting timed on the probe's clock: {costs}"

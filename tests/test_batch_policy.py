"""The batch's draft-length policy: the cost model by width (table-driven, crafted costs and acceptance),
the costs file's widths (round trip, old files) and the width probe. No timing in any assert: costs are
injected."""

import copy
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from tiny_models import make_base, make_drafter
from mlx_spec.proposers import make_proposer
from mlx_spec.tuning import Costs, CostsStore, WidthCosts
from mlx_spec.tuning import batch_costs as bc

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

"""Self-tuning: the cost model's maths (table-driven), the acceptance estimate, the auto policy's state
machine (auto-off, re-probe, backoff), its decisions on real drafters, and the per-machine cost cache."""

import json
import math
import warnings

import numpy as np
import pytest

from mlx_spec import tuning
from mlx_spec.bench.command import _random_weights
from mlx_spec.engine import Engine
from mlx_spec.identity import model_identity
from mlx_spec.proposers.base import RoundResult
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.proposers.ngram import NgramProposer
from mlx_spec.tuning import AutoDraftPolicy, AutoTuner, Costs, CostsStore, FixedK
from mlx_spec.tuning import costs as cost_model
from mlx_spec.tuning import policy as policies
from mlx_spec.tuning import store as stores
from mlx_spec.tuning import tuner as tuners
from mlx_spec.tuning.policy import AcceptanceEstimate, PairState
from mlx_spec.request import Request

# A typical Apple-silicon profile: verifying k+1 tokens costs little more than one, drafting ~0.1 step.
CHEAP = Costs(verify=[1.0 + 0.03 * k for k in range(9)], draft_fixed=0.02, draft_step=0.1)
FLAT = Costs(verify=[1.0] * 9)  # free drafting, free extra verify tokens
SLOW = Costs(verify=[1.0 + 1.0 * k for k in range(9)], draft_step=0.3)  # verify grows a full step per token
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cost-cache file (learnt state lives in the objects a test makes)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# --- cost model maths -------------------------------------------------------------------------------

TAU_CASES = [
    # (invariant, alphas, k, tau)
    ("k=0: the bonus token only", [0.9, 0.9], 0, 1.0),
    ("all accepted: k+1", [1.0, 1.0, 1.0], 3, 4.0),
    ("none accepted: 1", [0.0, 1.0, 1.0], 3, 1.0),
    ("geometric: 1 + a + a^2", [0.5, 0.5], 2, 1.75),
    ("conditional: later positions only count after earlier ones", [0.8, 0.5], 2, 1 + 0.8 + 0.4),
    ("k beyond the estimate uses what there is", [0.5], 3, 1.5),
]


@pytest.mark.parametrize("invariant, alphas, k, tau", TAU_CASES)
def test_expected_tokens(invariant, alphas, k, tau):
    assert math.isclose(tuning.expected_tokens(alphas, k), tau), invariant


SPEEDUP_CASES = [
    # (invariant, alphas, costs, k, empty_rate, speedup)
    ("plain decoding is the unit", [1.0] * 8, CHEAP, 0, 0.0, 1.0),
    ("free drafts, flat verify, all accepted: k+1", [1.0] * 8, FLAT, 3, 0.0, 4.0),
    ("tau / (verify[k] + draft(k))", [0.5] * 8, CHEAP, 2, 0.0, 1.75 / (1.06 + 0.02 + 0.2)),
    ("slow verify: even perfect drafts lose", [1.0] * 8, SLOW, 2, 0.0, 3.0 / (3.0 + 0.6)),
    ("empty proposals cost a 1-token verify, give 1 token", [1.0] * 8, FLAT, 3, 0.5, (0.5 + 0.5 * 4) / 1.0),
]


@pytest.mark.parametrize("invariant, alphas, costs, k, empty, speedup", SPEEDUP_CASES)
def test_expected_speedup(invariant, alphas, costs, k, empty, speedup):
    assert math.isclose(tuning.expected_speedup(alphas, costs, k, empty), speedup, rel_tol=1e-9), invariant
    if k:
        assert math.isclose(tuning.expected_speedup(alphas, costs, k, empty, overhead=2.0), speedup / 2), \
            "measured overhead scales the round cost"


BEST_K_CASES = [
    # (invariant, alphas, costs, k_max, best k)
    ("a drafter that never agrees: plain", [0.0] * 8, CHEAP, 8, 0),
    ("perfect drafts, flat costs: the longest k", [1.0] * 8, FLAT, 8, 8),
    ("perfect drafts, flat costs, capped k_max", [1.0] * 8, FLAT, 4, 4),
    ("a chip where verify grows a step per token: plain even for perfect drafts", [1.0] * 8, SLOW, 8, 0),
    ("decaying acceptance: an interior optimum", [0.9, 0.8, 0.6, 0.3, 0.1, 0.1, 0.1, 0.1], CHEAP, 8, 3),
    ("a marginal gain below MIN_SPEEDUP stays plain", [0.1] * 8, Costs([1.0] * 9, 0.0, 0.085), 8, 0),
]


@pytest.mark.parametrize("invariant, alphas, costs, k_max, want", BEST_K_CASES)
def test_best_k(invariant, alphas, costs, k_max, want):
    k, s = tuning.best_k(alphas, costs, k_max=k_max)
    assert k == want, invariant
    assert (s >= cost_model.MIN_SPEEDUP) if k else s == 1.0, "a drafting choice must clear MIN_SPEEDUP"


def test_best_k_min_k_forces_a_draft():
    k, _ = tuning.best_k([0.0] * 8, CHEAP, min_k=1)
    assert k == 1, "a probe drafts at least one token, the cheapest when nothing is accepted"


@pytest.mark.parametrize("costs, pays", [(CHEAP, True), (FLAT, True), (SLOW, False)])
def test_can_ever_pay(costs, pays):
    assert cost_model.can_ever_pay(costs) is pays


ISOTONIC_CASES = [
    ("monotone input is kept", [1.0, 1.1, 1.3], [1.0, 1.1, 1.3]),
    ("a dip is pooled with its neighbour", [1.0, 1.4, 1.2, 1.5], [1.0, 1.3, 1.3, 1.5]),
    ("a first spike is pooled", [2.0, 1.0, 1.0], [4 / 3] * 3),
]


@pytest.mark.parametrize("invariant, values, want", ISOTONIC_CASES)
def test_isotonic(invariant, values, want):
    got = cost_model.isotonic(values)
    assert all(math.isclose(a, b) for a, b in zip(got, want)), invariant
    assert all(a <= b for a, b in zip(got, got[1:])), "the fit is non-decreasing"


def test_fit_line_clamps_at_zero():
    assert cost_model.fit_line([1, 2, 4, 8], [0.12, 0.22, 0.42, 0.82]) == pytest.approx((0.02, 0.1))
    fixed, step = cost_model.fit_line([1, 2, 4, 8], [0.5, 0.4, 0.3, 0.1])
    assert step == 0.0 and fixed > 0, "drafting never gets cheaper with more drafts"


def test_costs_json_round_trip():
    assert Costs.from_json(json.loads(json.dumps(CHEAP.to_json()))) == CHEAP
    assert CHEAP.round_cost(0) == 1.0 and CHEAP.round_cost(2) == pytest.approx(1.06 + 0.22)


# --- acceptance estimate ----------------------------------------------------------------------------

OBSERVE_CASES = [
    # (invariant, k, n, trials, hits): a position is tried only when every earlier draft was accepted
    ("none accepted: only the first draft was tried", 3, 0, [1, 0, 0], [0, 0, 0]),
    ("one accepted: the second was tried and missed", 3, 1, [1, 1, 0], [1, 0, 0]),
    ("all accepted: every position tried and hit", 3, 3, [1, 1, 1], [1, 1, 1]),
    ("a short proposal tries only what it drafted", 1, 1, [1, 0, 0], [1, 0, 0]),
    ("an empty proposal tries nothing", 0, 0, [0, 0, 0], [0, 0, 0]),
]


@pytest.mark.parametrize("invariant, k, n, trials, hits", OBSERVE_CASES)
def test_acceptance_observe(invariant, k, n, trials, hits):
    est = AcceptanceEstimate(k_max=3)
    est.observe(k, n)
    assert (est.trials, est.hits) == (trials, hits), invariant


def test_acceptance_prior_and_evidence():
    est = AcceptanceEstimate(k_max=3)
    a = est.alphas()
    assert a[0] == pytest.approx(policies.PRIOR_ACCEPTANCE), "no evidence: the prior"
    assert a[1] == pytest.approx(a[0] * policies.PRIOR_DEPTH_DECAY), "an untried position: a little below the one before"
    for _ in range(200):
        est.observe(3, 1)
    a = est.alphas()
    assert a[0] > 0.95 and a[1] < 0.1, "evidence outweighs the prior"
    est.shrink(4.0)
    assert max(est.trials) <= 4.0 + 1e-9 and est.alphas()[0] > 0.9, "shrinking keeps the estimate, not the weight"
    assert est.empty_rate < 0.05
    for _ in range(200):
        est.observe(0, 0)
    assert est.empty_rate > 0.9, "proposals that come back empty are counted"


def test_a_position_k_no_longer_reaches_drifts_back_to_its_prior():
    est = AcceptanceEstimate(k_max=3, trials=[10.0, 10.0, 0.0], hits=[9.0, 0.0, 0.0])
    assert est.alphas()[1] < 0.1, "the second draft looked useless once"
    for _ in range(600):
        est.observe(1, 1)  # only k=1 is drafted from then on
    assert est.alphas()[1] > 0.6, "... so its estimate returns to the prior and k=2 gets tried again"


# --- the policy's state machine (synthetic costs, no engine) ----------------------------------------

def drive(policy, accept, rounds):
    """Run `rounds` next_k() calls; a drafting round accepts accept(k) drafts. Returns the k sequence."""
    ks = []
    for _ in range(rounds):
        k = policy.next_k()
        ks.append(k)
        policy.observe(RoundResult(k, accept(k) if k else 0))
    return ks


def test_policy_turns_off_for_a_drafter_that_never_agrees_and_backs_off():
    policy = AutoDraftPolicy(CHEAP)
    ks = drive(policy, lambda k: 0, 2000)
    first_zero = ks.index(0)
    cost = [CHEAP.round_cost(k) for k in ks]  # every round emits 1 token: plain costs 1 per token
    assert sum(cost[:128]) / 128 <= 1.05, f"auto-off costs <= 5% over a 128-token request: {ks[:16]}"
    assert sum(cost) / len(cost) <= 1.01, "... and under 1% over a long one"
    runs = "".join("d" if k else "p" for k in ks[first_zero:]).split("d")
    gaps = [len(r) for r in runs[:-1] if r]  # plain steps between probes
    assert gaps and all(b >= a for a, b in zip(gaps, gaps[1:])), f"probe gaps never shrink: {gaps}"
    assert max(gaps) >= policies.MAX_PROBE_AFTER, "backoff reaches its cap"
    assert max(len(r) for r in "".join("d" if k else "p" for k in ks[first_zero:]).split("p")) <= 2, \
        "a failed probe switches drafting off again within two rounds"
    assert all(k == 1 for k in ks[first_zero:] if k), "a failed drafter is probed with the cheapest draft"
    assert sum(k > 0 for k in ks) / len(ks) < 0.02, "auto-off drafts in under 2% of steps"


def test_policy_drafts_long_when_everything_is_accepted():
    policy = AutoDraftPolicy(CHEAP)
    ks = drive(policy, lambda k: k, 200)
    runs = [len(r) for r in "".join("d" if k else "p" for k in ks).split("d") if r]
    assert policy.probes == 0 and set(runs) == {policies.CALIBRATION_STEPS}, \
        "a drafter that always agrees is never switched off: plain steps only to re-time a plain step"
    assert len(runs) <= 1 + len(ks) // cost_model.CALIBRATE_EVERY
    assert ks[-1] == tuning.K_MAX, "cheap verify + full acceptance: the longest k"


def _drafted_rounds_between_calibrations(ks):
    return [len(r) for r in "".join("d" if k else "p" for k in ks).split("p") if r]


def test_policy_re_times_rarely_when_drafting_pays_by_far_and_often_when_it_is_close():
    """Calibration can only flip the draft-or-not verdict, so a drafter far ahead of plain decoding pays for
    it rarely (4 plain steps per 32 rounds would cost a 3x drafter ~7%), one near break-even often."""
    far = AutoDraftPolicy(CHEAP)
    gaps = _drafted_rounds_between_calibrations(drive(far, lambda k: k, 2000))[1:-1]
    assert far.expected_speedup > 3 and gaps[0] <= 2 * cost_model.CALIBRATE_EVERY
    assert all(b >= a for a, b in zip(gaps, gaps[1:])) and max(gaps) == cost_model.CALIBRATE_MAX_EVERY, gaps

    close = AutoDraftPolicy(CHEAP)  # the first draft accepted a third of the time, the rest never: S ~ 1.15
    rng = np.random.default_rng(0)
    ks = drive(close, lambda k: int(rng.random() < 0.35), 2000)
    assert 1.02 <= close.expected_speedup < 1.25, close.summary()
    gaps = _drafted_rounds_between_calibrations(ks)[1:-1]
    assert gaps and max(gaps) <= cost_model.CALIBRATE_EVERY + 1, gaps


def test_policy_recovers_when_acceptance_returns():
    policy = AutoDraftPolicy(CHEAP)
    drive(policy, lambda k: 0, 100)
    assert policy.next_k() == 0
    ks = drive(policy, lambda k: k, 300)
    assert ks[-1] >= 3 and sum(k > 0 for k in ks[-50:]) >= 50 - policies.CALIBRATION_STEPS, \
        "re-probing finds the drafter good again (plain steps now only to re-time a plain step)"


def test_policy_never_drafts_when_costs_cannot_pay():
    policy = AutoDraftPolicy(SLOW)
    ks = drive(policy, lambda k: k, 500)
    assert set(ks) == {0} and policy.probes == 0, "no probe when even perfect drafts cannot pay"


def test_policy_weighs_rounds_and_plain_steps_as_this_engine_runs_them(monkeypatch):
    """The time between next_k() calls is a round or a plain step as the engine really runs it; rounds that
    take twice the modelled time halve the expected speedup, and the policy goes plain."""
    costs = Costs(CHEAP.verify, CHEAP.draft_fixed, CHEAP.draft_step, plain_step_s=0.01)
    now = [0.0]
    policy = AutoDraftPolicy(costs, clock=lambda: now[0])
    ks = []
    for _ in range(300):
        k = policy.next_k()
        ks.append(k)
        n = min(k, 1)  # only the first draft is ever accepted: tau <= 2
        policy.observe(RoundResult(k, n)) if k else None
        now[0] += 2 * costs.round_cost(k) * 0.01 if k else 0.01  # rounds: twice the model; plain: as modelled
    st = policy.state
    assert st.round_overhead > 1.6 and abs(st.plain_overhead - 1.0) < 0.05, "measured / modelled, smoothed"
    assert ks[-1] == 0, "tau 2 over a doubled round cost is no gain: plain"


def test_policy_re_times_plain_steps_while_drafting_and_sees_a_stale_costs_file(monkeypatch):
    """The costs file was measured when everything ran 2.5x slower (another thermal state, or this project's
    VM in its slow phase). Now a plain step takes 0.4 of the file's and a round 0.8 of its modelled time:
    in the file's terms rounds look cheap (0.8), yet relative to a plain step they cost twice the model, so
    tau 2 does not pay. Without plain steps to compare with, the policy would draft forever; the calibration
    steps it takes while drafting see the ratio and switch drafting off."""
    costs = Costs(CHEAP.verify, CHEAP.draft_fixed, CHEAP.draft_step, plain_step_s=0.01)
    now = [0.0]
    policy = AutoDraftPolicy(costs, clock=lambda: now[0])
    ks, tokens = [], 0
    for _ in range(400):
        k = policy.next_k()
        ks.append(k)
        if k:
            policy.observe(RoundResult(k, min(k, 1)))  # only the first draft is ever accepted: tau <= 2
        tokens += 1 + min(k, 1)
        now[0] += 0.8 * costs.round_cost(k) * 0.01 if k else 0.4 * 0.01
    st = policy.state
    assert abs(st.plain_overhead - 0.4) < 0.05 and abs(st.round_overhead - 0.8) < 0.1
    assert policy.calibrations >= 1 and ks[-1] == 0, "tau 2 over twice the modelled round cost: plain"
    assert tokens / (now[0] / (0.4 * 0.01)) >= 0.95, "overall within 5% of plain decoding's speed"


def test_policy_every_zero_is_one_plain_step():
    """While off, each next_k() call stands for one plain step: exactly backoff calls between probes."""
    policy = AutoDraftPolicy(CHEAP, PairState(AcceptanceEstimate(trials=[50.0] * 8, hits=[0.0] * 8)))
    assert policy.next_k() == 0
    ks = drive(policy, lambda k: 0, 200)
    first_probe = next(i for i, k in enumerate(ks) if k)
    assert first_probe == policies.FIRST_PROBE_AFTER - 1, "the decision step plus backoff - 1 plain steps"


def test_learnt_state_carries_over_down_weighted(trained_pair):
    model, _, drafter = trained_pair
    tuner = AutoTuner()
    state = tuner.pair_state(model, MTPProposer(drafter, model))
    drive(AutoDraftPolicy(CHEAP, state), lambda k: 0, 300)
    assert state.plain_left > policies.FIRST_PROBE_AFTER, "deep in backoff"
    again = tuner.pair_state(model, MTPProposer(drafter, model))
    assert again is state, "a new request with the same pair continues what was learnt"
    assert AutoDraftPolicy(CHEAP, again).next_k() == 0, "... starting plain for a drafter that never agreed"
    assert max(again.estimate.trials) <= tuners.CARRY_WEIGHT + 1e-9, "... trusting the old evidence less"
    assert again.plain_left < policies.FIRST_PROBE_AFTER, "... and re-probing early, since the prompt is new"
    other = tuner.pair_state(model, NgramProposer(3))
    assert other is not state, "another proposer learns on its own"
    assert AutoTuner().pair_state(model, MTPProposer(drafter, model)) is not state, \
        "what a tuner learnt stays with it: another caller starts afresh"


# --- decisions on real drafters (the trained tiny pair) ---------------------------------------------

def decode(model, tokens, proposer=None, policy=None, max_tokens=48):
    eng = Engine(model, Request(tokens, max_tokens=max_tokens), proposer=proposer, policy=policy or FixedK(3))
    return [e.token for e in eng.run()], eng.stats


def test_auto_goes_plain_for_a_random_drafter_and_drafts_for_the_trained_one(trained_pair):
    model, tokenizer, drafter = trained_pair
    ids = tokenizer.encode(PROMPT)
    plain, _ = decode(model, ids)

    policy = AutoDraftPolicy(CHEAP)
    out, stats = decode(model, ids, MTPProposer(_random_weights(drafter), model), policy)
    assert out == plain, "greedy output with the auto policy equals plain"
    assert stats.accepted == 0 and policy.next_k() == 0, f"random drafter: plain after its probe ({policy.summary()})"
    drafted = sum(c for k, c in policy.k_counts.items() if k)
    assert drafted <= 8, f"a handful of drafted rounds before going plain ({policy.k_counts})"

    policy = AutoDraftPolicy(CHEAP)
    out, stats = decode(model, ids, MTPProposer(drafter, model), policy)
    assert out == plain, "greedy output with the auto policy equals plain"
    assert policy.next_k() >= 1 and stats.tau > 2, f"trained drafter keeps drafting ({policy.summary()})"


class ScriptedPolicy:
    """Alternates plain steps and drafted rounds in a fixed pattern (what auto-off and probes look like)."""

    def __init__(self, pattern):
        self.pattern, self.i = pattern, 0

    def next_k(self):
        self.i += 1
        return self.pattern[(self.i - 1) % len(self.pattern)]

    def observe(self, result):
        pass


@pytest.mark.parametrize("pattern", [[0, 0, 3, 0, 2, 0, 0, 0, 1], [0], [4, 0], [0, 0, 0, 0, 0, 0, 0, 5]])
def test_switching_between_plain_and_drafting_keeps_greedy_output_exact(trained_pair, pattern):
    model, tokenizer, drafter = trained_pair
    ids = tokenizer.encode(PROMPT)
    plain, _ = decode(model, ids, max_tokens=70)
    eng = Engine(model, Request(ids, max_tokens=70), proposer=MTPProposer(drafter, model),
                 policy=ScriptedPolicy(pattern))
    out = [e.token for e in eng.run()]
    assert out == plain, f"pattern {pattern}: speculative greedy equals plain, whatever k the policy gives"
    assert eng.cache[0].offset == len(eng.history) - 1, "after the run the cache holds history[:-1]"


def test_auto_tuner_measures_once_and_caches_per_machine_and_model(trained_pair, tmp_path):
    model, _, drafter = trained_pair
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return tuning.measure_costs(*a, **dict(kw, reps=1))

    proposer = MTPProposer(drafter, model)
    tuner = AutoTuner(CostsStore(measure=counting))
    policy = tuner.policy(model, proposer)
    path = tmp_path / "xdg" / "mlx_spec" / "tuning.json"
    assert path.exists(), "the cost cache lives under $XDG_CACHE_HOME/mlx_spec/"
    costs = policy.costs
    assert len(costs.verify) == tuning.K_MAX + 1 and all(v > 0 for v in costs.verify)
    assert costs.verify == sorted(costs.verify), "verify costs are non-decreasing in k"
    assert costs.draft_step >= 0 and costs.draft_fixed >= 0 and costs.plain_step_s > 0

    tuner.policy(model, proposer)
    assert len(calls) == 1, "a second request uses the in-memory costs"
    again = AutoTuner(CostsStore(measure=counting)).policy(model, proposer)
    assert len(calls) == 1 and again.costs == costs, "a new tuner (a new process) reads the file instead of measuring"

    tuner.policy(model, NgramProposer(3))
    assert len(calls) == 2, "another proposer is measured on its own"
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    assert set(entry["proposers"]) == {proposer.identity, "ngram:3"}
    assert entry["machine"]["mlx"] and entry["model"]["dtype"] == "float32"


def test_model_identity_tells_models_apart(trained_pair):
    import mlx.nn as nn

    model, _, drafter = trained_pair
    a = model_identity(drafter)
    b = model_identity(_random_weights(drafter))
    assert a["config_hash"] == b["config_hash"] and a["weights_hash"] != b["weights_hash"], \
        "same config, other weights: another model"
    assert a["quantization"] is None and a["dtype"] == "float32"
    q = _random_weights(drafter)
    nn.quantize(q, group_size=64, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear)
                and m.weight.shape[-1] % 64 == 0)
    assert model_identity(q)["quantization"]["bits"] == 4
    assert MTPProposer(drafter, model).identity != MTPProposer(_random_weights(drafter), model).identity, \
        "a proposer files its costs under its weights"


DAMAGED = {
    "not JSON": b"{not json",
    "not UTF-8": b"\xff\xfe{}",
    "nested too deeply": b"[" * 100_000 + b"]" * 100_000,  # a RecursionError in the JSON parser
    "no version": b'{"entries": {}}',
    "an entry that is a list": b'{"version": %d, "entries": {"k": []}}' % stores.CACHE_VERSION,
    "proposers that are a list": b'{"version": %d, "entries": {"k": {"proposers": []}}}' % stores.CACHE_VERSION,
    "costs of the wrong shape": b'{"version": %d, "entries": {"k": {"proposers": {"p": {"verify": "x"}}}}}'
                                % stores.CACHE_VERSION,
    "a NaN cost": b'{"version": %d, "entries": {"k": {"proposers": {"p": {"verify": [NaN]}}}}}' % stores.CACHE_VERSION,
}


def costs_file(tmp_path, content: bytes):
    path = tmp_path / "xdg" / "mlx_spec" / "tuning.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_costs_file_is_moved_aside_with_one_warning(trained_pair, tmp_path, damage):
    """Any damage: one warning naming the file and where it went, the costs measured afresh, the user's file
    kept beside the new one (never deleted, never a traceback)."""
    model, _, _ = trained_pair
    path = costs_file(tmp_path, DAMAGED[damage])
    lines = []
    store = CostsStore(measure=lambda *a, **kw: CHEAP, log=lines.append)
    assert store.get(model, NgramProposer(3)) == CHEAP, "measured afresh"
    assert store.get(model, NgramProposer(2)) == CHEAP
    warned = [line for line in lines if line.startswith("warning:")]
    assert len(warned) == 1 and str(path) in warned[0], f"one warning naming the file: {lines}"
    (aside,) = [p for p in path.parent.iterdir() if p.name.startswith("tuning.damaged-")]
    assert aside.read_bytes() == DAMAGED[damage] and str(aside) in warned[0], "the user's file is kept, and named"
    assert set(json.loads(path.read_text())["entries"].popitem()[1]["proposers"]) == {"ngram:3", "ngram:2"}
    lines.clear()
    assert CostsStore(measure=None, log=lines.append).get(model, NgramProposer(3)) == CHEAP and lines == [], \
        "the new file answers the next process, without a word"


def test_a_costs_file_of_an_older_format_is_replaced_without_a_word(trained_pair, tmp_path):
    model, _, _ = trained_pair
    path = costs_file(tmp_path, b'{"version": 1, "entries": {}}')
    lines = []
    assert CostsStore(measure=lambda *a, **kw: CHEAP, log=lines.append).get(model, NgramProposer(3)) == CHEAP
    assert not [line for line in lines if line.startswith("warning:")], lines
    assert json.loads(path.read_text())["version"] == stores.CACHE_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["tuning.json"], "old measurements are meant to be redone"


def test_a_damaged_costs_file_that_cannot_be_moved_is_left_alone(trained_pair, tmp_path, monkeypatch):
    model, _, _ = trained_pair
    path = costs_file(tmp_path, DAMAGED["nested too deeply"])

    def refuse(*a):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(stores.os, "rename", refuse)
    with pytest.warns(RuntimeWarning, match="cannot be moved aside .Permission denied., so it is ignored"):
        store = CostsStore(measure=lambda *a, **kw: CHEAP)  # a library call: Python's warnings
        assert store.get(model, NgramProposer(3)) == CHEAP
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert store.get(model, NgramProposer(2)) == CHEAP
    assert path.read_bytes() == DAMAGED["nested too deeply"], "the user's file is not written over"


def test_generate_with_a_damaged_costs_file_warns_and_runs(tmp_path, monkeypatch, capsys):
    """The audit's reproduction: a deeply nested tuning.json made every --num-draft-tokens auto run fail."""
    import functools

    from conftest import TINY_CODE

    from mlx_spec.generate import main

    path = costs_file(tmp_path, DAMAGED["nested too deeply"])
    monkeypatch.setattr(tuners, "CostsStore", functools.partial(CostsStore, measure=lambda *a, **kw: CHEAP))
    rc = main(["--model", str(TINY_CODE / "base"), "--drafter", str(TINY_CODE / "assistant"), "--prompt", "def",
               "--max-tokens", "4", "--num-draft-tokens", "auto", "--ignore-chat-template"])
    err = capsys.readouterr().err
    assert rc == 0 and err.count(f"the costs file {path} is damaged (nested too deeply)") == 1, err
    assert "Traceback" not in err


def test_costs_can_be_measured_for_a_draft_model_proposer():
    """A draft model keeps its own cache: every timing must start it like the engine does."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_models import make_base

    from mlx_spec.proposers.draft_model import DraftModelProposer
    from mlx_spec.tuning import measure_costs

    base = make_base("dense_keqv")
    costs = measure_costs(base, DraftModelProposer(make_base("dense_keqv", seed=5), base), k_max=3, context=24,
                          reps=1)
    assert costs.draft_step > 0 and len(costs.verify) == 4


def test_first_use_says_it_is_measuring_once_and_a_library_call_stays_silent(trained_pair, capsys):
    model, _, drafter = trained_pair
    lines = []
    AutoTuner(log=lines.append).policy(model, MTPProposer(drafter, model))
    assert len(lines) == 1 and "measuring this machine" in lines[0]
    AutoTuner(log=lines.append).policy(model, MTPProposer(drafter, model))
    assert len(lines) == 1, "the file answers now: nothing to say"
    AutoTuner().policy(model, NgramProposer(2))  # measures, silently
    assert capsys.readouterr().err == "", "a library call prints nothing"

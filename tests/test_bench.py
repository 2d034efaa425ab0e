"""mlx_spec.bench on the trained tiny pair, a few tokens: the JSON schema, values that are sane and
consistent with each other, the table, the prompt set and files, the oracle proposer, and user errors."""

import json
import math

import mlx.core as mx
import pytest
from conftest import TINY_CODE

from mlx_spec import bench, prompts, tuning
from mlx_spec.bench import command, report, runner
from mlx_spec.proposers.base import RoundContext
from mlx_spec.sampling import Sampler, SamplingParams
from mlx_spec.tuning import probe
from mlx_spec.proposers.oracle import OracleProposer

BASE, ASSISTANT = str(TINY_CODE / "base"), str(TINY_CODE / "assistant")
REQUIRED = {"proposer", "k", "temp", "plain_tps", "spec_tps", "speedup", "tau", "acceptance_rate",
            "acceptance_by_position", "round_cost", "draft_share", "verify_cost", "peak_memory_bytes",
            "plain_peak_memory_bytes", "efficiency", "by_kind", "environment"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small benchmark run shared by the schema tests: mtp k=1,3,auto, a random drafter, n-gram, oracle."""
    tmp = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
    mp.setattr(probe, "DEFAULT_PROBE_REPS", 1)
    out = tmp / "bench.json"
    argv = ["--model", BASE, "--drafter", ASSISTANT, "--random-drafter", "--ngram", "--oracle", "0,0.5",
            "--num-draft-tokens", "1,3,auto", "--prompts", "code", "--max-tokens", "12", "--repeats", "1",
            "--ignore-chat-template", "--memory-contexts", "40,300",
            "--json", str(out)]
    import contextlib
    import io

    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = bench.main(argv)
    (tmp / "stderr.txt").write_text(err.getvalue())
    mp.undo()
    results = json.loads(out.read_text())
    assert "memory_by_context" in results[-1], "the last JSON entry: peak memory by context"
    return rc, results[:-1], buf.getvalue(), tmp


def test_peak_memory_by_context_is_measured_with_the_kv_estimate(bench_run):
    _, _, table, tmp = bench_run
    rows = json.loads((tmp / "bench.json").read_text())[-1]["memory_by_context"]
    assert [r["context"] for r in rows] == [40, 300]
    for r in rows:
        assert r["kv_bytes"] == r["kv_estimate_bytes"], "the estimate the commands check is the measured K/V"
        assert r["plain_peak_bytes"] > 0 and r["mtp_peak_bytes"] > 0
    assert rows[1]["kv_bytes"] > rows[0]["kv_bytes"] and "peak memory by context" in table, "K/V grows with context"


def by(results, proposer, k, rate=None):
    return next(r for r in results if r["proposer"] == proposer and r["k"] == k and r["oracle_rate"] == rate)


def test_json_has_one_object_per_configuration_with_the_schema(bench_run):
    rc, results, _, _ = bench_run
    assert rc == 0
    families = {("mtp", None), ("mtp-random", None), ("ngram", None), ("oracle", 0.0), ("oracle", 0.5)}
    assert {(r["proposer"], r["oracle_rate"]) for r in results} == families
    assert len(results) == len(families) * 3, "every proposer x every k"
    for r in results:
        missing = REQUIRED - set(r)
        assert not missing, f"{r['proposer']} k={r['k']} lacks {missing}"


def test_values_are_sane_and_consistent(bench_run):
    _, results, _, _ = bench_run
    for r in results:
        name = f"{r['proposer']}({r['oracle_rate']}) k={r['k']}"
        assert r["plain_tps"] > 0 and r["spec_tps"] > 0, name
        assert math.isclose(r["speedup"], r["spec_tps"] / r["plain_tps"], rel_tol=1e-9), f"{name}: speedup = spec/plain"
        assert r["tau"] >= 1 or r["tau"] == 0, f"{name}: tau counts the bonus token (0 only with no rounds)"
        assert 0 <= r["acceptance_rate"] <= 1, name
        assert all(a is None or 0 <= a <= 1 for a in r["acceptance_by_position"]), name
        assert r["round_cost"] > 0, name
        assert r["draft_share"] is None or 0 <= r["draft_share"] <= 1, name
        assert r["peak_memory_bytes"] > 0 and r["plain_peak_memory_bytes"] > 0, name
        assert r["matches_plain"] == 1.0, f"{name}: greedy speculative output equals plain"
        assert set(r["verify_cost"]) == {str(k) for k in range(tuning.K_MAX + 1)}
        costs = [r["verify_cost"][str(k)] for k in range(tuning.K_MAX + 1)]
        assert all(c > 0 for c in costs) and costs == sorted(costs), "verify cost is positive, non-decreasing"
        if isinstance(r["k"], int):
            assert len(r["acceptance_by_position"]) <= r["k"], f"{name}: one rate per draft position"
        if r["rounds"]:
            assert math.isclose(r["tau"], (r["accepted"] + r["rounds"]) / r["rounds"]), f"{name}: tau = n/round + 1"
            assert math.isclose(r["acceptance_rate"], r["accepted"] / r["drafted"]), name
    assert by(results, "oracle", 3, 0.0)["acceptance_rate"] == 1.0, "an uncorrupted oracle is always accepted"
    assert by(results, "oracle", 3, 0.0)["tau"] > 3, "... so tau is near k+1"
    assert by(results, "mtp-random", 3)["acceptance_rate"] < 0.1, "random weights almost never agree"
    assert by(results, "mtp", 3)["tau"] > by(results, "mtp-random", 3)["tau"], "the trained drafter beats random"
    assert by(results, "mtp", 3)["draft_share"] > 0, "MTP drafting takes time"
    oracle = by(results, "oracle", 3, 0.0)
    assert 0 < oracle["efficiency"] < 2, "efficiency is a ratio near 1"


def test_environment_and_memory_records(bench_run):
    _, results, _, _ = bench_run
    env = results[0]["environment"]
    assert env["machine"]["mlx"] == mx.__version__ and env["machine"]["device"]
    assert env["model"]["dtype"] == "float32" and env["model"]["quantization"] is None
    assert env["model_path"] == BASE and env["max_tokens"] == 12
    mtp = by(results, "mtp", 3)
    assert mtp["drafter_weight_bytes"] > 0, "the drafter's weights are reported"
    assert by(results, "ngram", 3)["drafter_weight_bytes"] == 0, "n-gram has no weights"
    assert abs(mtp["memory_overhead_bytes"]) < mtp["drafter_weight_bytes"], \
        "speculation adds small buffers only (the drafter's weights are loaded for both runs)"


def test_auto_is_recorded_with_the_ks_it_chose(bench_run):
    _, results, _, _ = bench_run
    auto = by(results, "mtp-random", "auto")
    assert auto["k_counts"] and auto["k_counts"].get("0", 0) > 0, "auto switched a useless drafter off"
    assert by(results, "mtp", 1)["k_counts"] is None


def test_table_names_every_configuration(bench_run):
    _, results, table, _ = bench_run
    assert "plain:" in table and "tok/s" in table and "by kind" in table
    for r in results:
        assert f"k={r['k']}" in table
    assert "oracle(0.5) k=3" in table and "mtp-random k=auto" in table


def test_progress_goes_to_stderr_with_the_time_left_and_quiet_silences_it(bench_run, capsys):
    _, _, table, tmp = bench_run
    err = (tmp / "stderr.txt").read_text()
    assert "bench: plain reference runs" in err and "bench: pass 1/1 done; about" in err and "left" in err
    # 5 families (mtp, mtp-random, ngram, two oracles) x 3 ks = 15 configurations; per prompt a pass runs them
    # with 8 + 1 plain runs around them (24), the instrumented runs 15 more; 2 code prompts x 12 tokens
    assert f"the passes decode about {(24 + 15) * 2 * 12} tokens, up to " in err, err
    assert "bench:" not in table, "stdout holds the table only"
    assert bench.build_parser().parse_args(["--model", "m", "--quiet"]).quiet
    bench.Bench(None, [], None, [], 0, 1, progress=False).log("hidden")
    assert capsys.readouterr().err == ""
    assert runner._time_left(60.0, 1, 3) == "; about 2 min left" and runner._time_left(10.0, 2, 2) == "; about 2 s left"
    assert runner._duration(6 * 3600) == "6.0 h"


def test_tuning_cache_is_written_under_xdg(bench_run):
    _, _, _, tmp = bench_run
    data = json.loads((tmp / "xdg" / "mlx_spec" / "tuning.json").read_text())
    (entry,) = data["entries"].values()
    assert {"ngram:3", "oracle:0", "oracle:0.5"} <= set(entry["proposers"]), "the bench refreshes the costs it probed"


# --- errors a user can act on -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--model", BASE], "nothing to compare"),
    (["--model", BASE, "--oracle", "0.1", "--temp", "0.7"], "--temp 0"),
    (["--model", BASE, "--ngram", "--random-drafter"], "--random-drafter needs --drafter"),
    (["--model", BASE, "--ngram", "--prompts", "poetry"], "--prompts"),
    (["--model", BASE, "--ngram", "--repeats", "0"], "--repeats"),
    (["--model", BASE, "--draft-model", ASSISTANT], "pass it with --drafter"),
    (["--model", BASE, "--ngram", "--mlx-lm"], "--mlx-lm goes with --concurrency"),
    (["--model", BASE, "--ngram", "--concurrency", "1,2", "--http", "4"], "one of --concurrency's"),
    (["--model", BASE, "--ngram", "--concurrency", "2", "--oracle", "0.1"], "--oracle does not apply"),
    (["--model", BASE, "--ngram", "--concurrency", "2", "--http", "2", "--clock", "cpu"], "another process"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("value", ["1,x", "", "1,99"])
def test_bad_k_lists_are_rejected(value):
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--model", BASE, "--num-draft-tokens", value])


def test_k_list_parses_ints_and_auto():
    assert command.k_list("1, 2,auto") == [1, 2, "auto"]


# --- prompt set -------------------------------------------------------------------------------------

def test_builtin_prompts_cover_every_kind():
    kinds = {p.kind for p in prompts.builtin()}
    assert kinds == set(prompts.KINDS) == {"chat", "code", "summarize", "structured"}
    assert all(p.kind == "code" for p in prompts.builtin("code"))


@pytest.mark.parametrize("name, text, want", [
    ("p.json", json.dumps(["a", {"prompt": "b", "kind": "chat"}]), [("file", "a"), ("chat", "b")]),
    ("p.jsonl", '{"prompt": "x"}\n\n{"prompt": "y", "kind": "code"}\n', [("file", "x"), ("code", "y")]),
    ("p.txt", "first\nsecond\\nline\n\n", [("file", "first"), ("file", "second\nline")]),
])
def test_prompt_files(tmp_path, name, text, want):
    path = tmp_path / name
    path.write_text(text)
    assert [(p.kind, p.text) for p in prompts.resolve(str(path))] == want


def test_empty_prompt_file_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(Exception, match="no prompts"):
        prompts.resolve(str(tmp_path / "e.txt"))


# --- oracle proposer --------------------------------------------------------------------------------

def ctx(history):
    return RoundContext(list(history), len(history) - 1, None, [], Sampler(SamplingParams(), 0))


def test_oracle_proposes_the_reference_and_corrupts_at_its_rate():
    ref = list(range(10, 1010))
    exact = OracleProposer(ref, 0.0, vocab_size=2048)
    assert exact.propose(ctx(ref[:5]), 3).tokens.tolist() == ref[5:8], "rate 0: the continuation itself"
    assert exact.propose(ctx(ref[:-1]), 3).tokens.tolist() == ref[-1:], "never past the reference"
    assert exact.propose(ctx(ref[:4] + [1]), 3).k == 0, "off the reference: nothing to offer"
    always = OracleProposer(ref, 1.0, vocab_size=2048)
    assert all(a != b for a, b in zip(always.drafts, ref)), "rate 1: every draft is wrong"
    half = OracleProposer(ref, 0.3, vocab_size=2048, seed=1)
    wrong = sum(a != b for a, b in zip(half.drafts, ref)) / len(ref)
    assert 0.25 < wrong < 0.35, "corrupted at about the set rate"
    again = OracleProposer(ref, 0.3, vocab_size=2048, seed=1)
    assert again.drafts == half.drafts, "the same positions are corrupted in every repeat"


def test_plot_is_written(bench_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, results, _, _ = bench_run
    report.plot(results, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_efficiency_uses_probe_ratios_and_the_runs_plain_step():
    """Two rounds at k=2 (one accepted 2, one 0) and 3 plain passes: ideal = Σ(verify + draft) + plain
    passes, in plain steps, times the plain step the runs measured (not the probe's seconds)."""
    from mlx_spec.bench.report import _ideal_seconds
    from mlx_spec.stats import GenerationStats
    from mlx_spec.tuning import Costs

    stats = GenerationStats(generation_tokens=1 + 3 + 1 + 3, rounds=2, drafted=4, accepted=2,
                            drafted_by_position=[2, 2], accepted_by_position=[1, 1])
    costs = Costs([1.0, 1.4, 1.8], draft_fixed=0.1, draft_step=0.2, plain_step_s=123.0)
    per_round = 1.8 + 0.1 + 2 * 0.2
    passes = 3 + 1 + 3 - 2  # tokens after the first, minus accepted drafts: 2 rounds + 3 plain steps
    assert _ideal_seconds(stats, costs, 0.002) == pytest.approx((2 * per_round + passes - 2) * 0.002)
    assert _ideal_seconds(stats, costs, 0.0) is None


def test_speedup_pairs_plain_and_spec_of_the_same_pass():
    """The machine is slow in pass 0, fast in pass 1, in between in pass 2; speculation is 1.2x within each
    pass, except one stalled run in pass 1. The median pass's own pair is reported: 1.2, with
    speedup = spec_tps / plain_tps holding exactly."""
    from mlx_spec.bench.report import _paired_median
    from mlx_spec.bench.runner import RunResult
    from mlx_spec.stats import GenerationStats

    def runs(tps_by_prompt):
        return [RunResult([], GenerationStats(generation_tokens=100, generation_time=100 / t), 0)
                for t in tps_by_prompt]

    plain = {0: runs([50, 50]), 1: runs([300, 300]), 2: runs([100, 100])}
    spec = {0: runs([60, 60]), 1: runs([360, 360]), 2: runs([120, 120])}
    spec[1][1] = RunResult([], GenerationStats(generation_tokens=100, generation_time=100 / 30), 0)  # a stall
    s, p = _paired_median(spec, plain, [0, 1])
    assert s / p == pytest.approx(1.2)
    s, p = _paired_median(spec, plain, [1])
    assert s / p == pytest.approx(1.2)


def test_every_configuration_is_timed_between_two_plain_runs_of_its_prompt(monkeypatch):
    """Per prompt: plain, c1, c2, plain, c3, plain; each configuration's baseline is the two plain runs
    beside it, so a machine that changes speed between configurations cannot bias one of them."""
    from mlx_spec.bench import Bench, Config, RunResult, baseline_label
    from mlx_spec.stats import GenerationStats

    calls = []  # (label, prompt, decode seconds): the machine gets faster with every run

    def fake_run(self, cfg, i, max_tokens=None, instrument=False):
        seconds = 1.0 / (1 + len(calls))
        calls.append((cfg.label, i, seconds))
        return RunResult([i], GenerationStats(generation_tokens=10, generation_time=seconds), 0)

    monkeypatch.setattr(Bench, "run", fake_run)
    monkeypatch.setattr(Bench, "reprobe", lambda self, configs, samples: None)
    configs = [Config("mtp", k) for k in (1, 2, 3)]
    results, _, _ = Bench(None, [[1], [2]], None, (), 0, 10).measure(configs, repeats=1)
    measured = calls[len(configs) + 1: len(calls) - 2 * len(configs)]  # between the warm-up and instrumented runs
    prompt0 = [c for c in measured if c[1] == 0]
    assert [c[0] for c in prompt0] == ["plain", "mtp k=1", "mtp k=2", "plain", "mtp k=3", "plain"]
    for cfg in configs:
        pos = [c[0] for c in prompt0].index(cfg.label)
        before = max(j for j in range(pos) if prompt0[j][0] == "plain")
        after = min(j for j in range(pos, len(prompt0)) if prompt0[j][0] == "plain")
        base = results[baseline_label(cfg)][0][0].stats
        assert base.generation_tokens == 20
        assert base.generation_time == pytest.approx(prompt0[before][2] + prompt0[after][2])
        assert results[cfg.label][0][0].stats.generation_time == pytest.approx(prompt0[pos][2])


# --- --concurrency: batching under C closed-loop clients ----------------------------------------------

LOAD_FIELDS = {"config", "backend", "proposer", "k", "concurrency", "decode_concurrency", "aggregate_tps",
               "aggregate_tps_samples", "ttft_s", "itl_s", "vs_plain_batch", "vs_one_at_a_time", "tau",
               "acceptance_rate", "acceptance_by_position", "matches_plain", "requests", "tokens", "environment"}


@pytest.fixture(scope="module")
def load_run(tmp_path_factory):
    """One tiny --concurrency run at 1 and 2 clients: MTP k=2, the mlx-lm peer, and the check through a real
    server process at 2 clients."""
    tmp = tmp_path_factory.mktemp("load")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
    mp.setattr(probe, "DEFAULT_PROBE_REPS", 1)
    out = tmp / "load.json"
    argv = ["--model", BASE, "--drafter", ASSISTANT, "--num-draft-tokens", "2", "--concurrency", "1,2",
            "--prompts", "code", "--max-tokens", "8", "--repeats", "1", "--ignore-chat-template", "--mlx-lm",
            "--http", "2", "--quiet", "--json", str(out)]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(argv)
    mp.undo()
    return rc, json.loads(out.read_text()), buf.getvalue()


def load_by(results, config, c):
    return next(r for r in results if r["config"] == config and r["concurrency"] == c)


def test_concurrency_reports_every_configuration_at_every_client_count(load_run):
    rc, results, table = load_run
    assert rc == 0
    got = {(r["config"], r["concurrency"]) for r in results}
    want = {("plain", 1), ("mtp k=2", 1), ("mlx-lm", 1), ("plain", 2), ("mtp k=2", 2),
            ("mtp k=2, one at a time", 2), ("mlx-lm", 2), ("plain, over HTTP", 2), ("mtp k=2, over HTTP", 2)}
    assert got == want, "plain and speculative batching, one at a time only where C > 1, the peer, HTTP at --http"
    n_prompts = len(prompts.builtin("code"))
    for r in results:
        name = f"{r['config']} at {r['concurrency']}"
        assert not LOAD_FIELDS - set(r), f"{name} lacks {LOAD_FIELDS - set(r)}"
        assert r["requests"] == r["concurrency"] * n_prompts, f"{name}: every client sends every prompt once"
        assert r["tokens"] > 0 and r["aggregate_tps"]["median"] > 0, name
        for lat in ("ttft_s", "itl_s"):
            assert 0 < r[lat]["median"]["median"] and r[lat]["median"]["median"] <= r[lat]["p90"]["median"], \
                f"{name}: {lat} median <= p90"
        assert r["matches_plain"] == 1.0, f"{name}: every greedy answer equals its prompt's plain output alone"
        assert r["config"] in table, f"{name} is in the table"
    assert load_by(results, "mtp k=2, one at a time", 2)["decode_concurrency"] == 1
    assert load_by(results, "mtp k=2, one at a time", 2)["mean_rows"]["max"] <= 1, "one at a time: one row at most"
    assert 0 < load_by(results, "mtp k=2", 2)["mean_rows"]["median"] <= 2, "two clients: two rows at most"
    assert load_by(results, "mtp k=2", 2)["decode_concurrency"] == 2
    assert load_by(results, "mtp k=2", 2)["vs_one_at_a_time"] is not None, "batched vs one at a time, same pass"
    assert load_by(results, "mtp k=2", 1)["vs_one_at_a_time"] is None, "at one client the batch is one at a time"
    assert load_by(results, "plain", 2)["vs_plain_batch"] is None
    assert load_by(results, "mtp k=2, over HTTP", 2)["vs_scheduler"] is not None, "the server next to the scheduler"
    for config in ("mtp k=2", "mtp k=2, over HTTP"):
        spec = load_by(results, config, 2)
        assert spec["rounds"] > 0 and spec["tau"] >= 1, f"{config}: drafts were verified and counted"
    assert load_by(results, "mlx-lm", 2)["tau"] is None, "the peer drafts nothing"
    assert load_by(results, "mlx-lm", 2)["aggregate_tps_cpu"]["median"] > 0, "in-process runs have a CPU-time rate"
    assert load_by(results, "plain, over HTTP", 2)["aggregate_tps_cpu"] is None, "... the server's process has not"
    assert "is_batchable" in table, "the table says that mlx-lm's server does not batch with a draft model"


def test_closed_loop_keeps_c_requests_in_flight(monkeypatch):
    """C clients keep C rows decoding together (plain batching, speculative batching); decode concurrency 1
    keeps one."""
    from mlx_spec import load, load_drafter
    from mlx_spec.batch.scheduler import Scheduler
    from mlx_spec.bench import clients, concurrency
    from mlx_spec.proposers import make_proposer
    from mlx_spec.sampling import SamplingParams

    widths = []
    step = Scheduler.step

    def counting(self):
        step(self)
        widths.append(self.running)

    monkeypatch.setattr(Scheduler, "step", counting)
    model, tokenizer = load(BASE)
    mtp = make_proposer(model, drafter=load_drafter(ASSISTANT, model))
    ids = [tokenizer.encode(p) for p in ("def f(x):\n", "import os\n", "class A:\n")]
    lb = concurrency.LoadBench(model, ids, {"mtp": mtp}, [2], SamplingParams(), tokenizer.eos_token_ids, 0, 32,
                               tuning.AutoTuner())
    for cfg, want in ((concurrency.LoadConfig(), 3), (concurrency.LoadConfig("mtp", 2), 3),
                      (concurrency.LoadConfig("mtp", 2, serial=True), 1)):
        widths.clear()
        load_ = lb.run(cfg, 3)
        assert max(widths) == want, f"{cfg.label}: {want} rows decode together"
        assert sorted(a.prompt for a in load_.answers) == sorted(i for c in clients.plan(3, 3) for i in c)


def test_percentile_and_plan():
    from mlx_spec.bench.clients import percentile, plan

    assert plan(3, 2) == [[0, 1, 2], [1, 2, 0]], "each client sends every prompt, starting at its own"
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)
    assert percentile([4.0], 90) == 4.0 and percentile([], 50) is None

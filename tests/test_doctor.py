"""The parity probe (mlx_spec.doctor) and strict mode's padding, on a CPU that is row-invariant by itself.

MLX's CPU backend computes a row the same way whatever the row count, so these tests inject what a GPU's
kernel switch does (`row_dependent`: linear layers round a multi-row input differently) and check that
the probe reports it, that it breaks speculative == plain greedy, and that padding every decode pass to one
row count (strict mode, emulated here by a wrapper model) restores it. bf16 tiny models give the near-ties
that such a perturbation flips.
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import ROOT, TINY_CODE
from tiny_models import WINDOW, make_base, make_drafter

from mlx_spec.doctor import main
from mlx_spec import stream_generate
from mlx_spec.api import STRICT_ROWS
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.parity import padded_forward
from mlx_spec.parity.perturb import row_dependent
from mlx_spec.parity.ops import check_ops, ops_row_invariant
from mlx_spec.parity.probe import probe
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.proposers.oracle import OracleProposer
from mlx_spec.request import Request

BASE = str(TINY_CODE / "base")
PROMPT = [2] + [(i * 37) % 250 + 3 for i in range(3 * WINDOW)]  # past the sliding window


def bf16_base(quantized: bool = False):
    model = make_base("e2b")
    model.set_dtype(mx.bfloat16)  # bf16 logits: near-ties a one-ulp change in a matmul can flip
    if quantized:
        nn.quantize(model, group_size=32, bits=4,
                    class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)
    mx.eval(model.parameters())
    return model


def greedy(model, proposer=None, k=4, max_tokens=48, strict_rows=None):
    eng = Engine(model, Request(PROMPT, max_tokens=max_tokens), proposer=proposer, policy=FixedK(k),
                 strict_rows=strict_rows)
    return [ev.token for ev in eng.run()]


def test_this_cpu_computes_verify_rows_exactly_like_steps(trained_pair):
    model, _, _ = trained_pair
    r = probe(model, ks=(1, 3), tokens=32, cost_reps=0)
    assert r.context > model.args.sliding_window, "the compared rows must lie past the sliding window"
    assert r.row_invariant and all(p.bitwise and not p.flips and p.max_abs_diff == 0 for p in r.unpadded), \
        "on MLX's CPU backend a verify row must equal the one-token step bit for bit"
    assert r.first_differing_op is None and all(o.row_invariant for o in r.ops)
    assert {o.kind for o in r.ops} >= {"rms_norm", "matmul", "rope", "attention", "softmax"}
    assert r.padded is None, "padding is measured by default only where unpadded rows differ"
    assert r.verdict.startswith("byte-identical:")


@pytest.mark.parametrize("kind", ["matmul", "quantized_matmul"])
def test_probe_reports_an_injected_row_count_dependence(kind):
    model = bf16_base(quantized=kind == "quantized_matmul")
    with row_dependent(model, kind) as changed:
        assert changed > 0
        r = probe(model, ks=(1, 4), tokens=32, cost_reps=0)
    assert not r.row_invariant and not any(p.bitwise for p in r.unpadded), \
        "the probe must see that multi-row passes round differently"
    assert sum(len(p.flips) for p in r.unpadded) > 0, "a bf16 trace has near-ties the perturbation flips"
    assert all(f.step_token != f.verify_token and f.margin >= 0 for p in r.unpadded for f in p.flips)
    assert r.row_dependent_ops == [kind] and r.first_differing_op == kind, \
        "op attribution must name the perturbed kind and only it"
    assert r.padded_rows == 5 and r.strict_exact, "padding every pass to one row count must restore equality"
    assert "only with --strict" in r.verdict


def test_check_ops_uses_the_models_own_layers():
    model = make_base("dense_keqv")
    assert all(o.row_invariant for o in check_ops(model, ks=(1, 3))) and ops_row_invariant(model, rows=5)
    with row_dependent(model):
        ops = check_ops(model, ks=(1, 3))
        assert not ops_row_invariant(model, rows=5)
    bad = {o.kind for o in ops if not o.row_invariant}
    assert bad == {"matmul"}, f"only the perturbed linear layers may depend on the row count, got {bad}"
    assert all(o.differs_at == [2, 4] for o in ops if o.kind == "matmul" and "tied head" not in o.shape)


@pytest.mark.parametrize("proposer", ["oracle", "mtp"])
def test_row_dependence_breaks_speculative_greedy_and_strict_padding_restores_it(proposer):
    model, k = bf16_base(), 4
    drafter = make_drafter(model)
    drafter.set_dtype(mx.bfloat16)

    def propose(base, plain):
        return OracleProposer(PROMPT + plain, vocab_size=256) if proposer == "oracle" else MTPProposer(drafter, base)

    plain = greedy(model)
    assert greedy(model, propose(model, plain), k) == plain, "unperturbed, speculative greedy equals plain"
    with row_dependent(model):
        plain = greedy(model)
        assert greedy(model, propose(model, plain), k) != plain, \
            "with row-count-dependent kernels, verify rows must flip some near-tie (else this test shows nothing)"
        strict_plain = greedy(model, strict_rows=k + 1)
        assert greedy(model, propose(model, strict_plain), k, strict_rows=k + 1) == strict_plain, \
            "with every decode pass padded to one row count, speculative greedy must equal plain greedy"


def test_strict_mode_is_decided_by_the_probe_and_restores_byte_identity():
    """Through the API: on this row-invariant CPU, strict pads nothing; with row-count-dependent kernels the
    op check says so, every decode pass is padded, and drafting on or off gives the same tokens."""
    model = bf16_base()
    drafter = make_drafter(model)
    drafter.set_dtype(mx.bfloat16)
    tok = _Ids()

    def run(**kw):
        out = [(r.token, r.stats) for r in stream_generate(model, tok, PROMPT, max_tokens=48, **kw)]
        return [t for t, _ in out], out[-1][1]

    plain, stats = run(strict=True)
    assert stats.strict and stats.strict_rows == 0, "row-invariant here: strict costs nothing"
    vars(model).pop("_mlx_spec_row_invariance", None)  # the perturbation changes the model's kernels
    with row_dependent(model):
        plain, stats = run(strict=True)
        assert stats.strict_rows == STRICT_ROWS, "row-dependent kernels: every decode pass padded"
        spec, stats = run(strict=True, drafter=drafter, num_draft_tokens=4)
        assert spec == plain and stats.rounds > 0, "strict: speculative greedy == plain greedy, byte for byte"
        assert run(drafter=drafter, num_draft_tokens=4)[0] != run()[0], "... which without strict it is not"


def test_padded_forward_gives_the_real_rows_and_gives_the_padding_back():
    model = make_base("e2b")
    a, b = model.make_cache(max_rollback=17), model.make_cache(max_rollback=17)
    prefix = mx.array(PROMPT, mx.int32)[None]
    model.forward(prefix, a)
    model.forward(prefix, b)
    step = mx.array([[7]], mx.int32)
    logits, hidden = model.forward(step, a)
    p_logits, p_hidden = padded_forward(model.forward, step, b, rows=6)
    assert p_logits.shape == logits.shape and p_hidden.shape == hidden.shape
    assert mx.array_equal(p_logits, logits) and mx.array_equal(p_hidden, hidden), "row-invariant CPU: same rows"
    assert [c.offset for c in a] == [c.offset for c in b], "the padding must leave the cache"
    nxt = mx.array([[9, 11, 13]], mx.int32)
    assert mx.array_equal(model.forward(nxt, a)[0], model.forward(nxt, b)[0]), \
        "the padding's K/V must not be seen by later passes"
    with pytest.raises(ValueError):
        padded_forward(model.forward, nxt, b, rows=2)


def test_row_dependent_restores_the_layers():
    model = make_base("dense_keqv")
    x = mx.array([PROMPT[:8]], mx.int32)
    before = model(x)
    with row_dependent(model):
        assert not mx.array_equal(model(x), before)
    assert mx.array_equal(model(x), before), "leaving the block must restore the layers"
    assert not any(type(m).__name__.startswith("_Split") for _, m in model.named_modules())


def test_doctor_cli_prints_the_report_and_writes_json(capsys, tmp_path):
    path = tmp_path / "parity.json"
    rc = main(["--model", BASE, "--tokens", "16", "--num-draft-tokens", "1,2", "--cost-reps", "1",
               "--padding", "on", "--json", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0 and "row_invariant: true" in out and "verdict: byte-identical" in out
    assert "padding cost" in out and "strict: every decode pass padded to 3 rows" in out
    assert "probing" in err and "probing" not in out, "progress goes to stderr, the report to stdout"
    data = json.loads(path.read_text())
    assert data["row_invariant"] is True and data["strict_exact"] is True
    assert [p["k"] for p in data["unpadded"]] == [1, 2] and data["unpadded"][0]["bitwise_fraction"] == 1.0
    assert data["cost"]["rows"] == 3 and data["cost"]["plain_ratio"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--num-draft-tokens", "0"], "between 1 and 16"),
    (["--num-draft-tokens", "1,17"], "between 1 and 16"),
    (["--num-draft-tokens", "two"], "1,2,4,8"),
    (["--tokens", "1"], "--tokens"),
    (["--context", "0"], "--context"),
    (["--json", "/nonexistent/dir/p.json"], "--json"),
    # bounded by the model's 2048 positions (the audit's runs grew without limit, or ran past them)
    (["--tokens", "8", "--num-draft-tokens", "1", "--context", "100000000"], "max_position_embeddings"),
    (["--tokens", "100000000", "--num-draft-tokens", "1"], "max_position_embeddings"),
    (["--context", "2047"], "max_position_embeddings"),
])
def test_user_errors_are_one_line(capsys, argv, needle):
    try:
        rc = main(["--model", BASE, *argv])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_the_probe_may_use_exactly_the_models_context(trained_pair):
    from mlx_spec.parity.probe import ParityError, check_positions

    model = trained_pair[0]
    limit = model.args.max_position_embeddings
    check_positions(model, limit - 16 - 4, 16, 4)  # the trace and the timed (k+1)-row verify end at the last one
    with pytest.raises(ParityError, match="max_position_embeddings"):
        check_positions(model, limit - 16 - 4 + 1, 16, 4)


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_any_integer_seed_is_accepted_as_generate_accepts_it(capsys, seed):
    rc = main(["--model", BASE, "--tokens", "2", "--num-draft-tokens", "1", "--context", "8", "--cost-reps", "0",
               "--trace", "random", "--seed", seed])
    assert rc == 0, "doctor --seed takes any integer (mapped into range as generate's --seed is)"


def test_missing_model_is_one_line(capsys):
    assert main(["--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_gpu_script_measures_parity_on_the_tiny_shape(tmp_path):
    """The device call's shape script runs the probe (strict off and on, and strict's cost) per shape; here on
    the CPU with the tiny stand-in shape."""
    out = tmp_path / "shapes.json"
    r = subprocess.run([sys.executable, "examples/gpu/measure_shapes.py", "--shapes", "tiny", "--q-bits", "4",
                        "--context", "32", "--reps", "1", "--parity", "--parity-tokens", "12", "--parity-ks", "1,2",
                        "--parity-cost-reps", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    shape = json.loads(out.read_text())["shapes"][0]
    p = shape["parity"]
    assert shape["q_bits"] == 4 and len(shape["verify_cost"]) == 9
    assert p["row_invariant"] and p["strict_exact"] and p["strict_rows"] == 3
    assert set(p["strict_off"]) == set(p["strict_on"]) == {"1", "2"}
    assert p["strict_off"]["1"]["flips_per_1000"] == 0 and p["strict_cost"]["plain_ratio"] > 0


class _Ids:
    """A tokenizer stand-in for token-id prompts: no EOS, no text."""

    eos_token_ids = ()

    class detokenizer:
        last_segment = ""

        @staticmethod
        def reset():
            pass

        @staticmethod
        def add_token(t):
            pass

        @staticmethod
        def finalize():
            pass

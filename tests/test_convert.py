"""Converter: Hugging Face Gemma 4 checkpoints -> mlx-lm's MLX layout.

Equivalences: converted (fp32) == loaded in memory from the HF directory, exactly; both config forms,
both layouts and sharded input convert to the same model; a 4-bit conversion runs the same greedy tokens
in mlx-lm and mlx_spec, and on weights that 4 bits represent it decodes like fp32 (tie-aware); drafters
keep `token_ordering` int32 and centroids unquantized. Every user mistake is one `error:` line, exit != 0,
and leaves nothing at --mlx-path.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import VOCAB, make_checkpoint, make_drafter, tokens

from convert import pipeline
from convert import convert as convert_api
from convert.__main__ import main as convert_main
from mlx_spec import load, load_drafter
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.request import Request

VARIANTS = ["e2b", "e4b", "moe", "dense_keqv"]
PROMPT = tokens(seed=5, n=20)  # longer than the sliding window (16): window masks matter
N_NEW = 16
TIE_MARGIN = 1e-3  # DESIGN: a divergence is allowed only below this relative top-2 margin of the reference
# Keys whose mlx-lm 0.32 defaults differ from transformers': they must be explicit in a written config.
EXPLICIT_TEXT_KEYS = ("global_head_dim", "num_global_key_value_heads", "layer_types", "num_kv_shared_layers",
                      "use_double_wide_mlp", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
                      "final_logit_softcapping", "num_key_value_heads", "num_attention_heads", "sliding_window",
                      "rope_parameters", "vocab_size")


def convert(*args, **kwargs) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):  # progress lines
        return convert_api(*args, **kwargs)


def logits(model, ids=PROMPT) -> mx.array:
    out = model(mx.array([ids]))
    mx.eval(out)
    return out[0]


def saved_tensors(model_dir: Path) -> dict:
    out = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def mlx_spec_greedy(model, prompt=PROMPT, n=N_NEW) -> list:
    return [ev.token for ev in Engine(model, Request(list(prompt), max_tokens=n)).run()]  # no EOS: always n tokens


def mlx_lm_greedy(model, prompt=PROMPT, n=N_NEW) -> list:
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n,
                                             sampler=lambda x: mx.argmax(x, axis=-1))]


def assert_greedy_tie_aware(reference_model, ref_tokens, got_tokens, what, prompt=PROMPT):
    """Identical, or diverging only at a step where the reference's top-2 margin is a near-tie."""
    if ref_tokens == got_tokens:
        return
    i = next(i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b)
    row = np.array(logits(reference_model, list(prompt) + ref_tokens[:i])[-1])
    top2 = np.sort(row)[-2:]
    margin = (top2[1] - top2[0]) / max(abs(top2[1]), 1.0)
    assert margin < TIE_MARGIN, (
        f"{what}: greedy tokens diverge at step {i} ({ref_tokens[i]} vs {got_tokens[i]}) although the "
        f"reference's relative top-2 margin there is {margin:.2e}, not a near-tie"
    )


# --- conversion is exact --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_conversion_equals_in_memory_load(tmp_path, variant):
    hf = make_checkpoint(tmp_path, variant)
    out = convert(hf, tmp_path / "mlx", dtype="float32")
    reference, _ = load(str(hf))
    converted, tokenizer = load(str(out))
    assert mx.array_equal(logits(reference), logits(converted)), \
        f"{variant}: converted fp32 logits must equal the HF directory loaded in memory, exactly"

    names = {p.name for p in out.iterdir()}
    for f in ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        assert f in names, f"mlx-lm layout: {f} must be written"
    assert not any(n.startswith(".") for n in os.listdir(tmp_path)), "no temporary directory may remain"
    config = json.loads((out / "config.json").read_text())
    for key in EXPLICIT_TEXT_KEYS:
        assert key in config, f"config.json must spell out {key!r}: mlx-lm's default differs from HF's"
    assert "per_layer_config" not in config, "the resolved head geometry replaces per_layer_config"
    assert "quantization" not in config, "an unquantized conversion has no quantization block"
    assert tokenizer.chat_template is not None, "the chat template must be copied"


@pytest.mark.parametrize("variant", ["e4b", "moe"])
def test_both_config_forms_convert_to_the_same_model(tmp_path, variant):
    outs = {}
    for form in ("global", "per_layer"):
        hf = make_checkpoint(tmp_path, variant, config_form=form)
        outs[form] = convert(hf, tmp_path / f"mlx-{form}", dtype="float32")
    configs = {f: json.loads((o / "config.json").read_text()) for f, o in outs.items()}
    assert configs["global"] == configs["per_layer"], "both config forms must normalize to the same config.json"
    a, b = (saved_tensors(outs[f]) for f in ("global", "per_layer"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a), "same tensors from both forms"
    assert mx.array_equal(logits(load(str(outs["global"]))[0]), logits(load(str(outs["per_layer"]))[0]))


def test_multimodal_layout_drops_towers_and_matches_text_layout(tmp_path):
    text = convert(make_checkpoint(tmp_path, "e2b"), tmp_path / "mlx-text", dtype="float32")
    mm_hf = make_checkpoint(tmp_path, "e2b", layout="multimodal", config_form="per_layer")
    mm = convert(mm_hf, tmp_path / "mlx-mm", dtype="float32")
    config = json.loads((mm / "config.json").read_text())
    assert config["model_type"] == "gemma4" and "text_config" in config
    assert "vision_config" not in config and "audio_config" not in config, "towers are dropped"
    assert config["vocab_size"] == VOCAB, "mlx-lm's gemma4 overrides text_config.vocab_size with this key"
    names = saved_tensors(mm).keys()
    assert all(n.startswith("language_model.model.") for n in names), "mlx-lm's gemma4 weight names"
    assert not any("tower" in n or "embed_vision" in n or "embed_audio" in n for n in names)
    assert mx.array_equal(logits(load(str(mm))[0]), logits(load(str(text))[0])), \
        "the multimodal checkpoint's text model equals the text-only one"
    assert mx.array_equal(logits(load(str(mm))[0]), logits(load(str(mm_hf))[0]))


def test_sharded_input_with_index(tmp_path):
    one = convert(make_checkpoint(tmp_path, "moe"), tmp_path / "mlx-1", dtype="float32")
    hf = make_checkpoint(tmp_path, "moe", shards=3, shared_kv_tensors=True)
    assert (hf / "model.safetensors.index.json").exists()
    three = convert(hf, tmp_path / "mlx-3", dtype="float32")
    assert mx.array_equal(logits(load(str(one))[0]), logits(load(str(three))[0])), "sharding changes nothing"


def test_default_dtype_is_the_checkpoints(tmp_path):
    hf = make_checkpoint(tmp_path, "dense_keqv", dtype="bfloat16")
    out = convert(hf, tmp_path / "mlx")
    assert {v.dtype for v in saved_tensors(out).values()} == {mx.bfloat16}
    out16 = convert(hf, tmp_path / "mlx16", dtype="float16")
    assert {v.dtype for v in saved_tensors(out16).values()} == {mx.float16}
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "float16"


def _float_dtypes(model):
    from mlx.utils import tree_flatten

    return {name: p.dtype for name, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating)}


def test_a_half_precision_quantized_model_computes_in_float32_on_the_cpu_backend(tmp_path):
    """MLX's CPU quantized matmul is ~9x (bf16) / ~40x (fp16) slower than with float32 scales: on the CPU
    backend a quantized model loads in float32 unless a dtype is asked for; unquantized ones stay as stored
    (casting would double their memory for ~20%), and so does everything on Metal / CUDA."""
    hf = make_checkpoint(tmp_path, "dense_keqv", dtype="bfloat16")
    q4 = convert(hf, tmp_path / "q4", quantize=True)
    assert saved_tensors(q4)["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    on_cpu = mx.default_device() == mx.cpu
    dtypes = _float_dtypes(load(str(q4))[0])
    assert set(dtypes.values()) == ({mx.float32} if on_cpu else {mx.bfloat16}), dtypes
    assert set(_float_dtypes(load(str(q4), dtype="bfloat16")[0]).values()) == {mx.bfloat16}, "asked: kept"
    assert set(_float_dtypes(load(str(convert(hf, tmp_path / "bf16")))[0]).values()) == {mx.bfloat16}
    drafter = convert(make_drafter(tmp_path, hf, head="dense", dtype="bfloat16"), tmp_path / "dq4", quantize=True)
    base = load(str(q4))[0]
    assert set(_float_dtypes(load_drafter(str(drafter), base)).values()) == ({mx.float32} if on_cpu else {mx.bfloat16})
    from mlx_spec.proposers import make_proposer

    proposer = make_proposer(base, drafter=load_drafter(str(drafter), base))
    spec = [ev.token for ev in Engine(base, Request(PROMPT, max_tokens=N_NEW), proposer=proposer,
                                      policy=FixedK(3)).run()]
    assert spec == mlx_spec_greedy(base), "exact in float32 as well"


# --- quantized conversions ------------------------------------------------------------------------

# mlx-lm 0.32.2 cannot load the per_layer_config form, nor a tiny multimodal config (it reads the top-level
# vocab_size, default 262144), from the HF directory; it must load all of them after conversion.
@pytest.mark.parametrize("variant,form,layout,recipe", [("e2b", "per_layer", "text", None),
                                                        ("moe", "global", "multimodal", "embed_8"),
                                                        ("dense_keqv", "per_layer", "text", "mixed_3_6")])
def test_4bit_loads_in_mlx_lm_and_mlx_spec_with_the_same_greedy_tokens(tmp_path, variant, form, layout, recipe):
    from mlx_lm import load as mlx_lm_load

    hf = make_checkpoint(tmp_path, variant, config_form=form, layout=layout)
    out = convert(hf, tmp_path / "mlx-4bit", quantize=True, q_bits=4, recipe=recipe)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 64) and config["quantization_config"] == q
    tensors = saved_tensors(out)
    assert any(k.endswith(".scales") for k in tensors), "weights must be stored quantized"
    if variant == "moe":
        routers = [k for k in q if isinstance(q[k], dict) and k.endswith("router.proj")]
        assert routers and all(q[k]["bits"] == 8 for k in routers), "router.proj is quantized at 8 bits"
    if variant == "e2b":  # PLE width 16 is not a multiple of the group size: left in float
        assert not any("per_layer_projection.scales" in k for k in tensors)
    if recipe == "embed_8":
        assert q["language_model.model.embed_tokens"]["bits"] == 8

    ours, _ = load(str(out))
    theirs, tokenizer = mlx_lm_load(str(out))
    assert tokenizer.encode("w10 w11") == [2, 10, 11]
    np.testing.assert_allclose(np.array(logits(theirs)), np.array(logits(ours)), atol=1e-4,
                               err_msg="mlx-lm and mlx_spec must compute the same logits for our conversion")
    assert_greedy_tie_aware(ours, mlx_spec_greedy(ours), mlx_lm_greedy(theirs),
                            f"{variant}/{layout}: mlx-lm vs mlx_spec on the 4-bit conversion")


@pytest.mark.parametrize("variant", VARIANTS)
def test_4bit_greedy_equals_fp32_when_4_bits_represent_the_weights(tmp_path, variant):
    # Weights on a 4-bit grid: quantization loses only float rounding, so any wrong packing, group size,
    # bit width or layer mapping shows up as a divergence, while honest 4-bit noise (large on tiny random
    # models) does not hide it.
    hf = make_checkpoint(tmp_path, variant, quant_grid=4)
    fp32, _ = load(str(hf))
    out = convert(hf, tmp_path / "mlx-4bit", quantize=True, q_bits=4, q_group_size=32, dtype="float32")
    q4, _ = load(str(out))
    np.testing.assert_allclose(np.array(logits(q4)), np.array(logits(fp32)), atol=1e-4)
    assert_greedy_tie_aware(fp32, mlx_spec_greedy(fp32), mlx_spec_greedy(q4), f"{variant}: 4-bit vs fp32")


def test_quantization_predicate_rules(tmp_path):
    import mlx.nn as nn

    from convert.recipes import make_predicate

    model, _ = load(str(make_checkpoint(tmp_path, "moe")))
    layer = model.layers[0]
    predicate = make_predicate(model, "embed_8", bits=4, group_size=32)
    eight_bit = {"group_size": 64, "bits": 8, "mode": "affine"}
    assert predicate("model.layers.0.router.proj", layer.router.proj) == eight_bit, "model rule: router.proj 8-bit"
    assert predicate("model.embed_tokens", model.model.embed_tokens)["bits"] == 8, "embed_8: embeddings at 8 bits"
    assert predicate("model.layers.0.mlp.up_proj", layer.mlp.up_proj) is True, "defaults are not recorded per layer"
    assert predicate("model.layers.9.router.proj", nn.Linear(96, 4)) == {**eight_bit, "group_size": 32}, \
        "a group size that does not divide the input falls back to the run's"
    assert predicate("model.layers.9.mlp.up_proj", nn.Linear(16, 4)) is False, "indivisible input: stays float"
    mixed = make_predicate(model, "mixed_4_6", bits=4, group_size=64)
    assert mixed("model.embed_tokens", model.model.embed_tokens)["bits"] == 6, "mixed_L_H: the tied head gets H bits"

    base_hf = make_checkpoint(tmp_path, "e2b")
    drafter = load_drafter(str(make_drafter(tmp_path, base_hf)), load(str(base_hf))[0])
    drafter_predicate = make_predicate(drafter, None, bits=4, group_size=64)
    centroids = drafter.masked_embedding.centroids
    assert drafter_predicate("masked_embedding.centroids", centroids) is False, "centroids are never quantized"


# --- drafters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["centroid", "dense"])
def test_drafter_conversion(tmp_path, head):
    base_hf = make_checkpoint(tmp_path, "e2b" if head == "centroid" else "dense_keqv")
    base, _ = load(str(base_hf))
    hf = make_drafter(tmp_path, base_hf, head=head)
    original_ordering = mx.load(str(hf / "model.safetensors")).get("masked_embedding.token_ordering")
    h = mx.random.normal((1, 1, 64), key=mx.random.key(0))  # (1, 1, H_drafter)
    candidates = {}
    for bits in (None, 8, 4):
        out = convert(hf, tmp_path / f"drafter-{bits}", quantize=bits is not None, q_bits=bits or 4)
        tensors = saved_tensors(out)
        floats = {k: v.dtype for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.floating)}
        assert set(floats.values()) == {mx.bfloat16}, "drafters default to bf16"
        assert ("model.embed_tokens.scales" in tensors) == (bits is not None), f"{bits}-bit quantizes the embedding"
        drafter = load_drafter(str(out), base)
        ids, scores = drafter.candidates(h)
        mx.eval(scores)
        assert bool(mx.all(mx.isfinite(scores))), "candidate scores must be finite"
        if head == "centroid":
            ordering = tensors["masked_embedding.token_ordering"]
            assert ordering.dtype == mx.int32, "token_ordering is saved as int32"
            assert mx.array_equal(ordering, original_ordering.astype(mx.int32)), "never cast, quantized or permuted"
            assert "masked_embedding.centroids.scales" not in tensors, "centroids are never quantized"
            assert ids.shape == (4 * VOCAB // 16,), "top-4 of 16 clusters of 16 tokens"
            candidates[bits] = sorted(np.array(ids).tolist())
        else:
            assert ids is None and scores.shape == (VOCAB,), "dense head scores the whole vocabulary"
    if head == "centroid":
        assert candidates[8] == candidates[4] == candidates[None], \
            "unquantized centroids select the same clusters, so quantized drafters gather the same tokens"


# --- atomic writing -------------------------------------------------------------------------------

def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("interrupt", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, interrupt):
    hf = make_checkpoint(tmp_path, "dense_keqv")
    real_save = pipeline._save

    def failing_save(model, config, src, out):
        real_save(model, config, src, out)  # a complete model in the temp dir, then the failure
        raise interrupt

    monkeypatch.setattr(pipeline, "_save", failing_save)
    dest = tmp_path / "new" / "deeper" / "mlx"
    with pytest.raises(type(interrupt)):
        convert(hf, dest)
    assert not (tmp_path / "new").exists(), "created parent directories are removed again"
    assert leftovers(tmp_path) == []


def test_force_replaces_and_a_failed_replace_keeps_the_old_model(tmp_path, monkeypatch):
    hf = make_checkpoint(tmp_path, "dense_keqv")
    dest = convert(hf, tmp_path / "mlx", dtype="float32")
    before = (dest / "model.safetensors").read_bytes()
    monkeypatch.setattr(pipeline, "_save", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        convert(hf, dest, dtype="bfloat16", force=True)
    assert (dest / "model.safetensors").read_bytes() == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    convert(hf, dest, dtype="bfloat16", force=True)
    assert {v.dtype for v in saved_tensors(dest).values()} == {mx.bfloat16}, "--force replaced the model"
    assert leftovers(tmp_path) == [], "the old directory is deleted after the swap"


# --- user errors: one line, non-zero exit, nothing written ----------------------------------------

def _rewrite_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def _read_all(path: Path) -> dict:
    w = mx.load(str(path))
    mx.eval(list(w.values()))  # MLX may read lazily from the file these helpers overwrite
    return w


def _drop_tensor(d: Path) -> None:
    w = _read_all(d / "model.safetensors")
    del w["model.layers.1.mlp.down_proj.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), w)


def _reshape_tensor(d: Path) -> None:
    w = _read_all(d / "model.safetensors")
    w["model.layers.0.mlp.gate_proj.weight"] = mx.zeros((64, 64))
    mx.save_safetensors(str(d / "model.safetensors"), w)


def _int32_tensor(d: Path) -> None:
    w = _read_all(d / "model.safetensors")
    w["model.layers.0.mlp.gate_proj.weight"] = w["model.layers.0.mlp.gate_proj.weight"].astype(mx.int32)
    mx.save_safetensors(str(d / "model.safetensors"), w)


def _nan_tensor(d: Path) -> None:
    w = _read_all(d / "model.safetensors")
    t = w["model.layers.1.self_attn.q_proj.weight"]
    w["model.layers.1.self_attn.q_proj.weight"] = mx.where(mx.arange(t.size).reshape(t.shape) == 7, mx.nan, t)
    mx.save_safetensors(str(d / "model.safetensors"), w)


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _remove_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").unlink()  # tokenizer_config.json stays: transformers alone fails on many lines


ERROR_CASES = [
    # (name, break the checkpoint, words the one-line message must contain)
    ("unknown model_type", lambda d: _rewrite_config(d, model_type="llama4000"),
     ["'llama4000'", "gemma4_text", "gemma4_assistant"]),
    ("missing tensor", _drop_tensor, ["'model.layers.1.mlp.down_proj.weight'", "missing"]),
    ("shape mismatch", _reshape_tensor, ["'model.layers.0.mlp.gate_proj.weight'", "(64, 64)", "(128, 64)"]),
    ("truncated safetensors", _truncate, ["model.safetensors", "truncated or corrupt"]),
    ("int32 where floats are expected", _int32_tensor, ["'model.layers.0.mlp.gate_proj.weight'", "int32",
                                                        "floating-point"]),
    ("NaN in a weight", _nan_tensor, ["'model.layers.1.self_attn.q_proj.weight'", "1 NaN", "corrupt"]),
    ("missing tokenizer", _remove_tokenizer, ["no tokenizer", "tokenizer.json"]),
    ("bad config JSON", lambda d: (d / "config.json").write_text('{"model_type": '),
     ["config.json", "not valid JSON"]),
    ("unreadable config", lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()),
     ["config.json", "cannot read"]),
    ("output path exists", None, ["already exists", "--force"]),
]


def run_cli(argv) -> tuple:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = convert_main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("name,breaker,words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_user_errors_are_one_actionable_line(tmp_path, name, breaker, words):
    hf = make_checkpoint(tmp_path, "e2b")
    dest = tmp_path / "out" / "mlx"
    if breaker is None:
        dest.mkdir(parents=True)
        (dest / "notes.txt").write_text("mine")
    else:
        breaker(hf)
    code, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(dest), "-q"])
    assert code != 0, f"{name}: exit code must be non-zero"
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[INFO]")]  # progress is on stderr too
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: one 'error:' line, got {err!r}"
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], f"{name}: message must mention {w!r}: {lines[0]}"
    if breaker is None:
        assert os.listdir(dest) == ["notes.txt"], "an existing directory is left untouched"
    else:
        assert not (tmp_path / "out").exists(), f"{name}: nothing may be written"
    assert leftovers(tmp_path) == [] and (not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == [])


@pytest.mark.parametrize("failure, free", [
    (OSError(28, "No space left on device"), 10 << 30),
    (RuntimeError("[write] Unable to write 8 bytes to file."), 1 << 20),  # what mx.save_safetensors raises
])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failure, free):
    import shutil
    from collections import namedtuple

    hf = make_checkpoint(tmp_path, "e2b")
    dest = tmp_path / "out" / "mlx"

    def full(*a, **k):
        raise failure

    monkeypatch.setattr(mx, "save_safetensors", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100 << 30, (100 << 30) - free, free))
    code, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(dest)])
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[INFO]")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: the disk is full at {dest.parent}") and "nothing was written" in lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_failed_write_with_room_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    hf = make_checkpoint(tmp_path, "e2b")

    def broken(*a, **k):
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", broken)
    code, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(tmp_path / "mlx")])
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[INFO]")]
    assert code == 2 and len(lines) == 1 and "cannot write" in lines[0] and "nothing was written" in lines[0], err
    assert "disk is full" not in lines[0]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_output_permissions_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    hf = make_checkpoint(tmp_path, "e2b")
    old = os.umask(umask)
    try:
        dest = convert(hf, tmp_path / "mlx")
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == dir_mode, "the directory is as mkdir would make it, not mkdtemp's 0700"
    modes = {f.name: f.stat().st_mode & 0o777 for f in dest.iterdir()}
    assert modes and set(modes.values()) == {file_mode}, modes


def test_weights_that_overflow_the_target_dtype_are_refused(tmp_path):
    hf = make_checkpoint(tmp_path, "e2b")
    w = _read_all(hf / "model.safetensors")
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"] * 0 + 1e6  # fp16 max: 65504
    mx.save_safetensors(str(hf / "model.safetensors"), w)
    code, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(tmp_path / "mlx"), "--dtype", "float16"])
    assert code == 2 and "'model.layers.0.mlp.up_proj.weight'" in err and "overflow float16" in err, err
    assert not (tmp_path / "mlx").exists()


def test_a_model_with_integer_weights_is_refused_on_load_too(tmp_path):
    from mlx_spec.errors import WeightMismatchError

    hf = make_checkpoint(tmp_path, "e2b")
    _int32_tensor(hf)
    with pytest.raises(WeightMismatchError, match="gate_proj.weight.*int32"):
        load(str(hf))


def test_force_refuses_a_directory_that_is_not_a_model(tmp_path):
    hf = make_checkpoint(tmp_path, "e2b")
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    code, err = run_cli(["--hf-path", str(hf), "--mlx-path", str(dest), "--force"])
    assert code != 0 and "does not look like a model directory" in err
    assert (dest / "notes.txt").read_text() == "keep me"


def test_quantization_flags_need_quantize(tmp_path):
    code, err = run_cli(["--hf-path", str(tmp_path), "--mlx-path", str(tmp_path / "x"), "--q-bits", "8"])
    assert code != 0 and "-q/--quantize" in err and not (tmp_path / "x").exists()


def test_verbose_shows_the_traceback(tmp_path):
    hf = make_checkpoint(tmp_path, "e2b")
    _truncate(hf)
    with pytest.raises(Exception, match="truncated or corrupt"):
        run_cli(["--hf-path", str(hf), "--mlx-path", str(tmp_path / "mlx"), "--verbose"])


def test_python_dash_m_convert(tmp_path):
    hf = make_checkpoint(tmp_path, "e2b")
    (hf / "config.json").write_text("not json")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "convert", "--hf-path", str(hf), "--mlx-path", str(tmp_path / "mlx")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: ") and "not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlx").exists() and leftovers(tmp_path) == []

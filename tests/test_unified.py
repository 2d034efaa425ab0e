"""Gemma 4 12B "unified" (`gemma4_unified`, text config `gemma4_unified_text`): Google's layout loads and
converts (the encoder-free vision and audio embedders dropped, no per-layer inputs although the config
does not say so), mlx-vlm's quantized layout of it loads and decodes like ours, and its MTP assistant
(`gemma4_unified_assistant`, an alias of gemma4_assistant) pairs with it and decodes exactly, past the
window. Weights are tiny and random (tests/checkpoints.py); mlx-vlm's logits for the same checkpoint are
checked in test_block_goldens.py."""

import contextlib
import io
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from checkpoints import make_drafter, make_unified_checkpoint, tokens
from mlx.utils import tree_flatten

from convert import convert as convert_api
from mlx_spec import load, load_drafter
from mlx_spec.engine import Engine
from mlx_spec.proposers import make_proposer
from mlx_spec.tuning import FixedK
from mlx_spec.request import Request

PROMPT = tokens(seed=9, n=24)  # longer than the window (16)
N_NEW = 40


def convert(*args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return convert_api(*args, **kwargs)


def greedy(model, proposer=None, k=3):
    eng = Engine(model, Request(PROMPT, max_tokens=N_NEW), proposer=proposer, policy=FixedK(k))
    return [e.token for e in eng.run()]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_unified_checkpoint(tmp_path_factory.mktemp("unified"))


def test_google_layout_loads_without_per_layer_inputs(hf):
    config = json.loads((hf / "config.json").read_text())["text_config"]
    assert "hidden_size_per_layer_input" not in config and "per_layer_config" in config
    model, _ = load(str(hf))
    args = model.text_args
    assert args.model_type == "gemma4_unified_text" and args.hidden_size_per_layer_input == 0
    assert args.global_head_dim == 32 and args.num_global_key_value_heads == 1 and args.attention_k_eq_v
    assert not any(k.startswith(("vision", "embed_vision", "embed_audio")) for k, _ in tree_flatten(model.parameters()))


def test_conversion_equals_the_checkpoint_and_loads_in_mlx_lm(hf, tmp_path):
    from mlx_lm import load as mlx_lm_load

    out = convert(hf, tmp_path / "mlx", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_unified" and "vision_config" not in config
    assert config["text_config"]["hidden_size_per_layer_input"] == 0, "explicit: mlx-lm's default is 256"
    ref, _ = load(str(hf))
    got, _ = load(str(out))
    ids = mx.array([PROMPT])
    assert mx.array_equal(ref(ids), got(ids)), "converted == loaded from the HF directory"
    theirs, _ = mlx_lm_load(str(out))  # mlx-lm maps gemma4_unified to its gemma4 model
    assert mx.allclose(theirs(ids), ref(ids), atol=1e-4), "mlx-lm reads our conversion as the same model"


def test_mlx_vlm_quantized_layout_loads(hf, tmp_path):
    """What mlx_vlm.convert -q writes for the 12B: `language_model.model.*`, the vision embedder unquantized,
    `embed_audio.embedding_projection` quantized (not in its skip list), `vision_config: null`, both
    `quantization` and `quantization_config`."""
    ours = convert(hf, tmp_path / "ours", quantize=True, q_bits=4, q_group_size=32)
    ours_model, _ = load(str(ours))
    vlm = shutil.copytree(ours, tmp_path / "vlm")
    weights = dict(mx.load(str(vlm / "model.safetensors")))
    src = dict(mx.load(str(hf / "model.safetensors")))
    for k, v in src.items():
        if k.startswith("model.vision_embedder.") or k.startswith("model.embed_vision."):
            weights[k.removeprefix("model.")] = v
    audio = nn.QuantizedLinear.from_linear(_linear(src["model.embed_audio.embedding_projection.weight"]), 32, 4)
    for name, w in tree_flatten(audio.parameters()):
        weights[f"embed_audio.embedding_projection.{name}"] = w
    mx.save_safetensors(str(vlm / "model.safetensors"), weights, metadata={"format": "mlx"})
    (vlm / "model.safetensors.index.json").unlink(missing_ok=True)
    config = json.loads((vlm / "config.json").read_text())
    q = {"group_size": 32, "bits": 4, "mode": "affine"}
    config.update(quantization=q, quantization_config=q, vision_config=None, audio_config=None)
    (vlm / "config.json").write_text(json.dumps(config))
    got, _ = load(str(vlm))
    assert greedy(got) == greedy(ours_model), "mlx-vlm's layout of the 12B decodes like our conversion"


def _linear(w):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight = w
    return layer


def unified_assistant(tmp_path, base_dir):
    """A tiny `gemma4_unified_assistant` as transformers 5.24 writes it: no PLE keys, per-layer geometry."""
    d = make_drafter(tmp_path, base_dir, head="dense", layers=("sliding_attention", "full_attention"),
                     name="assistant")
    config = json.loads((d / "config.json").read_text())
    text = config["text_config"]
    for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        text.pop(key)
    text["model_type"] = "gemma4_unified_text"
    config.update(model_type="gemma4_unified_assistant", architectures=["Gemma4UnifiedAssistantForCausalLM"])
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_unified_assistant_is_an_mtp_drafter_and_exact(hf, tmp_path):
    base, _ = load(str(hf))
    drafter = load_drafter(str(unified_assistant(tmp_path, hf)), base)
    assert drafter.model_type == "gemma4_unified_assistant" and "MTP assistant" in drafter.describe()
    proposer = make_proposer(base, drafter=drafter)
    assert proposer.name == "mtp"
    plain = greedy(base)
    for k in (1, 2, 4):
        assert greedy(base, proposer, k) == plain, f"unified assistant k={k}: speculative == plain"
    out = convert(tmp_path / "assistant", tmp_path / "assistant-mlx")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma4_unified_assistant"
    assert greedy(base, make_proposer(base, drafter=load_drafter(str(out), base)), 3) == plain

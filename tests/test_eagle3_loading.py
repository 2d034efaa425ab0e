"""EAGLE-3 drafters from disk, in the Speculators layout: recognised by `speculators_model_type` (a config with
no model_type), loaded with --drafter, converted (quantized or not) with the config kept as published and
d2t/t2d never cast; a config or tensor we cannot honour, or a drafter made for another base, is one clear
error."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_unified_checkpoint, tokens
from eagle3_checkpoints import make_eagle3_checkpoint
from conftest import TINY_CODE

from mlx_spec import load, load_drafter
from mlx_spec.engine import Engine
from mlx_spec.errors import ModelLoadError, PairingError, UnsupportedModelError, WeightMismatchError
from mlx_spec.generate import main
from mlx_spec.proposers import make_proposer
from mlx_spec.tuning import FixedK
from mlx_spec.request import Request


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("eagle3")
    base = make_unified_checkpoint(out)  # 4 layers, hidden 64, vocab 256
    return {"base": base, "eagle3": make_eagle3_checkpoint(out, base, aux=(1, 2, 3), draft_vocab=128)}


@pytest.fixture(scope="module")
def base(ckpt):
    return load(str(ckpt["base"]))[0]


def greedy(model, proposer=None, k=3, n=24):
    eng = Engine(model, Request(tokens(seed=3, n=21), max_tokens=n), proposer=proposer, policy=FixedK(k))
    return [e.token for e in eng.run()]


def drafts(model, drafter, k=5):
    """One round's drafts after a fixed prompt (greedy)."""
    from mlx_spec.proposers.base import RoundContext
    from mlx_spec.sampling import Sampler, SamplingParams

    proposer = make_proposer(model, drafter=drafter)
    prompt = tokens(seed=3, n=21)
    proposer.start(prompt[:-1])
    proposer.extend(model.forward_layers(mx.array([prompt[:-1]]), model.make_cache(), proposer.base_layers)[2])
    return proposer.propose(RoundContext(prompt, len(prompt) - 1, None, [], Sampler(SamplingParams(), 0)), k).tokens.tolist()


def edit(src, dst, config=None, layer=None, weights=None, drop=()):
    """A copy of a checkpoint with config keys, transformer_layer_config keys and tensors changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config or {})
    cfg["transformer_layer_config"].update(layer or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = dict(mx.load(str(dst / "model.safetensors")))
    tensors.update(weights or {})
    mx.save_safetensors(str(dst / "model.safetensors"), {k: v for k, v in tensors.items() if k not in drop})
    return dst


def test_a_speculators_checkpoint_loads_as_a_drafter(base, ckpt):
    drafter = load_drafter(str(ckpt["eagle3"]), base)
    assert drafter.describe().startswith("EAGLE-3 drafter") and "trained for k=3" in drafter.describe()
    proposer = make_proposer(base, drafter=drafter)
    assert proposer.name == "eagle3" and proposer.base_layers == (0, 1, 2), "aux id a reads base layer a - 1"
    plain = greedy(base)
    for k in (1, 3, 5):
        assert greedy(base, make_proposer(base, drafter=drafter), k) == plain, f"k={k}: speculative == plain"


@pytest.mark.parametrize("k", ["3", "auto"])  # auto (the CLI's default) first measures the drafter's costs
def test_the_cli_loads_it_with_drafter(ckpt, capsys, k):
    argv = ["--model", str(ckpt["base"]), "--prompt", "w10 w11 w12", "--max-tokens", "12", "--ignore-chat-template"]
    assert main(argv + ["--no-draft"]) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--drafter", str(ckpt["eagle3"]), "--num-draft-tokens", k]) == 0
    out, err = capsys.readouterr()
    assert out == plain, f"--drafter with an EAGLE-3 drafter, k={k}, prints plain decoding's text"
    lines = [line for line in err.splitlines() if line.startswith("[mlx_spec] drafter:")]
    assert len(lines) == 1 and "EAGLE-3 drafter" in lines[0] and "aux layers [1, 2, 3]" in lines[0]


def test_default_aux_layers_are_the_bases():
    """No eagle_aux_hidden_state_layer_ids: vLLM's [2, n // 2, n - 3] over the base's n layers."""
    from test_eagle3 import make_eagle3
    from tiny_models import make_base, text_config

    from mlx_spec.models import gemma4_text

    config = dict(text_config("dense_keqv"), num_hidden_layers=8, layer_types=["sliding_attention", "full_attention"] * 4)
    base8 = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(config))
    drafter = make_eagle3(base8, aux=None)
    assert drafter.aux_layer_ids(60) == [2, 30, 57], "RedHatAI's 31B drafter reads [2, 30, 57]"
    assert make_proposer(base8, drafter=drafter).base_layers == (1, 3, 4)
    assert greedy(base8, make_proposer(base8, drafter=drafter)) == greedy(base8)
    base4 = make_base("dense_keqv")
    with pytest.raises(PairingError, match=r"eagle_aux_hidden_state_layer_ids is \[1, 2, 2\]"):
        make_proposer(base4, drafter=make_eagle3(base4, aux=None))  # [2, 4 // 2, 4 - 3]: a layer twice


def test_aux_layers_past_the_base_are_one_clear_error(base, ckpt, tmp_path):
    path = edit(ckpt["eagle3"], tmp_path / "d", config={"eagle_aux_hidden_state_layer_ids": [1, 2, 4]})
    with pytest.raises(PairingError, match=r"eagle_aux_hidden_state_layer_ids is \[1, 2, 4\]") as e:
        load_drafter(str(path), base)  # id 4 is the input of a 5th layer: the base has 4
    assert "use the drafter made for this base (it was made for tiny-gemma4)" in str(e.value)
    assert "\n" not in str(e.value)


def test_another_vocabulary_or_width_is_refused(base, ckpt, tmp_path):
    tiny_code = load(str(TINY_CODE / "base"))[0]  # hidden 128, vocab 2048
    with pytest.raises(PairingError, match="target hidden size is 64 but the base model's is hidden_size 128"):
        load_drafter(str(ckpt["eagle3"]), tiny_code)
    t2d = np.zeros(512, bool)
    t2d[np.array(mx.arange(128) + mx.load(str(ckpt["eagle3"] / "model.safetensors"))["d2t"])] = True
    wide = edit(ckpt["eagle3"], tmp_path / "v", layer={"vocab_size": 512},
                weights={"embed_tokens.weight": mx.zeros((512, 64)), "t2d": mx.array(t2d)})
    with pytest.raises(PairingError, match="vocab_size is 512 but the base model's is 256"):
        load_drafter(str(wide), base)


def test_a_base_that_is_not_gemma_is_refused(base, ckpt):
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
                                        num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=256, num_key_value_heads=2))
    with pytest.raises(PairingError, match="EAGLE-3 drafter reads a Gemma 4 base's decoder layers"):
        make_proposer(model, drafter=load_drafter(str(ckpt["eagle3"]), base))


@pytest.mark.parametrize("change, error, needle", [
    ({"config": {"speculators_model_type": "mtp"}}, PairingError, "'speculators_mtp' model, not a drafter"),
    ({"layer": {"layer_types": ["sliding_attention"]}}, UnsupportedModelError, "sliding-window layers"),
    ({"layer": {"model_type": "mistral"}}, UnsupportedModelError, "model_type 'mistral' are not supported"),
    ({"layer": {"hidden_act": "gelu"}}, UnsupportedModelError, "hidden_act 'gelu'"),
    ({"config": {"transformer_layer_config": None}}, ModelLoadError, "lacks transformer_layer_config"),
    ({"config": {"norm_before_fc": True, "fc_norm": True}}, ModelLoadError, "both norm_before_fc and fc_norm"),
    ({"weights": {"d2t": mx.full((128,), 200, mx.int64)}}, WeightMismatchError, "outside the vocabulary"),
    ({"weights": {"t2d": mx.zeros((256,), mx.bool_)}}, WeightMismatchError, "t2d does not mark exactly"),
    ({"drop": ("embed_tokens.weight",)}, WeightMismatchError, "'embed_tokens.weight' is missing"),
])
def test_what_we_cannot_honour_is_refused(base, ckpt, tmp_path, change, error, needle):
    change = dict(change)
    if change.get("config", {}).get("transformer_layer_config", 0) is None:
        shutil.copytree(ckpt["eagle3"], tmp_path / "d")
        cfg = json.loads((tmp_path / "d" / "config.json").read_text())
        del cfg["transformer_layer_config"]
        (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
        path = tmp_path / "d"
    else:
        path = edit(ckpt["eagle3"], tmp_path / "d", **change)
    with pytest.raises(error, match=needle) as e:
        load_drafter(str(path), base)
    assert "\n" not in str(e.value)


def test_a_file_without_t2d_loads_alike(base, ckpt, tmp_path):
    """mlx-vlm's sanitize drops t2d, so its conversions lack it; it is derived from d2t."""
    path = edit(ckpt["eagle3"], tmp_path / "d", drop=("t2d",))
    a, b = load_drafter(str(ckpt["eagle3"]), base), load_drafter(str(path), base)
    assert np.array_equal(np.array(a.t2d), np.array(b.t2d))
    assert drafts(base, a) == drafts(base, b)


def _tensors(path):
    return dict(mx.load(str(path / "model.safetensors")))


def test_convert_keeps_the_published_layout(base, ckpt, tmp_path):
    """Unquantized: config.json as published (its dtype follows the cast), d2t int64 and t2d bool unchanged;
    the converted drafter drafts what the original does."""
    from convert import convert

    out = convert(ckpt["eagle3"], tmp_path / "f32", dtype="float32")
    published = json.loads((ckpt["eagle3"] / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == published, "the config is kept as published"
    src, dst = _tensors(ckpt["eagle3"]), _tensors(out)
    for name in ("d2t", "t2d"):
        assert dst[name].dtype == src[name].dtype and np.array_equal(np.array(dst[name]), np.array(src[name])), \
            f"{name} is written as it was read (never cast)"
    assert drafts(base, load_drafter(str(out), base)) == drafts(base, load_drafter(str(ckpt["eagle3"]), base))


def test_convert_quantizes_and_stays_exact(base, ckpt, tmp_path):
    from convert import convert

    out = convert(ckpt["eagle3"], tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    published = json.loads((ckpt["eagle3"] / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert {k: v for k, v in config.items() if not k.startswith("quantization") and k != "dtype"} == \
        {k: v for k, v in published.items() if k != "dtype"}, "published config plus the quantization block"
    src, dst = _tensors(ckpt["eagle3"]), _tensors(out)
    assert "lm_head.scales" in dst and "fc.scales" in dst and "layers.0.self_attn.q_proj.scales" in dst
    assert dst["d2t"].dtype == mx.int64 and dst["t2d"].dtype == mx.bool_, "d2t/t2d are never cast or quantized"
    assert np.array_equal(np.array(dst["d2t"]), np.array(src["d2t"]))
    drafter = load_drafter(str(out), base)
    assert greedy(base, make_proposer(base, drafter=drafter)) == greedy(base), "quantized EAGLE-3: still exact"

"""Block drafters and the 12B unified base from disk: the family is read from the config (with or without
`dflash_config`, either rope form, a `model.` prefix, quantized or not), the CLI says on one stderr line
which drafter it loaded, and a drafter that does not fit its base (its layers, width, vocabulary, mask
token, or a base that is not Gemma 4) is refused with one clear line."""

import json
import shutil

import mlx.core as mx
import pytest
from checkpoints import (build_block_checkpoints, make_dflash_checkpoint, make_dspark_checkpoint,
                         make_unified_checkpoint, tokens)
from conftest import TINY_CODE

from mlx_spec import load, load_drafter
from mlx_spec.engine import Engine
from mlx_spec.errors import ModelLoadError, PairingError, WeightMismatchError
from mlx_spec.generate import main
from mlx_spec.proposers import make_proposer
from mlx_spec.tuning import FixedK
from mlx_spec.request import Request


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_block_checkpoints(tmp_path_factory.mktemp("block"))


@pytest.fixture(scope="module")
def base(ckpt):
    return load(str(ckpt["unified"]))[0]


def greedy(model, proposer=None, k=3, n=20):
    eng = Engine(model, Request(tokens(seed=3, n=21), max_tokens=n), proposer=proposer, policy=FixedK(k))
    return [e.token for e in eng.run()]


@pytest.mark.parametrize("name, family, proposer", [("dflash", "DFlash", "dflash"), ("dflash_sliding", "DFlash", "dflash"),
                                                     ("dspark", "DSpark", "dspark"), ("dspark_v", "DSpark", "dspark")])
def test_family_is_read_from_the_config(base, ckpt, name, family, proposer):
    drafter = load_drafter(str(ckpt[name]), base)
    assert drafter.describe().startswith(f"{family} block drafter"), drafter.describe()
    assert make_proposer(base, drafter=drafter).name == proposer


def test_prefixed_weights_and_the_flat_rope_form_load_alike(base, ckpt, tmp_path):
    a = load_drafter(str(ckpt["dflash"]), base)
    other = make_dflash_checkpoint(tmp_path, ckpt["unified"], block_size=6, rope_form="theta", prefix="model.")
    b = load_drafter(str(other), base)
    assert greedy(base, make_proposer(base, drafter=a)) == greedy(base, make_proposer(base, drafter=b)) == greedy(base)


def test_quantized_block_drafters_load_and_stay_exact(base, ckpt, tmp_path):
    """Through our converter (8-bit, group 32): the published layout, quantized; output still exact."""
    from convert import convert

    for name in ("dflash", "dspark"):
        out = convert(ckpt[name], tmp_path / name, quantize=True, q_bits=8, q_group_size=32)
        config = json.loads((out / "config.json").read_text())
        assert config["quantization"]["bits"] == 8 and "model_type" in config
        drafter = load_drafter(str(out), base)
        assert greedy(base, make_proposer(base, drafter=drafter)) == greedy(base), f"quantized {name}: exact"


def test_cli_says_which_drafter_it_loaded(ckpt, capsys):
    rc = main(["--model", str(ckpt["unified"]), "--drafter", str(ckpt["dspark"]), "--prompt", "w10 w11 w12",
               "--max-tokens", "8", "--num-draft-tokens", "3", "--ignore-chat-template"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip()
    lines = [line for line in err.splitlines() if line.startswith("[mlx_spec] drafter:")]
    assert len(lines) == 1 and "DSpark block drafter" in lines[0] and "reads base layers [0, 2]" in lines[0]


def _edit(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if key in config.get("dflash_config", {}):
            config["dflash_config"][key] = value
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("name, changes, needle", [
    ("dflash", {"target_layer_ids": [0, 3]}, "target_layer_ids is [0, 3]"),  # 3 is the base's last layer
    ("dflash", {"target_layer_ids": [0, 9]}, "target_layer_ids is [0, 9]"),
    ("dspark", {"target_layer_ids": [1, 2]}, None),  # fits (a different drafter, same shapes)
    ("dspark", {"num_target_layers": 48}, "num_target_layers is 48"),
    ("dflash", {"mask_token_id": 4096}, "mask_token_id is 4096"),
])
def test_mismatched_layers_are_one_clear_error(base, ckpt, tmp_path, name, changes, needle):
    path = _edit(ckpt[name], tmp_path / "d", **changes)
    if needle is None:
        load_drafter(str(path), base)
        return
    with pytest.raises(PairingError) as e:
        load_drafter(str(path), base)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_drafter_for_another_base_is_refused(ckpt, tmp_path):
    tiny_code = load(str(TINY_CODE / "base"))[0]  # hidden 128, vocab 2048: not the unified tiny base's 64/256
    with pytest.raises(PairingError, match="hidden_size is 64 but the base model's is 128"):
        load_drafter(str(ckpt["dflash"]), tiny_code)
    wide = make_unified_checkpoint(tmp_path, name="wide")
    config = json.loads((wide / "config.json").read_text())
    config["vocab_size"] = config["text_config"]["vocab_size"] = 512
    (wide / "config.json").write_text(json.dumps(config))
    shutil.copy(ckpt["unified"] / "model.safetensors", wide / "model.safetensors")
    with pytest.raises(PairingError, match="vocab_size is 256 but the base model's is 512"):
        weights = dict(mx.load(str(wide / "model.safetensors")))
        weights["model.language_model.embed_tokens.weight"] = mx.zeros((512, 64))
        mx.save_safetensors(str(wide / "model.safetensors"), weights)
        load_drafter(str(make_dspark_checkpoint(tmp_path, ckpt["unified"])), load(str(wide))[0])


def test_a_base_that_is_not_gemma_is_refused(ckpt):
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
                                        num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=256, num_key_value_heads=2))
    drafter = load_drafter(str(ckpt["dflash"]), load(str(ckpt["unified"]))[0])
    with pytest.raises(PairingError, match="reads a Gemma 4 base's decoder layers"):
        make_proposer(model, drafter=drafter)


@pytest.mark.parametrize("drop, error, needle", [
    ("target_layer_ids", ModelLoadError, "lacks target_layer_ids"),
    ("rope_parameters", ModelLoadError, "lacks rope_theta"),
])
def test_incomplete_configs_are_refused_not_guessed(ckpt, tmp_path, drop, error, needle):
    dst = shutil.copytree(ckpt["dflash"], tmp_path / "d")
    config = json.loads((dst / "config.json").read_text())
    config.pop(drop, None)
    config["dflash_config"].pop(drop, None)
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=needle):
        load_drafter(str(dst), load(str(ckpt["unified"]))[0])


def test_a_dflash_file_with_its_own_embedding_is_refused(ckpt, tmp_path):
    dst = shutil.copytree(ckpt["dflash"], tmp_path / "d")
    weights = dict(mx.load(str(dst / "model.safetensors")))
    weights["embed_tokens.weight"] = mx.zeros((256, 64))
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    with pytest.raises(WeightMismatchError, match="takes the base's embedding and head"):
        load_drafter(str(dst), load(str(ckpt["unified"]))[0])

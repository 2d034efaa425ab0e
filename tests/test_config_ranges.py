"""Config numbers out of range are one clear error at load and at convert, naming the field: zero heads
(a ZeroDivisionError), sizes past MLX's int32 shapes (an OverflowError), `sliding_window: 0` and
`max_position_embeddings: -1` (accepted, then garbage or no context bound), a fractional DFlash/DSpark
`block_size` (a TypeError mid-generation, after output was printed). Base, DFlash and DSpark configs all go
through loading.build_model, which both load and convert use."""

import json
import shutil

import pytest
from checkpoints import make_dspark_checkpoint, make_unified_checkpoint
from conftest import TINY_CODE

from mlx_spec.checkpoint import read_config, read_weights
from mlx_spec.errors import ModelLoadError
from mlx_spec.generate import main as generate_main
from mlx_spec.loading import build_model

BASE = TINY_CODE / "base"


@pytest.fixture(scope="module")
def dspark(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dspark")
    return make_dspark_checkpoint(tmp, make_unified_checkpoint(tmp), block_size=5, nested=True)


def edited(config: dict, key: str, value) -> dict:
    config = json.loads(json.dumps(config))
    nested = config.get("dflash_config")
    (nested if isinstance(nested, dict) and key in nested else config)[key] = value
    return config


def refused(src, key, value):
    """The message build_model raises for config.json with `key` set to `value` (None: it loaded)."""
    try:
        build_model(edited(read_config(src), key, value), read_weights(src), src)
    except ModelLoadError as e:
        return str(e)
    return None


BAD = [
    ("num_attention_heads", 0, "num_attention_heads must be an integer >= 1, got 0"),
    ("num_attention_heads", 1.5, "num_attention_heads must be an integer >= 1, got 1.5"),
    ("num_attention_heads", True, "got True"),
    ("intermediate_size", 10**12, "intermediate_size must be an integer <= 2147483647"),
    ("hidden_size", 0, "hidden_size must be an integer >= 1"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3"),
    ("max_position_embeddings", -1, "max_position_embeddings must be an integer >= 1, got -1"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number > 0"),
    ("final_logit_softcapping", 0, "final_logit_softcapping must be a finite number > 0 or null"),
]
BASE_ONLY = [
    ("sliding_window", 0, "sliding_window must be an integer >= 1, got 0"),
    ("head_dim", 0, "head_dim must be an integer >= 1"),
    ("num_hidden_layers", 0, "num_hidden_layers must be an integer >= 1"),
    ("num_kv_shared_layers", 100, "num_kv_shared_layers must be an integer in [0, 4]"),
    ("layer_types", ["sliding_attention"], "layer_types must list num_hidden_layers = 4 entries"),
    ("rope_parameters", {"full_attention": {"rope_theta": 0}}, "rope_parameters.full_attention.rope_theta"),
]
BLOCK_SIZE = [
    ("block_size", 8.5, "block_size"),
    ("block_size", "8", "block_size"),
    ("block_size", 0, "block_size"),
    ("mask_token_id", -1, "mask_token_id must be an integer >= 0"),
]


@pytest.mark.parametrize("key, value, needle", BAD + BASE_ONLY, ids=lambda x: str(x)[:20])
def test_base_config_out_of_range_is_one_error_naming_the_field(key, value, needle):
    message = refused(BASE, key, value)
    assert message is not None and needle in message, f"{key}={value!r} must be refused naming it; got {message}"
    assert str(BASE / "config.json") in message and "\n" not in message, "one line that names the file"


@pytest.mark.parametrize("key, value, needle", BAD + BLOCK_SIZE + [("block_size", 1, "at least one mask")],
                         ids=lambda x: str(x)[:20])
def test_dflash_config_out_of_range_is_one_error_naming_the_field(key, value, needle):
    message = refused(TINY_CODE / "dflash", key, value)
    assert message is not None and needle in message, f"{key}={value!r} must be refused naming it; got {message}"


DSPARK = [case for case in BAD if case[0] != "num_key_value_heads"] + BLOCK_SIZE + [
    ("num_global_key_value_heads", 3, "not a multiple of the full layers' K/V heads 3"),  # k_eq_v: these are used
    ("markov_rank", -1, "markov_rank must be an integer >= 0"),
]


@pytest.mark.parametrize("key, value, needle", DSPARK, ids=lambda x: str(x)[:20])
def test_dspark_config_out_of_range_is_one_error_naming_the_field(dspark, key, value, needle):
    message = refused(dspark, key, value)
    assert message is not None and needle in message, f"{key}={value!r} must be refused naming it; got {message}"


def test_the_unchanged_configs_load(dspark):
    for src in (BASE, TINY_CODE / "dflash", dspark):
        assert refused(src, "model_type", read_config(src)["model_type"]) is None, f"{src} loads as it is"


def copy_with(tmp_path, src, key, value):
    dst = shutil.copytree(src, tmp_path / src.name)
    (dst / "config.json").write_text(json.dumps(edited(read_config(src), key, value)))
    return dst


@pytest.mark.parametrize("key, value", [("num_attention_heads", 0), ("intermediate_size", 10**12),
                                        ("sliding_window", 0)])
def test_convert_refuses_with_one_line_and_writes_nothing(tmp_path, capsys, key, value):
    from convert.__main__ import main

    src = copy_with(tmp_path, BASE, key, value)
    assert main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and key in err[-1] and not (tmp_path / "out").exists(), err


def test_a_fractional_block_size_is_refused_before_any_output(tmp_path, capsys):
    """The audit's run: the DFlash drafter loaded, printed text, then crashed once k reached its block."""
    drafter = copy_with(tmp_path, TINY_CODE / "dflash", "block_size", 8.5)
    rc = generate_main(["--model", str(BASE), "--drafter", str(drafter), "--prompt", "def", "--max-tokens", "16",
                        "--ignore-chat-template", "--num-draft-tokens", "16"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "block_size" in err and len(err.strip().splitlines()) == 1, err


def test_generate_refuses_a_zero_window_with_one_line(tmp_path, capsys):
    """`sliding_window: 0` converted and then generated garbage; the memory check before loading must not
    trip over it either."""
    rc = generate_main(["--model", str(copy_with(tmp_path, BASE, "sliding_window", 0)), "--prompt", "def",
                        "--max-tokens", "4", "--ignore-chat-template"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "sliding_window must be an integer >= 1, got 0" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("key, value", [("head_dim", "16"), ("num_key_value_heads", None)])
def test_the_memory_check_leaves_a_bad_config_to_the_loader(tmp_path, capsys, key, value):
    rc = generate_main(["--model", str(copy_with(tmp_path, BASE, key, value)), "--prompt", "def", "--max-tokens", "4",
                        "--ignore-chat-template"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{key} must be an integer >= 1" in err and len(err.strip().splitlines()) == 1, err


def test_more_layers_than_the_weights_hold_is_refused_before_building_them():
    message = refused(BASE, "num_hidden_layers", 10**6)  # with layer_types given, that list is wrong first
    assert "num_hidden_layers = 1000000" in message
    src = TINY_CODE / "dflash"
    config = edited(read_config(src), "num_hidden_layers", 10**6)
    config.pop("layer_types")  # the drafter's layers are all full attention then: a million of them
    with pytest.raises(ModelLoadError, match=r"num_hidden_layers is 1000000 but the weights hold layers 0..1"):
        build_model(config, read_weights(src), src)

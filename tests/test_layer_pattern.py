"""A Gemma 4 config without `layer_types`: which layers are sliding.

transformers (5.5 to 5.25) derives 5 sliding + 1 full, the last layer full, and ignores
`sliding_window_pattern` for Gemma 4; mlx-lm 0.32 and mlx-vlm 0.7.10 repeat (pattern - 1) sliding + 1 full.
The fixture (tests/fixtures/layer_pattern, made by make_pattern_golden.py in transformers 5.24) says
`sliding_window_pattern: 3` over 6 layers and has head_dim == global_head_dim, so its weights fit both
readings: only the logits tell them apart. Such a config is refused, naming both layouts; written out, the
transformers layout gives transformers' logits, and the other reading is a different model."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_spec.checkpoint import read_config, read_weights
from mlx_spec.errors import ModelLoadError, WeightMismatchError
from mlx_spec.loading import build_model, load_model

FIXTURE = FIXTURES / "layer_pattern"
GOLDEN = np.load(FIXTURE / "golden.npz")
S, F = "sliding_attention", "full_attention"
TRANSFORMERS = [S if c == "S" else F for c in GOLDEN["layer_types"]]  # S S S S S F
PATTERN_3 = [S, S, F, S, S, F]  # mlx-lm's and mlx-vlm's reading


def with_config(tmp_path, **changes):
    dst = shutil.copytree(FIXTURE, tmp_path / "m")
    config = read_config(dst)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def logits(path) -> np.ndarray:
    model = load_model(str(path))[0]
    return np.array(model(mx.array(GOLDEN["prompt"].tolist())[None])[0].astype(mx.float32))


def test_the_fixture_is_what_transformers_made_of_the_pattern():
    assert TRANSFORMERS == [S, S, S, S, S, F] and read_config(FIXTURE)["sliding_window_pattern"] == 3
    assert "layer_types" not in read_config(FIXTURE)


def test_a_pattern_read_two_ways_is_refused_naming_both_layouts():
    with pytest.raises(ModelLoadError) as e:
        load_model(str(FIXTURE))
    message = str(e.value)
    assert "sliding_window_pattern 3" in message and "read two ways" in message, message
    assert "(layers S S S S S F)" in message and "(layers S S F S S F)" in message, "both readings, named"
    assert "write the layer_types" in message and "\n" not in message


def test_with_transformers_layout_written_in_the_logits_are_transformers(tmp_path):
    got = logits(with_config(tmp_path, layer_types=TRANSFORMERS))
    np.testing.assert_allclose(got, GOLDEN["logits"], atol=2e-4, rtol=0,
                               err_msg="the layout the message asks for must give transformers' logits")


def test_a_pattern_that_reads_one_way_loads_as_transformers_reads_it(tmp_path):
    """sliding_window_pattern 6 is transformers' own layout: no ambiguity, nothing refused."""
    got = logits(with_config(tmp_path, sliding_window_pattern=6))
    np.testing.assert_allclose(got, GOLDEN["logits"], atol=2e-4, rtol=0)


def test_the_other_reading_is_a_different_model(tmp_path):
    """Why the config is refused rather than read one way: the two layouts decode differently."""
    other = logits(with_config(tmp_path, layer_types=PATTERN_3))
    assert np.abs(other - GOLDEN["logits"]).max() > 0.1, "the two readings must give different logits"


def test_an_empty_per_layer_config_means_no_overrides_as_in_transformers(tmp_path):
    """transformers writes `per_layer_config: {}` when the full layers' geometry equals the sliding one;
    read as absent it meant global_head_dim 512 and a shape error."""
    assert read_config(FIXTURE)["per_layer_config"] == {}
    model = load_model(str(with_config(tmp_path, layer_types=TRANSFORMERS)))[0]
    assert model.args.global_head_dim == model.args.head_dim == 16


def test_a_mismatch_in_attention_tensors_points_at_the_derived_layout():
    """Weights made for another layout show up as attention tensors missing or left over: with no
    layer_types in config.json the message says the layout was derived, not that the file is incomplete."""
    config = read_config(FIXTURE)
    config.pop("sliding_window_pattern")
    config["attention_k_eq_v"] = True  # full layers take V from K: the derived full layer 5 has no v_proj
    with pytest.raises(WeightMismatchError) as e:
        build_model(config, read_weights(FIXTURE), FIXTURE)
    message = str(e.value)
    assert "layers.5.self_attn.v_proj" in message and "config.json has no layer_types" in message, message
    assert "(S S S S S F)" in message and "do not match" not in message
    config["layer_types"] = TRANSFORMERS  # stated: the ordinary message
    with pytest.raises(WeightMismatchError, match="config.json and the weights do not match"):
        build_model(config, read_weights(FIXTURE), FIXTURE)

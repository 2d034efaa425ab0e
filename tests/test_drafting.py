"""Drafter loading: pairing validation (one clear error naming both values) and --drafter auto."""

import shutil

import pytest
from conftest import TINY_CODE
from tiny_models import make_base, make_drafter

import mlx_spec.drafting as drafting
from mlx_spec import load, load_drafter
from mlx_spec.errors import ModelLoadError, PairingError


def test_mismatched_backbone_is_refused_with_both_values():
    base = make_base("e2b")
    other = make_drafter(make_base("dense_keqv"), "dense")
    with pytest.raises(PairingError) as e:
        drafting.validate_pairing(other, base)
    msg = str(e.value)
    assert "base model" in msg and "drafter" in msg


def test_mismatched_kv_geometry_is_refused():
    base = make_base("moe")  # full layers: 1 kv head (k_eq_v)
    d = make_drafter(make_base("dense_keqv"), "dense")  # full layers expect 2 kv heads
    d.args.backbone_hidden_size = base.args.hidden_size
    with pytest.raises(PairingError, match="kv heads"):
        drafting.validate_pairing(d, base)


def test_non_gemma_base_is_refused():
    from mlx_lm.models import llama

    base = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                       num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=256,
                                       num_key_value_heads=2))
    with pytest.raises(PairingError, match="--draft-model or --ngram"):
        drafting.validate_pairing(make_drafter(make_base("e2b")), base)


def test_drafter_auto_finds_sibling_directory(tmp_path):
    shutil.copytree(TINY_CODE / "base", tmp_path / "mybase")
    shutil.copytree(TINY_CODE / "assistant", tmp_path / "mybase-assistant")
    model, _ = load(str(tmp_path / "mybase"))
    drafter = load_drafter("auto", model, base_path=str(tmp_path / "mybase"))
    assert drafter.model_type == "gemma4_assistant"


def test_drafter_auto_candidates_for_hub_ids():
    c = drafting.auto_drafter_candidates("mlx-community/gemma-4-E2B-it-4bit")
    assert c == ["mlx-community/gemma-4-E2B-it-4bit-assistant", "google/gemma-4-E2B-it-assistant"]
    assert drafting.auto_drafter_candidates("google/gemma-4-E4B-it") == ["google/gemma-4-E4B-it-assistant"]


def test_drafter_auto_offline_says_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="google/gemma-4-E2B-it-assistant"):
        drafting.find_auto_drafter("mlx-community/gemma-4-E2B-it-4bit")

"""Hub repo ids, with huggingface_hub mocked (no network in tests): download, convert once, reuse."""

import shutil

import pytest
from conftest import TINY_CODE

import convert as convert_pkg
from mlx_spec import load
from mlx_spec.errors import ModelLoadError


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download returns a local copy of the trained pair, as if downloaded."""
    import huggingface_hub

    repos = {"google/tiny-code": TINY_CODE / "base", "google/tiny-code-assistant": TINY_CODE / "assistant"}
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        if repo_id not in repos:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError(f"{repo_id} not cached")
        dest = tmp_path / "hub" / repo_id.replace("/", "--")
        if not dest.exists():
            shutil.copytree(repos[repo_id], dest)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return calls


def test_hub_checkpoint_is_converted_once_then_reused(fake_hub, tmp_path, monkeypatch):
    model, tok = load("google/tiny-code", q_bits=8)
    cached = tmp_path / "cache" / "mlx_spec" / "models" / "google--tiny-code-8bit"
    assert (cached / "config.json").exists(), "the converted model must land in the local cache"

    def no_convert(*a, **k):
        raise AssertionError("the second load must reuse the cached conversion")

    monkeypatch.setattr(convert_pkg, "convert", no_convert)
    model2, _ = load("google/tiny-code", q_bits=8)
    assert fake_hub == ["google/tiny-code", "google/tiny-code"]


def test_drafter_auto_from_hub(fake_hub):
    from mlx_spec import load_drafter

    model, _ = load("google/tiny-code")
    drafter = load_drafter("auto", model, base_path="google/tiny-code")
    assert drafter.model_type == "gemma4_assistant"


def test_unknown_repo_is_one_clear_error(fake_hub):
    with pytest.raises(ModelLoadError, match="google/nope"):
        load("google/nope")

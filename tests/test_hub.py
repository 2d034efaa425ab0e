"""Hub repo ids, with huggingface_hub mocked (no network in tests): download, convert once, reuse. A hub
that accepts connections and never answers (a loopback socket), or a broken proxy, is one clear error
within the timeout, for load and for --drafter auto."""

import shutil
import socket
import time
from types import SimpleNamespace

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
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kw: SimpleNamespace(sha="0" * 40))
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


@pytest.fixture
def silent_hub(tmp_path, monkeypatch):
    """HF_ENDPOINT at a loopback socket that accepts connections (the listen backlog) and never answers;
    an empty hub cache; a 1 s timeout."""
    import huggingface_hub

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    yield sock.getsockname()[1]
    sock.close()


def test_a_hub_that_never_answers_is_one_error_within_the_timeout(silent_hub):
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="did not answer within 1 s .HF_HUB_ETAG_TIMEOUT.") as e:
        load("org/never-answers")
    assert time.monotonic() - started < 8, "bounded by the timeout, not forever"
    assert "org/never-answers" in str(e.value) and "not in the local hub cache" in str(e.value)


def test_the_cache_still_serves_when_the_hub_does_not_answer(silent_hub, monkeypatch):
    import huggingface_hub

    def cached_only(repo_id, local_files_only=False, **kw):
        assert local_files_only, "only the cache is asked once the hub did not answer"
        return str(TINY_CODE / "base")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_only)
    model, tok = load("org/cached")
    assert model is not None


def test_drafter_auto_stops_at_the_first_unanswered_lookup(silent_hub):
    from mlx_spec import load_drafter

    model, _ = load(str(TINY_CODE / "base"))
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="did not answer"):
        load_drafter("auto", model, base_path="mlx-community/tiny-code-4bit")  # two hub candidates
    assert time.monotonic() - started < 8, "not one timeout per candidate"


def test_the_cli_says_it_in_one_line(silent_hub, capsys):
    from mlx_spec.generate import main

    assert main(["--model", "org/never-answers", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot get org/never-answers") and "1 s" in err[0], err


def test_a_broken_proxy_is_one_clear_error(silent_hub, monkeypatch):
    """A loopback proxy that refuses every CONNECT (407): huggingface_hub raises ProxyError at once."""
    import threading

    import huggingface_hub

    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)

    def refuse():
        while True:
            try:
                conn, _ = proxy.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=refuse, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")  # reached through the proxy
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
    close_session = getattr(huggingface_hub, "close_session", lambda: None)
    close_session()  # the shared HTTP client reads the proxy settings when it is made
    try:
        with pytest.raises(ModelLoadError, match="HTTPS_PROXY/HTTP_PROXY refused the connection.*407"):
            load("org/behind-a-proxy")
    finally:
        close_session()
        proxy.close()


@pytest.mark.parametrize("repo", ["foo/..", "org/bad..name", "org/-x", "org/" + "a" * 100, "org/na me"])
def test_an_invalid_repo_id_is_one_error_before_the_hub_is_asked(repo, monkeypatch):
    """These gave huggingface_hub's HFValidationError as a traceback (audit defect 19)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: pytest.fail("the hub must not be asked"))
    with pytest.raises(ModelLoadError, match="neither a local directory nor a valid Hugging Face repo id") as e:
        load(repo)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command, argv", [
    ("mlx_spec.generate", ["--model", "foo/..", "--prompt", "x"]),
    ("mlx_spec.generate", ["--model", str(TINY_CODE / "base"), "--drafter", "org/bad..name", "--prompt", "x"]),
    ("convert", ["--hf-path", "org/bad..name", "--mlx-path", "{tmp}/x"]),
])
def test_the_commands_say_it_in_one_line(command, argv, tmp_path, capsys, monkeypatch):
    import importlib

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    main = importlib.import_module("convert.__main__" if command == "convert" else command).main
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "nor a valid Hugging Face repo id" in err and len(err.strip().splitlines()) == 1, err

"""Every example runs as written (against the tiny fixtures)."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, TINY_CODE

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300, **kw)
    assert r.returncode == 0, f"{argv} failed:\n{r.stdout}\n{r.stderr}"
    return r


def test_stream_api():
    r = run(sys.executable, "examples/stream_api.py", "--max-tokens", "30")
    assert "tau" in r.stderr and r.stdout.strip()


def test_ngram_editing():
    r = run(sys.executable, "examples/ngram_editing.py", "--max-tokens", "40")
    assert "n-gram" in r.stderr


@pytest.mark.skipif(shutil.which("mlx_spec.convert") is None, reason="console scripts not installed")
def test_convert_then_chat(tmp_path):
    r = run("bash", "examples/convert_then_chat.sh", str(TINY_CODE / "base"), str(TINY_CODE / "assistant"),
            str(tmp_path / "models"), stdin=subprocess.DEVNULL)
    assert (tmp_path / "models" / "base-4bit" / "config.json").exists() and "tau" in (r.stdout + r.stderr)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_client_against_the_server():
    pytest.importorskip("openai")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlx_spec.server", "--model", str(TINY_CODE / "base"),
                               "--drafter", str(TINY_CODE / "assistant"), "--port", str(port)],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"server exited: {server.stderr.read()}")
                time.sleep(0.1)
        r = run(sys.executable, "examples/openai_client.py", "--base-url", f"http://127.0.0.1:{port}/v1",
                "--max-tokens", "24")
        assert r.stdout.strip()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_trees_measurement_runs():
    r = run(sys.executable, "examples/measure/trees.py", "--prompts", "1", "--tokens", "12", "--temps", "0",
            "--sizes", "4", "--drafters", "assistant", "--no-auto")
    assert "tree 4" in r.stdout and "chain k=4" in r.stdout


def test_gpu_measure_shapes_runs_on_the_tiny_shape(tmp_path):
    """The prepared GPU measurement script works (here on the CPU, with the tiny stand-in shape)."""
    import json

    out = tmp_path / "costs.json"
    run(sys.executable, "examples/gpu/measure_shapes.py", "--shapes", "tiny", "--q-bits", "0", "--context", "32",
        "--reps", "1", "--out", str(out))
    r = json.loads(out.read_text())["shapes"][0]
    assert r["shape"] == "tiny" and len(r["verify_cost"]) == 9 and r["draft_step_cost"] > 0


def test_batch_round_profile_runs_and_splits_every_phase():
    """The batched-round profile (docs/BATCHING.md) still finds every phase it times in Batch.round."""
    r = run(sys.executable, "examples/measure/batch_round.py", "--widths", "2", "--rounds", "2", "--clock", "cpu")
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] == ["2"]]
    assert [row[1] for row in rows] == ["0", "3"], "a plain and a drafted batch of 2 rows"
    assert all(len(row) == 14 for row in rows), "round, tokens, ms/token, 7 phases, the rest"
    assert float(rows[1][3]) > float(rows[0][3]), "a drafted round emits more tokens than a plain one"


def test_mlx_vlm_wrapper_gives_the_same_model(tmp_path):
    """The comparison's multimodal wrapper of the tiny base loads (Google's gemma4 layout) and decodes
    exactly what the text-only checkpoint decodes, so both implementations compare on the same model."""
    from mlx_spec import generate, load

    run(sys.executable, "examples/mlx_vlm/wrap_multimodal.py", str(TINY_CODE / "base"), str(tmp_path / "mm"))
    text, tok = load(str(TINY_CODE / "base"))
    wrapped, _ = load(str(tmp_path / "mm"))
    assert type(wrapped).__module__.endswith("gemma4")
    ids = tok.encode("def fibonacci(n):")
    assert generate(wrapped, tok, ids, max_tokens=40) == generate(text, tok, ids, max_tokens=40)


@pytest.mark.skipif(importlib.util.find_spec("mlx_vlm") is None, reason="needs mlx-vlm (see examples/mlx_vlm/run.sh)")
@pytest.mark.skipif(shutil.which("mlx_spec.convert") is None, reason="console scripts not installed")
def test_mlx_vlm_side_by_side(tmp_path):
    r = run("bash", "examples/mlx_vlm/run.sh", str(tmp_path), "40", "1")
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report and all(row["equals_plain"] for row in report), r.stdout

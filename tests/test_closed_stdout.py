"""A command whose reader goes away (`mlx_spec.generate ... | head -c 1`) stops quietly, as Unix tools do:
no BrokenPipeError traceback, and the shell's status for SIGPIPE (141). The pipe's read end is closed
before the command starts, so its first write to stdout is the one that fails (no race with the reader)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_CODE

BASE = str(TINY_CODE / "base")
SIGPIPE_STATUS = 141  # 128 + SIGPIPE

COMMANDS = {
    "generate": (["mlx_spec.generate", "--model", BASE, "--prompt", "def", "--max-tokens", "8",
                  "--ignore-chat-template", "--no-draft"], None),
    "chat": (["mlx_spec.chat", "--model", BASE, "--max-tokens", "8", "--no-draft"], "def add(a, b):\n"),
    "doctor": (["mlx_spec.doctor", "--model", BASE, "--tokens", "2", "--num-draft-tokens", "1", "--context", "8",
                "--cost-reps", "0"], None),
}


def run_with_closed_stdout(argv, stdin, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first byte
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), HF_HUB_OFFLINE="1")
    try:
        return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, stdout=write_end, input=stdin or "",
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_closed_stdout_ends_the_command_quietly(name, tmp_path):
    proc = run_with_closed_stdout(*COMMANDS[name], tmp_path)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, \
        f"a closed stdout must end {name} without a traceback; stderr:\n{proc.stderr}"
    assert proc.returncode == SIGPIPE_STATUS, f"{name} exits as a Unix tool killed by SIGPIPE (141), got " \
                                              f"{proc.returncode}; stderr:\n{proc.stderr}"


def test_convert_writes_nothing_on_stdout_so_a_closed_one_cannot_stop_it(tmp_path):
    """mlx-lm's quantizer prints its bits-per-weight line; the converter's notes all go to stderr."""
    proc = run_with_closed_stdout(["convert", "--hf-path", BASE, "--mlx-path", str(tmp_path / "q"), "-q"], None,
                                  tmp_path)
    assert proc.returncode == 0 and (tmp_path / "q" / "config.json").is_file(), \
        f"convert -q must finish with a closed stdout; stderr:\n{proc.stderr}"
    assert "bits per weight" in proc.stderr, "mlx-lm's quantization summary is kept, on stderr"

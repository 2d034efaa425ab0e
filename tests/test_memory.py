"""Memory warnings go to stderr (stdout carries generated text) and name what to do."""

import pytest
from conftest import TINY_CODE

import mlx_spec.memory as memory
from mlx_spec.cache import KVQuant
from mlx_spec.loading import load_model


def test_warns_on_stderr_before_a_load_that_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(memory, "recommended_working_set", lambda: 1024)
    load_model(str(TINY_CODE / "base"))
    out, err = capsys.readouterr()
    assert out == "" and "recommended working set" in err and "--q-bits 4" in err


def test_no_warning_when_it_fits(monkeypatch, capsys):
    monkeypatch.setattr(memory, "recommended_working_set", lambda: 2**40)
    load_model(str(TINY_CODE / "base"))
    assert capsys.readouterr().err == ""


# -- the memory check sizes K/V from the context the run will use, and proposes only what is smaller

GIB = 2**30
E2B_LIKE = [memory.LayerKV(1, 256, 256, 512)] * 12 + [memory.LayerKV(1, 512, 512)] * 3  # as test_memory_estimate


def proposed(text: str, flag: str):
    """The number a warning or its flags propose for `flag` (None: not proposed)."""
    import re

    found = re.search(re.escape(flag) + r" (\d+)", text)
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("limit_gib, slots", [(16, 8), (8, 8), (4.3, 8), (4.0, 64), (3.7, 4), (3.6, 1), (5, 10**6)])
def test_advice_never_proposes_more_than_the_run_uses_and_what_it_proposes_fits(limit_gib, slots):
    context, weights = 131072, int(3.3 * GIB)
    a = memory.advise(E2B_LIKE, context, weights=weights, dtype_bytes=2, limit=int(limit_gib * GIB), slots=slots)
    one = memory.estimate_memory(E2B_LIKE, context, weights=weights).kv
    assert a.estimate.kv == slots * one, "each slot holds its own caches, up to the context"
    if a.fits or not a.flags:
        return
    ctx, n = proposed(a.flags, "--max-context"), proposed(a.flags, "--prompt-cache-slots")
    assert ctx is None or 0 < ctx <= context, f"a --max-context no longer than the context in use: {a.message}"
    assert n is None or 1 <= n < slots, f"fewer slots than asked: {a.message}"
    bits = proposed(a.flags, "--kv-bits")
    fitted = memory.estimate_memory(E2B_LIKE, ctx or context, weights=weights, kv=KVQuant(bits, 64) if bits else None,
                                    slots=n or slots)
    assert fitted.total <= 0.9 * limit_gib * GIB, f"what it proposes fits: {a.message}"


def memory_warning(monkeypatch, capsys, module, argv, limit):
    """The warning line (or None) a command prints before loading, with `limit` bytes of memory."""
    import importlib

    from mlx_spec.errors import MlxSpecError

    def stop(*a, **k):
        raise MlxSpecError("stopped after the memory check")

    command = importlib.import_module(module)
    monkeypatch.setattr(command, "load_models", stop)
    monkeypatch.setattr(memory, "memory_limit", lambda: (limit, "test limit"))
    assert command.main(["--model", str(TINY_CODE / "base"), *argv]) == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) <= 1
    return warnings[0] if warnings else None


def test_generate_sizes_kv_after_the_context_cap(monkeypatch, capsys):
    """The tiny base's context is 2,048 positions: --max-tokens 10^11 is cut to it, so its K/V is 2.6 MB, not
    the 95,367 GiB the warning once computed (with a --max-context of 142,150,400 as the fix)."""
    argv = ["--prompt", "def", "--ignore-chat-template", "--max-tokens", "100000000000"]
    assert memory_warning(monkeypatch, capsys, "mlx_spec.generate", argv, 10 * 2**20) is None, \
        "4.4 MB of weights and 2.6 MB of K/V at the capped context fit in 10 MB"
    line = memory_warning(monkeypatch, capsys, "mlx_spec.generate", argv, 5 * 2**20)
    assert "at 2048 tokens" in line and 0 < proposed(line, "--max-context") <= 2048, line
    line = memory_warning(monkeypatch, capsys, "mlx_spec.generate", argv[:-1] + ["100"], 5 * 2**20)
    assert "at 103 tokens" in line and (proposed(line, "--max-context") or 0) <= 103, \
        "a short run is sized as short: --max-tokens 100 after a 3-character prompt"


def test_server_sizes_kv_per_slot_and_proposes_fewer_slots(monkeypatch, capsys):
    argv = ["--prompt-cache-slots", "1000000", "--max-context", "2048", "--quiet"]
    line = memory_warning(monkeypatch, capsys, "mlx_spec.server.command", argv, GIB)
    assert line and "at 2048 tokens x 1000000 slots" in line, line
    assert 1 <= proposed(line, "--prompt-cache-slots") < 10**6 and "--max-context" not in line, line
    assert memory_warning(monkeypatch, capsys, "mlx_spec.server.command", argv[:2] + ["--no-prompt-cache", "--quiet"],
                          GIB) is None, "--no-prompt-cache keeps one slot"

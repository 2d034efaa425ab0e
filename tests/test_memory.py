"""Memory warnings go to stderr (stdout carries generated text) and name what to do."""

from conftest import TINY_CODE

import mlx_spec.memory as memory
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

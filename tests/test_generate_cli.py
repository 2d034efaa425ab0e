"""`mlx_spec.generate`: text on stdout only, stats on stderr, one-line errors for user mistakes."""

import subprocess
import sys

import pytest
from conftest import ROOT, TINY_CODE

from mlx_spec import generate, load
from mlx_spec.generate import main

BASE, ASSISTANT = str(TINY_CODE / "base"), str(TINY_CODE / "assistant")
PROMPT = "def add(a, b):\n    return"


def cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def plain_text():
    model, tok = load(BASE)
    return generate(model, tok, PROMPT, max_tokens=40)


def test_stdout_is_exactly_the_generated_text(capsys, plain_text):
    rc, out, err = cli(capsys, "--model", BASE, "--prompt", PROMPT, "--max-tokens", "40", "--no-draft",
                       "--ignore-chat-template")
    assert rc == 0 and out == plain_text + "\n", "stdout must carry the generated text and nothing else"
    assert "Generation: 40 tokens" in err and "Peak memory" in err


@pytest.mark.parametrize("flags", [["--drafter", ASSISTANT, "--num-draft-tokens", "3"],
                                   ["--drafter", ASSISTANT, "--num-draft-tokens", "8"], ["--ngram", "2"]])
def test_speculative_cli_prints_the_same_text(capsys, plain_text, flags):
    rc, out, err = cli(capsys, "--model", BASE, "--prompt", PROMPT, "--max-tokens", "40", "--temp", "0",
                       "--ignore-chat-template", *flags)
    assert rc == 0 and out == plain_text + "\n", f"{flags}: speculative output must equal plain output"
    assert "Speculation:" in err and "tau" in err


def test_python_dash_m_subprocess():
    r = subprocess.run([sys.executable, "-m", "mlx_spec.generate", "--model", BASE, "--drafter", ASSISTANT,
                        "--prompt", PROMPT, "--max-tokens", "10", "--ignore-chat-template"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Warning" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/nonexistent/model", "--prompt", "x"], "does not exist"),
    (["--model", BASE, "--drafter", BASE, "--prompt", "x"], "not a drafter (gemma4_assistant, gemma4_unified_assistant"),
    (["--model", BASE, "--prompt", "x", "--temp", "-1"], "--temp"),
    (["--model", BASE, "--prompt", "x", "--top-p", "0"], "--top-p"),
])
def test_user_errors_are_one_line(capsys, argv, needle):
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_num_draft_tokens_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", BASE, "--prompt", "x", "--num-draft-tokens", "many"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "integer or 'auto'" in err and len(err.strip().splitlines()) == 1


def test_the_summary_says_how_many_tokens_were_decoded_without_drafts(capsys):
    import io

    from mlx_spec.stats import GenerationStats
    from mlx_spec.cli import print_stats

    out = io.StringIO()
    stats = GenerationStats(prompt_tokens=5, generation_tokens=10, rounds=2, drafted=6, accepted=3,
                            drafted_by_position=[2, 2, 2], accepted_by_position=[2, 1, 0])
    assert stats.plain_steps == 10 - 1 - 3 - 2
    print_stats(stats, file=out, drafting=True)
    assert "tau 2.50" in out.getvalue() and "4 tokens without drafts" in out.getvalue()
    out = io.StringIO()
    print_stats(GenerationStats(prompt_tokens=5, generation_tokens=10), file=out, drafting=True)
    assert "no drafted rounds" in out.getvalue(), "auto-off is said, not silent"
    out = io.StringIO()
    print_stats(GenerationStats(prompt_tokens=5, generation_tokens=10), file=out)
    assert "Speculation" not in out.getvalue(), "plain decoding: nothing to say"


def test_acceptance_at_a_position_never_drafted_is_undefined_not_zero():
    import io

    from mlx_spec.cli import print_stats
    from mlx_spec.stats import GenerationStats

    a = GenerationStats(generation_tokens=9, rounds=3, drafted=4, accepted=2, drafted_by_position=[3, 1],
                        accepted_by_position=[2, 0])
    b = GenerationStats(drafted_by_position=[0, 0, 0], accepted_by_position=[0, 0, 0])
    total = GenerationStats.total([a, b])
    assert total.acceptance_by_position == [2 / 3, 0.0, None], "drafted and rejected: 0; never drafted: undefined"
    out = io.StringIO()
    print_stats(total, file=out)
    assert "by position [0.67, 0.00, -]" in out.getvalue()


def test_strict_says_what_it_did(capsys):
    rc, out, err = cli(capsys, "--model", BASE, "--prompt", "def f(x):", "-m", "6", "--ignore-chat-template",
                       "--strict", "--ngram", "--num-draft-tokens", "3")
    assert rc == 0 and "Strict: nothing to pad" in err, err
    rc, _, err = cli(capsys, "--model", BASE, "--prompt", "x", "--strict", "--ngram", "--num-draft-tokens", "12")
    assert rc == 2 and "strict mode verifies at most 8 drafts" in err


# --- hostile input: bytes that are not UTF-8, seeds out of range, NaN, a prompt past the context ----------

def test_stdin_that_is_not_utf8_is_replaced_with_a_warning(capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"def f(\xff):\n"), encoding="utf-8"))
    rc, out, err = cli(capsys, "--model", BASE, "--prompt", "-", "-m", "6", "--ignore-chat-template", "--no-draft")
    model, tok = load(BASE)
    assert rc == 0 and out == generate(model, tok, "def f(\ufffd):\n", max_tokens=6) + "\n"
    assert "stdin is not valid UTF-8: 1 byte replaced with U+FFFD" in err and "Traceback" not in err


def test_argv_that_is_not_utf8_is_replaced_with_a_warning():
    """Python hands argv bytes that are not UTF-8 over as surrogates, which the tokenizer cannot encode."""
    r = subprocess.run([sys.executable, "-m", "mlx_spec.generate", "--model", BASE, "--prompt", b"ab\xffcd\xfe",
                        "-m", "4", "--ignore-chat-template", "--no-draft"], capture_output=True, cwd=ROOT, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0 and "--prompt is not valid UTF-8: 2 bytes replaced with U+FFFD" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("seed, same_as", [("-1", str(2**64 - 1)), (str(2**70 + 5), "5")])
def test_any_integer_seed_is_mapped_into_range(capsys, seed, same_as):
    argv = ["--model", BASE, "--prompt", PROMPT, "-m", "8", "--temp", "1", "--ignore-chat-template"]
    rc, out, err = cli(capsys, *argv, "--seed", seed)
    assert rc == 0, err
    assert cli(capsys, *argv, "--seed", same_as)[1] == out, f"seed {seed} is seed {same_as} (mod 2**64)"


@pytest.mark.parametrize("argv, needle", [
    (["--seed", "1e20"], "--seed: invalid int value"),
    (["--seed", "0x10"], "--seed: invalid int value"),
    (["--temp", "nan"], "--temp must be a finite number"),
    (["--temp", "inf"], "--temp must be a finite number"),
    (["--top-p", "nan"], "--top-p"),
    (["--max-context", "1"], "--max-context must be >= 2"),
])
def test_bad_values_are_one_line(capsys, argv, needle):
    try:
        rc, out, err = cli(capsys, "--model", BASE, "--prompt", "x", *argv)
    except SystemExit as e:  # argparse's own refusals
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("drafter", ["assistant", "dflash"])
def test_a_drafter_given_as_draft_model_is_told_to_use_drafter(capsys, drafter):
    """A drafter cannot draft alone (it reads the base's K/V or layer outputs): --draft-model gave a TypeError
    (MTP assistant) or a missing-tokenizer error (DFlash)."""
    rc, out, err = cli(capsys, "--model", BASE, "--draft-model", str(TINY_CODE / drafter), "--prompt", "x",
                       "--max-tokens", "2")
    assert rc == 2 and "pass it with --drafter" in err, err
    assert len(err.strip().splitlines()) == 1, "one error line, no traceback"


def test_a_prompt_that_fills_the_context_is_refused(capsys):
    rc, out, err = cli(capsys, "--model", BASE, "--prompt", "x = 1\n" * 700, "--ignore-chat-template")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and out == "", err
    assert "context holds 2048 (the model's max_position_embeddings): no room to generate" in lines[0]
    rc, _, err = cli(capsys, "--model", BASE, "--prompt", PROMPT, "--max-context", "5", "--ignore-chat-template")
    assert rc == 2 and "(--max-context)" in err and "shorten the prompt" in err


def test_max_tokens_past_the_context_is_cut_with_a_note(capsys):
    model, tok = load(BASE)
    n = len(tok.encode(PROMPT))
    rc, out, err = cli(capsys, "--model", BASE, "--prompt", PROMPT, "--max-context", str(n + 5), "-m", "40",
                       "--ignore-chat-template", "--no-draft")
    assert rc == 0 and "so at most 5 of --max-tokens 40 are generated" in err
    assert out == generate(model, tok, PROMPT, max_tokens=5) + "\n" and "Generation: 5 tokens" in err

"""mlx_spec.chat: cache reuse across turns == full re-prefill (with and without drafting), Ctrl-C, commands,
context limits and CLI errors. Uses the trained tiny Gemma 4 pair with a Gemma-style chat template."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_CODE
from mlx_spec import conversation as conversation_mod
from mlx_spec import generate, load, load_drafter, stream_generate
from mlx_spec.api import respond
from mlx_spec import chat as chat_mod
from mlx_spec.chat import ChatSession, ChatUI
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.draft_model import DraftModelProposer

WINDOW = 32  # the fixture's sliding window
# Gemma's turn markup: the model's turns are "model" turns, in history as in the generation prompt
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
            "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TURNS = ["def parse_args(argv):\n    parser = argparse.ArgumentParser()", "class Config:\n    def __init__(self):",
         "import os\nimport sys\n\ndef main():"]
LINES = [t.replace("\n", " ") for t in TURNS]  # as typed at the prompt, one line each
MAX_TOKENS = 24


def model_dir(dst, template=TEMPLATE):
    """A copy of the fixture base whose tokenizer_config.json carries `template` (None: no template)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in (TINY_CODE / "base").iterdir():
        shutil.copy(f, dst / f.name)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = model_dir(tmp_path_factory.mktemp("chat") / "base")
    model, tokenizer = load(str(path))
    return path, model, tokenizer, load_drafter(str(TINY_CODE / "assistant"), model)


def reference_reply(model, tokenizer, messages):
    """What plain decoding from scratch (no cache, no drafter) answers to this conversation."""
    session = ChatSession(model, tokenizer)
    return [r.token for r in stream_generate(model, tokenizer, session.conversation_tokens(messages),
                                             max_tokens=MAX_TOKENS)]


@pytest.mark.parametrize("drafting", [False, True], ids=["plain", "mtp"])
def test_cache_reuse_equals_full_reprefill(pair, drafting):
    _, model, tokenizer, drafter = pair
    session = ChatSession(model, tokenizer, proposer=make_proposer(model, drafter=drafter), drafting=drafting,
                          system_prompt="You write Python.", max_tokens=MAX_TOKENS,
                          num_draft_tokens=3)  # fixed: auto may decide, on timing, not to draft
    held = []
    for turn, text in enumerate(TURNS):
        messages = session.messages + [{"role": "user", "content": text}]
        want = reference_reply(model, tokenizer, messages)
        got = [r.token for r in session.reply(text)]
        assert got == want, f"turn {turn}: cached + {'drafted' if drafting else 'plain'} decoding == full re-prefill"
        if turn:
            assert session.last.reused_tokens == len(held), "the whole cache is reused: only the new turn is prefilled"
            assert len(held) > 2 * WINDOW, "reuse is tested past the sliding window"
        full = session.conversation_tokens(session.messages)
        held = session.cached_tokens
        assert held == full[: len(held)], "the cache holds a prefix of the conversation"
        assert len(held) == session.last.prompt_tokens + len(got) - 1, "... all of it but the reply's last token"
        assert all(c.offset == len(held) for c in session.cache), "every layer's cache holds the same tokens"
    if drafting:
        assert session.last.stats.rounds > 0, "the drafter was used"


def test_draft_model_keeps_its_cache_across_turns(pair):
    """With --draft-model, one proposer serves the session: each turn prefills only the new tokens into the
    draft model's cache too, and replies stay those of plain decoding from scratch."""
    _, model, tokenizer, _ = pair
    session = ChatSession(model, tokenizer, proposer=make_proposer(model, draft_model=model), max_tokens=MAX_TOKENS,
                          num_draft_tokens=3)
    assert session.proposer_name == "draft_model"
    real, owners = DraftModelProposer._reusable_prefix, set()
    for turn, text in enumerate(TURNS):
        messages = session.messages + [{"role": "user", "content": text}]
        want = reference_reply(model, tokenizer, messages)
        kept = []

        def counting(self, prompt):
            owners.add(id(self))
            kept.append(real(self, prompt))
            return kept[-1]

        DraftModelProposer._reusable_prefix = counting
        try:
            got = [r.token for r in session.reply(text)]
        finally:
            DraftModelProposer._reusable_prefix = real
        assert got == want, f"turn {turn}: draft-model speculation with a carried-over cache == plain"
        assert session.last.stats.rounds > 0 and session.last.stats.tau > 3, "the model drafting for itself"
        if turn:  # the draft cache trails the history by at most a round (its last bonus and drafts)
            assert kept[0] >= session.last.reused_tokens - 4, f"turn {turn}: the draft cache kept the conversation"
    assert len(owners) == 1 and session._slot.proposer is not session.proposer, \
        "the conversation's slot keeps one proposer of its own (a fork) across turns"


def test_deep_rollback_falls_back_to_full_prefill(pair):
    """An edit early in the conversation needs a rollback the sliding window cannot give: start afresh."""
    _, model, tokenizer, drafter = pair
    session = ChatSession(model, tokenizer, proposer=make_proposer(model, drafter=drafter), system_prompt="You write Python.",
                          max_tokens=MAX_TOKENS)
    list(session.reply(TURNS[0]))
    session.messages[0]["content"] = "You write C."
    messages = session.messages + [{"role": "user", "content": TURNS[1]}]
    got = [r.token for r in session.reply(TURNS[1])]
    assert session.last.reused_tokens == 0, "a rollback past the window slack falls back to a fresh cache"
    assert got == reference_reply(model, tokenizer, messages), "the fallback is a full re-prefill"


class SigintAfter(io.StringIO):
    """stdout that presses Ctrl-C (a real SIGINT to this process) on its n-th write."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def write(self, s):
        self.n -= 1
        if self.n == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(s)


class RaiseAfter(io.StringIO):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def write(self, s):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return super().write(s)


@pytest.mark.parametrize("press", [SigintAfter, RaiseAfter], ids=["sigint", "keyboardinterrupt"])
def test_ctrl_c_stops_the_reply_not_the_chat(pair, press):
    _, model, tokenizer, drafter = pair
    session = ChatSession(model, tokenizer, proposer=make_proposer(model, drafter=drafter), max_tokens=MAX_TOKENS)
    out, err = press(3), io.StringIO()
    rc = ChatUI(session, io.StringIO(f"{LINES[0]}\n{LINES[1]}\n"), out, err).loop()
    assert rc == 0 and session.turns == 2, "the chat goes on after Ctrl-C"
    assert err.getvalue().count("[stopped]") == 1, "the interrupted reply says so"
    first, second = session.messages[1]["content"], session.messages[3]["content"]
    assert 0 < len(tokenizer.encode(first, add_special_tokens=False)) < 8, "the first reply stopped early"
    want = generate(model, tokenizer, session.conversation_tokens(session.messages[:3]), max_tokens=MAX_TOKENS)
    assert second == want, "the turn after an interrupted one decodes as from scratch"
    assert session.cache is not None and session.cached_tokens, "a clean stop keeps the prompt cache"


def test_interrupt_inside_the_engine_drops_the_cache(pair, monkeypatch):
    """A KeyboardInterrupt raised mid-step may leave the cache half-updated: it is dropped, not trusted."""
    _, model, tokenizer, drafter = pair

    def torn(*args, **kwargs):
        for i, r in enumerate(respond(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield r

    session = ChatSession(model, tokenizer, proposer=make_proposer(model, drafter=drafter), max_tokens=MAX_TOKENS)
    monkeypatch.setattr(conversation_mod, "respond", torn)
    err = io.StringIO()
    ChatUI(session, io.StringIO(LINES[0] + "\n"), io.StringIO(), err).loop()
    assert "[stopped]" in err.getvalue() and session.cache is None, "a torn step drops the cache"
    monkeypatch.setattr(conversation_mod, "respond", respond)
    messages = session.messages + [{"role": "user", "content": TURNS[1]}]
    assert [r.token for r in session.reply(TURNS[1])] == reference_reply(model, tokenizer, messages), \
        "after a dropped cache the next turn is a full re-prefill"


def run_main(argv, stdin, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = chat_mod.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_main_streams_replies_and_runs_commands(pair, monkeypatch, capsys):
    path, model, tokenizer, _ = pair
    argv = ["--model", str(path), "--drafter", str(TINY_CODE / "assistant"), "-m", str(MAX_TOKENS)]
    lines = [LINES[0], "/stats", "/draft off", LINES[1], "/temp 0.5", "/temp -1", "/draft maybe", "/bogus",
             "/reset", "/help", "/quit", "never read"]
    rc, out, err = run_main(argv, "\n".join(lines) + "\n", monkeypatch, capsys)
    assert rc == 0, err
    first = generate(model, tokenizer, ChatSession(model, tokenizer).conversation_tokens(
        [{"role": "user", "content": LINES[0]}]), max_tokens=MAX_TOKENS)
    assert out.startswith(first + "\n"), "the first reply (greedy) is mlx_spec.generate's text, on stdout"
    summaries = [line for line in err.splitlines() if line.startswith("[") and not line.startswith("[mlx_spec]")]
    assert len(summaries) == 2, "one summary line after each reply"
    assert "τ" in summaries[0] and "acceptance" in summaries[0] and "tok/s" in summaries[0]
    assert "drafting off" in summaries[1] and "cached" in summaries[1]
    for expected in ("Speculation:", "Conversation: 1 replies", "drafting off", "temperature 0.5", "usage: /temp",
                     "usage: /draft", "unknown command /bogus", "new conversation", "/draft on|off"):
        assert expected in err, f"stderr mentions {expected!r}"
    assert "never read" not in out + err, "/quit ends the chat"


def test_draft_on_without_a_proposer(pair, monkeypatch, capsys):
    path = pair[0]
    rc, _, err = run_main(["--model", str(path)], "/draft on\n", monkeypatch, capsys)
    assert rc == 0 and "no proposer loaded" in err


def test_context_full_is_a_message_not_a_crash(pair, monkeypatch, capsys):
    path = pair[0]
    argv = ["--model", str(path), "--max-context", "60", "-m", "100"]
    rc, out, err = run_main(argv, "hi\n" + "y" * 200 + "\n/stats\n", monkeypatch, capsys)
    assert rc == 0, err
    assert "the context is full, so the reply was cut" in err, "a reply cut by the context says so"
    assert "context full: with this message the conversation would be" in err and "/reset" in err, \
        "a message that no longer fits says so"


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--model", "{base}", "--temp", "-1"], "--temp must be a finite number >= 0"),
    (["--model", "{base}", "--temp", "nan"], "--temp must be a finite number >= 0"),
    (["--model", "{base}", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--model", "{notemplate}"], "no chat template"),
])
def test_user_mistakes_print_one_line(pair, tmp_path, monkeypatch, capsys, argv, message):
    notemplate = model_dir(tmp_path / "plain", template=None) if "{notemplate}" in argv else None
    argv = [a.format(base=pair[0], notemplate=notemplate) for a in argv]
    rc, _, err = run_main(argv, "", monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_subprocess_reads_stdin(pair):
    path = pair[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "mlx_spec.chat", "--model", str(path), "--drafter",
                        str(TINY_CODE / "assistant"), "-m", "16"], input=f"{LINES[2]}\n/stats\n", text=True,
                       capture_output=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip(), "the reply is on stdout"
    assert "τ" in p.stderr and "Conversation: 1 replies" in p.stderr
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr


def test_input_that_is_not_utf8_is_replaced_not_a_crash(pair, monkeypatch, capsys):
    """A strict UTF-8 stdin (a UTF-8 locale) raised on the first bad byte; the chat reads it with
    surrogateescape and replaces what is not UTF-8, with a warning."""
    path, model, tokenizer, _ = pair
    stdin = io.TextIOWrapper(io.BytesIO(b"def f(\xff):\n/quit\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc = chat_mod.main(["--model", str(path), "-m", "6", "--seed", "-1", "--temp", "0.5"])
    captured = capsys.readouterr()
    assert rc == 0 and "this line is not valid UTF-8: 1 byte replaced with U+FFFD" in captured.err, captured.err
    assert captured.out.strip(), "the line was answered"

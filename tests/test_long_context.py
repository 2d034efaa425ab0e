"""Long contexts from the commands: --kv-bits keeps drafting exact, saved sessions (cache_prompt +
--prompt-cache-file) continue exactly like an unbroken run and refuse what does not fit, the memory check
names the flag that fits, and a long prefill says how far it is."""

import io
import shutil

import pytest

from conftest import FIXTURES, TINY_CODE
from mlx_spec import cache_prompt, generate, load, load_drafter, stream_generate
from mlx_spec.chat import ChatSession
from mlx_spec.long_context import PrefillProgress, check_memory
from mlx_spec.proposers import make_proposer

BASE, ASSISTANT = str(TINY_CODE / "base"), str(TINY_CODE / "assistant")
CODE = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"


def run(main, capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def gen_main(argv):
    from mlx_spec.generate import main

    return main(argv)


@pytest.fixture(scope="module")
def pair():
    model, tok = load(BASE)
    return model, tok, load_drafter(ASSISTANT, model)


def test_quantized_kv_from_the_command_line_keeps_drafting_exact(capsys):
    flags = ["--model", BASE, "--prompt", CODE, "-m", "40", "--ignore-chat-template", "--kv-bits", "8",
             "--kv-group-size", "32", "--quantized-kv-start", "0"]
    rc, plain, err = run(gen_main, capsys, *flags, "--no-draft")
    assert rc == 0, err
    rc, spec, err = run(gen_main, capsys, *flags, "--drafter", ASSISTANT, "--num-draft-tokens", "3")
    assert rc == 0 and spec == plain and "Speculation" in err, "speculative == plain with the same --kv-bits"
    rc, _, err = run(gen_main, capsys, "--model", BASE, "--prompt", "x", "--kv-bits", "8")
    assert rc == 2 and "--kv-group-size 64 does not divide the model's head_dim 32" in err and \
        "--kv-group-size 32" in err, "the group size is checked against the model, with the fix"


def test_a_saved_session_continues_exactly_like_an_unbroken_run(pair, tmp_path, capsys):
    model, tok, _ = pair
    path = tmp_path / "s.safetensors"
    rc, _, err = run(cache_prompt.main, capsys, "--model", BASE, "--prompt", CODE, "--prompt-cache-file", str(path),
                     "--ignore-chat-template")
    assert rc == 0 and path.exists() and "cached" in err, err
    question = "    parser.add_argument("
    rc, out, err = run(gen_main, capsys, "--model", BASE, "--drafter", ASSISTANT, "--prompt-cache-file", str(path),
                       "--prompt", question, "-m", "32", "--ignore-chat-template", "--num-draft-tokens", "3")
    assert rc == 0, err
    ids = tok.encode(CODE) + tok.encode(question, add_special_tokens=False)
    assert out == generate(model, tok, ids, max_tokens=32) + "\n", "the cached prefix + the question, from scratch"
    assert "Prompt: " in err


def test_a_session_for_another_model_or_a_damaged_file_is_one_line(pair, tmp_path, capsys):
    model, tok, _ = pair
    path = tmp_path / "s.safetensors"
    run(cache_prompt.main, capsys, "--model", BASE, "--prompt", CODE, "--prompt-cache-file", str(path),
        "--ignore-chat-template")
    other = str(FIXTURES / "hf" / "e2b_like")
    rc, _, err = run(gen_main, capsys, "--model", other, "--prompt-cache-file", str(path), "--prompt", "w9",
                     "--ignore-chat-template")
    assert rc == 2 and "was saved for another model" in err and len(err.strip().splitlines()) == 1, err
    damaged = tmp_path / "d.safetensors"
    shutil.copy(path, damaged)
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size - 100)
    rc, _, err = run(gen_main, capsys, "--model", BASE, "--prompt-cache-file", str(damaged), "--prompt", "x",
                     "--ignore-chat-template")
    assert rc == 2 and str(damaged) in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = run(gen_main, capsys, "--model", BASE, "--prompt-cache-file", str(tmp_path / "none"), "--prompt", "x")
    assert rc == 2 and "mlx_spec.cache_prompt" in err


def test_a_chat_starting_with_a_saved_prompt_continues_it(pair):
    from mlx_spec.cache_prompt import prefill

    model, tok, drafter = pair
    tok._tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                                    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                                    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    try:
        system = "You write Python. " * 20
        plain = ChatSession(model, tok, system_prompt=system, max_tokens=16)
        saved = plain.conversation_tokens([{"role": "system", "content": system}])[:-3]  # a prefix of every turn
        caches = prefill(model, saved, None, lambda done, total: None)
        assert caches[0].offset == len(saved)
        with_session = ChatSession(model, tok, system_prompt=system, max_tokens=16, session=(caches, saved),
                                   proposer=make_proposer(model, drafter=drafter))
        for text in ("def parse(line):", "class Config:"):
            want = [r.token for r in plain.reply(text)]
            assert [r.token for r in with_session.reply(text)] == want, "as without the saved prompt"
            assert with_session.last.reused_tokens >= len(saved), "the saved prompt was not prefilled again"
        assert with_session.turns == 2
        with_session.reset()
        list(with_session.reply("import os"))
        assert with_session.last.reused_tokens >= len(saved), "after /reset the saved prompt is still whole"
    finally:
        del tok._tokenizer.chat_template


def test_the_memory_check_names_the_flag_that_fits(monkeypatch):
    from mlx_spec import memory

    err = io.StringIO()
    monkeypatch.setattr(memory, "memory_limit", lambda: (10 * 2**20, "test limit"))
    assert check_memory(BASE, ASSISTANT, 2048, None, file=err), "4.4 MB of weights and a little K/V fit in 10 MB"
    assert not check_memory(BASE, ASSISTANT, 200_000, None, file=err)
    line = err.getvalue()
    assert line.startswith("warning:") and "--kv-bits" in line and "test limit" in line, line


def test_a_long_prefill_says_how_far_it_is():
    out = io.StringIO()
    progress = PrefillProgress(file=out)
    progress(2048, 1000)
    assert out.getvalue() == "", "short prompts: nothing to say"
    for done in (2048, 4096, 6143):
        progress(done, 6144)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("prefill: 2048/6144 tokens") and "tok/s" in lines[-1] and len(lines) == 3


def test_the_api_takes_mlx_lms_kv_flags(pair):
    model, tok, drafter = pair
    kw = dict(max_tokens=24, kv_bits=4, kv_group_size=32, quantized_kv_start=8)
    plain = [r.token for r in stream_generate(model, tok, CODE, **kw)]
    assert [r.token for r in stream_generate(model, tok, CODE, drafter=drafter, num_draft_tokens=4, **kw)] == plain


def test_the_server_continues_requests_that_start_with_its_saved_prompt(pair):
    from mlx_spec.cache_prompt import prefill
    from mlx_spec.server import GenerationRequest, Job, Worker

    model, tok, _ = pair
    saved = tok.encode(CODE)
    worker = Worker(model, tok, None, max_context=None, max_tokens=12, prompt_cache=False,
                    session=(prefill(model, saved, None, lambda d, t: None), saved))
    for follow_up in ("    args = parser.parse_args(argv)\n", "    return 0\n"):  # each from the saved prompt
        job = Job(GenerationRequest(kind="text", prompt=CODE + follow_up, max_tokens=12))
        worker.run_now(job)
        events = [job.events.get_nowait() for _ in range(job.events.qsize())]
        text = "".join(v for k, v in events if k == "text")
        result = next(v for k, v in events if k == "done")
        assert text == generate(model, tok, CODE + follow_up, max_tokens=12), "as from scratch"
        assert result.cached_tokens >= len(saved) - 1, "the saved prompt served (even with --no-prompt-cache)"

"""forge's data: every format mlx-lm users have, windows with their prompts, and one clear error per bad input."""

import json

import pytest
from conftest import TINY_CODE

from mlx_spec.forge import data


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_spec.checkpoint import read_config
    from mlx_spec.loading import load_tokenizer

    return load_tokenizer(TINY_CODE / "base", read_config(TINY_CODE / "base"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 4 for i in range(12)]


def test_text_jsonl_tokenizes_as_mlx_lm_does(tmp_path, tokenizer):
    ds = data.load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS]), tokenizer, 512, 16)
    assert ds.kind == "text" and len(ds.train) + len(ds.valid) == len(TEXTS)
    w = ds.train[0]
    assert w.tokens == tokenizer.encode(TEXTS[0]) + [tokenizer.eos_token_id], "mlx-lm's TextDataset: text + EOS"
    assert w.tokens[0] == tokenizer.bos_token_id and w.prompt_tokens == w.tokens[:16]


def test_messages_and_prompt_completion_use_the_chat_template(tmp_path, tokenizer):
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} " * 20}]}
             for i in range(6)]
    ds = data.load_dataset(write_jsonl(tmp_path / "c.jsonl", chats), tokenizer, 512, 16)
    w = ds.train[0]
    prompt = tokenizer.apply_chat_template(chats[0]["messages"][:1], add_generation_prompt=True)
    assert w.tokens == tokenizer.apply_chat_template(chats[0]["messages"])
    assert w.prompt_tokens == prompt, "the prompt is the conversation up to the model's turn"

    pcs = [{"prompt": f"q{i}", "completion": f"a{i} " * 20} for i in range(6)]
    ds = data.load_dataset(write_jsonl(tmp_path / "p.jsonl", pcs), tokenizer, 512, 16)
    assert ds.kind == "prompt/completion"
    assert ds.train[0].prompt_tokens == prompt


def test_text_files_directories_and_mlx_lm_layout(tmp_path, tokenizer):
    one = tmp_path / "notes.txt"
    one.write_text("".join(TEXTS))
    ds = data.load_dataset(one, tokenizer, 64, 16)
    assert len(ds.train) > 5 and all(len(w.tokens) <= 64 for w in ds.train + ds.valid)
    assert all(w.tokens[0] == tokenizer.bos_token_id for w in ds.train), "every window starts with BOS"

    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    for i, t in enumerate(TEXTS):
        (d / ("sub" if i % 2 else "") / f"{i:02d}.py").write_text(t)
    (d / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    (d / ".hidden").write_text("not data")
    ds = data.load_dataset(d, tokenizer, 512, 16)
    assert len(ds.train) + len(ds.valid) == len(TEXTS), "one document per text file; binaries, hidden skipped"

    layout = tmp_path / "layout"
    layout.mkdir()
    write_jsonl(layout / "train.jsonl", [{"text": t} for t in TEXTS[:8]])
    write_jsonl(layout / "valid.jsonl", [{"text": t} for t in TEXTS[8:]])
    ds = data.load_dataset(layout, tokenizer, 512, 16)
    assert (len(ds.train), len(ds.valid)) == (8, 4), "mlx-lm layout: valid.jsonl is the held-out part"


def test_long_documents_become_windows_that_restart_with_bos(tokenizer):
    tokens = list(range(10, 110))
    wins = data.windows([([2] + tokens, None)], 40, 2, 8)
    assert [len(w.tokens) for w in wins] == [40, 40, 23]
    assert [w.tokens[0] for w in wins] == [2, 2, 2]
    assert sum(len(w.tokens) - 1 for w in wins) == len(tokens), "no token lost or repeated"


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": \n', r"d\.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n[1, 2]\n', r"d\.jsonl:2: expected a JSON object"),
    ('{"text": "a"}\n\n{"txt": "b"}\n', r"d\.jsonl:3: no 'text', 'messages' or 'prompt'\+'completion' field"),
    ('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', r"d\.jsonl:2: a prompt/completion record in a file of text"),
    ('{"messages": "hi"}\n', r"d\.jsonl:1: 'messages' must be a non-empty list"),
    ('{"text": 3}\n', r"d\.jsonl:1: 'text' must be a string"),
    ("\n\n", r"d\.jsonl holds no examples"),
])
def test_malformed_jsonl_names_the_line(tmp_path, tokenizer, content, message):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_dataset(p, tokenizer, 64, 8)


def test_missing_empty_and_undecodable_data(tmp_path, tokenizer):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_dataset(tmp_path / "nope.jsonl", tokenizer, 64, 8)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(data.DataError, match="holds no text"):
        data.load_dataset(tmp_path / "empty.txt", tokenizer, 64, 8)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(data.DataError, match="not UTF-8"):
        data.load_dataset(tmp_path / "bin.txt", tokenizer, 64, 8)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(data.DataError, match="holds no files"):
        data.load_dataset(tmp_path / "emptydir", tokenizer, 64, 8)


def test_batches_resume_in_the_same_order():
    wins = [data.Window(list(range(2, 2 + n)), 1) for n in range(8, 40)]
    a = data.Batches(wins, 3, seed=5)
    seen = [next(a)[0].tolist() for _ in range(15)]  # past one epoch (11 batches)
    b = data.Batches(wins, 3, seed=5)
    for _ in range(6):
        next(b)
    c = data.Batches(wins, 3, seed=5)
    c.restore(b.state())
    assert [next(c)[0].tolist() for _ in range(9)] == seen[6:], "restore() continues the same order"
    tokens, mask = data.pad([[5, 6, 7], [8]])
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]


def test_self_generated_batches_generate_what_training_reaches_in_pools():
    calls = []

    def generate(wins):
        calls.append(len(wins))
        return [data.Window(w.prompt_tokens + [7] * 5, w.prompt_len, w.prompt_tokens, w.first) for w in wins]

    wins = [data.Window([2] + list(range(10, 10 + n)), 3) for n in range(8, 28)]
    b = data.SelfGeneratedBatches(wins, 2, seed=1, pad_id=0, generate=generate, pool=6)
    tokens, mask = next(b)
    assert calls == [6], "one batched generation for the next pool of windows"
    assert all(row[3:8] == [7] * 5 for row in tokens.tolist()), "prompt + the base's continuation"
    next(b), next(b)
    assert calls == [6], "the pool covered three batches"
    next(b)
    assert calls == [6, 6]
    plain = data.Batches(wins, 2, seed=1)
    assert [len(w) for w in (plain.next_rows(), plain.next_rows())] == [2, 2]

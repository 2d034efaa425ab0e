"""Saved sessions: a saved-then-loaded prompt cache continues exactly like an unbroken run (greedy, past the
sliding window, with and without kv_bits, speculative too); mlx-lm loads the files where its cache types
map; a file for another model or setting, and a damaged file, are refused with one clear line; the write
is atomic."""

import json
import struct

import mlx.core as mx
import pytest
from conftest import TINY_CODE
from tiny_models import WINDOW, _redraw, make_drafter, text_config

from mlx_spec.cache import KVQuant, make_rewindable
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.errors import MlxSpecError
from mlx_spec.models import gemma4_text
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.session_file import SessionFileError, _checksum, load_prompt_cache, save_prompt_cache, session_identity
from mlx_spec.request import Request

PREFIX = [2] + [(i * 37) % 250 + 3 for i in range(3 * WINDOW)]  # 49 tokens: three windows of 16
SUFFIX = [(i * 11) % 250 + 3 for i in range(7)]
CODE = "import os\nimport sys\n\n\ndef main(argv):\n"
_models = {}


def qbase(seed=0, window=WINDOW):
    key = (seed, window)
    if key not in _models:
        cfg = {**text_config("e2b", window), "head_dim": 32, "global_head_dim": 64}
        model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(cfg))
        _redraw(model, seed, std=0.08)
        _models[key] = model
    return _models[key]


def flags(bits, start=0):
    return dict(kv_bits=bits, kv_group_size=32, quantized_kv_start=start) if bits else {}


def prefill(model, tokens, cache, chunk=20):
    """What a cache_prompt command does: every token of the prompt through the model, in chunks."""
    toks = mx.array(tokens, mx.int32)[None]
    for s in range(0, len(tokens), chunk):
        model(toks[:, s : s + chunk], cache)
        mx.eval([c.state for c in cache])
    return cache


def saved(tmp_path, model, bits=None, start=0, tokens=PREFIX, name="session"):
    cache = prefill(model, tokens, model.make_cache(17, **flags(bits, start)))
    return save_prompt_cache(tmp_path / name, cache, tokens, {**session_identity(model), "model": "tiny-e2b"})


def generate(model, prompt, cache, proposer=None, k=3, max_tokens=40):
    eng = Engine(model, Request(prompt, max_tokens=max_tokens), proposer=proposer, policy=FixedK(k), cache=cache)
    return [e.token for e in eng.run()]


@pytest.mark.parametrize("bits, start", [(None, 0), (8, 0), (4, 0), (4, 30), (8, 60)])
def test_loaded_session_continues_like_an_unbroken_run(tmp_path, bits, start):
    """start=30: the file holds quantized K/V switched mid-prefill; start=60: full precision that switches
    after loading, as it would have without the file."""
    model = qbase()
    path = saved(tmp_path, model, bits, start)
    assert path.name == "session.safetensors"
    prompt = PREFIX + SUFFIX
    want = generate(model, prompt, model.make_cache(17, **flags(bits, start)))
    cache, tokens = load_prompt_cache(path, model)
    assert tokens == PREFIX and all(c.offset == len(PREFIX) for c in cache)
    assert generate(model, prompt, cache) == want, "plain decoding from the loaded cache == unbroken run"
    cache, _ = load_prompt_cache(path, model, kv=KVQuant(bits, 32, start) if bits else None)
    spec = generate(model, prompt, cache, MTPProposer(make_drafter(model), model), k=4)
    assert spec == want, "speculative decoding from the loaded cache == unbroken plain run"


def test_loaded_session_continues_the_same_prompt(tmp_path):
    """The prompt is exactly what the file holds: the engine rolls back one position to run the last token
    (the sliding layers keep enough for that) and continues as if never saved."""
    model = qbase()
    path = saved(tmp_path, model, 8)
    want = generate(model, PREFIX, model.make_cache(17, **flags(8)))
    cache, _ = load_prompt_cache(path, model)
    assert generate(model, PREFIX, cache) == want


def test_trained_pair_session_with_mtp(tmp_path, trained_pair):
    model, tokenizer, drafter = trained_pair
    system = tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(\n"
                              "        description='copy files', prog='cp')\n    parser.add_argument('src')\n" * 2)
    assert len(system) > 2 * model.args.sliding_window
    more = tokenizer.encode("    parser.add_argument('dst')\n", add_special_tokens=False)
    for bits in (None, 4):
        kw = dict(kv_bits=bits, kv_group_size=32) if bits else {}
        path = save_prompt_cache(tmp_path / f"s{bits}", prefill(model, system, model.make_cache(17, **kw)),
                                 system, session_identity(model))
        want = generate(model, system + more, model.make_cache(17, **kw), max_tokens=60)
        cache, _ = load_prompt_cache(path, model)
        got = generate(model, system + more, cache, MTPProposer(drafter, model), k=3, max_tokens=60)
        assert got == want, f"kv_bits={bits}: a loaded session must continue like an unbroken one"


def test_mlx_lm_loads_our_file_and_continues_the_same(tmp_path, trained_pair):
    """Unquantized Gemma 4: mlx-lm's load_prompt_cache reads the file (RotatingKVCache + KVCache) and its own
    Gemma 4 model continues with the same greedy tokens as ours."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache

    model, tokenizer, _ = trained_pair
    prompt = tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n" * 3)
    assert len(prompt) > model.args.sliding_window + 18
    path = save_prompt_cache(tmp_path / "s", prefill(model, prompt, model.make_cache(17)), prompt,
                             session_identity(model))
    theirs, meta = mlx_lm_load_prompt_cache(str(path), return_metadata=True)
    assert [type(c).__name__ for c in theirs] == ["RotatingKVCache"] * 3 + ["KVCache"]
    assert "mlx_spec" in meta and "model" in meta
    more = tokenizer.encode("\n\ndef", add_special_tokens=False)
    want = generate(model, prompt + more, model.make_cache(17), max_tokens=24)
    mlx_lm_model, _ = mlx_lm_load(str(TINY_CODE / "base"))
    got = [int(t) for t, _ in zip((y for y, _ in generate_step(mx.array(more), mlx_lm_model, max_tokens=24,
                                                                  prompt_cache=theirs)), range(24))]
    assert got == want, "mlx-lm continuing from our file must give our tokens"


def test_mlx_lm_loads_quantized_full_attention_caches(tmp_path):
    """An mlx-lm model with full attention only: our quantized caches load as mlx-lm's QuantizedKVCache."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama
    from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache
    from mlx_lm.models.cache import make_prompt_cache

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96, tie_word_embeddings=False))
    mx.eval(model.parameters())
    prompt = [3, 17, 42, 5, 88, 9, 61, 23, 7, 50, 11, 74]
    cache = prefill(model, prompt, make_rewindable(make_prompt_cache(model), 17, kv_bits=8, kv_group_size=32))
    path = save_prompt_cache(tmp_path / "llama", cache, prompt, session_identity(model))
    ours, tokens = load_prompt_cache(path, model)
    theirs = mlx_lm_load_prompt_cache(str(path))
    assert tokens == prompt and [type(c).__name__ for c in theirs] == ["QuantizedKVCache"] * 2
    want = generate(model, prompt + [5, 6], ours, max_tokens=12)
    got = [int(y) for (y, _), _ in zip(generate_step(mx.array([5, 6]), model, max_tokens=12, prompt_cache=theirs,
                                                       kv_bits=8, kv_group_size=32, quantized_kv_start=0),
                                         range(12))]
    assert got == want


def test_quantized_sliding_layers_do_not_load_in_mlx_lm(tmp_path):
    """mlx-lm has no quantized sliding-window cache: such a file is ours only (documented)."""
    from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache

    path = saved(tmp_path, qbase(), 4)
    with pytest.raises(KeyError, match="mlx_spec.SlidingKVCache"):
        mlx_lm_load_prompt_cache(str(path))


def _error(path, model, **kw) -> str:
    with pytest.raises(SessionFileError) as e:
        load_prompt_cache(path, model, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and isinstance(e.value, MlxSpecError)
    return msg


def test_refuses_another_model_or_setting(tmp_path):
    model = qbase()
    path = saved(tmp_path, model, 8)
    assert "saved for another model (saved for tiny-e2b): its weights differ" in _error(path, qbase(seed=3))
    assert "config" in _error(path, qbase(window=8))
    half = qbase()
    half = gemma4_text.Model(half.args)
    half.update(qbase().parameters())
    half.set_dtype(mx.float16)
    assert "K/V dtype" in _error(path, half)
    msg = _error(path, model, kv=KVQuant(4, 32))
    assert "saved with --kv-bits 8 --kv-group-size 32 --quantized-kv-start 0, this run uses --kv-bits 4" in msg
    assert "this run uses no --kv-bits" in _error(path, model, kv=None)
    load_prompt_cache(path, model, kv=KVQuant(8, 32))  # the same setting loads


def test_refuses_a_file_mlx_spec_did_not_write(tmp_path):
    from mlx_lm.models.cache import KVCache
    from mlx_lm.models.cache import save_prompt_cache as mlx_lm_save

    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 1, 2, 32)), mx.zeros((1, 1, 2, 32)))
    mlx_lm_save(str(tmp_path / "theirs.safetensors"), [c], {"model": "x"})
    assert "was not written by mlx_spec" in _error(tmp_path / "theirs.safetensors", qbase())


def _rewrite(path, edit):
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expect", [
    (lambda d: d.__delitem__(slice(len(d) - 100, None)), "corrupted or truncated"),
    (lambda d: d.__setitem__(len(d) - 50, d[len(d) - 50] ^ 0x40), "checksum"),
    (lambda d: d.__setitem__(slice(8, 12), b"\xff\xfe\x00\x01"), "unreadable header"),
    (lambda d: d.__setitem__(slice(0, 8), struct.pack("<Q", 2**40)), "header of"),
    (lambda d: d.__delitem__(slice(4, None)), "shorter than a safetensors header"),
    (lambda d: d.extend(b"\0" * 16), "bytes past the last tensor"),
])
def test_refuses_a_damaged_file(tmp_path, damage, expect):
    model = qbase()
    path = saved(tmp_path, model, 4)
    _rewrite(path, damage)
    assert expect in _error(path, model)


def _edit_header(path, old, new):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + n].decode()
    assert old in header
    header = header.replace(old, new, 1).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])


@pytest.mark.parametrize("old, new, expect", [
    (r'\"tokens\": [2, ', r'\"tokens\": [2000000, ', "token ids or layer records out of range"),
    ('"1.0":"RotatingKVCache"', '"1.0":"KVCache"', "layer 0 is a 'KVCache', expected 'RotatingKVCache'"),
    ('"shape":[1,1,34,32]', '"shape":[1,1,17,64]', "tensor 0.0 is F32 [1, 1, 17, 64], expected F32 [1, 1, 17, 32]"),
    (r'\"offset\": 49', r'\"offset\": 48', "does not match this model's layer 0"),
])
def test_refuses_a_well_formed_file_that_does_not_fit(tmp_path, old, new, expect):
    """Headers edited so the file stays well-formed safetensors but no longer fits the model."""
    model = qbase()
    path = saved(tmp_path, model, None)
    _edit_header(path, old, new)
    assert expect in _error(path, model)


def test_refuses_a_missing_file(tmp_path):
    assert "cannot be read" in _error(tmp_path / "missing.safetensors", qbase())


def test_write_is_atomic(tmp_path, monkeypatch):
    model = qbase()
    path = saved(tmp_path, model, None)
    before = path.read_bytes()
    real = mx.save_safetensors

    def half_written(file, arrays, metadata):
        real(file, arrays, metadata)
        with open(file, "r+b") as f:
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", half_written)
    with pytest.raises(SessionFileError, match="cannot be written .disk full.; nothing was saved"):
        saved(tmp_path, model, 8)
    assert path.read_bytes() == before, "a failed save leaves the previous file as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.safetensors"], "and no temporary file"
    monkeypatch.setattr(mx, "save_safetensors", real)
    saved(tmp_path, model, 8)
    assert load_prompt_cache(path, model)[0][0].quantized, "a successful save replaces it"


@pytest.mark.parametrize("bits", [None, 4])
def test_bfloat16_caches_round_trip_byte_for_byte(tmp_path, bits):
    """bf16 (as on a Mac): the file holds the cache's exact bytes, and loading gives them back."""
    model = gemma4_text.Model(qbase().args)
    model.update(qbase().parameters())
    model.set_dtype(mx.bfloat16)
    cache = prefill(model, PREFIX, model.make_cache(17, **flags(bits)))
    path = save_prompt_cache(tmp_path / "bf16", cache, PREFIX, session_identity(model))
    loaded, _ = load_prompt_cache(path, model)
    flat = lambda c: [x for b in c.state for x in (b if isinstance(b, tuple) else (b,))]
    for a, b in zip(cache, loaded):
        n = min(a.size(), a.keep) if hasattr(a, "keep") else a.offset  # what a sliding layer keeps
        for x, y in zip(flat(a), flat(b)):
            assert y.dtype == x.dtype and mx.array_equal(x[..., x.shape[2] - n :, :], y).item()


# -- mlx_spec.cache_prompt: what it refuses before the prefill, and a save that fails

def cache_prompt_cli(capsys, *argv):
    """(exit code, stderr's error lines, its last line) of mlx_spec.cache_prompt on the tiny base."""
    from mlx_spec import cache_prompt

    rc = cache_prompt.main(["--model", str(TINY_CODE / "base"), "--ignore-chat-template", *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in lines if line.startswith("error:")], lines[-1] if lines else ""


def no_prefill(monkeypatch):
    from mlx_spec import cache_prompt

    monkeypatch.setattr(cache_prompt, "prefill", lambda *a, **k: pytest.fail("prefilled before refusing"))


def test_cache_prompt_refuses_a_prompt_that_fills_the_context_before_the_prefill(tmp_path, monkeypatch, capsys):
    no_prefill(monkeypatch)
    rc, errors, last = cache_prompt_cli(capsys, "--prompt", "x = 1" * 1000, "--prompt-cache-file",
                                        str(tmp_path / "long"))
    assert rc == 2 and errors == [last] and "3001 tokens" in last and "context holds 2048" in last, \
        "a saved prompt must leave room to generate, as generate requires: one line"
    assert list(tmp_path.iterdir()) == [], "nothing saved"


@pytest.mark.parametrize("where, expect", [("nodir/s", "directory"), ("adir.safetensors", "is a directory"),
                                           ("readonly/s", "Read-only file system")])
def test_cache_prompt_checks_where_it_writes_before_loading_the_model(tmp_path, monkeypatch, capsys, where, expect):
    import errno
    import tempfile

    from mlx_spec import cache_prompt

    (tmp_path / "adir.safetensors").mkdir()
    (tmp_path / "readonly").mkdir()
    real = tempfile.TemporaryFile

    def read_only(*a, dir=None, **k):  # root writes anywhere: a read-only filesystem is how it fails then
        if dir is not None and str(dir).endswith("readonly"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(cache_prompt, "load", lambda *a, **k: pytest.fail("loaded the model before the check"))
    rc, errors, last = cache_prompt_cli(capsys, "--prompt", "x", "--prompt-cache-file", str(tmp_path / where))
    assert rc == 2 and errors == [last] and "--prompt-cache-file" in last and expect in last, last


@pytest.mark.parametrize("failure, expect", [
    (OSError(28, "No space left on device"), "the disk is full: No space left on device"),
    (RuntimeError("[save_safetensors] Failed to open file"), "Failed to open file"),
])
def test_cache_prompt_save_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, failure, expect):
    from mlx_spec import session_file

    def fail(*a, **k):
        raise failure

    monkeypatch.setattr(session_file.mx, "save_safetensors", fail)
    rc, errors, last = cache_prompt_cli(capsys, "--prompt", CODE, "--prompt-cache-file", str(tmp_path / "s"))
    assert rc == 2 and errors == [last] and "--prompt-cache-file" in last and expect in last, last
    assert list(tmp_path.iterdir()) == [], "no temporary file left behind"


# -- a session file is untrusted input: crafted files are one line naming the file, never a traceback

def craft(src, dst, kind):
    """A copy of session file `src` at `dst`, edited as a hostile user would (the audit's craft script):
    `identity` not an object, a metadata field of another type, deep JSON nesting in the safetensors header
    or in mlx_spec's metadata, a NaN or an infinity in the K/V with the checksum recomputed to match."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8 : 8 + n]), bytearray(raw[8 + n :])
    ours = json.loads(header["__metadata__"]["0.mlx_spec"])
    hb = None
    if kind == "identity":
        ours["identity"] = []
    elif kind == "identity-string":
        ours["identity"] = "x"
    elif kind == "layer-record":
        ours["layers"][0] = [1, 2]
    elif kind == "offset-infinity":
        ours["layers"][0]["offset"] = float("inf")
    elif kind == "deep-header":
        hb = b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    elif kind == "deep-metadata":
        header["__metadata__"]["0.mlx_spec"] = '{"format": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif kind in ("nan", "inf"):
        a, _ = header["0.0"]["data_offsets"]
        value = float(kind)
        data[a : a + 4] = {"F32": struct.pack("<f", value), "F16": struct.pack("<e", value) * 2,
                           "BF16": struct.pack("<f", value)[2:] * 2}[header["0.0"]["dtype"]]
        tensors = {k: bytes(data[slice(*v["data_offsets"])]) for k, v in header.items() if k != "__metadata__"}
        ours["sha256"] = _checksum(tensors)
    if kind != "deep-metadata":
        header["__metadata__"]["0.mlx_spec"] = json.dumps(ours)
    hb = hb or json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(hb)) + hb + bytes(data))
    return dst


CRAFTED = {"identity": "mlx_spec metadata is unreadable", "identity-string": "mlx_spec metadata is unreadable",
           "layer-record": "mlx_spec metadata is unreadable", "offset-infinity": "layer 0's record",
           "deep-header": "header nested too deeply", "deep-metadata": "metadata is nested too deeply",
           "nan": "non-finite K/V", "inf": "non-finite K/V"}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_refuses_a_crafted_file(tmp_path, kind):
    model = qbase()
    path = craft(saved(tmp_path, model, None), tmp_path / f"{kind}.safetensors", kind)
    assert CRAFTED[kind] in _error(path, model), "one line that names the file and what is wrong"


@pytest.mark.parametrize("command", ["generate", "chat", "server"])
@pytest.mark.parametrize("kind", ["identity", "deep-header", "nan"])
def test_crafted_files_are_one_line_in_every_command(tmp_path, capsys, monkeypatch, command, kind):
    import importlib
    import io

    from mlx_spec.server import command as server_command

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # chat: a file that loads meets end of input at once
    monkeypatch.setattr(server_command, "Server", lambda *a, **k: pytest.fail("served with a crafted session"))
    rc, errors, _ = cache_prompt_cli(capsys, "--prompt", CODE, "--prompt-cache-file", str(tmp_path / "s"))
    assert rc == 0 and not errors, errors
    path = craft(tmp_path / "s.safetensors", tmp_path / f"{kind}.safetensors", kind)
    argv = ["--model", str(TINY_CODE / "base"), "--prompt-cache-file", str(path)]
    argv += {"generate": ["--prompt", "x", "--max-tokens", "4", "--ignore-chat-template"], "chat": [],
             "server": ["--quiet", "--port", "0"]}[command]
    rc = importlib.import_module(f"mlx_spec.{command}").main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == 2 and [l for l in lines if l.startswith("error:")] == lines[-1:] and str(path) in lines[-1], \
        f"{command}: one error line naming the file, no traceback: {lines}"
    assert CRAFTED[kind] in lines[-1] and out.out.strip() == "", "and nothing generated"

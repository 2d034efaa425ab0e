"""Quantized K/V caches (mlx-lm's --kv-bits / --kv-group-size / --quantized-kv-start).

Invariants: rollback of a quantized cache == never having seen the rejected tokens, byte for byte;
speculative greedy == plain greedy with the same kv_bits, past the sliding window, for every proposer; the
switch at quantized_kv_start depends on positions only (a verify pass that straddles it, or a rollback
back below it, changes nothing); mlx-lm's own QuantizedKVCache gives the same logits.

The tiny models here have head_dim 32 / global 64 (mx.quantize needs groups of >= 32) and weights drawn
with std 0.08, which gives varied greedy text (std 0.15 repeats one token after a few steps).
"""

import mlx.core as mx
import pytest
from tiny_models import WINDOW, _redraw, make_base, make_drafter, text_config

from mlx_spec.cache import (FullKVCache, KVQuant, SlidingKVCache, dequantize,
                            make_rewindable, quantize, rollback_all)
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.errors import CacheRollbackError, MlxSpecError
from mlx_spec.models import gemma4_text
from mlx_spec.proposers.base import Draft
from mlx_spec.proposers.draft_model import DraftModelProposer
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.proposers.ngram import NgramProposer
from mlx_spec.request import Request

GROUP = 32
PROMPT = [2] + [(i * 37) % 250 + 3 for i in range(3 * WINDOW)]  # 49 tokens: past the window of 16
MAX_TOKENS = 3 * WINDOW
_models = {}


def qbase(variant: str, seed: int = 0) -> gemma4_text.Model:
    key = (variant, seed)
    if key not in _models:
        cfg = {**text_config(variant), "head_dim": 32, "global_head_dim": 64}
        model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(cfg))
        _redraw(model, seed, std=0.08)
        _models[key] = model
    return _models[key]


def qdrafter(variant: str):
    key = (variant, "drafter")
    if key not in _models:
        _models[key] = make_drafter(qbase(variant), "dense" if variant == "dense_keqv" else "centroid")
    return _models[key]


def run(model, proposer=None, k=3, bits=8, start=0, prompt=PROMPT, max_tokens=MAX_TOKENS):
    cache = model.make_cache(17, kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=start)
    eng = Engine(model, Request(prompt, max_tokens=max_tokens), proposer=proposer, policy=FixedK(k), cache=cache)
    return [ev.token for ev in eng.run()], eng


class ScriptedProposer:
    """Drafts the plain continuation with draft `wrong_at` corrupted: every round rolls back k - wrong_at."""

    name = "scripted"

    def __init__(self, reference, wrong_at, prompt=PROMPT, vocab=256):
        self.full, self.wrong_at, self.vocab = list(prompt) + list(reference), wrong_at, vocab

    def start(self, prompt):
        pass

    def propose(self, ctx, k):
        nxt = self.full[len(ctx.history) : len(ctx.history) + k]
        return Draft(mx.array([(t + 1) % self.vocab if i == self.wrong_at else t for i, t in enumerate(nxt)],
                              mx.int32))

    def observe(self, result):
        pass


def _same_bytes(a, b) -> bool:
    """Two cache states (K, V), each an array or a quantized triple, hold the same bytes."""
    flat = lambda s: [x for buf in s for x in (buf if isinstance(buf, tuple) else (buf,))]
    return all(x.dtype == y.dtype and mx.array_equal(x, y).item() for x, y in zip(flat(a), flat(b)))


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [1, 5])
def test_rollback_equals_never_seen_bytes(variant, bits, k):
    """At every offset across the window edge: append k junk positions, roll back, continue; the cache's
    bytes and the logits equal a cache that never saw the junk."""
    model = qbase(variant)
    toks = mx.array(PROMPT[: WINDOW + k + 8], mx.int32)
    junk = mx.array([(7 * i + 11) % 250 for i in range(k)], mx.int32)
    clean = model.make_cache(17, kv_bits=bits, kv_group_size=GROUP)
    dirty = model.make_cache(17, kv_bits=bits, kv_group_size=GROUP)
    model(toks[None, :1], clean)
    model(toks[None, :1], dirty)
    for i in range(1, toks.shape[0]):
        model(junk[None], dirty)
        rollback_all(dirty, k)
        a = model(toks[None, i : i + 1], clean)
        b = model(toks[None, i : i + 1], dirty)
        assert mx.array_equal(a, b).item(), f"rollback at offset {i}: logits must not see the rejected tokens"
        for c, d in zip(clean, dirty):
            assert c.quantized and d.quantized and c.offset == d.offset
            assert _same_bytes(c.state, d.state), f"rollback at offset {i}: cache bytes must equal never-seen"


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
@pytest.mark.parametrize("bits", [4, 8])
def test_speculative_equals_plain_every_proposer(variant, bits):
    model, drafter = qbase(variant), qdrafter(variant)
    plain, eng = run(model, bits=bits)
    assert all(c.quantized for c in eng.cache)
    assert len(set(plain)) > 10, "the reference text should vary, or equality says little"
    cases = [("mtp", MTPProposer(drafter, model), 3), ("ngram", NgramProposer(2), 3)]
    cases += [(f"scripted wrong_at={w}", ScriptedProposer(plain, w), k) for k, w in ((4, 2), (8, 1))]
    for name, proposer, k in cases:
        spec, eng = run(model, proposer, k=k, bits=bits)
        assert spec == plain, f"{name} k={k} kv_bits={bits}: speculative greedy must equal plain greedy"
        assert eng.stats.rounds > 0


def test_draft_model_equals_plain():
    """The base's cache quantized, the draft model's own cache not (each model has its own cache)."""
    model = qbase("e2b")
    plain, _ = run(model, bits=4)
    spec, _ = run(model, DraftModelProposer(qbase("e2b", seed=7), model), k=3, bits=4)
    assert spec == plain, "draft model kv_bits=4: speculative greedy must equal plain greedy"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["e2b", "moe", "dense_keqv", "e4b"])
@pytest.mark.parametrize("bits", [4, 8])
def test_speculative_equals_plain_every_k(variant, bits):
    model, drafter = qbase(variant), qdrafter(variant)
    plain, _ = run(model, bits=bits, max_tokens=4 * WINDOW)
    for k in range(1, 9):
        for name, proposer in (("mtp", MTPProposer(drafter, model)), ("ngram", NgramProposer(2)),
                               ("scripted", ScriptedProposer(plain, k // 2)),
                               ("draft model", DraftModelProposer(qbase(variant, seed=7), model))):
            spec, _ = run(model, proposer, k=k, bits=bits, max_tokens=4 * WINDOW)
            assert spec == plain, f"{variant} {name} k={k} kv_bits={bits}: speculative must equal plain"


@pytest.mark.parametrize("variant", ["moe", "e4b"])
def test_speculative_equals_plain_other_variants(variant):
    model, drafter = qbase(variant), qdrafter(variant)
    plain, _ = run(model, bits=4)
    spec, _ = run(model, MTPProposer(drafter, model), k=3, bits=4)
    assert spec == plain, f"{variant} mtp kv_bits=4: speculative greedy must equal plain greedy"
    spec, _ = run(model, ScriptedProposer(plain, 2), k=4, bits=4)
    assert spec == plain, f"{variant} scripted kv_bits=4: speculative greedy must equal plain greedy"


@pytest.mark.parametrize("offset", [1, 5])
def test_switch_at_quantized_kv_start_depends_on_positions_only(offset, ks=(2, 5)):
    """With the switch a few positions past the prompt, verify passes straddle it and rollbacks return
    below it (scripted drafts reject from the middle on); speculative must still equal plain."""
    model = qbase("e2b")
    start = len(PROMPT) + offset
    plain, eng = run(model, bits=4, start=start)
    assert all(c.quantized for c in eng.cache)
    unquantized, _ = run(model, bits=None)
    assert plain[:offset] == unquantized[:offset], "before the switch the cache is full precision"
    assert plain != unquantized, "after the switch the cache is quantized (4 bits changes this text)"
    for k in ks:
        spec, _ = run(model, ScriptedProposer(plain, k // 2), k=k, bits=4, start=start)
        assert spec == plain, f"start={start} scripted k={k}: speculative greedy must equal plain greedy"
        spec, _ = run(model, MTPProposer(qdrafter("e2b"), model), k=k, bits=4, start=start)
        assert spec == plain, f"start={start} mtp k={k}: speculative greedy must equal plain greedy"


@pytest.mark.slow
@pytest.mark.parametrize("offset", [2, 3, 4, 7, 20])
def test_switch_at_quantized_kv_start_every_k(offset):
    test_switch_at_quantized_kv_start_depends_on_positions_only(offset, ks=range(1, 9))


@pytest.mark.parametrize("make", [lambda kv: FullKVCache(kv), lambda kv: SlidingKVCache(4, 3, kv)])
def test_rollback_below_start_restores_full_precision_then_raises_once_gone(make):
    kv = KVQuant(8, 32, start=6)
    x = mx.random.normal((1, 1, 12, 32), key=mx.random.key(0))
    ref, c = make(None), make(kv)
    ref.update_and_fetch(x[:, :, :6], x[:, :, :6])
    c.update_and_fetch(x[:, :, :6], x[:, :, :6])
    assert not c.quantized and not hasattr(c, "bits"), "below start: full precision, mlx-lm's plain attention"
    c.update_and_fetch(x[:, :, 6:9], x[:, :, 6:9])  # switches at its start (offset 6 >= 6)
    assert c.quantized and c.bits == 8 and c.group_size == 32
    c.rollback(4)  # back to 5 < start: the full-precision K/V come back
    assert not c.quantized and c.offset == 5
    ref.rollback(1)
    assert _same_bytes(c.state, ref.state), "restored state must equal a cache that never switched"
    c.update_and_fetch(x[:, :, 5:7], x[:, :, 5:7])  # offset 5 < 6: still full precision in this pass
    c.update_and_fetch(x[:, :, 7:8], x[:, :, 7:8])  # switches
    c.update_and_fetch(x[:, :, 8:9], x[:, :, 8:9])  # a pass past the switch: the full-precision copy goes
    assert c.quantized and c._fallback is None
    c.rollback(2)  # to 7: still >= start, fine
    with pytest.raises(CacheRollbackError, match="quantized-kv-start"):
        c.rollback(2)


def _llama():
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96, tie_word_embeddings=False))
    mx.eval(model.parameters())
    return model


def test_mlx_lm_model_speculative_equals_plain_across_the_switch():
    from mlx_lm.models.cache import make_prompt_cache

    model = _llama()  # the engine's adapter (models/base.py) splits a pass at the switch, as gemma4_text does
    prompt = [3, 17, 42, 5, 88, 9, 61, 23, 7, 50, 11, 74]

    def go(proposer=None, k=3):
        cache = make_rewindable(make_prompt_cache(model), 17, kv_bits=4, kv_group_size=32,
                                quantized_kv_start=len(prompt) + 2)
        eng = Engine(model, Request(prompt, max_tokens=30), proposer=proposer, policy=FixedK(k), cache=cache)
        return [e.token for e in eng.run()], eng

    plain, eng = go()
    assert all(c.quantized for c in eng.cache)
    for k in (2, 4, 7):
        spec, _ = go(ScriptedProposer(plain, k // 2, prompt, vocab=96), k)
        assert spec == plain, f"mlx-lm model, scripted k={k}: speculative greedy must equal plain across the switch"


def test_matches_mlx_lm_quantized_kv_cache():
    """An mlx-lm model: make_rewindable(kv_bits=8) gives the same logits, bit for bit, as mlx-lm's own
    KVCache -> QuantizedKVCache switch (maybe_quantize_kv_cache after every step) in one-token decoding."""
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    model = _llama()
    prompt, start = mx.array([[3, 17, 42, 5, 88, 9]]), 9
    theirs = make_prompt_cache(model)
    ours = make_rewindable(make_prompt_cache(model), 4, kv_bits=8, kv_group_size=32, quantized_kv_start=start)
    a, b = model(prompt, cache=theirs), model(prompt, cache=ours)
    for step in range(10):
        assert mx.array_equal(a, b).item(), f"step {step}: logits must equal mlx-lm's quantized cache"
        maybe_quantize_kv_cache(theirs, start, 32, 8)
        tok = mx.argmax(a[:, -1:], axis=-1)
        a, b = model(tok, cache=theirs), model(tok, cache=ours)
    assert type(theirs[0]).__name__ == "QuantizedKVCache" and ours[0].quantized


class _FakeQuantized:
    """Stores dequantize(quantize(K/V)) in full precision: what quantized attention should compute."""

    def update_and_fetch(self, keys, values):
        fake = lambda x: dequantize(quantize(x, self.fake), self.fake)
        return super().update_and_fetch(fake(keys), fake(values))


class _FakeFull(_FakeQuantized, FullKVCache):
    pass


class _FakeSliding(_FakeQuantized, SlidingKVCache):
    pass


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_attention_equals_attention_on_dequantized_kv(variant, bits):
    """Every layer, KV-shared ones included, attends the quantized K/V: the logits equal a full-precision
    model whose cache holds dequantize(quantize(K/V)), up to float rounding, in prefill and in decode."""
    model = qbase(variant)
    q = KVQuant(bits, GROUP)
    fake = [_FakeFull() if isinstance(c, FullKVCache) else _FakeSliding(WINDOW, 17) for c in model.make_cache()]
    for c in fake:
        c.fake = q
    real = model.make_cache(17, kv_bits=bits, kv_group_size=GROUP)
    toks = mx.array(PROMPT, mx.int32)[None]
    for s, e in ((0, 40), (40, 41), (41, 45), (45, 46), (46, 49)):
        want, got = model(toks[:, s:e], fake), model(toks[:, s:e], real)
        unquantized = model(toks[:, :e])[:, s:e]
        err, effect = mx.abs(got - want).max().item(), mx.abs(unquantized - want).max().item()
        assert err < 1e-4 and err < 0.01 * effect, f"positions {s}..{e}: quantized attention differs by {err}"


def test_group_size_and_bits_are_checked_with_the_flag_named():
    with pytest.raises(MlxSpecError, match="--kv-group-size 32 does not divide the model's head_dim 16"):
        make_base("e2b").make_cache(kv_bits=8, kv_group_size=32)
    with pytest.raises(MlxSpecError, match="use --kv-group-size 32"):
        qbase("e2b").make_cache(kv_bits=8, kv_group_size=64)
    with pytest.raises(MlxSpecError, match="--kv-bits must be one of 4, 8"):
        qbase("e2b").make_cache(kv_bits=3, kv_group_size=32)


def test_trained_pair_quantized_speculative_equals_plain(trained_pair):
    model, tokenizer, drafter = trained_pair
    prompt = tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(\n"
                              "        description='copy files', prog='cp')\n    parser.add_argument('src')\n")
    W = model.args.sliding_window
    assert len(prompt) + 96 > 3 * W
    for bits in (8, 4):
        kw = dict(kv_bits=bits, kv_group_size=32)
        plain = [e.token for e in Engine(model, Request(prompt, max_tokens=96), cache=model.make_cache(17, **kw)).run()]
        eng = Engine(model, Request(prompt, max_tokens=96), proposer=MTPProposer(drafter, model), policy=FixedK(3),
                     cache=model.make_cache(17, **kw))
        assert [e.token for e in eng.run()] == plain, f"trained pair kv_bits={bits}: spec must equal plain"
        assert eng.stats.acceptance_by_position[0] > 0.5, "the drafter reads the quantized K/V correctly"


def test_copy_is_independent():
    """`copy()` (for a prompt cache shared by two conversations) gives new handles on quantized triples."""
    kv = KVQuant(4, 32)
    x = mx.random.normal((1, 1, 5, 32), key=mx.random.key(1))
    for c in (FullKVCache(kv), SlidingKVCache(4, 3, kv)):
        c.update_and_fetch(x[:, :, :3], x[:, :, :3])
        before = [mx.array(a) for a in c.state[0]]
        d = c.copy()
        d.rollback(1)
        d.update_and_fetch(x[:, :, 3:5] * 9, x[:, :, 3:5] * 9)
        assert c.offset == 3 and all(mx.array_equal(a, b).item() for a, b in zip(before, c.state[0]))


@pytest.mark.parametrize("L, mask", [(1, None), (5, "causal"), (5, "window"), (5, "additive")])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_attention_equals_mlx_lm_bit_for_bit(L, mask, bits):
    """Our quantized attention (no per-head broadcast of K/V) computes exactly what mlx-lm's does."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from mlx_spec.models.gemma4_text import quantized_attention

    key = mx.random.key(3)
    T = 40
    q = mx.random.normal((1, 8, L, 64), key=key)
    k, v = (quantize(mx.random.normal((1, 2, T, 64), key=mx.random.key(s)), KVQuant(bits, 32)) for s in (4, 5))
    if mask == "window":
        q_pos, k_pos = mx.arange(T - L, T)[:, None], mx.arange(T)[None]
        mask = (k_pos <= q_pos) & (q_pos - k_pos < 16)
    elif mask == "additive":
        mask = mx.random.normal((L, T), key=mx.random.key(6))
    ours = quantized_attention(q, k, v, 1.0, mask, 32, bits)
    theirs = quantized_scaled_dot_product_attention(q, k, v, 1.0, mask, 32, bits)
    assert mx.array_equal(ours, theirs).item()

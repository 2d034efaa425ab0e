"""Rewindable caches: cached == uncached, and rollback == never having seen the rolled-back tokens."""

import mlx.core as mx
import pytest
from tiny_models import WINDOW, make_base

from mlx_spec.cache import FullKVCache, SlidingKVCache, rollback_all
from mlx_spec.errors import CacheRollbackError

VARIANTS = ["e2b", "moe", "dense_keqv", "e4b"]


def _tokens(n, seed=0):
    return mx.random.randint(3, 256, (n,), key=mx.random.key(seed)).astype(mx.int32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_equals_uncached_forward(variant):
    model = make_base(variant)
    toks = _tokens(3 * WINDOW + 5)
    ref = model(toks[None])[0]  # one pass, no cache, window applied by mask
    cache = model.make_cache()
    prefill = WINDOW - 3
    got = [model(toks[None, :prefill], cache)[0]]
    for i in range(prefill, toks.shape[0]):
        got.append(model(toks[None, i : i + 1], cache)[0])
    got = mx.concatenate(got)
    err = mx.abs(got - ref).max().item()
    assert err < 1e-4, f"cached decoding must equal the uncached forward pass past the window (max err {err})"


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_rollback_equals_never_seen(variant, k):
    """At every offset around the window edge: append k junk tokens, roll back, continue == clean run."""
    model = make_base(variant)
    toks = _tokens(WINDOW + k + 8, seed=1)
    junk = _tokens(k, seed=2)
    clean = model.make_cache()
    dirty = model.make_cache()
    model(toks[None, :1], clean)
    model(toks[None, :1], dirty)
    for i in range(1, toks.shape[0]):
        model(junk[None], dirty)  # k rejected drafts in one verify-like pass
        rollback_all(dirty, k)
        a = model(toks[None, i : i + 1], clean)
        b = model(toks[None, i : i + 1], dirty)
        assert mx.array_equal(a, b).item(), f"rollback at offset {i} must leave no trace of the rejected tokens"
        assert clean[0].offset == dirty[0].offset


def test_sliding_rollback_beyond_slack_raises():
    c = SlidingKVCache(window=4, max_rollback=2)
    kv = mx.zeros((1, 1, 1, 8))
    for _ in range(20):
        c.update_and_fetch(kv, kv)
    c.rollback(2)
    c.update_and_fetch(kv, kv)
    with pytest.raises(CacheRollbackError):
        c.rollback(c.length - 2)  # would leave fewer than window + 1 positions at offset > window


def test_full_rollback_more_than_held_raises():
    c = FullKVCache()
    kv = mx.zeros((1, 1, 3, 8))
    c.update_and_fetch(kv, kv)
    assert c.rollback(2) == 2 and c.offset == 1
    with pytest.raises(CacheRollbackError):
        c.rollback(2)


def test_sliding_drafter_view_is_last_window_plus_one_in_order():
    c = SlidingKVCache(window=4, max_rollback=3)
    for pos in range(12):
        v = mx.full((1, 1, 1, 2), float(pos))
        c.update_and_fetch(v, v)
    c.update_and_fetch(*(mx.full((1, 1, 3, 2), 99.0),) * 2)  # three drafts
    c.rollback(3)
    k, _ = c.drafter_view()
    assert k[0, 0, :, 0].tolist() == [7.0, 8.0, 9.0, 10.0, 11.0], "drafter sees the last W+1 positions, in order"

"""The compiled draft stepper computes what mlx-lm's Gemma 4 blocks compute for the drafter.

`DraftStepper` re-wires the drafter's mlx-lm blocks (compiled segments, RoPE as a per-round matrix,
attention written for one query). Reference here: the blocks' own `__call__` on the same inputs, on every
base variant (GQA ratios 2..4, k_eq_v, partial-rotary full layers) and both heads, with the drafter
reading a base cache past the sliding window, several chained steps, and a later query position.
"""

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import VARIANTS, make_base, make_drafter


def reference_step(drafter, embedded, hidden, shared_kv, position):
    """The drafter step through mlx-lm's DecoderLayer.__call__ (the pre-stepper implementation)."""
    h = drafter.pre_projection(mx.concatenate([embedded, hidden], axis=-1))
    for layer in drafter.model.layers:
        h, _, _ = layer(h, None, None, shared_kv=shared_kv[layer.layer_type], offset=position)
    h = drafter.model.norm(h)
    return h, drafter.post_projection(h)


def filled_cache(base, n_tokens: int, seed: int = 0):
    cache = base.make_cache()
    ids = mx.random.randint(0, base.args.vocab_size, (1, n_tokens), key=mx.random.key(seed))
    _, hidden = base.forward(ids, cache)
    mx.eval(hidden)
    return cache, hidden[:, -1:], ids[0, -1].item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("head", ["centroid", "dense"])
def test_stepper_matches_mlx_lm_blocks(variant, head):
    base = make_base(variant)
    drafter = make_drafter(base, head)
    cache, hidden, token = filled_cache(base, 3 * base.args.sliding_window + 5)  # past the window
    shared = {t: cache[i].drafter_view() for t, i in base.producer_layers.items()}
    position = cache[0].offset
    stepper = drafter.stepper()
    state = stepper.begin_round(shared, position)
    ref_hidden, our_hidden = hidden, hidden
    tok = mx.array([token], mx.int32)
    for step in range(4):  # chained: each step feeds its h_next and drafted token to the next
        embedded = base.embed_scaled(tok)
        ref_h, ref_hidden = reference_step(drafter, embedded[None], ref_hidden, shared, position)
        h, our_hidden = stepper.step(state, embedded, our_hidden)
        np.testing.assert_allclose(np.array(h), np.array(ref_h[0]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(our_hidden), np.array(ref_hidden[0]), rtol=1e-4, atol=1e-4)
        ref_logits = np.array(drafter.full_logits(ref_h))
        assert int(np.argmax(ref_logits)) == drafter.greedy_token(h).item(), f"step {step}: drafted token"
        tok = drafter.greedy_token(h)


@pytest.mark.parametrize("head", ["centroid", "dense"])
def test_greedy_step_is_step_then_argmax(head):
    base = make_base("e4b")
    drafter = make_drafter(base, head)
    cache, hidden, token = filled_cache(base, 40)
    shared = {t: cache[i].drafter_view() for t, i in base.producer_layers.items()}
    stepper = drafter.stepper()
    for position in (cache[0].offset, cache[0].offset + 3):  # the round's query position moves RoPE
        state = stepper.begin_round(shared, position)
        embedded = base.embed_scaled(mx.array([token], mx.int32))
        h, h_next = stepper.step(state, embedded, hidden)
        tok, g_next = stepper.greedy_step(state, embedded, hidden)
        assert tok.item() == int(np.argmax(np.array(drafter.full_logits(h))))
        np.testing.assert_array_equal(np.array(g_next), np.array(h_next))
        ref_h, _ = reference_step(drafter, embedded[None], hidden, shared, position)
        np.testing.assert_allclose(np.array(h), np.array(ref_h[0]), rtol=1e-4, atol=1e-4)


def test_stepper_reads_weights_of_its_own_model():
    """A stepper built for one drafter never computes with another's weights (bench clones drafters)."""
    base = make_base("e4b")
    a, b = make_drafter(base, seed=1), make_drafter(base, seed=2)
    cache, hidden, token = filled_cache(base, 20)
    shared = {t: cache[i].drafter_view() for t, i in base.producer_layers.items()}
    embedded = base.embed_scaled(mx.array([token], mx.int32))
    outs = []
    for d in (a, b, a):
        s = d.stepper()
        outs.append(np.array(s.step(s.begin_round(shared, 20), embedded, hidden)[0]))
    assert not np.allclose(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("base_dtype", [mx.bfloat16, mx.float32])
def test_the_drafters_dtype_is_kept_through_the_step(base_dtype):
    """A bf16 drafter computes in bf16, also next to an fp32 base: a float32 intermediate (the RoPE matrix,
    an fp32 base's hidden state) must not promote the residual stream, or every matmul would cast the
    drafter's weights to float32 each step (on Metal, the drafter's whole size in extra traffic)."""
    from mlx.utils import tree_map

    base = make_base("e4b")
    base.update(tree_map(lambda p: p.astype(base_dtype), base.parameters()))
    drafter = make_drafter(base)
    drafter.update(tree_map(lambda p: p.astype(mx.bfloat16) if mx.issubdtype(p.dtype, mx.floating) else p,
                            drafter.parameters()))
    cache, hidden, token = filled_cache(base, 40)
    shared = {t: cache[i].drafter_view() for t, i in base.producer_layers.items()}
    stepper = drafter.stepper()
    state = stepper.begin_round(shared, cache[0].offset)
    embedded = base.embed_scaled(mx.array([token], mx.int32))
    h, h_next = stepper.step(state, embedded, hidden)
    assert h.dtype == h_next.dtype == mx.bfloat16
    tok, _ = stepper.greedy_step(state, embedded, hidden)
    ref_h, _ = reference_step(drafter, embedded[None].astype(mx.bfloat16), hidden.astype(mx.bfloat16), shared,
                              cache[0].offset)
    np.testing.assert_allclose(np.array(h.astype(mx.float32)), np.array(ref_h[0].astype(mx.float32)),
                               rtol=0.05, atol=0.05)

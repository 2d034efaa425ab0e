"""PromptCache: reuse up to the common prefix, several conversations in LRU slots, exact or fresh.

The end-to-end checks (replies equal a full re-prefill) are in test_chat.py and test_server.py; these
check the bookkeeping on a tiny model: what each slot holds, which one a prompt continues, evictions."""

import mlx.core as mx
import pytest
from tiny_models import WINDOW, make_base

from mlx_spec.prompt_cache import PromptCache, common_prefix

A = [2] + list(range(10, 30))
B = [2] + list(range(100, 130))


@pytest.fixture(scope="module")
def model():
    return make_base("e4b")


def serve(pc: PromptCache, model, prompt, reply=(7, 8, 9)):
    """What a request does: prepare, prefill the rest plus the reply's tokens, settle. Returns reused."""
    slot, reused = pc.prepare(prompt)
    model(mx.array([list(prompt[reused:])]), cache=slot.cache)  # the prefill
    for t in reply[:-1]:  # decode steps (the cache ends up holding all but the reply's last token)
        model(mx.array([[t]]), cache=slot.cache)
    pc.settle(slot, list(prompt) + list(reply), torn=False)
    assert slot.tokens == list(prompt) + list(reply[:-1])
    assert all(c.offset == len(slot.tokens) for c in slot.cache)
    return reused


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_a_follow_up_reuses_the_conversation_so_far(model):
    pc = PromptCache(model)
    assert serve(pc, model, A) == 0
    follow_up = A + [7, 8, 9, 40, 41]
    assert serve(pc, model, follow_up) == len(A) + 2, "prompt and reply (all but its last token) reused"


@pytest.mark.parametrize("slots", [1, 2])
def test_two_conversations_take_turns(model, slots):
    pc = PromptCache(model, slots=slots)
    serve(pc, model, A)
    serve(pc, model, B)
    reused = serve(pc, model, A + [7, 8, 9, 50])
    assert reused == (len(A) + 2 if slots == 2 else 1), "with one slot, B took A's (all but their shared BOS)"
    assert len(pc) == slots


def test_the_least_recently_used_goes_first(model):
    pc = PromptCache(model, slots=2)
    serve(pc, model, A)
    serve(pc, model, B)
    serve(pc, model, A + [7, 8, 9, 50])  # A is now the most recent
    serve(pc, model, [2, 3, 4, 5])  # a third conversation takes B's slot, the least recently used
    assert serve(pc, model, B + [7, 8, 9, 60]) <= 1, "B is gone (but for the shared BOS)"
    assert serve(pc, model, A + [7, 8, 9, 50, 7, 8, 70]) > 0, "A was kept"


def test_a_rollback_past_the_window_starts_over(model):
    pc = PromptCache(model)
    long = [2] + list(range(10, 10 + 4 * WINDOW))
    serve(pc, model, long)
    assert serve(pc, model, long[:4] + [99, 98]) == 0, "keeping 4 tokens needs positions the window dropped"


def test_a_shared_prefix_does_not_cut_the_other_conversation_short(model):
    """B shares A's first token; continuing from a copy of A's cache leaves A's whole for its follow-up, and
    the copy holds exactly what a fresh prefill of B would."""
    pc = PromptCache(model, slots=2)
    serve(pc, model, A)
    assert serve(pc, model, B) == 1
    fresh = PromptCache(model)
    serve(fresh, model, B)
    for ours, theirs in zip(pc.latest.cache, fresh.latest.cache):
        for x, y in zip(ours.drafter_view(), theirs.drafter_view()):
            assert x.shape == y.shape and mx.allclose(x, y, atol=1e-5).item()
    assert serve(pc, model, A + [7, 8, 9, 3]) == len(A) + 2


def test_torn_drops_only_that_cache(model):
    pc = PromptCache(model, slots=2)
    serve(pc, model, A)
    slot, _ = pc.prepare(B)
    pc.settle(slot, B, torn=True)
    assert slot not in pc._slots and len(pc) == 1
    assert serve(pc, model, A + [7, 8, 9, 1]) > 0, "the other conversation is still there"


def test_disabled_never_reuses(model):
    pc = PromptCache(model, enabled=False, slots=3)
    serve(pc, model, A)
    assert serve(pc, model, A + [7, 8, 9, 1]) == 0 and len(pc) == 1

"""After every round, the base's caches hold exactly what a run that never saw the rejected drafts holds.

A wrapping proposer compares, at the start of each round (after the previous round's rollback), the
cached K/V that attention and the drafter will read with those of a fresh cache prefilled with the
accepted history.
"""

import mlx.core as mx
import pytest
from tiny_models import make_base, make_drafter

from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.proposers.ngram import NgramProposer
from mlx_spec.request import Request


class CheckingProposer:
    def __init__(self, inner, model):
        self.inner, self.model, self.name, self.checked = inner, model, "checking", 0

    def start(self, prompt):
        self.inner.start(prompt)

    def observe(self, result):
        self.inner.observe(result)

    def propose(self, ctx, k):
        clean = self.model.make_cache()
        self.model(mx.array(ctx.history[:-1])[None], clean)
        for i, (ours, ref) in enumerate(zip(ctx.base_cache, clean)):
            assert ours.offset == ref.offset == ctx.position, "cache offset must be the bonus token's position"
            # full layers: every position; sliding layers: the last W+1 (the drafter's view, a superset of
            # the W-1 the next query attends to)
            for x, y in zip(ours.drafter_view(), ref.drafter_view()):
                assert x.shape == y.shape and mx.allclose(x, y, atol=1e-5).item(), \
                    f"layer {i}: cache differs from a run that never saw the rejected drafts (round at {ctx.position})"
        self.checked += 1
        return self.inner.propose(ctx, k)


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
@pytest.mark.parametrize("k", [2, 7])
def test_cache_after_each_round_equals_never_seen(variant, k):
    model = make_base(variant)
    drafter = make_drafter(model, "dense" if variant == "dense_keqv" else "centroid")
    prompt = [2] + [(i * 37) % 250 + 3 for i in range(20)]
    for inner in (MTPProposer(drafter, model), NgramProposer(1)):
        proposer = CheckingProposer(inner, model)
        list(Engine(model, Request(prompt, max_tokens=48), proposer=proposer, policy=FixedK(k)).run())
        assert proposer.checked > 5


@pytest.mark.parametrize("with_proposer", [False, True])
def test_stopping_early_leaves_the_cache_at_the_history(with_proposer):
    """A caller that stops iterating (stop string, Ctrl-C) gets a cache holding exactly history[:-1], even
    though the engine had already queued the next step or round."""
    model = make_base("e2b")
    prompt = [2] + [(i * 37) % 250 + 3 for i in range(20)]
    proposer = NgramProposer(1) if with_proposer else None
    eng = Engine(model, Request(prompt, max_tokens=60), proposer=proposer, policy=FixedK(3))
    gen = eng.run()
    for _ in range(17):
        next(gen)
    gen.close()
    assert eng.cache[0].offset == len(eng.history) - 1
    clean = model.make_cache()
    model(mx.array(eng.history[:-1])[None], clean)
    for ours, ref in zip(eng.cache, clean):
        for x, y in zip(ours.drafter_view(), ref.drafter_view()):
            assert mx.allclose(x, y, atol=1e-5).item()

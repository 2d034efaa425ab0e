"""Drafts from a Gemma 4 MTP assistant: k chained drafter steps on the base's hidden state and K/V.

The drafter reads the base's producer-layer caches after rollback, so it never sees rejected drafts
(transformers' loop does; clean K/V accepts at least as often). The query position is the bonus
token's position for every step of the round, as in transformers.
"""

from functools import cached_property

import mlx.core as mx

from ..drafting import validate_pairing
from ..identity import weights_fingerprint
from .base import Draft, RoundContext, RoundResult


class MTPProposer:
    name = "mtp"
    base_layers = ()  # reads no decoder-layer outputs of the base

    def __init__(self, drafter, base):
        validate_pairing(drafter, base)
        self.drafter, self.base = drafter, base
        self.weights = drafter
        self.producers = base.producer_layers
        self.stepper = drafter.stepper()  # compiled steps, reused by every round

    @cached_property
    def identity(self) -> str:
        return f"{self.name}:{weights_fingerprint(self.drafter)}"

    def start(self, prompt) -> None:
        pass

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        if ctx.hidden is None:
            raise RuntimeError("the MTP proposer needs the base's hidden state")
        shared_kv = {t: ctx.base_cache[i].drafter_view() for t, i in self.producers.items()}
        state = self.stepper.begin_round(shared_kv, ctx.position)
        greedy = ctx.sampler.greedy
        token = mx.array([ctx.history[-1]], mx.int32)
        hidden = ctx.hidden
        tokens, probs = [], []
        for i in range(k):
            embedded = self.base.embed_scaled(token)  # (1, H_base)
            if greedy:  # the argmax is folded into the compiled head (the centroid head never builds (V,))
                token, hidden = self.stepper.greedy_step(state, embedded, hidden)
            else:
                h, hidden = self.stepper.step(state, embedded, hidden)
                token, q = ctx.sampler.draft(self.drafter.full_logits(h), ctx.position + 1 + i)
                if q is not None:
                    probs.append(q)
            tokens.append(token)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None)

    def observe(self, result: RoundResult) -> None:
        pass

    def fork(self) -> "MTPProposer":
        return self  # no per-conversation state: the drafter reads the base's caches

"""Drafts from a Gemma 4 MTP assistant: k chained drafter steps on the base's hidden state and K/V.

The drafter reads the base's producer-layer caches after rollback, so it never sees rejected drafts
(transformers' loop does; clean K/V accepts at least as often). The query position is the bonus
token's position for every step of the round, as in transformers.
"""

import mlx.core as mx

from .. import acceptance
from ..drafting import validate_pairing
from .base import Draft, RoundContext


class MTPProposer:
    name = "mtp"

    def __init__(self, drafter, base, position_offset: int = 0):
        validate_pairing(drafter, base)
        self.drafter, self.base = drafter, base
        self.producers = base.producer_layers
        self.stepper = drafter.stepper()  # compiled steps, reused by every round of this request
        # HF queries at the bonus position p; vLLM/mlx-vlm use p-1. Kept tunable for A/B on real weights.
        self.position_offset = position_offset

    def start(self, prompt) -> None:
        pass

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        if ctx.hidden is None:
            raise RuntimeError("the MTP proposer needs the base's hidden state")
        shared_kv = {t: ctx.base_cache[i].drafter_view() for t, i in self.producers.items()}
        state = self.stepper.begin_round(shared_kv, ctx.position + self.position_offset)
        greedy = ctx.sampling.greedy
        uniforms = None if greedy else mx.random.uniform(shape=(k,), key=ctx.key)
        token = mx.array([ctx.history[-1]], mx.int32)
        hidden = ctx.hidden
        tokens, probs = [], []
        for i in range(k):
            embedded = self.base.embed_scaled(token)  # (1, H_base)
            if greedy:
                token, hidden = self.stepper.greedy_step(state, embedded, hidden)
            else:
                h, hidden = self.stepper.step(state, embedded, hidden)
                q = ctx.sampling.probs(self.drafter.full_logits(h))  # (V,) tempered and filtered like the base
                token = acceptance.sample_from_probs(q, uniforms[i]).astype(mx.int32).reshape(1)
                probs.append(q)
            tokens.append(token)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None)

    def observe(self, n_accepted: int, draft_k: int) -> None:
        pass

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
        # HF queries at the bonus position p; vLLM/mlx-vlm use p-1. Kept tunable for A/B on real weights.
        self.position_offset = position_offset

    def start(self, prompt) -> None:
        pass

    def _draft_token(self, h: mx.array, ctx: RoundContext, u):
        """(token, q or None) for drafter state h (1, 1, H)."""
        if ctx.sampling.greedy:
            ids, scores = self.drafter.candidates(h)
            best = mx.argmax(scores)
            return (best if ids is None else ids[best]).astype(mx.int32), None
        q = ctx.sampling.probs(self.drafter.full_logits(h))  # (V,) tempered and filtered like the base
        return acceptance.sample_from_probs(q, u), q

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        if ctx.hidden is None:
            raise RuntimeError("the MTP proposer needs the base's hidden state")
        shared_kv = {t: ctx.base_cache[i].drafter_view() for t, i in self.producers.items()}
        position = ctx.position + self.position_offset
        uniforms = mx.random.uniform(shape=(k,), key=ctx.key) if not ctx.sampling.greedy else [None] * k
        token = mx.array([ctx.history[-1]], mx.int32)
        hidden = ctx.hidden
        tokens, probs = [], []
        for i in range(k):
            embedded = self.base.embed_scaled(token[None])  # (1, 1, H_base)
            h, hidden = self.drafter.step(embedded, hidden, shared_kv, position)
            token, q = self._draft_token(h, ctx, uniforms[i])
            token = token.reshape(1)
            tokens.append(token)
            if q is not None:
                probs.append(q)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None)

    def observe(self, n_accepted: int, draft_k: int) -> None:
        pass

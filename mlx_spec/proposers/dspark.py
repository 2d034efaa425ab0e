"""Drafts from a DeepSeek DSpark block drafter (models/gemma4_dspark.py): one drafter pass per round, then
the Markov head's chain.

k drafts: the block [last token, mask * (k-1)] sits at positions p .. p+k-1 after the drafter's context;
row j predicts the token at position p + 1 + j. With a Markov head, draft j is drawn from row j's logits
plus a bias that depends on the token before it (the last token, then draft j-1), one draw after another,
each through the request's sampler at its own position; its distribution q_j is what rejection sampling
divides by (DeepSpec's evaluator does the same). Without a Markov head the rows are independent. A tree
grows from the same rows, each node's children from row d plus the bias after the node's own token.
"""

import mlx.core as mx

from .base import Draft, RoundContext
from .block import BlockProposer


class DSparkProposer(BlockProposer):
    name = "dspark"

    def tree_step(self, ctx: RoundContext, depth: int):
        """Depth d's logits for a frontier: row d, plus the Markov bias after each frontier node's token."""
        logits, d = self._logits(ctx, depth), self.drafter
        if not d.args.markov_rank:
            return lambda depth_d, rows, tokens: logits[depth_d - 1 : depth_d]
        return lambda depth_d, rows, tokens: logits[depth_d - 1][None] + d.markov_bias(tokens)

    def _logits(self, ctx: RoundContext, k: int) -> mx.array:
        """(k, V): the block's rows, row j for the token at position p + 1 + j (before the Markov bias)."""
        d = self.drafter
        block = mx.array([[ctx.history[-1]] + [d.args.mask_token_id] * (k - 1)], mx.int32)  # (1, k)
        return d.block_logits(d.block_hidden(d.embed(block), self.context_cache)[0])

    def draft(self, ctx: RoundContext, k: int) -> Draft:
        d = self.drafter
        logits = self._logits(ctx, k)  # (k, V)
        if not d.args.markov_rank:
            return self.sample_rows(ctx, logits)
        previous = mx.array([ctx.history[-1]], mx.int32)
        tokens, probs = [], []
        for j in range(k):
            step = logits[j] + d.markov_bias(previous)[0]  # (V,)
            if ctx.sampler.greedy:
                previous = mx.argmax(step).astype(mx.int32).reshape(1)
            else:
                previous, q = ctx.sampler.draft(step, ctx.position + 1 + j)
                if q is not None:
                    probs.append(q)
            tokens.append(previous)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None)

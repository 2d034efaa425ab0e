"""Drafts from a z-lab DFlash block drafter (models/gemma4_dflash.py): one drafter pass per round.

k drafts: the block [last token, mask * k] sits at positions p .. p+k after the drafter's context; row j
(j >= 1) of the drafter's output, scored by the base's own head, is the draft at position p + j. The rows
are independent distributions, each drawn through the request's sampler at its own position (so the
coupled and rejection modes work as for any proposer). A tree (DDTree) grows from the same rows: depth d's
candidates are row d's best tokens, whatever their parents.
"""

import mlx.core as mx

from .base import Draft, RoundContext
from .block import BlockProposer


class DFlashProposer(BlockProposer):
    name = "dflash"

    def draft(self, ctx: RoundContext, k: int) -> Draft:
        return self.sample_rows(ctx, self._logits(ctx, k))

    def tree_step(self, ctx: RoundContext, depth: int):
        logits = self._logits(ctx, depth)
        return lambda d, rows, tokens: logits[d - 1 : d]  # the marginal of depth d, whatever the path

    def _logits(self, ctx: RoundContext, k: int) -> mx.array:
        """(k, V): the block's rows 1..k scored by the base's head."""
        mask = self.drafter.args.mask_token_id
        block = mx.array([[ctx.history[-1]] + [mask] * k], mx.int32)  # (1, k+1)
        h = self.drafter.block_hidden(self.base.embed_scaled(block), self.context_cache)  # (1, k+1, H)
        return self.drafter.softcap(self.base.head(h[0, 1:]))

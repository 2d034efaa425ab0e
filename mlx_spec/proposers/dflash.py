"""Drafts from a z-lab DFlash block drafter (models/gemma4_dflash.py): one drafter pass per round.

k drafts: the block [last token, mask * k] sits at positions p .. p+k after the drafter's context; row j
(j >= 1) of the drafter's output, scored by the base's own head, is the draft at position p + j. The rows
are independent distributions, each drawn through the request's sampler at its own position (so the
coupled and rejection modes work as for any proposer).
"""

import mlx.core as mx

from .base import Draft, RoundContext
from .block import BlockProposer


class DFlashProposer(BlockProposer):
    name = "dflash"

    def draft(self, ctx: RoundContext, k: int) -> Draft:
        mask = self.drafter.args.mask_token_id
        block = mx.array([[ctx.history[-1]] + [mask] * k], mx.int32)  # (1, k+1)
        h = self.drafter.block_hidden(self.base.embed_scaled(block), self.context_cache)  # (1, k+1, H)
        logits = self.drafter.softcap(self.base.head(h[0, 1:]))  # (k, V)
        return self.sample_rows(ctx, logits)

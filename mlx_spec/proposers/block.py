"""What the block-drafter proposers (dflash.py, dspark.py) share: a context of the base's layer outputs, kept
in step with the base's cache (proposers/base.py, FeatureReader), and the round's block.

A round asks for k drafts; the block is as long as k needs (DFlash: k + 1 rows, DSpark: k rows), never
longer than the drafter's native block. A block cut shorter is a different input, not a prefix of the
full one: attention inside the block is bidirectional, so every row sees how many masks follow it. That
is what mlx-vlm and z-lab's MLX loop run for a short block; the drafts of a cut block are therefore the
drafter's answer for that block length (tests/test_block_drafters.py checks both facts).

Features wait before they enter the context: `extend` only keeps them, and the context takes them in one
batch when it is next read (a draft, a rollback, a prefill chunk's evaluation) or once MAX_PENDING wait.
While `auto` decodes plainly that saves a drafter pass per token (a block drafter's context costs most of a
plain step here when extended one position at a time; its output only steers drafts, so when it is
computed cannot change what the engine emits).

The context follows the token ids it was built from (`start` keeps the longest prefix a new prompt shares
with them, as a draft model's cache does), so a chat or a server slot that reuses the base's K/V reuses the
drafter's context with it; the engine aligns the two (engine._align_context).
"""

from functools import cached_property
from typing import List, Tuple

import mlx.core as mx

from ..cache import rollback_all
from ..drafting import validate_block_pairing
from ..errors import CacheRollbackError
from ..identity import weights_fingerprint
from ..prefill import common_prefix
from ..trees.grow import Step, grow
from .base import Draft, RoundContext, RoundResult


MAX_PENDING = 64  # positions of features kept back before they are taken in anyway (bounds their memory)


class BlockProposer:
    name = "block"

    def __init__(self, drafter, base):
        validate_block_pairing(drafter, base)
        self.drafter = self.weights = drafter
        self.base = base
        self.base_layers: Tuple[int, ...] = tuple(drafter.target_layer_ids)
        self._context = drafter.make_context_cache()
        self._pending: List[mx.array] = []  # features handed over, not yet in the context (module docstring)
        self._history: List[int] = []  # the ids whose features the context holds are a prefix of this

    @cached_property
    def identity(self) -> str:
        return f"{self.name}:{weights_fingerprint(self.drafter)}"

    @property
    def max_drafts(self) -> int:
        """A round's drafts are the block's rows after the bonus: never more than this."""
        return self.drafter.max_drafts

    @property
    def context_cache(self) -> list:
        """The drafter's context caches, with every feature handed over so far taken in."""
        self._take_pending()
        return self._context

    @property
    def context_length(self) -> int:
        return self._context[0].offset + sum(f.shape[1] for f in self._pending)

    def _take_pending(self) -> None:
        if self._pending:
            features = self._pending[0] if len(self._pending) == 1 else mx.concatenate(self._pending, axis=1)
            self._pending = []
            self.drafter.extend_context(features, self._context)

    def fork(self) -> "BlockProposer":
        return type(self)(self.drafter, self.base)

    def reset(self) -> None:
        self._context = self.drafter.make_context_cache()
        self._pending = []
        self._history = []

    def start(self, prompt: List[int]) -> None:
        """Keep the context's longest prefix shared with `prompt` (the rest is rolled back, or all of it)."""
        have = self.context_length
        keep = common_prefix(self._history[:have], prompt)
        try:
            rollback_all(self.context_cache, have - keep)
        except CacheRollbackError:  # a sliding layer's window already dropped what this needs
            self.reset()
        self._history = list(prompt)

    def extend(self, features: mx.array) -> None:
        self._pending.append(features)
        if sum(f.shape[1] for f in self._pending) >= MAX_PENDING:
            self._take_pending()

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        k = self._begin(ctx, k)
        return self.draft(ctx, k) if k > 0 else Draft.empty()

    def propose_tree(self, ctx: RoundContext, nodes: int, depth: int) -> Draft:
        """A DDTree (trees/grow.py) over the block's per-position distributions: one drafter pass for a block
        as deep as the tree may be, then best-first over its rows (no drafter pass per depth, so every
        frontier node is expanded)."""
        depth = self._begin(ctx, depth)
        if depth <= 0:
            return Draft.empty()
        return grow(self.tree_step(ctx, depth), sampler=ctx.sampler, root=ctx.history[-1], position=ctx.position,
                    nodes=nodes, depth=depth, width=nodes, rank_logp=ctx.rank_logp)

    def _begin(self, ctx: RoundContext, k: int) -> int:
        """Check the context is in step with the base's cache; the drafts this round may have."""
        if self.context_length != ctx.position:
            raise RuntimeError(f"the drafter's context holds {self.context_length} positions but the base's cache "
                               f"{ctx.position}: the engine must hand every base pass's features to extend()")
        self._history = ctx.history  # the engine's list, appended in place
        return min(k, self.max_drafts)

    def draft(self, ctx: RoundContext, k: int) -> Draft:
        raise NotImplementedError

    def tree_step(self, ctx: RoundContext, depth: int) -> Step:
        """One block pass for `depth` drafts; the returned step gives depth d's logits for a frontier."""
        raise NotImplementedError

    def observe(self, result: RoundResult) -> None:
        pass  # the engine rolls the context back with the base's cache

    @staticmethod
    def sample_rows(ctx: RoundContext, logits: mx.array) -> Draft:
        """Drafts from independent rows of logits (k, V), row i at position ctx.position + 1 + i."""
        if ctx.sampler.greedy:
            return Draft(mx.argmax(logits, axis=-1).astype(mx.int32))
        tokens, probs = [], []
        for i in range(logits.shape[0]):
            token, q = ctx.sampler.draft(logits[i], ctx.position + 1 + i)
            tokens.append(token)
            if q is not None:
                probs.append(q)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None)

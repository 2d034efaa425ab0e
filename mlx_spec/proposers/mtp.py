"""Drafts from a Gemma 4 MTP assistant: k chained drafter steps on the base's hidden state and K/V.

The drafter reads the base's producer-layer caches after rollback, so it never sees rejected drafts
(transformers' loop does; clean K/V accepts at least as often). The query position is the bonus
token's position for every step of the round, as in transformers.
"""

from functools import cached_property
from typing import List

import mlx.core as mx

from ..cache import QuantizedKV
from ..drafting import validate_pairing
from ..identity import weights_fingerprint
from ..trees.grow import grow
from .base import Draft, RoundContext, RoundResult

TREE_WIDTH = 4  # frontier nodes a tree's drafter step runs as rows (the drafter's cost grows with them)


def _take_rows(buf, index: mx.array):
    """Rows `index` of K or V (B, ...), an array or a QuantizedKV."""
    if isinstance(buf, QuantizedKV):
        return QuantizedKV(*(mx.take(x, index, axis=0) for x in buf[:3]), buf.group_size, buf.bits)
    return mx.take(buf, index, axis=0)


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

    def propose_rows(self, ctxs: List[RoundContext], ks: List[int], caches: list, rows: List[int]) -> List[Draft]:
        """Drafts for several rows of a batch in one drafter pass per step: ctxs[i] is row rows[i] of the
        base's rows-caches `caches` (batch/cache.py), its hidden (1, H). Row i gets ks[i] drafts (rows with
        fewer run along and drop the rest)."""
        index = mx.array(rows, mx.int32)
        views = {}
        for t, i in self.producers.items():
            (k, v), valid = caches[i].drafter_views()
            if len(rows) != caches[i].rows:
                k, v, valid = _take_rows(k, index), _take_rows(v, index), valid[index]
            views[t] = ((k, v), valid)
        state = self.rows_stepper.begin_round(views, mx.array([c.position for c in ctxs], mx.int32))
        token = mx.array([c.history[-1] for c in ctxs], mx.int32)
        hidden = mx.concatenate([c.hidden for c in ctxs])  # (B, H_base)
        tokens, probs = [], [[] for _ in ctxs]
        sampled = [i for i, c in enumerate(ctxs) if not c.sampler.greedy]
        for step in range(max(ks)):
            embedded = self.base.embed_scaled(token)
            if not sampled:  # the argmax folded into the compiled head
                token, hidden = self.rows_stepper.greedy_step(state, embedded, hidden)
            else:
                h, hidden = self.rows_stepper.step(state, embedded, hidden)
                token = self.drafter.greedy_tokens(h)
            if sampled:  # rows that sample draw one by one, each from its own keyed noise
                picks = [token[i : i + 1] for i in range(len(ctxs))]
                for i in sampled:
                    picks[i], q = ctxs[i].sampler.draft(self.drafter.full_logits(h[i : i + 1]),
                                                        ctxs[i].position + 1 + step)
                    if q is not None:
                        probs[i].append(q)
                token = mx.concatenate(picks)
            tokens.append(token)
        drafted = mx.stack(tokens, axis=1)  # (B, max k)
        return [Draft(drafted[i, :k], mx.stack(probs[i][:k]) if probs[i] else None) for i, k in enumerate(ks)]

    def propose_tree(self, ctx: RoundContext, nodes: int, depth: int) -> Draft:
        """A best-first tree (trees/grow.py): each depth is one drafter step over up to TREE_WIDTH frontier
        nodes as rows. The drafter attends only to the base's cache (no K/V of its own), so a depth's branches
        need no tree mask: every row reads the same K/V, at the round's query position."""
        if ctx.hidden is None:
            raise RuntimeError("the MTP proposer needs the base's hidden state")
        views = {}
        for t, i in self.producers.items():
            k, v = ctx.base_cache[i].drafter_view()
            length = (k.packed if isinstance(k, QuantizedKV) else k).shape[2]
            views[t] = ((k, v), mx.ones((1, length), mx.bool_))  # one request: every slot valid, for every row
        state = self.rows_stepper.begin_round(views, mx.array([ctx.position], mx.int32))
        hidden = [ctx.hidden.reshape(1, -1)]

        def step(d: int, rows: mx.array, tokens: mx.array) -> mx.array:
            embedded = self.base.embed_scaled(tokens)  # (W, H_base); each row continues its parent's hidden
            h, hidden[0] = self.rows_stepper.step(state, embedded, mx.take(hidden[0], rows, axis=0))
            return self.drafter.full_logits_rows(h)

        return grow(step, sampler=ctx.sampler, root=ctx.history[-1], position=ctx.position, nodes=nodes,
                    depth=depth, width=min(nodes, TREE_WIDTH), rank_logp=ctx.rank_logp)

    @cached_property
    def rows_stepper(self):
        return self.drafter.rows_stepper()

    def observe(self, result: RoundResult) -> None:
        pass

    def fork(self) -> "MTPProposer":
        return self  # no per-conversation state: the drafter reads the base's caches

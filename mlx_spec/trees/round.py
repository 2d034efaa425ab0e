"""One tree round of an Engine: verify a drafted tree in one base pass, keep a branch, compact, emit.

The engine drafts (a proposer's `propose_tree`) and hands a Draft with parents here. Queued, with no host
read: the base runs `[bonus] + nodes` over NodeViews of its caches (views.py), and acceptance (accept.py)
and the packed result are built in the same graph. Settled after the round's one host read: the kept
branch's K/V move to consecutive positions and the other nodes' are dropped (`compact`, checked like
rollback); then the engine emits as for a chain.

A block drafter's context holds K/V rotated at their positions, so moving its entries would keep the wrong
rotation: it takes the pass's features as a chain's pass does (so any rollback of the engine keeps the two
in step), and at settle gives the pass back and takes the branch's features again, at consecutive positions.

Result, int32: [n, next token, the branch's tokens (D), its rows (D), their ranks among their siblings (D),
the children of its last node (all rejected), log-probability rows (D+1) if asked]. The ranks teach the
request's RankAcceptance (ranks.py), which shapes its next sampled trees.
"""

from typing import List

import mlx.core as mx

from ..cache import rollback_all
from ..logprobs import logprob_rows
from ..proposers.base import Draft
from ..sampling import ACCEPT, BASE, RESAMPLE, SIBLING
from .accept import follow_accept, rejection_accept
from .shape import TreeShape
from .views import single_views


def depth_before_switch(caches: list, depth: int) -> int:
    """A tree's depth bound while the caches still hold full precision before --quantized-kv-start: its
    nodes stay before the switch (a plain step at a position >= start stores quantized K/V, and a tree pass
    cannot be split by position as a chain's is). 0 when no node fits: the round drafts a chain."""
    kv = getattr(caches[0], "kv", None) if caches else None
    if kv is not None and not caches[0].quantized and caches[0].offset < kv.start:
        return min(depth, kv.start - 1 - caches[0].offset)
    return depth


def shape_of(draft: Draft) -> TreeShape:
    return TreeShape(draft.parents, draft.depth, draft.branching)


def base_tokens(sampler, logits: mx.array, depths: mx.array, after: List[int]) -> mx.array:
    """The base's own token after each row (N+1,): its argmax, or its draw with the noise of the position
    after the row (`after[d]` for a row of depth d), exactly what plain sampling draws there."""
    if sampler.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    noise = mx.take(sampler.gumbel(after, logits.shape[-1], BASE), depths, axis=0)
    return mx.argmax(sampler.scores(logits) + noise, axis=-1).astype(mx.int32)


def verify_tree(sampler, shape: TreeShape, draft: Draft, logits: mx.array, verify_in: mx.array, position: int,
                logprobs: int = 0) -> mx.array:
    """The round's result (lazy) from the base's rows of logits (N+1, V) over verify_in [bonus] + nodes."""
    D, depths = shape.depth_bound, shape.depths
    after = [position + 1 + d for d in range(D + 1)]  # the position a row of depth d predicts
    if sampler.greedy or sampler.mode != "rejection":
        n, nxt, path = follow_accept(shape, draft.tokens, base_tokens(sampler, logits, depths, after))
    else:
        streams = [ACCEPT] + [SIBLING + r for r in range(shape.branching - 1)]
        accept_u = mx.stack([sampler.uniforms(after, s) for s in streams], axis=1)  # (D+1, K)
        n, nxt, path = rejection_accept(shape, draft.tokens, draft.probs, sampler.probs(logits),
                                        mx.take(accept_u, depths, axis=0),
                                        mx.take(sampler.uniforms(after, RESAMPLE), depths))
    tokens = mx.take(verify_in, path).astype(mx.int32)
    last = mx.take(path, mx.maximum(n - 1, 0)) * (n > 0)  # the branch's last row (the root when n = 0)
    rejected = (mx.take(shape.children, last, axis=0) >= 0).sum()[None].astype(mx.int32)
    result = mx.concatenate([mx.stack([n, nxt]).astype(mx.int32), tokens, path,
                             mx.take(shape.sibling_rank, path).astype(mx.int32), rejected])
    if logprobs:  # row j of the branch predicts its (j+1)-th emitted token: a node while accepted, then next
        rows = mx.take(logits, mx.concatenate([mx.zeros((1,), mx.int32), path]), axis=0)  # (D+1, V)
        chosen = mx.where(mx.arange(D + 1) < n, mx.concatenate([tokens, nxt[None]]), nxt)
        result = mx.concatenate([result, logprob_rows(rows, chosen, logprobs).reshape(-1)])
    return result


def unpack(values: List[int], depth: int):
    """(n, the kept rows [0] + branch, the engine's chain layout [n, next, D tokens, log-probability rows],
    (the branch's ranks among their siblings, the children its last node had))."""
    n, D = values[0], depth
    ranks = (values[2 + 2 * D : 2 + 2 * D + n], values[2 + 3 * D])
    return n, [0] + values[2 + D : 2 + D + n], values[: 2 + D] + values[3 + 3 * D :], ranks


class TreeRound:
    """A tree round queued on the device for one Engine; `settle` finishes it after the host read."""

    def __init__(self, engine, draft: Draft, position: int, asked: int):
        e = engine
        self.draft, self.asked, self.L = draft, asked, draft.k + 1
        shape = shape_of(draft)
        verify_in = mx.concatenate([mx.array(e.history[-1:], mx.int32), draft.tokens.astype(mx.int32)])
        views = single_views(e.cache, shape)
        if e.reads:
            logits, self.hidden, self.features = e.base.forward_layers(verify_in[None], views, e.reads)
            e.proposer.extend(self.features)
        else:
            (logits, self.hidden), self.features = e.base.forward(verify_in[None], views), None
        self.result = verify_tree(e.sampler, shape, draft, logits[0], verify_in, position, e.logprobs)
        mx.async_eval(self.result)

    def settle(self, engine):
        """(the round's TokenEvents, the base's hidden at the kept branch's end (1, 1, H) or None)."""
        e = engine
        n, keep, values, ranks = unpack(self.result.tolist(), self.draft.depth)
        e.tree_ranks.observe(*ranks)
        for c in e.cache:
            c.compact(keep, self.L)
        if e.reads:
            rollback_all(e.proposer.context_cache, self.L)
            e.proposer.extend(self.features[:, mx.array(keep)])
        events = e.settle(values, self.asked, self.draft.depth, nodes=self.draft.k)
        return events, (self.hidden[:, keep[-1] : keep[-1] + 1] if self.hidden is not None else None)

"""The best-first tree builder: from a drafter's distributions, the N nodes most worth verifying.

EAGLE-2's dynamic tree and DDTree's best-first expansion: a node's key is the log of the product, along its
path, of the drafter's probabilities, so the tree with the largest keys maximizes the expected accepted
length under the drafter's own distribution. Built on the device with fixed shapes, so no host read waits:

    per depth d = 1..D
      frontier   W nodes of depth d - 1 (the root at d = 1), each with its token and key
      step       the drafter's logits for each frontier node's children (W, V): an MTP drafter's batched
                 step, a block drafter's row d (DSpark: with its Markov bias after the frontier token)
      children   each row's top K: by the drafter's logits (greedy), or by the sampler's scores plus the
                 noise of position p + d (coupled: the base's own noise; rejection and match: the drafter's, a
                 vector of its own per frontier row, which makes the K a draw without replacement, Gumbel-top-k)
      keys       key(child of rank r) = key(parent) + log s_r - DELTA * (1 + r); greedy: s_r = q_(r), the row's
                 r-th largest probability; sampled drafts: the measured chance that a node's r-th child is
                 the one kept (ranks.py: the drafter's probabilities misjudge depth against width there)
      next frontier: the W children with the largest keys
    the tree: the N candidates with the largest keys over all depths.

Keys fall strictly from parent to child and from sibling to sibling (the DELTA term breaks ties), so the N
largest contain each one's parent and earlier siblings, and sorted by key they come in topological order
with siblings in drawing order, as shape.py wants. With W >= N and K >= N this is exactly DDTree's tree.

Why ranks and not the drawn tokens' own probabilities: whether a node's r-th child exists must not depend
on that child's own draw (accept.py's rejection rule). Its key depends on its parent only; what can push it
out of the N are nodes with larger keys: its earlier siblings' subtrees (drawn before it: allowed), never its
own subtree (smaller keys), and other parents' subtrees, whose draws are independent of its own because each
frontier row draws with its own noise. For greedy drafts the keys are the drawn tokens' own probabilities.
With a single row of noise per position, a cousin's draw would share its noise and could decide whether it
is in the tree. The first frontier row (the all-first-children path: the chain) draws with the chain's noise.
"""

from typing import Callable, Optional, Sequence

import mlx.core as mx

from ..proposers.base import Draft
from ..sampling import BASE, BRANCH, DRAFT

DELTA = 0.01  # tie-break per rank and depth, in log-probability (far above float32 rounding of the keys)
LOG_FLOOR = -50.0  # log q below this counts as this: keeps keys finite (q < 2e-22 is never worth a row)
MAX_BRANCHING = 8  # children tried per node at most (the rejection rule runs one pass per rank)

Step = Callable[[int, mx.array, mx.array], mx.array]  # (depth, frontier rows, tokens) -> logits (W or 1, V)


def _top(x: mx.array, k: int) -> mx.array:
    """Indices of each row's k largest values, largest first: (..., k)."""
    part = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
    order = mx.argsort(-mx.take_along_axis(x, part, axis=-1), axis=-1)
    return mx.take_along_axis(part, order, axis=-1)


def grow(step: Step, *, sampler, root: int, position: int, nodes: int, depth: int, width: int,
         branching: int = MAX_BRANCHING, rank_logp: Optional[Sequence[Sequence[float]]] = None) -> Draft:
    """A tree of at most `nodes` nodes and depth `depth` after the root token `root` (at `position`).
    `step(d, rows, tokens)`: the drafter's logits for the children of the frontier (rows: each frontier
    node's row in the previous frontier; tokens: their tokens). `rank_logp`: for sampled drafts, [d][r] log P(a
    depth-d node's r-th child is kept) (ranks.py); without it they are ranked by the drafter's probabilities."""
    greedy, rejection = sampler.greedy, not sampler.greedy and sampler.mode == "rejection"
    tokens, rows, keys = mx.array([root], mx.int32), mx.zeros((1,), mx.int32), mx.zeros((1,), mx.float32)
    ids = mx.array([-1], mx.int32)  # the frontier's candidate ids (-1: the root)
    found = {"token": [], "key": [], "parent": [], "qrow": [], "rank": []}
    qs, picks, seen, qseen = [], [], 0, 0
    for d in range(1, depth + 1):
        logits = step(d, rows, tokens).astype(mx.float32)
        W, V = tokens.shape[0], logits.shape[-1]
        logits = mx.broadcast_to(logits, (W, V))
        K = min(branching, V)
        scores = logits if greedy else sampler.scores(logits)
        logq = scores - mx.logsumexp(scores, axis=-1, keepdims=True)  # (W, V)
        if greedy:
            children = _top(logits, K)
            ranked = mx.take_along_axis(logq, children, axis=-1)
        else:
            children = _top(scores + _noise(sampler, position + d, W, V), K)
            ranked = mx.take_along_axis(logq, _top(logq, K), axis=-1) if rank_logp is None \
                else mx.array(list(rank_logp[d - 1][:K]), mx.float32)[None]
        child_keys = keys[:, None] + mx.maximum(ranked, LOG_FLOOR) - DELTA * (1 + mx.arange(K))  # (W, K)
        found["token"].append(children.reshape(-1))
        found["key"].append(child_keys.reshape(-1))
        found["parent"].append(mx.repeat(ids, K))
        found["qrow"].append(qseen + mx.repeat(mx.arange(W, dtype=mx.int32), K))
        found["rank"].append(mx.tile(mx.arange(K, dtype=mx.int32), W))
        if rejection:
            qs.append(mx.exp(logq))
            picks.append(children)
        if d < depth:
            best = _top(child_keys.reshape(-1), min(width, W * K))
            rows, tokens = (best // K).astype(mx.int32), children.reshape(-1)[best].astype(mx.int32)
            keys, ids = child_keys.reshape(-1)[best], (seen + best).astype(mx.int32)
        seen, qseen = seen + W * K, qseen + W
    cand = {name: mx.concatenate(parts) for name, parts in found.items()}
    n = min(nodes, seen)
    chosen = _top(cand["key"], n)  # descending keys: topological, siblings in drawing order
    index = mx.full((seen,), -1, mx.int32)
    index[chosen] = mx.arange(n, dtype=mx.int32)
    parent = mx.take(cand["parent"], chosen)
    parents = mx.where(parent < 0, -1, mx.take(index, mx.maximum(parent, 0)))
    probs = _without_replacement(mx.concatenate(qs), mx.concatenate(picks), mx.take(cand["qrow"], chosen),
                                 mx.take(cand["rank"], chosen)) if rejection else None
    return Draft(mx.take(cand["token"], chosen).astype(mx.int32), probs, parents=parents.astype(mx.int32),
                 depth=depth, branching=min(branching, V))


def _noise(sampler, position: int, rows: int, vocab: int) -> mx.array:
    """(1 or rows, V) Gumbel noise for a depth's draws: coupled, the base's own at the position (so a child
    equals the base's draw exactly when the base would draw it); otherwise the drafter's, one row per frontier
    node (the first row the chain's draft noise)."""
    if sampler.mode == "coupled":
        return sampler.gumbel([position], vocab, BASE)
    return mx.concatenate([sampler.gumbel([position], vocab, DRAFT if w == 0 else BRANCH + w - 1)
                           for w in range(rows)])


def _without_replacement(q: mx.array, picks: mx.array, qrow: mx.array, rank: mx.array) -> mx.array:
    """(N, V): what each chosen node was drawn from: its parent's q (rows of q (R, V)) without the siblings
    drawn before it (picks (R, K), the first `rank` of its row), renormalized (Gumbel-top-k is sequential
    sampling without replacement). Zero where q's support is used up (accept.py skips such a node)."""
    parent_q = mx.take(q, qrow, axis=0)  # (N, V)
    siblings = mx.take(picks, qrow, axis=0)  # (N, K)
    earlier = mx.arange(siblings.shape[1])[None] < rank[:, None]
    kept = mx.take_along_axis(parent_q, siblings, axis=1)
    parent_q = mx.put_along_axis(parent_q, siblings, mx.where(earlier, 0.0, kept), axis=1)
    total = parent_q.sum(axis=-1, keepdims=True)
    return parent_q / mx.where(total > 0, total, 1.0)

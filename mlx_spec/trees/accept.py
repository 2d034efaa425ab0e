"""Acceptance on a draft tree: which branch the base keeps, and the token it adds after it (pure, lazy).

As acceptance.py for chains: arrays in, arrays out, random numbers as arguments, nothing read back, so the
engine builds the whole round and reads it once. Rows as in shape.py (row 0 the root, row i + 1 node i).
Shapes (N nodes, depth bound D, branching K, vocabulary V):
    tokens        (N,)      int32   the nodes' tokens
    targets       (N+1,)    int32   the base's own token after each row (its argmax, or its position-keyed draw)
    target_probs  (N+1, V)  float   p after each row
    draft_probs   (N, V)    float   q_i: the distribution node i was drawn from, given its parent and the
                                    siblings drawn before it; None: deterministic nodes (q one-hot)
    accept_u      (N+1, K)  float   the uniform for each row's r-th child
    resample_u    (N+1,)    float   the uniform for the token after each row
Each rule returns (n accepted, next token, path (D,) int32): the kept branch is the rows path[:n] (depths
1..n, in order), and the next token follows its last row.
"""

import mlx.core as mx

from ..acceptance import sample_from_probs
from .shape import TreeShape


def branch(shape: TreeShape, chosen: mx.array):
    """(n, the kept branch's last row, path (D,)) from chosen (N+1,) bool: the row is the child its parent
    continues with (the root always). A row is kept when it and all its ancestors are chosen."""
    kept = ~mx.any(shape.ancestors & ~chosen[None], axis=1)  # (N+1,)
    depth = mx.where(kept, shape.depths, -1)
    last = mx.argmax(depth)
    wanted = mx.arange(1, shape.depth_bound + 1, dtype=mx.int32)[:, None]  # (D, 1)
    path = mx.argmax(kept[None] & (shape.depths[None] == wanted), axis=1)  # rows past n: 0, never read
    return depth[last].astype(mx.int32), last, path.astype(mx.int32)


def follow_accept(shape: TreeShape, tokens: mx.array, targets: mx.array):
    """Greedy, coupled and match: continue with the child equal to the base's own token after its parent
    (the first drawn, where siblings repeat a token). Every emitted token is the base's own, so the output is
    plain decoding's whatever the tree."""
    rows = mx.arange(shape.nodes + 1)
    tokens = mx.concatenate([mx.array([-1], mx.int32), tokens.astype(mx.int32)])
    match = (tokens == mx.take(targets, shape.rows_parent)) & (rows > 0)
    first = match & ~mx.any(shape.earlier_siblings & match[None], axis=1)
    n, last, path = branch(shape, first | (rows == 0))
    return n, mx.take(targets, last).astype(mx.int32), path


def rejection_accept(shape: TreeShape, tokens: mx.array, draft_probs, target_probs: mx.array,
                     accept_u: mx.array, resample_u: mx.array):
    """Multi-candidate speculative sampling (SpecInfer's, recursive rejection sampling) down the tree: from
    the root, each row's children are tried (`sibling_outcomes`); a kept child continues, and where every
    child is rejected the round ends with the token drawn from what p has become."""
    rows = mx.arange(shape.nodes + 1)
    tokens = mx.concatenate([mx.zeros((1,), mx.int32), tokens.astype(mx.int32)])
    if draft_probs is not None:
        draft_probs = mx.concatenate([mx.zeros((1, draft_probs.shape[-1]), mx.float32), draft_probs.astype(mx.float32)])
    kept_child, after = sibling_outcomes(shape.children, tokens, draft_probs, target_probs, accept_u, resample_u)
    n, last, path = branch(shape, (mx.take(kept_child, shape.rows_parent) == rows) | (rows == 0))
    return n, mx.take(after, last).astype(mx.int32), path


def sibling_outcomes(children: mx.array, tokens: mx.array, draft_probs, target_probs: mx.array,
                     accept_u: mx.array, resample_u: mx.array):
    """What every row would do if the walk reached it, for R rows at once: (its kept child's row or -1 (R,),
    the token drawn after it when none is kept (R,)). children (R, K): each row's children's rows in the
    order drawn (-1: none); tokens (R,) and draft_probs (R, V) or None are per row (a child's own).

    After a row with base distribution p, child x drawn from q is kept with probability min(1, p(x) / q(x));
    after a rejection p becomes normalize(max(p - q, 0)), and the next child is tried against that. The kept
    child, or the token drawn from the final p, then follows p exactly, provided each q is what its node was
    drawn from given its earlier siblings (drawn with replacement: the parent's q each time; without
    replacement: q without the earlier siblings, renormalized; deterministic: one-hot, draft_probs None) and
    how many children a row has does not depend on those children's draws. A child with q(x) = 0 was not
    drawn (a draw without replacement past q's support) and is skipped."""
    p = target_probs.astype(mx.float32)  # (R, V)
    V = p.shape[-1]
    kept_child = mx.full(children.shape[:1], -1, mx.int32)
    for r in range(children.shape[1]):
        child = mx.maximum(children[:, r], 0)
        x = mx.take(tokens, child)
        q = (mx.arange(V)[None] == x[:, None]).astype(mx.float32) if draft_probs is None \
            else mx.take(draft_probs, child, axis=0)
        q_x = mx.take_along_axis(q, x[:, None], axis=1)[:, 0]
        p_x = mx.take_along_axis(p, x[:, None], axis=1)[:, 0]
        live = (children[:, r] >= 0) & (kept_child < 0) & (q_x > 0)
        keep = live & (accept_u[:, r] * q_x < p_x)  # u < p/q without a division
        kept_child = mx.where(keep, children[:, r], kept_child)
        residual = mx.maximum(p - q, 0.0)
        total = residual.sum(axis=-1, keepdims=True)
        residual = mx.where(total > 0, residual / mx.where(total > 0, total, 1.0), p)  # all zero: only rounding
        p = mx.where((live & ~keep)[:, None], residual, p)
    return kept_child, sample_from_probs(p, resample_u)

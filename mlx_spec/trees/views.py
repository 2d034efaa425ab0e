"""The base's caches as one tree verify pass sees them: node positions for RoPE, and the tree mask.

A verify pass writes its L = N + 1 rows (`[bonus] + nodes`) to the caches in row order, as a chain's pass
does; what differs is what each row is: row i sits at position offset + depth_i (its RoPE position), and
attends to
    the cached prefix: every cached position on a full-attention layer, those inside its window (measured
        from its own position) on a sliding one;
    the pass's rows that are itself or its ancestors (sliding layers: inside the window too).
Nothing else: a sibling's or a cousin's K/V never reach it. A chain's rows (depth i, ancestors 0..i) give
exactly the causal mask. `NodeView` wraps a cache for one pass and delegates everything else (storage,
quantization, rollback) to it; the model reads `node_positions` (models/gemma4_text.py).

Knows caches' public geometry and positions; nothing of tokens or acceptance.
"""

from typing import Optional, Sequence

import mlx.core as mx

from ..cache import SlidingKVCache
from .shape import TreeShape


def single_mask(cache, depths: mx.array, ancestors: mx.array) -> mx.array:
    """(L, n_cached + L) bool for one request's cache (cache.py): the keys its next update returns are
    its retained positions in order, then the pass's L rows."""
    window = cache.window if isinstance(cache, SlidingKVCache) else None
    n = min(cache.length, cache.keep) if window is not None else cache.offset
    L = depths.shape[0]
    q = cache.offset + depths[:, None]  # (L, 1)
    p = mx.arange(cache.offset - n, cache.offset)[None]  # (1, n)
    cached = mx.ones((L, n), mx.bool_) if window is None else (q - p) < window
    new = ancestors
    if window is not None:
        new = new & ((depths[:, None] - depths[None]) < window)
    return mx.concatenate([cached, new], axis=1)


class NodeView:
    """A cache as one tree verify pass sees it (see the module docstring)."""

    # A tree pass never straddles --quantized-kv-start (its depth is capped before it, trees/round.py),
    # though its row count may: the model must not split it by rows (cache.quantization_split).
    kv = None

    def __init__(self, cache, positions: mx.array, mask_of):
        self.cache = cache
        self.node_positions = positions  # (B, L) int32
        self._mask_of = mask_of

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return self.cache.update_and_fetch(keys, values)

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        return self._mask_of(self.cache)


def single_views(caches: list, shape: TreeShape) -> list:
    """One request's caches for a pass over `[bonus] + shape's nodes`."""
    depths, ancestors = shape.depths, shape.ancestors
    positions = (caches[0].offset + depths)[None]  # (1, L)
    return [NodeView(c, positions, lambda c: single_mask(c, depths, ancestors)) for c in caches]


def rows_layout(shapes: Sequence[Optional[TreeShape]], ks: Sequence[int], L: int):
    """(depths (B, L), ancestors (B, L, L)) for a batch's rows padded to L: a tree row's nodes, or a chain
    of ks[b] drafts (shape None); padding rows continue the positions and see only themselves (never seen by
    a real row: they are rolled back)."""
    depths, ancestors = [], []
    for shape, k in zip(shapes, ks):
        n = (shape.nodes if shape is not None else k) + 1
        if shape is None:
            d, a = mx.arange(n, dtype=mx.int32), mx.tril(mx.ones((n, n), mx.bool_))
        else:
            d, a = shape.depths, shape.ancestors
        pad = L - n
        if pad:
            d = mx.concatenate([d, mx.arange(n, L, dtype=mx.int32)])
            a = mx.concatenate([mx.concatenate([a, mx.zeros((n, pad), mx.bool_)], axis=1),
                                mx.concatenate([mx.zeros((pad, n), mx.bool_), mx.eye(pad, dtype=mx.bool_)], axis=1)])
        depths.append(d)
        ancestors.append(a)
    return mx.stack(depths), mx.stack(ancestors)


def rows_views(caches: list, depths: mx.array, ancestors: mx.array) -> list:
    """A batch's rows-caches (batch/cache.py) for a pass in which row b's query i sits at depth depths[b, i]."""
    positions = caches[0].offset[:, None] + depths  # (B, L)
    return [NodeView(c, positions, lambda c: c.tree_mask(depths, ancestors)) for c in caches]

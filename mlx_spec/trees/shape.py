"""A draft tree's structure, computed on the device from its parents, so no host read waits for it.

Rows: row 0 is the root (the round's bonus token, already emitted, whose position is the round's), row
i + 1 is node i. Nodes come in topological order (a parent before its children) and siblings in the order
they were drawn, which is the order the multi-candidate rejection rule tries them (accept.py).

    parents    (N,)          int32   node i's parent node, -1 for the root
    rows_parent (N+1,)       int32   each row's parent row (the root's is itself)
    ancestors  (N+1, N+1)    bool    [i, j]: row j is row i or an ancestor of it
    depths     (N+1,)        int32   the root 0, its children 1, ...
    children   (N+1, K)      int32   the row of each row's r-th child, -1 where it has fewer than K

Knows indices only; nothing of tokens, models or caches.
"""

import math
from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx


@dataclass(frozen=True, eq=False)
class TreeShape:
    """parents (N,) int32 (host or device values); `depth_bound` >= the deepest node's depth and
    `branching` >= the most children any row has (both known to the builder before its values are)."""

    parents: mx.array
    depth_bound: int
    branching: int

    @property
    def nodes(self) -> int:
        return self.parents.shape[0]

    @staticmethod
    def chain(k: int) -> "TreeShape":
        """A chain of k nodes: node i's parent is node i - 1."""
        return TreeShape(mx.arange(-1, k - 1, dtype=mx.int32), k, 1)

    @cached_property
    def rows_parent(self) -> mx.array:
        return mx.concatenate([mx.zeros((1,), mx.int32), self.parents.astype(mx.int32) + 1])

    @cached_property
    def ancestors(self) -> mx.array:
        """Reachability through parent links, by squaring: after s squarings it spans 2**s links."""
        n = self.nodes + 1
        reach = (mx.eye(n) + (self.rows_parent[:, None] == mx.arange(n)[None])).astype(mx.float32)
        for _ in range(max(1, math.ceil(math.log2(max(self.depth_bound, 1))))):
            reach = ((reach @ reach) > 0).astype(mx.float32)  # counts of 0/1 paths: exact in float32
        return reach > 0

    @cached_property
    def depths(self) -> mx.array:
        return (self.ancestors.sum(axis=1) - 1).astype(mx.int32)

    @cached_property
    def earlier_siblings(self) -> mx.array:
        """(N+1, N+1) bool: [i, j]: row j is a sibling of row i drawn before it."""
        rows = mx.arange(self.nodes + 1)
        return (self.rows_parent[:, None] == self.rows_parent[None]) & (rows[None] < rows[:, None]) & (rows[None] > 0)

    @cached_property
    def sibling_rank(self) -> mx.array:
        """(N+1,) int32: how many siblings were drawn before the row (the root: 0)."""
        return self.earlier_siblings.sum(axis=1).astype(mx.int32)

    @cached_property
    def children(self) -> mx.array:
        n, K = self.nodes + 1, self.branching
        rows = mx.arange(1, n, dtype=mx.int32)
        rank = self.sibling_rank[1:]
        dump = n * K  # where a rank past `branching` would go: a builder that kept its bound never writes it
        slot = mx.where(rank < K, self.rows_parent[1:] * K + rank, dump)
        table = mx.full((n * K + 1,), -1, mx.int32)
        table[slot] = rows
        return table[: n * K].reshape(n, K)

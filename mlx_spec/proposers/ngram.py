"""Prompt-lookup drafts: find the latest earlier occurrence of the last n tokens, propose what followed.

Needs no weights and works with any model; it pays off when the output copies from the context
(editing a document, quoting code, repeated structure).
"""

from typing import List

import mlx.core as mx

from ..trees.ngram import continuations, lookup_tree
from .base import Draft, RoundContext, RoundResult

DEFAULT_NGRAM = 3


def lookup(history: List[int], n: int, k: int, min_n: int = 1) -> List[int]:
    """Up to k tokens that followed the most recent earlier match of the longest suffix (n down to min_n):
    the first of the continuations a tree merges (trees/ngram.py), so a tree's first branch is this chain.
    The most recent match best predicts local repetition."""
    return next(continuations(history, n, k, min_n), [])


class NgramProposer:
    name = "ngram"
    base_layers = ()  # reads no decoder-layer outputs of the base
    weights = None

    def __init__(self, n: int = DEFAULT_NGRAM):
        if n < 1:
            raise ValueError(f"--ngram N must be >= 1, got {n}")
        self.n = n
        self.identity = f"ngram:{n}"

    def start(self, prompt: List[int]) -> None:
        pass

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        return Draft(mx.array(lookup(ctx.history, self.n, k), mx.int32))

    def propose_tree(self, ctx: RoundContext, nodes: int, depth: int) -> Draft:
        """Several matches' continuations merged (trees/ngram.py); the chain's lookup is its first branch."""
        tokens, parents = lookup_tree(ctx.history, self.n, nodes, depth)
        if not tokens:
            return Draft.empty()
        depths = []
        for p in parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        most = max(parents.count(p) for p in set(parents))
        return Draft(mx.array(tokens, mx.int32), parents=mx.array(parents, mx.int32), depth=max(depths),
                     branching=most)

    def observe(self, result: RoundResult) -> None:
        pass

    def fork(self) -> "NgramProposer":
        return self  # no state

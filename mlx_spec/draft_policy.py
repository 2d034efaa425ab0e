"""The draft-length contract the engine plugs, beside the Proposer contract (proposers/base.py).

The engine calls `next_k()` before each round and `observe(RoundResult)` after it (only for rounds that
asked for drafts). `next_k()` returning 0 means "decode this token plainly"; a policy that returns 0 once
and k > 0 later switches the engine between plain steps and rounds. `FixedK` is the engine's default;
tuning/ implements the others (AutoDraftPolicy) against this contract and the engine never imports it.

Trees (trees/): a policy may also say how many nodes this round's tree has (`next_nodes()`, asked right
after `next_k()` gave k > 0; k is then the tree's depth bound). A policy without `next_nodes` drafts chains.
"""

from typing import Optional, Protocol

from .proposers.base import RoundResult


class DraftPolicy(Protocol):
    def next_k(self) -> int:
        """Drafts the next round asks for; 0: decode the next token plainly."""

    def observe(self, result: RoundResult) -> None:
        """What the round that asked for drafts got (the proposer may give fewer than asked)."""


class FixedK:
    """Always k drafts (k = 0: plain decoding)."""

    def __init__(self, k: int):
        self.k = k

    def next_k(self) -> int:
        return self.k

    def observe(self, result: RoundResult) -> None:
        pass


class TreePolicy(DraftPolicy, Protocol):
    def next_nodes(self) -> int:
        """Asked right after next_k() gave k > 0: this round's tree budget in nodes (0: a chain of k drafts)."""


def tree_budget(policy) -> int:
    """The nodes `policy` gives this round's tree; 0 (a chain) for policies that draft chains only."""
    ask = getattr(policy, "next_nodes", None)
    return int(ask()) if ask is not None else 0


class FixedTree:
    """A tree of `nodes` nodes every round, none deeper than `depth` (default: `nodes`, which lets a
    drafter that is sure make it a chain)."""

    def __init__(self, nodes: int, depth: Optional[int] = None):
        self.nodes, self.depth = nodes, depth if depth is not None else nodes

    def next_k(self) -> int:
        return self.depth

    def next_nodes(self) -> int:
        return self.nodes

    def observe(self, result: RoundResult) -> None:
        pass

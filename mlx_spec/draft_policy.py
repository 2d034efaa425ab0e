"""The draft-length contract the engine plugs, beside the Proposer contract (proposers/base.py).

The engine calls `next_k()` before each round and `observe(RoundResult)` after it (only for rounds that
asked for drafts). `next_k()` returning 0 means "decode this token plainly"; a policy that returns 0 once
and k > 0 later switches the engine between plain steps and rounds. `FixedK` is the engine's default;
tuning/ implements the others (AutoDraftPolicy) against this contract and the engine never imports it.
"""

from typing import Protocol

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

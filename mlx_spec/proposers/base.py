"""The contract between the engine and every way of proposing drafts; the engine never asks which one it has.

A round: the engine builds a `RoundContext`, asks the proposer for up to k drafts (`propose`), verifies
them in one base pass, rolls back what the base rejected and tells the proposer what happened
(`observe(RoundResult)`), the same `RoundResult` the draft policy observes.

A proposer says what it is: `name` (for stats and logs), `identity` (what its measured costs and learnt
acceptance are filed under: its kind and its weights) and `weights` (the module to keep resident next to
the base, or None). `fork()` gives a proposer for another conversation: the same weights, none of the
per-conversation state (a draft model's KV cache), so a chat or a server slot owns its own.
"""

from dataclasses import dataclass
from typing import List, Optional, Protocol

import mlx.core as mx


@dataclass(frozen=True)
class RoundResult:
    """What one round did: the proposer gave `drafted` drafts and the base kept the first `accepted`."""

    drafted: int
    accepted: int


@dataclass
class RoundContext:
    """What a proposer may read at the start of a round (after the previous round's rollback).

    history: every token so far (prompt + emitted), ending with the bonus token, which the base has
        not yet run; its position is `position` (= len(history) - 1 = the base cache's offset).
        Draft i (0-based) will sit at position `position + 1 + i`.
    hidden: the base's final-normed hidden state at the last accepted position (1, 1, H), or None when
        the base model does not expose it.
    base_cache: the base's rewindable caches, already rolled back to `position`.
    sampler: draws each draft from the proposer's logits (`sampler.draft`), so drafts use the request's
        temperature, filters, acceptance mode and position-keyed noise (sampling.py).
    """

    history: List[int]
    position: int
    hidden: Optional[mx.array]
    base_cache: list
    sampler: "object"  # sampling.Sampler


@dataclass
class Draft:
    """tokens (k,) int32, lazily computed; probs (k, V): the distribution each draft was drawn from, or
    None when drafts are deterministic (then rejection sampling treats q as one-hot)."""

    tokens: mx.array
    probs: Optional[mx.array] = None

    @property
    def k(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def empty() -> "Draft":
        return Draft(mx.zeros((0,), mx.int32))


class Proposer(Protocol):
    name: str
    identity: str
    weights: Optional[object]  # an mlx.nn.Module, or None for proposers without weights

    def start(self, prompt: List[int]) -> None:
        """A new request begins with this prompt (proposers with state bring it up to date here)."""

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        """Up to k drafts to follow ctx.history; may be fewer (even zero) when it has nothing useful."""

    def observe(self, result: RoundResult) -> None:
        """The base kept the first result.accepted of result.drafted drafts (caches roll back here)."""

    def fork(self) -> "Proposer":
        """A proposer for another conversation: shares the weights, not the per-conversation state."""

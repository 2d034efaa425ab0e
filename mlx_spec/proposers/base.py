"""The one interface every way of proposing drafts implements; the engine never asks which one it has."""

from dataclasses import dataclass
from typing import List, Optional, Protocol

import mlx.core as mx


@dataclass
class RoundContext:
    """What a proposer may read at the start of a round (after the previous round's rollback).

    history: every token so far (prompt + emitted), ending with the bonus token, which the base has
        not yet run; its position is `position` (= len(history) - 1 = the base cache's offset).
    hidden: the base's final-normed hidden state at the last accepted position (1, 1, H), or None when
        the base model does not expose it.
    base_cache: the base's rewindable caches, already rolled back to `position`.
    """

    history: List[int]
    position: int
    hidden: Optional[mx.array]
    base_cache: list
    sampling: "object"  # engine.SamplingParams
    key: Optional[mx.array] = None  # PRNG key for proposers that sample their drafts


@dataclass
class Draft:
    """tokens (k,) int32, lazily computed; probs (k, V): the distribution each draft was drawn from, or
    None when drafts are deterministic (then rejection sampling treats q as one-hot)."""

    tokens: mx.array
    probs: Optional[mx.array] = None

    @property
    def k(self) -> int:
        return self.tokens.shape[0]


class Proposer(Protocol):
    name: str

    def start(self, prompt: List[int]) -> None:
        """A new request begins with this prompt (proposers with state reset it here)."""

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        """Up to k drafts to follow ctx.history; may be fewer (even zero) when it has nothing useful."""

    def observe(self, n_accepted: int, draft_k: int) -> None:
        """The base kept the first n_accepted of draft_k drafts (proposers with caches roll back here)."""

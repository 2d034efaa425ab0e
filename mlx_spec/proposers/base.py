"""The contract between the engine and every way of proposing drafts; the engine never asks which one it has.

A round: the engine builds a `RoundContext`, asks the proposer for up to k drafts (`propose`), verifies
them in one base pass, rolls back what the base rejected and tells the proposer what happened
(`observe(RoundResult)`), the same `RoundResult` the draft policy observes.

A proposer says what it is: `name` (for stats and logs), `identity` (what its measured costs and learnt
acceptance are filed under: its kind and its weights) and `weights` (the module to keep resident next to
the base, or None). `fork()` gives a proposer for another conversation: the same weights, none of the
per-conversation state (a draft model's KV cache), so a chat or a server slot owns its own.

Base features. A proposer may read the outputs of some of the base's decoder layers (`base_layers`; block
drafters do): it is then a `FeatureReader`. The engine captures those layers in the base's own passes
(prefill chunks, plain steps, verifies; never a second pass) and hands every pass's rows to `extend`, in
order, so the reader's context cache holds one entry per position the base's cache holds; whenever the
base's cache rolls back n positions (rejected drafts, a stop inside accepted drafts, a reused prompt cache),
so does `context_cache` (cache.rollback_all). After each round's rollback the context covers exactly the
accepted history, as the base's cache does.
"""

from dataclasses import dataclass
from typing import List, Optional, Protocol, Tuple

import mlx.core as mx


@dataclass(frozen=True)
class RoundResult:
    """What one round did: the proposer gave `drafted` drafts and the base kept the first `accepted`; `tree`:
    the drafts were a tree's nodes, and `accepted` the depth of the branch the base kept."""

    drafted: int
    accepted: int
    tree: bool = False


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
    rank_logp: for a tree of sampled drafts, [d][r]: log P(a depth-d node's r-th child is the one kept), as
        this request's tree rounds measured it (trees/ranks.py); None where not used.
    """

    history: List[int]
    position: int
    hidden: Optional[mx.array]
    base_cache: list
    sampler: "object"  # sampling.Sampler
    rank_logp: Optional[List[List[float]]] = None


@dataclass
class Draft:
    """tokens (k,) int32, lazily computed; probs (k, V): the distribution each draft was drawn from, or
    None when drafts are deterministic (then rejection sampling treats q as one-hot).

    A tree (trees/): `parents` (k,) int32, node i's parent node or -1 for the round's bonus token, the nodes
    in topological order and siblings in the order they were drawn (probs[i] is then what node i was drawn
    from given its parent and its earlier siblings); `depth` and `branching` bound its deepest node's depth
    and any node's children. None: a chain, node i after node i - 1."""

    tokens: mx.array
    probs: Optional[mx.array] = None
    parents: Optional[mx.array] = None
    depth: int = 0
    branching: int = 0

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
    # decoder layers of the base whose outputs it reads (a FeatureReader); () or absent: none
    base_layers: Tuple[int, ...]

    def start(self, prompt: List[int]) -> None:
        """A new request begins with this prompt (proposers with state bring it up to date here)."""

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        """Up to k drafts to follow ctx.history; may be fewer (even zero) when it has nothing useful."""

    def observe(self, result: RoundResult) -> None:
        """The base kept the first result.accepted of result.drafted drafts (caches roll back here)."""

    def fork(self) -> "Proposer":
        """A proposer for another conversation: shares the weights, not the per-conversation state."""


class TreeProposer(Proposer, Protocol):
    """A proposer that can also draft a tree (trees/): MTP, DFlash, DSpark, n-gram."""

    def propose_tree(self, ctx: RoundContext, nodes: int, depth: int) -> Draft:
        """A tree of at most `nodes` nodes, none deeper than `depth` (a Draft with parents)."""


def most_drafts(proposer, default: int) -> int:
    """The most drafts a round can get from `proposer` (a block drafter's rows after the bonus; an optional
    `max_drafts` attribute), else `default`: what `auto` should weigh k up to."""
    cap = getattr(proposer, "max_drafts", None)
    return min(default, cap) if isinstance(cap, int) and cap > 0 else default


def grows_trees(proposer) -> bool:
    """Whether a proposer can draft trees (others draft chains only)."""
    return callable(getattr(proposer, "propose_tree", None))


class FeatureReader(Proposer, Protocol):
    """A proposer with a context of base features (see the module docstring): `base_layers` is not empty."""

    # rewindable caches (cache.py), one entry per base position: the engine rolls them back with the base's
    context_cache: list

    @property
    def context_length(self) -> int:
        """Base positions whose features the context holds (0 .. the base cache's offset)."""

    def extend(self, features: mx.array) -> None:
        """features (1, L, len(base_layers) * H_base): the outputs of `base_layers` at the next L positions
        the base ran, continuing the context (lazy: computed in the engine's graph)."""

    def reset(self) -> None:
        """Forget the context (the engine then re-runs the base from position 0)."""


def feature_layers(proposer) -> Tuple[int, ...]:
    """The base layers a proposer reads; () for one that declares none (proposers written before base
    features existed need not declare the attribute)."""
    return tuple(getattr(proposer, "base_layers", ()) or ())

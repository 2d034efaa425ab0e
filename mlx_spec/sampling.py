"""Sampling settings and the request's sampler: every random draw is a function of (seed, position).

The noise for the token at absolute position t (its index in prompt + output) comes from a key derived
from (seed, t, stream) and nothing else, so plain sampling is a pure function of (seed, position, prefix)
and the same seed gives the same text however the tokens were produced:

    token_t = argmax(scores_t + g_t)      g_t ~ Gumbel, keyed by (seed, t)        (Gumbel-max: a sample
                                                                                  from softmax(scores_t))

where scores_t are the base's logits after mlx-lm's filters and the temperature (acceptance.py). Three
ways to accept drafts when temp > 0 (`SamplingParams.acceptance`; "auto", the default, is coupled when
the caller gave a seed and rejection otherwise: a seed asks for the same text every time, and only the
coupled mode gives it whatever k auto picks; without one, rejection accepts the most):
- "coupled": the drafter draws with the same g_t (draft = argmax(drafter scores + g_t)) and a draft is kept
  while it equals the base's own token. Every emitted token is the plain sample, so output is token for
  token plain sampling with the same seed, for every proposer and k, drafting on or off.
- "rejection": Leviathan/Chen speculative sampling (exact in distribution; the drafter draws with its own
  noise; the accept/resample uniforms are keyed by position too, so a seed reproduces a run at fixed k).
- "match": token match with independent drafter noise (like mlx-lm and mlx-vlm); emitted tokens are the
  plain sample too, but drafts agree less often than when coupled. Kept for comparison.
Greedy (temp 0) needs no noise: argmax, any mode.

Knows logits, positions and seeds; nothing of models, caches or rounds.
"""

import math
import os
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import mlx.core as mx

from . import acceptance
from .errors import MlxSpecError

ACCEPTANCE_MODES = ("auto", "coupled", "rejection", "match")
DEFAULT_ACCEPTANCE = "auto"  # measured on held-out prompts: see README "Sampling and seeds"
SEED_MODULUS = 2**64  # any integer seed is taken modulo this (mx.random.key takes a uint64)

# noise streams: one per use, so that drafter, base and acceptance draws at a position are independent
BASE, DRAFT, ACCEPT, RESAMPLE = 0, 1, 2, 3
SIBLING = 4  # + r - 1: the accept uniform of a tree node's r-th child (r >= 1; the first child uses ACCEPT)
BRANCH = 64  # + w - 1: the drafter's noise for a tree's w-th frontier node's children (w >= 1; the first: DRAFT)


class SamplingError(MlxSpecError):
    """A sampling setting out of range; `field` names it (temp, top_p, top_k, min_p, acceptance, seed)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class SamplingParams:
    """How the base's next token is chosen; the one form every surface builds and passes around."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    acceptance: str = DEFAULT_ACCEPTANCE

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def validate(self) -> "SamplingParams":
        """Return self, or raise SamplingError naming the setting (NaN and infinities are refused too)."""
        def number(name, value, ok, expect):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise SamplingError(name, f"must be {expect}, got {value!r}")

        number("temp", self.temp, lambda v: v >= 0, "a finite number >= 0 (0 = greedy)")
        number("top_p", self.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
        number("min_p", self.min_p, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if self.acceptance not in ACCEPTANCE_MODES:
            raise SamplingError("acceptance", f"must be one of {', '.join(ACCEPTANCE_MODES)}, got {self.acceptance!r}")
        return self

    def with_temp(self, temp: float) -> "SamplingParams":
        return replace(self, temp=temp).validate()


def check_seed(seed) -> int:
    """An integer seed, mapped into [0, 2**64); anything else raises SamplingError."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SamplingError("seed", f"must be an integer, got {seed!r}")
    return seed % SEED_MODULUS


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


def _mix(x: int) -> int:
    """splitmix64's finalizer: nearby (seed, position) pairs give unrelated keys."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class Sampler:
    """One request's draws. Built by the engine; proposers reach it through `RoundContext.sampler`."""

    def __init__(self, params: SamplingParams, seed: Optional[int] = None):
        """seed None: a fresh random one (and, in the "auto" mode, rejection sampling)."""
        self.params = params
        self.seed = check_seed(seed) if seed is not None else random_seed()
        self.mode = params.acceptance
        if self.mode == "auto":
            self.mode = "coupled" if seed is not None else "rejection"

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    # -- noise
    def key(self, position: int, stream: int) -> mx.array:
        return mx.random.key(_mix(_mix(self.seed ^ _mix(position)) + stream))

    def gumbel(self, positions: Sequence[int], vocab: int, stream: int) -> mx.array:
        """(len(positions), V) Gumbel noise, row i keyed by positions[i] alone."""
        return mx.stack([mx.random.gumbel(shape=(vocab,), key=self.key(t, stream)) for t in positions])

    def uniforms(self, positions: Sequence[int], stream: int) -> mx.array:
        """(len(positions),) uniforms in [0, 1), entry i keyed by positions[i] alone."""
        if not positions:
            return mx.zeros((0,), mx.float32)
        return mx.concatenate([mx.random.uniform(shape=(1,), key=self.key(t, stream)) for t in positions])

    # -- distributions
    def scores(self, logits: mx.array) -> mx.array:
        """Filtered, tempered log-probabilities (..., V) float32; filtered tokens are -inf."""
        p = self.params
        return acceptance.scores_from_logits(logits, p.temp, p.top_p, p.top_k, p.min_p)

    def probs(self, logits: mx.array) -> mx.array:
        p = self.params
        return acceptance.probs_from_logits(logits, p.temp, p.top_p, p.top_k, p.min_p)

    # -- the base's tokens
    def sample(self, logits: mx.array, positions: Sequence[int]) -> mx.array:
        """The base's token at each position (R,) int32 from its logits (R, V): the plain sample."""
        if self.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        noise = self.gumbel(positions, logits.shape[-1], BASE)
        return mx.argmax(self.scores(logits) + noise, axis=-1).astype(mx.int32)

    # -- a proposer's drafts
    def draft(self, logits: mx.array, position: int) -> Tuple[mx.array, Optional[mx.array]]:
        """(token (1,) int32, q (V,) or None) for a draft at `position` from the drafter's logits (V,).
        q is returned only where rejection sampling needs it."""
        if self.greedy:
            return mx.argmax(logits).astype(mx.int32).reshape(1), None
        stream = BASE if self.mode == "coupled" else DRAFT  # coupled: the base's own noise at that position
        scores = self.scores(logits)
        token = mx.argmax(scores + self.gumbel([position], logits.shape[-1], stream)[0]).astype(mx.int32).reshape(1)
        # q must be the normalized distribution the draft was drawn from: scores are log-probabilities only up
        # to a constant (tempered and filtered, not renormalized), so exp(scores) would inflate or shrink q
        return token, (mx.softmax(scores) if self.mode == "rejection" else None)

    # -- verification
    def accept(self, drafts: mx.array, draft_probs: Optional[mx.array], logits: mx.array,
               position: int) -> Tuple[mx.array, mx.array]:
        """(n accepted, next token) for drafts (k,) at positions position+1.., from the base's k+1 rows of
        (processed) logits (k+1, V); row i predicts position + 1 + i. Rows past k+1 (strict mode's padding,
        so the sampling runs at a fixed row count) are computed and ignored."""
        k = drafts.shape[0]
        positions = list(range(position + 1, position + k + 2))
        positions += [positions[-1]] * (logits.shape[0] - k - 1)
        if self.greedy or self.mode in ("coupled", "match"):
            return acceptance.token_match_accept(drafts, self.sample(logits, positions)[: k + 1])
        p = self.probs(logits)[: k + 1]  # (k+1, V)
        q = draft_probs
        if q is None:  # deterministic drafts: q is one-hot on the draft
            q = (mx.arange(p.shape[-1]) == drafts[:, None]).astype(mx.float32)
        return acceptance.rejection_accept(drafts, q, p, self.uniforms(positions[:k], ACCEPT),
                                           self.uniforms(positions[: k + 1], RESAMPLE))

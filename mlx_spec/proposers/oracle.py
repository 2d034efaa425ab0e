"""For benchmarking only: drafts that are the known plain continuation, corrupted at a set rate.

With corruption rate r every draft is accepted with probability 1 - r, independently of its position, and
drafting costs next to nothing, so a run with this proposer measures the engine alone: how close its
speedup comes to τ / verify cost (mlx_spec.bench reports that ratio as efficiency). Greedy only: at
temp > 0 the run leaves the reference and the oracle then proposes nothing.
"""

from typing import Sequence

import mlx.core as mx
import numpy as np

from .base import Draft, RoundContext, RoundResult


class OracleProposer:
    name = "oracle"
    base_layers = ()  # reads no decoder-layer outputs of the base
    weights = None

    def __init__(self, reference: Sequence[int], rate: float = 0.0, vocab_size: int = 256, seed: int = 0):
        """reference: prompt + plain continuation (token ids); rate: chance that a draft is corrupted."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"the oracle's corruption rate must be in [0, 1], got {rate}")
        self.reference = [int(t) for t in reference]
        self.rate = rate
        self.identity = f"oracle:{rate:g}"  # each rate is its own proposer for what auto learns
        # Which positions are corrupted is fixed up front, so repeats and every k see the same drafts.
        rng = np.random.default_rng(seed)
        bad = rng.random(len(self.reference)) < rate
        shift = rng.integers(1, max(vocab_size, 2), size=len(self.reference))
        self.drafts = [(t + int(s)) % vocab_size if b else t for t, b, s in zip(self.reference, bad, shift)]

    def start(self, prompt) -> None:
        pass

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        p = len(ctx.history)  # the first draft continues history
        if p > len(self.reference) or ctx.history[-1] != self.reference[p - 1]:
            return Draft.empty()  # off the reference (sampling): nothing known to offer
        return Draft(mx.array(self.drafts[p : p + k], mx.int32))

    def observe(self, result: RoundResult) -> None:
        pass

    def fork(self) -> "OracleProposer":
        return self

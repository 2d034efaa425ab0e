"""The cost model: how many drafts per round pay off, given measured costs and acceptance (pure).

A round drafts k tokens and verifies them in one (k+1)-token base pass. With α_i the chance that draft i
is accepted given drafts 1..i-1 were, it emits on average

    τ(k) = 1 + Σ_{i=1..k} Π_{j≤i} α_j              tokens, and costs
    R(k) = verify[k] + draft[k]                     plain decode steps,

so its expected speedup over plain decoding is S(k) = τ(k) / R(k), and plain decoding is S(0) = 1.
Knows numbers only: nothing of models, clocks or files.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

K_MAX = 8  # the largest k the policy considers (and the probe measures)
MIN_SPEEDUP = 1.02  # expected speedup needed to draft; a tie goes to plain decoding, which pipelines
CALIBRATE_EVERY = 32  # drafted rounds in a row after which a few plain steps re-measure a plain step here
# ... stretched (doubling per calibration, up to CALIBRATE_MAX_EVERY) while the expected speedup clears 1 by
# a wide margin: the re-timing scales every R(k) alike, so it can change only the draft-or-not verdict, and
# 4 plain steps in 32 rounds cost a drafter at 3.7x (tau 6.3) about 7% of its speed. The interval at
# speedup S is at most CALIBRATE_EVERY * (S - 1) / CALIBRATION_MARGIN: it shrinks back with the margin.
CALIBRATE_MAX_EVERY = 256
CALIBRATION_MARGIN = 0.25


@dataclass
class Costs:
    """Measured costs in units of one plain decode step (pipelined, as the engine's plain loop runs it).

    verify[k]: one (k+1)-token base pass with its acceptance and host sync, k = 0..K_MAX (up to the largest
        tree budget when trees were measured: verify cost by row count).
    draft_fixed + draft_step * k: proposing k drafts (0 for k = 0).
    tree[n]: a whole round with a tree of n nodes (its drafting, verify pass, acceptance and host sync), for
        the budgets measured (tuning/trees.py); empty when trees were not measured.
    """

    verify: List[float]
    draft_fixed: float = 0.0
    draft_step: float = 0.0
    plain_step_s: float = 0.0  # seconds, for information: the ratios are what transfers between runs
    tree: Dict[int, float] = dataclasses.field(default_factory=dict)

    @property
    def k_max(self) -> int:
        return len(self.verify) - 1

    def draft(self, k: int) -> float:
        return self.draft_fixed + self.draft_step * k if k > 0 else 0.0

    def round_cost(self, k: int) -> float:
        """R(k) in plain steps; R(0) is a plain step (the engine runs k = 0 as plain decoding)."""
        return self.verify[k] + self.draft(k) if k > 0 else 1.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Costs":
        return cls([float(v) for v in d["verify"]], float(d.get("draft_fixed", 0.0)),
                   float(d.get("draft_step", 0.0)), float(d.get("plain_step_s", 0.0)),
                   {int(n): float(v) for n, v in (d.get("tree") or {}).items()})


def expected_tokens(alphas: Sequence[float], k: int) -> float:
    """τ(k) = 1 + Σ_{i=1..k} Π_{j≤i} α_j for conditional per-position acceptance α."""
    tau, survive = 1.0, 1.0
    for a in alphas[:k]:
        survive *= a
        tau += survive
    return tau


def expected_speedup(alphas: Sequence[float], costs: Costs, k: int, empty_rate: float = 0.0,
                     overhead: float = 1.0) -> float:
    """S(k) = τ(k) / R(k). A proposer that offers nothing in a fraction `empty_rate` of rounds (n-gram
    lookup with no match) gets a 1-token round for the price of a 1-token verify plus its lookup.
    `overhead` scales R(k): measured round time / predicted, as the policy observes it."""
    if k == 0:
        return 1.0
    e = empty_rate
    tokens = e * 1.0 + (1 - e) * expected_tokens(alphas, k)
    cost = costs.draft(k) + e * costs.verify[0] + (1 - e) * costs.verify[k]
    return tokens / (cost * overhead)


def best_k(alphas: Sequence[float], costs: Costs, *, k_max: Optional[int] = None, empty_rate: float = 0.0,
           min_speedup: float = MIN_SPEEDUP, min_k: int = 0, overhead: float = 1.0) -> Tuple[int, float]:
    """(k, S(k)) maximising the expected speedup over k = min_k..k_max; k = 0 unless some k ≥ 1 reaches
    `min_speedup` (only when min_k = 0)."""
    k_max = min(costs.k_max, len(alphas), k_max if k_max is not None else K_MAX)
    scored = [(expected_speedup(alphas, costs, k, empty_rate, overhead), k)
              for k in range(max(1, min_k), k_max + 1)]
    s, k = max(scored) if scored else (1.0, 0)
    if min_k == 0 and s < min_speedup:
        return 0, 1.0
    return k, s


def calibration_interval(interval: int, expected_speedup: float) -> int:
    """Drafted rounds between plain-step re-timings: `interval`, but no longer than the margin of the expected
    speedup over plain decoding allows (CALIBRATE_EVERY when the verdict is close)."""
    by_margin = CALIBRATE_EVERY * max(1.0, (expected_speedup - 1.0) / CALIBRATION_MARGIN)
    return int(min(interval, by_margin, CALIBRATE_MAX_EVERY))


def can_ever_pay(costs: Costs, min_speedup: float = MIN_SPEEDUP) -> bool:
    """Whether some k would beat plain decoding even if every draft were accepted."""
    return any((k + 1) / costs.round_cost(k) >= min_speedup for k in range(1, costs.k_max + 1))


def isotonic(values: Sequence[float]) -> List[float]:
    """Least-squares non-decreasing fit (pool adjacent violators): a (k+1)-token pass costs at least a
    k-token one, so a dip in the measurements is noise."""
    blocks = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(w)]


def fit_line(ks: Sequence[int], values: Sequence[float]) -> Tuple[float, float]:
    """(intercept, slope), both clamped at 0, least squares."""
    if len(ks) < 2:
        return 0.0, max(0.0, values[0] / ks[0]) if ks else 0.0
    slope, intercept = np.polyfit(np.asarray(ks, float), np.asarray(values, float), 1)
    slope = max(0.0, float(slope))
    intercept = max(0.0, float(np.mean(values) - slope * np.mean(ks)))
    return intercept, slope

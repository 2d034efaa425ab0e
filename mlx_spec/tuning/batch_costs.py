"""The cost model of a batched round (pure): what B rows, row b drafting k_b, emit and cost.

Costs by width B, in units of one plain batched step at the same B (a round of B rows without drafts, as
batch/engine.py runs it; `WidthCosts`):

    verify[k]                      a round whose longest row has k drafts (one (B, k+1) base pass);
    draft_fixed + draft_step * k   drafting k: once for all the rows a proposer drafts together (an MTP
                                   drafter: one pass per step for every row), or per drafting row
                                   (`per_row`: n-gram, a draft model, block drafters).

Row b's expected tokens are its own τ_b(k_b) (its acceptance estimate; 1 when it drafts nothing), so a round
emits N = Σ_b τ_b(k_b) for T = verify[max k_b] + drafting (T = 1 when no row drafts) and the batch policy
maximises N / T: aggregate tokens per plain batched step. Rows whose drafting costs their own time (per-row
proposers) draft only where their gain pays for it; rows of one batched drafter draft together or not at all.

Knows numbers only: nothing of models, clocks, files or rows' engines.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

from .costs import K_MAX, MIN_SPEEDUP, expected_tokens


@dataclass
class WidthCosts:
    """One width's measured costs, in plain batched steps at that width (see the module docstring)."""

    verify: List[float]
    draft_fixed: float = 0.0
    draft_step: float = 0.0
    per_row: bool = False  # draft costs are per drafting row (else once for all the rows it drafts)
    plain_step_s: float = 0.0  # seconds of a plain batched step when measured: converts measured round times

    def draft(self, k: int) -> float:
        return self.draft_fixed + self.draft_step * k if k > 0 else 0.0

    def verify_at(self, k: int) -> float:
        """verify[k]; past the measured k (a fixed row asking for more than K_MAX), extrapolated linearly."""
        v = self.verify
        if k < len(v):
            return v[k]
        slope = v[-1] - v[-2] if len(v) > 1 else 0.0
        return v[-1] + slope * (k - len(v) + 1)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "WidthCosts":
        return cls([float(v) for v in d["verify"]], float(d.get("draft_fixed", 0.0)), float(d.get("draft_step", 0.0)),
                   bool(d.get("per_row", False)), float(d.get("plain_step_s", 0.0)))


def at_width(table: Mapping[int, WidthCosts], rows: int) -> Optional[WidthCosts]:
    """The costs at `rows`: measured, else interpolated linearly between the nearest measured widths (the
    nearest one's beyond them); None when nothing is measured."""
    if rows in table:
        return table[rows]
    if not table:
        return None
    below = max((b for b in table if b < rows), default=None)
    above = min((b for b in table if b > rows), default=None)
    if below is None or above is None:
        return table[below if above is None else above]
    lo, hi, t = table[below], table[above], (rows - below) / (above - below)
    mix = lambda a, b: a + t * (b - a)  # noqa: E731
    n = min(len(lo.verify), len(hi.verify))
    return WidthCosts([mix(a, b) for a, b in zip(lo.verify[:n], hi.verify[:n])], mix(lo.draft_fixed, hi.draft_fixed),
                      mix(lo.draft_step, hi.draft_step), lo.per_row, mix(lo.plain_step_s, hi.plain_step_s))


@dataclass
class RowView:
    """What the policy knows of one row this round.

    fixed: the row's own k (a fixed --num-draft-tokens, or 0 for a row without a proposer); None for an auto
    row, whose k the batch policy chooses up to `cap` (its budget: max tokens, a K/V switch).
    forced: an auto row due for a probe (auto-off re-checks its acceptance): it drafts at least one.
    drafter: whose drafting costs it shares (a key of the costs' `drafting`); None: drafting costs nothing
    the policy knows of."""

    alphas: Sequence[float] = ()
    empty_rate: float = 0.0
    cap: int = 0
    fixed: Optional[int] = None
    forced: bool = False
    drafter: Optional[Hashable] = None


@dataclass
class Plan:
    """Each row's k, and the expected aggregate tokens per plain batched step of that plan and of the plan
    without auto rows drafting (`baseline`; plain batching when no row has a fixed k)."""

    ks: List[int]
    rate: float
    baseline: float

    @property
    def speedup(self) -> float:
        return self.rate / self.baseline


def row_tokens(row: RowView, k: int) -> float:
    """Expected tokens the row emits drafting k: its τ(k), or 1 in a round its proposer offers nothing."""
    if k <= 0:
        return 1.0
    e = row.empty_rate
    return e + (1.0 - e) * expected_tokens(row.alphas, k)


def _tokens_by_k(row: RowView, k_max: int) -> List[float]:
    """row_tokens(row, k) for k = 0..k_max, in one pass."""
    out, tau, survive = [1.0], 1.0, 1.0
    for k in range(1, k_max + 1):
        if k <= len(row.alphas):
            survive *= row.alphas[k - 1]
            tau += survive
        out.append(row.empty_rate + (1.0 - row.empty_rate) * tau)
    return out


class _Cost:
    """A round's cost as rows are added to it: the longest draft, per-row drafting, shared drafting."""

    def __init__(self, verify: WidthCosts, drafting: Mapping[Hashable, WidthCosts]):
        self.verify, self.drafting = verify, drafting
        self.top, self.per_row, self.together = 0, 0.0, {}

    def copy(self) -> "_Cost":
        out = _Cost(self.verify, self.drafting)
        out.top, out.per_row, out.together = self.top, self.per_row, dict(self.together)
        return out

    def add(self, row: RowView, k: int) -> None:
        if k <= 0:
            return
        self.top = max(self.top, k)
        d = self.drafting.get(row.drafter) if row.drafter is not None else None
        if d is None:
            return
        if d.per_row:
            self.per_row += d.draft(k)
        else:
            self.together[row.drafter] = max(self.together.get(row.drafter, 0), k)

    def total(self, overhead: float) -> float:
        if self.top <= 0:
            return 1.0
        shared = sum(self.drafting[key].draft(k) for key, k in self.together.items())
        return (self.verify.verify_at(self.top) + self.per_row + shared) * overhead


def round_cost(rows: Sequence[RowView], ks: Sequence[int], verify: WidthCosts,
               drafting: Mapping[Hashable, WidthCosts], overhead: float = 1.0) -> float:
    """T in plain batched steps; `overhead` (measured / modelled round time) scales rounds that draft."""
    cost = _Cost(verify, drafting)
    for row, k in zip(rows, ks):
        cost.add(row, k)
    return cost.total(overhead)


def round_rate(rows: Sequence[RowView], ks: Sequence[int], verify: WidthCosts,
               drafting: Mapping[Hashable, WidthCosts], overhead: float = 1.0) -> float:
    return sum(row_tokens(r, k) for r, k in zip(rows, ks)) / round_cost(rows, ks, verify, drafting, overhead)


def _baseline(rows: Sequence[RowView], verify: WidthCosts, drafting) -> Tuple[List[int], _Cost, float]:
    """The rounds' part without auto rows drafting: each row's k, its cost, its tokens."""
    base = [r.fixed if r.fixed is not None else 0 for r in rows]
    cost = _Cost(verify, drafting)
    for row, k in zip(rows, base):
        cost.add(row, k)
    return base, cost, sum(row_tokens(r, k) for r, k in zip(rows, base))


def choose_round(rows: Sequence[RowView], verify: WidthCosts, drafting: Mapping[Hashable, WidthCosts], *,
                 k_max: int = K_MAX, overhead: float = 1.0, min_speedup: float = MIN_SPEEDUP) -> Plan:
    """The plan maximising expected aggregate tokens per plain batched step: the auto rows' common K
    (each drafts min(K, cap)), and which of them draft at all. Without a forced row, drafting must beat the
    baseline by `min_speedup` (a tie goes to the plain step)."""
    base, base_cost, base_tokens = _baseline(rows, verify, drafting)
    baseline = base_tokens / base_cost.total(overhead)
    auto = [b for b, r in enumerate(rows) if r.fixed is None and r.cap > 0]
    forced = [b for b in auto if rows[b].forced]
    units = _units(rows, [b for b in auto if not rows[b].forced], drafting)
    charged = {rows[b].drafter for b, k in enumerate(base) if k > 0} | {rows[b].drafter for b in forced}
    tokens = {b: _tokens_by_k(rows[b], k_max) for b in auto}
    best: Optional[Plan] = None
    for K in range(1, k_max + 1) if auto else ():
        ks, cost, n = list(base), base_cost.copy(), base_tokens
        for b in forced:
            ks[b] = k = min(K, rows[b].cap)
            n += tokens[b][k] - 1.0
            cost.add(rows[b], k)
        candidates = [(n / cost.total(overhead), list(ks))] if forced else []
        for unit in sorted((_Unit(rows, m, K, tokens, drafting, charged) for m in units), key=lambda u: u.ratio,
                           reverse=True):
            for b, k in zip(unit.members, unit.ks):
                ks[b] = k
            n += unit.gain
            unit.add_to(cost)
            candidates.append((n / cost.total(overhead), list(ks)))
        for rate, plan in candidates:
            if best is None or rate > best.rate:
                best = Plan(plan, rate, baseline)
    if best is None or (not forced and best.rate < min_speedup * baseline):
        return Plan(base, baseline, baseline)
    return best


def can_pay(rows: Sequence[RowView], verify: WidthCosts, drafting: Mapping[Hashable, WidthCosts], *,
            k_max: int = K_MAX, overhead: float = 1.0, min_speedup: float = MIN_SPEEDUP) -> bool:
    """Whether some K would beat the baseline if every auto row drafted min(K, cap) and every draft were
    accepted: where not, acceptance cannot make drafting pay at this width (no probe can change that)."""
    base, base_cost, base_tokens = _baseline(rows, verify, drafting)
    auto = [b for b, r in enumerate(rows) if r.fixed is None and r.cap > 0]
    for K in range(1, k_max + 1) if auto else ():
        cost, n = base_cost.copy(), base_tokens
        for b in auto:
            k = min(K, rows[b].cap)
            n += k
            cost.add(rows[b], k)
        if n / cost.total(overhead) >= min_speedup * base_tokens / base_cost.total(overhead):
            return True
    return False


def _units(rows: Sequence[RowView], free: List[int], drafting) -> List[List[int]]:
    """The free auto rows as the units that join a round's drafting: a row of a per-row proposer alone, the
    rows of a proposer that drafts them together as one."""
    units: Dict[Hashable, List[int]] = {}
    for b in free:
        d = drafting.get(rows[b].drafter)
        units.setdefault(b if d is None or d.per_row else ("together", rows[b].drafter), []).append(b)
    return list(units.values())


class _Unit:
    """Rows that join a round's drafting together at K: their ks, expected extra tokens, what they add to
    the round's cost, and gain per cost (infinite where they add no drafting: a shared drafter that runs
    anyway for other rows). Units join best first."""

    def __init__(self, rows, members: List[int], K: int, tokens, drafting, charged):
        self.members, self.ks = members, [min(K, rows[b].cap) for b in members]
        self.gain = sum(tokens[b][k] - 1.0 for b, k in zip(members, self.ks))
        self.top, self.drafter = max(self.ks), rows[members[0]].drafter
        d = drafting.get(self.drafter)
        self.per_row = d is not None and d.per_row
        self.cost = 0.0 if d is None else sum(d.draft(k) for k in self.ks) if self.per_row else d.draft(self.top)
        free = d is None or (not self.per_row and self.drafter in charged)
        self.ratio = float("inf") if free or self.cost <= 0 else self.gain / self.cost

    def add_to(self, cost: _Cost) -> None:
        cost.top = max(cost.top, self.top)
        if self.per_row:
            cost.per_row += self.cost
        elif self.drafter in cost.drafting:
            cost.together[self.drafter] = max(cost.together.get(self.drafter, 0), self.top)

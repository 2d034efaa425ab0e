"""What the parity probe found, as data (dataclasses a strict engine or a JSON file can read) and as text."""

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from ..errors import MlxSpecError

# The order in which a decoder layer first uses each kind: the first row-dependent one is where a verify
# row starts to differ from a step.
OP_ORDER = ("rms_norm", "matmul", "quantized_matmul", "rope", "attention", "moe", "softmax")


class ParityError(MlxSpecError):
    """The probe was asked for something it cannot measure (a bad k, too few tokens)."""


@dataclass
class Flip:
    """A verify row whose top-1 token differs from the step's at the same position."""

    position: int  # absolute position of the row (its logits choose the token at position + 1)
    row: int  # index in the verify pass (0: the bonus token's row)
    step_token: int
    verify_token: int
    margin: float  # the step's top-1 minus top-2 logit: how near a tie it was


@dataclass
class RowParity:
    """Verify rows at one k (padded or not) against one-token steps."""

    k: int
    rows: int  # verify rows compared
    bitwise_rows: int  # rows whose logits equal the step's bit for bit
    max_abs_diff: float
    flips: List[Flip] = field(default_factory=list)

    @property
    def bitwise(self) -> bool:
        return self.bitwise_rows == self.rows

    @property
    def bitwise_fraction(self) -> float:
        return self.bitwise_rows / self.rows if self.rows else 1.0

    @property
    def flips_per_1000(self) -> float:
        return 1000.0 * len(self.flips) / self.rows if self.rows else 0.0


@dataclass
class OpCheck:
    """One op at one of the model's shapes: its rows computed in a multi-row call vs one row at a time."""

    kind: str  # one of OP_ORDER
    shape: str
    dtype: str
    differs_at: List[int]  # row counts (k+1) at which some row was not bitwise equal to the 1-row call
    max_abs_diff: float

    @property
    def row_invariant(self) -> bool:
        return not self.differs_at


@dataclass
class StrictCost:
    """Median seconds of unpadded and padded (to `rows`) decode passes at the end of the trace."""

    rows: int
    plain_step_s: float
    padded_step_s: float
    verify_s: Dict[int, float]  # k -> (k+1)-row verify
    padded_verify_s: Dict[int, float]  # k -> the same rows padded to `rows`

    @property
    def plain_ratio(self) -> float:
        return self.padded_step_s / self.plain_step_s

    def verify_ratio(self, k: int) -> float:
        return self.padded_verify_s[k] / self.verify_s[k]


@dataclass
class ParityResult:
    device: str
    mlx_version: str
    model: str
    dtype: str
    quantization: str  # "unquantized", "4-bit g64", "mixed: 4-bit g64, 8-bit g64"
    sliding_window: Optional[int]
    context: int  # prompt tokens (the first verify row's position + 1)
    tokens: int  # positions compared per k
    trace: str  # "greedy" or "random" continuation
    unpadded: List[RowParity]
    ops: List[OpCheck]
    padded_rows: Optional[int] = None  # strict mode's row count M (max k + 1), when measured
    padded: Optional[List[RowParity]] = None
    cost: Optional[StrictCost] = None
    seconds: float = 0.0

    @property
    def row_invariant(self) -> bool:
        """True when every verify row equalled its step bit for bit and no op depends on the row count: a
        strict engine need not pad on this device."""
        return all(p.bitwise for p in self.unpadded) and all(o.row_invariant for o in self.ops)

    @property
    def strict_exact(self) -> Optional[bool]:
        """Whether padded verify rows equalled padded steps bit for bit (None: not measured)."""
        return None if self.padded is None else all(p.bitwise for p in self.padded)

    @property
    def row_dependent_ops(self) -> List[str]:
        kinds = {o.kind for o in self.ops if not o.row_invariant}
        return [k for k in OP_ORDER if k in kinds]

    @property
    def first_differing_op(self) -> Optional[str]:
        ops = self.row_dependent_ops
        return ops[0] if ops else None

    @property
    def verdict(self) -> str:
        if self.row_invariant:
            return ("byte-identical: on this device a verify row is computed exactly as a one-token step, so "
                    "speculative greedy output equals plain greedy output (--strict costs nothing here: it "
                    "does not pad)")
        if self.strict_exact:
            return ("byte-identical only with --strict: verify rows differ from one-token steps here; padding "
                    f"every decode pass to {self.padded_rows} rows makes them equal")
        if self.strict_exact is None:
            return "not byte-identical without --strict (padding not measured: run with --padding on)"
        return ("not byte-identical, even padded: rows still differ with every pass at one row count; only "
                "tie-aware exactness holds (a divergence only where the top-2 margin is tiny)")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("unpadded", "padded"):
            for p, src in zip(d[key] or [], getattr(self, key) or []):
                p.update(bitwise=src.bitwise, bitwise_fraction=src.bitwise_fraction,
                         flips_per_1000=src.flips_per_1000)
        for o, src in zip(d["ops"], self.ops):
            o["row_invariant"] = src.row_invariant
        if self.cost is not None:
            d["cost"].update(plain_ratio=self.cost.plain_ratio,
                             verify_ratio={k: self.cost.verify_ratio(k) for k in self.cost.verify_s})
        d.update(row_invariant=self.row_invariant, strict_exact=self.strict_exact,
                 row_dependent_ops=self.row_dependent_ops, first_differing_op=self.first_differing_op,
                 verdict=self.verdict)
        return d

    def report(self) -> str:
        window = f", sliding window {self.sliding_window}" if self.sliding_window else ""
        lines = [
            f"model   {self.model} ({self.dtype}, {self.quantization})",
            f"device  {self.device}, mlx {self.mlx_version}",
            f"trace   {self.context}-token pseudo-random prompt + {self.tokens} {self.trace} tokens{window}",
            "",
            "verify rows vs one-token steps at the same position",
            *_parity_table(self.unpadded),
            "",
            "ops at the model's shapes, a multi-row call vs one row at a time (bitwise)",
            *_ops_table(self.ops),
            f"first differing op: {self.first_differing_op or 'none'}",
        ]
        if self.padded is not None:
            lines += ["", f"strict: every decode pass padded to {self.padded_rows} rows (steps and verifies)",
                      *_parity_table(self.padded)]
        if self.cost is not None:
            c = self.cost
            ks = ", ".join(f"k={k} {c.verify_ratio(k):.2f}x" for k in sorted(c.verify_s))
            lines += ["", f"padding cost: a plain step padded to {c.rows} rows takes {c.plain_ratio:.2f}x an "
                      f"unpadded one ({c.padded_step_s * 1e3:.2f} vs {c.plain_step_s * 1e3:.2f} ms); "
                      f"a verify padded to {c.rows} rows: {ks}"]
        lines += ["", f"verdict: {self.verdict}", f"row_invariant: {str(self.row_invariant).lower()}"]
        return "\n".join(lines)


def _parity_table(rows: List[RowParity]) -> List[str]:
    out = [f"  {'k':>2}  {'rows':>5}  {'bitwise equal':>13}  {'max |diff|':>10}  {'top-1 flips/1000':>16}  "
           "margins at flips"]
    for p in rows:
        margins = ", ".join(f"{f.margin:.2g}" for f in p.flips[:6]) + (" ..." if len(p.flips) > 6 else "")
        out.append(f"  {p.k:>2}  {p.rows:>5}  {p.bitwise_fraction:>13.1%}  {p.max_abs_diff:>10.3g}  "
                   f"{p.flips_per_1000:>16.2f}  {margins or '-'}")
    return out


def _ops_table(ops: List[OpCheck]) -> List[str]:
    """One line per (kind, dtype); the shapes that depend on the row count are named."""
    groups: Dict[tuple, List[OpCheck]] = {}
    for o in ops:
        groups.setdefault((o.kind, o.dtype), []).append(o)
    out = [f"  {'op':<16}  {'dtype':<8}  {'shapes':>6}  row-count dependent"]
    for (kind, dtype), checks in groups.items():
        bad = [o for o in checks if not o.row_invariant]
        dep = "; ".join(f"{o.shape} at {','.join(map(str, o.differs_at))} rows (max |diff| {o.max_abs_diff:.3g})"
                        for o in bad)
        out.append(f"  {kind:<16}  {dtype:<8}  {len(checks):>6}  {'yes: ' + dep if bad else 'no'}")
    return out


# --- the trace ---------------------------------------------------------------------------------------

Forward = Callable[[mx.array, list], tuple]

"""The parity probe: does a (k+1)-row verify pass give, row for row, the logits of one-token steps?

One trace (a pseudo-random prompt that reaches past the sliding window, then `tokens` greedy tokens) is
teacher-forced on the current device two ways: plain decoding, one-token steps (the reference); and the
engine's verify rounds, [bonus, d1..dk] in one base pass on the rewindable cache followed by a rollback of
the rejected tail, with an accept count that cycles through 0..k, so rows at every index and K/V written by
multi-row passes both enter. Each verify row is compared with the step at the same position: bit for bit,
max |diff|, and top-1 flips with the step's top-2 margin. Then each kind of op the model uses runs at the
model's shapes and dtypes with 1 row and with k+1 rows, to name the ops whose result depends on the row
count; and, padded (strict mode: every decode pass at one row count), the comparison again, with its cost.

Knows base forwards and rewindable caches (the engine's helpers); nothing of proposers, sampling or text.
"""

import time
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import FullKVCache, SlidingKVCache, rollback_all
from ..engine import MAX_DRAFT_TOKENS, base_forward, make_base_cache
from ..errors import MlxSpecError
from .strict import padded_forward

DEFAULT_KS = (1, 2, 4, 8)
DEFAULT_TOKENS = 256
PAST_WINDOW = 32  # the default prompt is this much longer than the sliding window
DEFAULT_CONTEXT_NO_WINDOW = 64
PREFILL_STEP = 2048  # the engine's chunk
DEFAULT_COST_REPS = 10
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


def _bits(x: mx.array) -> mx.array:
    return x.view(mx.uint32 if x.dtype.size == 4 else mx.uint16)


def _prefill(forward: Forward, cache: list, tokens: List[int]) -> None:
    """Run tokens into the cache in the engine's chunks."""
    for s in range(0, len(tokens), PREFILL_STEP):
        forward(mx.array(tokens[s : s + PREFILL_STEP], mx.int32)[None], cache)
        mx.eval([(c.keys, c.values) for c in cache])


def _pass(forward: Forward, tokens: List[int], cache: list, rows: Optional[int]) -> mx.array:
    """Logits (L, V) of one decode pass, padded to `rows` when given."""
    x = mx.array(tokens, mx.int32)[None]
    logits, _ = padded_forward(forward, x, cache, rows) if rows else forward(x, cache)
    return logits[0]


def _steps(forward: Forward, make_cache, trace: List[int], context: int, tokens: int, greedy: bool,
           rows: Optional[int]) -> List[mx.array]:
    """Plain decoding through the trace: logits (V,) at positions context-1 .. context+tokens-2. A greedy
    trace grows here (trace holds the prompt only on entry)."""
    cache = make_cache()
    _prefill(forward, cache, trace[: context - 1])
    out = []
    for j in range(context - 1, context - 1 + tokens):
        logits = _pass(forward, [trace[j]], cache, rows)[0]
        mx.eval(logits)
        out.append(logits)
        if greedy and len(trace) == j + 1:
            trace.append(int(mx.argmax(logits).item()))
    return out


def _verify_rounds(forward: Forward, make_cache, trace: List[int], context: int, reference: List[mx.array],
                   k: int, rows: Optional[int]) -> RowParity:
    """The engine's rounds through the trace, each row compared with the reference step at its position."""
    cache = make_cache()
    _prefill(forward, cache, trace[: context - 1])
    first, last = context - 1, context - 2 + len(reference)  # positions that have a reference
    result = RowParity(k=k, rows=0, bitwise_rows=0, max_abs_diff=0.0)
    p, r = first, 0
    while p <= last:
        kk = min(k, last - p)
        verify = _pass(forward, trace[p : p + kk + 1], cache, rows)  # (kk+1, V)
        ref = mx.stack(reference[p - first : p - first + kk + 1])  # (kk+1, V)
        equal = mx.all(_bits(verify) == _bits(ref), axis=-1)
        diff = mx.max(mx.abs(verify.astype(mx.float32) - ref.astype(mx.float32)))
        top2 = mx.topk(ref.astype(mx.float32), 2, axis=-1)  # (kk+1, 2), unordered
        margin = mx.max(top2, axis=-1) - mx.min(top2, axis=-1)
        v_tok, r_tok = mx.argmax(verify, axis=-1), mx.argmax(ref, axis=-1)
        equal, diff, margin, v_tok, r_tok = (a.tolist() for a in (equal, diff, margin, v_tok, r_tok))
        result.rows += kk + 1
        result.bitwise_rows += sum(equal)
        result.max_abs_diff = max(result.max_abs_diff, diff)
        result.flips += [Flip(p + i, i, r_tok[i], v_tok[i], margin[i]) for i in range(kk + 1) if v_tok[i] != r_tok[i]]
        n = r % (kk + 1)  # accepted drafts this round: every count from 0 (reject all) to kk (accept all)
        rollback_all(cache, kk - n)
        p, r = p + n + 1, r + 1
    return result


# --- ops at the model's shapes -------------------------------------------------------------------------

def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


@dataclass
class _OpCase:
    """One op at one shape: `multi(M)` computes rows 0..M-1 in one call, `singles(n)` rows 0..n-1 one call
    each (row i after rows < i, as steps run). Inputs are lazy: a case never run costs nothing."""

    kind: str
    shape: str
    dtype: object
    multi: Callable[[int], mx.array]
    singles: Callable[[int], List[mx.array]]
    row_axis: int


def _row_case(kind: str, shape: str, dtype, fn, x: mx.array, row_axis: int = 1) -> _OpCase:
    """A row-wise op fn on input x: row i alone is fn of x's i-th slice along row_axis."""
    take = lambda a, b: x[(slice(None),) * row_axis + (slice(a, b),)]
    return _OpCase(kind, shape, dtype, lambda M: fn(take(0, M)), lambda n: [fn(take(i, i + 1)) for i in range(n)],
                   row_axis)


def _linear_info(module) -> Optional[tuple]:
    """(kind, shape, dtype, input dims) of a linear layer (quantized or not), else None."""
    if isinstance(module, nn.QuantizedLinear):
        out, packed = module.weight.shape  # (out, in * bits / 32) uint32
        in_dims = packed * 32 // module.bits
        return ("quantized_matmul", f"{in_dims}->{out} {module.bits}-bit g{module.group_size}",
                module.scales.dtype, in_dims)
    if isinstance(module, nn.Linear):
        out, in_dims = module.weight.shape
        return "matmul", f"{in_dims}->{out}", module.weight.dtype, in_dims
    return None


def _attention_modules(model):
    for _, m in model.named_modules():
        if all(hasattr(m, a) for a in ("n_heads", "n_kv_heads", "q_proj", "rope")):
            yield m


def _head_dim(attn) -> int:
    return getattr(attn, "head_dim", None) or attn.q_proj.weight.shape[0] // attn.n_heads  # out = nh * hd


def _head_dims(model) -> List[int]:
    return sorted({_head_dim(a) for a in _attention_modules(model)})


def _activation_dtype(model):
    """The dtype hidden states flow in: the embedding's (its scales' when quantized)."""
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedEmbedding):
            return m.scales.dtype
        if isinstance(m, nn.Embedding):
            return m.weight.dtype
    return mx.float32


def _norm_cases(model, rows: int, normal):
    """Every RMSNorm (mlx-lm's, ours, the scale-free one on V) at its width and dtype."""
    for _, m in model.named_modules():
        if isinstance(m, nn.RMSNorm):
            cases = [(m["weight"].shape[0], m["weight"].dtype, "")]
        elif type(m).__name__ == "RMSNormNoScale":  # mlx-lm's v_norm: no weight, over the head dim
            cases = [(d, _activation_dtype(model), " (no scale)") for d in _head_dims(model)]
        else:
            continue
        for dims, dtype, note in cases:
            yield _row_case("rms_norm", f"{dims}{note}", dtype, m, normal((1, rows, dims), dtype))


def _linear_cases(model, rows: int, normal):
    """Every linear layer's shape, and the tied embedding as the output layer."""
    for _, m in model.named_modules():
        info = _linear_info(m)
        if info is not None:
            kind, shape, dtype, in_dims = info
            yield _row_case(kind, shape, dtype, m, normal((1, rows, in_dims), dtype))
    args, embed = getattr(model, "args", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None and getattr(args, "tie_word_embeddings", False) and not hasattr(model, "lm_head"):
        quantized = isinstance(embed, nn.QuantizedEmbedding)
        dtype = embed.scales.dtype if quantized else embed.weight.dtype
        vocab, width = embed.weight.shape[0], embed.weight.shape[1] * (32 // embed.bits if quantized else 1)
        shape = f"{width}->{vocab} tied head" + (f" {embed.bits}-bit g{embed.group_size}" if quantized else "")
        yield _row_case("quantized_matmul" if quantized else "matmul", shape, dtype, embed.as_linear,
                        normal((1, rows, width), dtype))


def _attention_cases(model, rows: int, context: int, normal):
    """RoPE and attention per distinct head geometry, on the engine's caches and masks: one pass of M
    queries after `context` cached positions vs M one-query passes, each after the previous rows' K/V."""
    window = getattr(getattr(model, "args", None), "sliding_window", None)
    for attn in _attention_modules(model):
        win = window if getattr(attn, "is_sliding", False) else None
        D, H, Hkv = _head_dim(attn), attn.n_heads, attn.n_kv_heads
        dtype = _linear_info(attn.q_proj)[2]
        q = normal((1, H, rows, D), dtype)  # (B, nh, rows, hd)
        rope = attn.rope
        yield _OpCase("rope", f"{H} heads x {D} {type(rope).__name__}", dtype,
                      lambda M, q=q, rope=rope: rope(q[:, :, :M], offset=mx.array(context)),
                      lambda n, q=q, rope=rope: [rope(q[:, :, i : i + 1], offset=mx.array(context + i))
                                                 for i in range(n)], 2)
        kv = [normal((1, Hkv, n, D), dtype) for n in (context, context, rows, rows)]  # K, V cached; K, V new
        yield _OpCase("attention", f"{H}q/{Hkv}kv heads x {D}, {f'window {win}' if win else 'full'}, ctx {context}",
                      dtype, lambda M, a=attn, q=q, kv=kv, w=win: _attend(a, q, *kv, w, M),
                      lambda n, a=attn, q=q, kv=kv, w=win: _attend_one_by_one(a, q, *kv, w, n), 2)


def _moe_cases(model, rows: int, normal):
    """Router + experts (gather matmuls) of each MoE block."""
    for _, m in model.named_modules():
        if getattr(m, "enable_moe", False) and hasattr(m, "router") and hasattr(m, "experts"):
            dims, dtype = m.router.scale.shape[0], _activation_dtype(model)
            yield _row_case("moe", f"{dims} router + experts", dtype, lambda x, m=m: m.experts(x, *m.router(x)),
                            normal((1, rows, dims), dtype))


def _softmax_cases(model, rows: int, normal):
    """The sampler's softmax over the vocabulary in float32, over a verify's k+1 rows or a step's one."""
    vocab = _vocab(model)
    if vocab:
        yield _row_case("softmax", f"{vocab}", mx.float32, lambda x: mx.softmax(x, axis=-1),
                        normal((rows, vocab), mx.float32) * 5, row_axis=0)


def _attention_cache(window: Optional[int]):
    return SlidingKVCache(window, MAX_DRAFT_TOKENS + 1) if window else FullKVCache()


def _mask(cache, N: int, window: Optional[int]):
    """The mask the model builds for N new queries on this cache (mlx-lm's create_attention_mask)."""
    from mlx_lm.models.base import create_attention_mask

    return create_attention_mask(mx.zeros((1, N, 1)), cache, window_size=window)


def _attend(attn, q, k_ctx, v_ctx, k_new, v_new, window, M: int) -> mx.array:
    """The first M queries in one pass after the cached context, as a verify runs them: (1, nh, M, hd)."""
    cache = _attention_cache(window)
    cache.update_and_fetch(k_ctx, v_ctx)
    mask = _mask(cache, M, window)
    keys, values = cache.update_and_fetch(k_new[:, :, :M], v_new[:, :, :M])
    return mx.fast.scaled_dot_product_attention(q[:, :, :M], keys, values, scale=attn.scale, mask=mask)


def _attend_one_by_one(attn, q, k_ctx, v_ctx, k_new, v_new, window, n: int) -> List[mx.array]:
    """The first n queries one pass each, each after the previous rows' K/V, as steps run them."""
    cache = _attention_cache(window)
    cache.update_and_fetch(k_ctx, v_ctx)
    out = []
    for i in range(n):
        mask = _mask(cache, 1, window)
        keys, values = cache.update_and_fetch(k_new[:, :, i : i + 1], v_new[:, :, i : i + 1])
        out.append(mx.fast.scaled_dot_product_attention(q[:, :, i : i + 1], keys, values, scale=attn.scale,
                                                         mask=mask))
    return out


def check_ops(model, ks: Sequence[int] = DEFAULT_KS, context: int = DEFAULT_CONTEXT_NO_WINDOW,
              seed: int = 0) -> List[OpCheck]:
    """Run each kind of op the model uses, at its shapes and dtypes, on k+1 rows in one call and on each row
    alone; one OpCheck per (kind, shape, dtype), in OP_ORDER. An op is row-invariant when row i of every
    multi-row call equals its one-row call bit for bit. The model's own modules run (so a perturbed layer
    shows), attention on the engine's caches and masks."""
    counts = sorted({k + 1 for k in ks})
    rows = counts[-1]
    keys = iter(mx.random.split(mx.random.key(seed), 1 << 16))
    normal = lambda shape, dtype: mx.random.normal(shape, key=next(keys)).astype(dtype)
    cases = chain(_norm_cases(model, rows, normal), _linear_cases(model, rows, normal),
                  _attention_cases(model, rows, context, normal), _moe_cases(model, rows, normal),
                  _softmax_cases(model, rows, normal))
    checks: Dict[tuple, OpCheck] = {}
    for case in cases:
        key = (case.kind, case.shape, _dtype_name(case.dtype))
        if key in checks:  # a shape already checked (every layer has the same few)
            continue
        check = checks[key] = OpCheck(*key, differs_at=[], max_abs_diff=0.0)
        singles = case.singles(rows)
        for M in counts:
            multi, one = case.multi(M), mx.concatenate(singles[:M], axis=case.row_axis)
            equal, diff = mx.array_equal(_bits(multi), _bits(one)), mx.max(mx.abs(
                multi.astype(mx.float32) - one.astype(mx.float32)))
            if not equal.item():
                check.differs_at.append(M)
            check.max_abs_diff = max(check.max_abs_diff, diff.item())
    return sorted(checks.values(), key=lambda o: OP_ORDER.index(o.kind))


def ops_row_invariant(model, rows: int) -> bool:
    """The probe's op check alone, for a quick decision (no trace; a few calls per distinct shape): whether
    every op kind the model uses gives each row the same bits in a call of 2..rows rows as alone, here."""
    return all(o.row_invariant for o in check_ops(model, ks=range(1, rows)))


def _vocab(model) -> Optional[int]:
    args = getattr(model, "text_args", None) or getattr(model, "args", None)
    v = getattr(args, "vocab_size", None)
    return v if isinstance(v, int) and v > 0 else None


def describe_quantization(model) -> str:
    kinds = sorted({(m.bits, m.group_size) for _, m in model.named_modules()
                    if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))})
    if not kinds:
        return "unquantized"
    names = ", ".join(f"{b}-bit g{g}" for b, g in kinds)
    return names if len(kinds) == 1 else f"mixed: {names}"


# --- the probe ---------------------------------------------------------------------------------------

def measure_strict_cost(model, cache: list, token: int, ks: Sequence[int], rows: int,
                        reps: int = DEFAULT_COST_REPS) -> StrictCost:
    """Median times of unpadded and padded plain steps and verifies on `cache` (left as it was found),
    interleaved pass by pass so a machine that changes speed moves both alike."""
    forward = lambda x, c: base_forward(model, x, c)

    def run(n: int, padded: bool) -> float:
        x = mx.full((1, n), token, mx.int32)
        start = time.perf_counter()
        logits, _ = padded_forward(forward, x, cache, rows) if padded else forward(x, cache)
        mx.eval(logits)
        rollback_all(cache, n)
        return time.perf_counter() - start

    configs = [(n, padded) for n in [1] + [k + 1 for k in ks] for padded in (False, True)
               if not (padded and n == rows)]  # a verify of `rows` rows needs no padding
    times = {c: [] for c in configs}
    for rep in range(reps + 1):
        for c in configs:
            t = run(*c)
            if rep:  # pass 0 warms up (compilation, allocation)
                times[c].append(t)
    median = {c: float(np.median(t)) for c, t in times.items()}
    median[(rows, True)] = median.get((rows, False), float("nan"))
    return StrictCost(rows, median[(1, False)], median[(1, True)], {k: median[(k + 1, False)] for k in ks},
                      {k: median[(k + 1, True)] for k in ks})


def check_ks(ks: Sequence[int]) -> List[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > MAX_DRAFT_TOKENS:
        raise ParityError(f"draft lengths must be between 1 and {MAX_DRAFT_TOKENS}, got {ks}")
    return ks


def probe(model, *, ks: Sequence[int] = DEFAULT_KS, tokens: int = DEFAULT_TOKENS, context: Optional[int] = None,
          trace: str = "greedy", padding: Optional[bool] = None, cost_reps: int = DEFAULT_COST_REPS,
          seed: int = 0, name: Optional[str] = None) -> ParityResult:
    """Measure verify-vs-step parity of `model` on the current device (see the module docstring).

    context: prompt length (default: the sliding window + 32, so every compared row is past the window);
    trace: "greedy" (the model's own continuation) or "random" (pseudo-random tokens, teacher-forced);
    padding: measure strict mode's padded parity too: True, False, or None (only when unpadded rows differ);
    cost_reps: timed passes per kind for the padding cost (0: not timed)."""
    started = time.perf_counter()
    ks = check_ks(ks)
    if tokens < 2:
        raise ParityError(f"--tokens must be at least 2, got {tokens}")
    if trace not in ("greedy", "random"):
        raise ParityError(f"the trace is 'greedy' or 'random', got {trace!r}")
    args = getattr(model, "text_args", None) or getattr(model, "args", None)
    window = getattr(args, "sliding_window", None)
    if context is None:
        context = window + PAST_WINDOW if window else DEFAULT_CONTEXT_NO_WINDOW
    if context < 1:
        raise ParityError(f"--context must be at least 1, got {context}")
    vocab = _vocab(model)
    if vocab is None:
        raise ParityError("cannot tell the model's vocabulary size from its config")
    rows = ks[-1] + 1
    forward = lambda x, c: base_forward(model, x, c)
    make_cache = lambda: make_base_cache(model, MAX_DRAFT_TOKENS + 1)  # the engine's cache, the engine's slack

    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(4, vocab, size=n).tolist()
    path = draw(context) + ([] if trace == "greedy" else draw(tokens))
    reference = _steps(forward, make_cache, path, context, tokens, trace == "greedy", None)
    unpadded = [_verify_rounds(forward, make_cache, path, context, reference, k, None) for k in ks]
    ops = check_ops(model, ks, context, seed)
    result = ParityResult(device=str(mx.default_device()), mlx_version=mx.__version__,
                          model=name or getattr(model, "source_path", type(model).__name__),
                          dtype=_dtype_name(reference[0].dtype), quantization=describe_quantization(model),
                          sliding_window=window, context=context, tokens=tokens, trace=trace,
                          unpadded=unpadded, ops=ops)
    if padding or (padding is None and not result.row_invariant):
        padded_ref = _steps(forward, make_cache, path, context, tokens, False, rows)
        result.padded_rows = rows
        result.padded = [_verify_rounds(forward, make_cache, path, context, padded_ref, k, rows) for k in ks]
    if cost_reps > 0:
        cache = make_cache()
        _prefill(forward, cache, path[:-1])
        result.cost = measure_strict_cost(model, cache, path[-1], ks, rows, cost_reps)
    result.seconds = time.perf_counter() - started
    return result

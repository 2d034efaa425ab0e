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
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import DEFAULT_MAX_ROLLBACK, MAX_DRAFT_TOKENS, rollback_all
from ..models.base import as_base, context_length, vocab_size
from ..prefill import prefill
from ..sampling import SamplingError, check_seed
from .ops import DEFAULT_CONTEXT_NO_WINDOW, DEFAULT_KS, _bits, _dtype_name, check_ops
from .report import Flip, Forward, ParityError, ParityResult, RowParity, StrictCost
from .strict import padded_forward

DEFAULT_TOKENS = 256
PAST_WINDOW = 32  # the default prompt is this much longer than the sliding window
DEFAULT_COST_REPS = 10


def _prefill(forward: Forward, cache: list, tokens: List[int]) -> None:
    """Run tokens into the cache in the engine's chunks."""
    prefill(lambda x: forward(x, cache), tokens, lambda: cache)


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
    forward = as_base(model).forward

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


def sliding_window(model) -> Optional[int]:
    args = getattr(model, "text_args", None) or getattr(model, "args", None)
    return getattr(args, "sliding_window", None)


def default_context(model) -> int:
    """The prompt length when none is asked for: the sliding window + PAST_WINDOW, so every row is past it."""
    window = sliding_window(model)
    return window + PAST_WINDOW if window else DEFAULT_CONTEXT_NO_WINDOW


def check_positions(model, context: int, tokens: int, k_max: int) -> None:
    """The trace (context + tokens positions) and the timed verify after it (k_max more, at most) must fit
    the model's context: past it the model runs on positions it was never trained on, and memory grows
    with the numbers however large they are."""
    limit = context_length(model)
    need = context + tokens + k_max
    if limit is not None and need > limit:
        raise ParityError(f"--context {context} + --tokens {tokens} + the largest k {k_max} = {need} positions, but "
                          f"the model's context holds {limit} (max_position_embeddings); lower --context or --tokens")


def probe(model, *, ks: Sequence[int] = DEFAULT_KS, tokens: int = DEFAULT_TOKENS, context: Optional[int] = None,
          trace: str = "greedy", padding: Optional[bool] = None, cost_reps: int = DEFAULT_COST_REPS,
          seed: int = 0, name: Optional[str] = None) -> ParityResult:
    """Measure verify-vs-step parity of `model` on the current device (see the module docstring).

    context: prompt length (default: the sliding window + 32, so every compared row is past the window);
    context + tokens + the largest k must fit the model's context (max_position_embeddings);
    trace: "greedy" (the model's own continuation) or "random" (pseudo-random tokens, teacher-forced);
    padding: measure strict mode's padded parity too: True, False, or None (only when unpadded rows differ);
    cost_reps: timed passes per kind for the padding cost (0: not timed); seed: any integer, as --seed is
    for generate."""
    started = time.perf_counter()
    ks = check_ks(ks)
    if tokens < 2:
        raise ParityError(f"--tokens must be at least 2, got {tokens}")
    if trace not in ("greedy", "random"):
        raise ParityError(f"the trace is 'greedy' or 'random', got {trace!r}")
    window = sliding_window(model)
    if context is None:
        context = default_context(model)
    if context < 1:
        raise ParityError(f"--context must be at least 1, got {context}")
    check_positions(model, context, tokens, ks[-1])
    try:
        seed = check_seed(seed)
    except SamplingError as e:
        raise ParityError(f"--{e}") from None
    vocab = vocab_size(model)
    if vocab is None:
        raise ParityError("cannot tell the model's vocabulary size from its config")
    rows = ks[-1] + 1
    forward = as_base(model).forward
    make_cache = lambda: as_base(model).make_cache(DEFAULT_MAX_ROLLBACK)  # the engine's cache, the engine's slack

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

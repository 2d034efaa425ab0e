"""Which ops give a different result for a row depending on how many rows they run at once.

Each kind of op the model uses (norms, matmuls, quantized matmuls, RoPE, attention, MoE, softmax) runs at
the model's own shapes and dtypes with 1 row and with k+1 rows; bitwise differences name the ops a strict
engine must pad around. Knows the model's modules and MLX; nothing of traces or proposers.
"""

from dataclasses import dataclass
from itertools import chain
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..cache import DEFAULT_MAX_ROLLBACK, FullKVCache, SlidingKVCache
from ..models.base import vocab_size
from .report import OP_ORDER, OpCheck

DEFAULT_KS = (1, 2, 4, 8)
DEFAULT_CONTEXT_NO_WINDOW = 64


def _bits(x: mx.array) -> mx.array:
    return x.view(mx.uint32 if x.dtype.size == 4 else mx.uint16)


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
    vocab = vocab_size(model)
    if vocab:
        yield _row_case("softmax", f"{vocab}", mx.float32, lambda x: mx.softmax(x, axis=-1),
                        normal((rows, vocab), mx.float32) * 5, row_axis=0)


def _attention_cache(window: Optional[int]):
    return SlidingKVCache(window, DEFAULT_MAX_ROLLBACK) if window else FullKVCache()


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

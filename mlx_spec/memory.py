"""Unified memory: keep base + drafter weights resident, know before a run how much it will need (weights,
drafter, K/V at a context length and kv-bits), and say which flag makes it fit.

On Apple silicon the GPU may page out weights it has not touched recently; mlx-lm raises the wired limit to
the device's recommended working set while generating, and so do we (for the base and the drafter
together). On devices that report no working set (CPU, CUDA) these are no-ops.
"""

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx.utils import tree_reduce

from .cache import DEFAULT_MAX_ROLLBACK, FullKVCache


def recommended_working_set() -> int:
    """Bytes the device recommends keeping resident, or 0 when it reports none (CPU, CUDA)."""
    try:
        return int(mx.device_info().get("max_recommended_working_set_size", 0) or 0)
    except (AttributeError, RuntimeError):
        return 0


def weight_bytes(*modules) -> int:
    return sum(tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, m, 0)
               for m in modules if m is not None)


def warn_if_too_big(nbytes: int, what: str) -> bool:
    """Warn on stderr (never stdout: it carries generated text) when nbytes exceeds 90% of the working set."""
    limit = recommended_working_set()
    if limit and nbytes > 0.9 * limit:
        print(f"warning: {what} needs {nbytes / 2**30:.1f} GiB, close to or above this device's recommended "
              f"working set of {limit / 2**30:.1f} GiB; expect swapping. Use a smaller quantization "
              "(mlx_spec.convert -q --q-bits 4) or a smaller model.", file=sys.stderr)
        return True
    return False


@contextmanager
def resident(*modules):
    """Raise the wired limit to the recommended working set while generating (base and drafter together)."""
    limit = recommended_working_set()
    if not limit:
        yield
        return
    warn_if_too_big(weight_bytes(*modules), "the model and drafter")
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)


# -- Memory known in advance: weights + drafter + K/V at a context length, against the device's limit.
#
# K/V bytes are exact for mlx_spec's caches (cache.py): a full-attention layer holds ceil(T / step) * step
# positions, a sliding layer a constant window + 1 + max_rollback + step, a KV-shared layer nothing; k_eq_v
# layers still store K and V (V is K through another norm, not the same tensor). Weights are what the files
# hold (a quantized model on MLX's CPU backend is cast to float32 on load: a little more) or, for a loaded
# model, its arrays. Not counted: the prefill chunk's activations and the allocator's cache (see README).

DEFAULT_HEADROOM = 0.9  # plan to use at most this share of the limit: the OS and other apps need the rest
_STEP = FullKVCache.step  # growth step of the caches the estimate predicts (SlidingKVCache's is the same)
_DEFAULT_ROLLBACK = DEFAULT_MAX_ROLLBACK  # what the engine's caches keep for a rejected verify


@dataclass(frozen=True)
class LayerKV:
    """What one cached layer stores per position. window None: full attention (every position)."""

    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    window: Optional[int] = None


def _gemma4_layers(config: dict) -> List[LayerKV]:
    from .models.gemma4_text import FULL, normalize_text_config

    multimodal = config.get("model_type") in ("gemma4", "gemma4_unified")
    text = normalize_text_config((config.get("text_config") or config) if multimodal else config)
    n_cached = text.get("num_hidden_layers", 30) - (text.get("num_kv_shared_layers") or 0)
    window = text.get("sliding_window", 512)
    out = []
    for t in text["layer_types"][:n_cached]:
        if t == FULL:
            hd = text["global_head_dim"]
            n_kv = text.get("num_global_key_value_heads") or text.get("num_key_value_heads", 4)
            out.append(LayerKV(n_kv, hd, hd))
        else:
            hd = text.get("head_dim", 256)
            out.append(LayerKV(text.get("num_key_value_heads", 4), hd, hd, window))
    return out


def kv_layers_from_config(config: dict) -> List[LayerKV]:
    """The cached layers of a model from its config.json: exact for Gemma 4 (gemma4, gemma4_unified,
    gemma4_text), mlx-lm's usual fields otherwise (num_key_value_heads, head_dim, layer_types +
    sliding_window)."""
    from .models import BASE_TYPES

    if config.get("model_type") in BASE_TYPES:
        return _gemma4_layers(config)
    heads = config.get("num_attention_heads", 1)
    n_kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or config["hidden_size"] // heads
    n = config["num_hidden_layers"]
    types = config.get("layer_types") or ["full_attention"] * n
    window = config.get("sliding_window")
    return [LayerKV(n_kv, hd, hd, window if t == "sliding_attention" and window else None) for t in types[:n]]


def kv_layers_from_model(model, max_rollback: int = _DEFAULT_ROLLBACK) -> Tuple[List[LayerKV], Any]:
    """(cached layers, K/V dtype) of a loaded model, read from the shapes of a one-token forward that is
    built but never run (MLX is lazy: shapes are known without computing anything)."""
    from .cache import FullKVCache, SlidingKVCache
    from .models.base import as_base

    base = as_base(model)  # ours, or an mlx-lm model with rewindable caches
    caches = base.make_cache(max_rollback=max_rollback)
    base.forward(mx.zeros((1, 1), mx.int32), caches)
    layers = []
    for c in caches:
        if not isinstance(c, (FullKVCache, SlidingKVCache)):
            raise TypeError(f"cannot size a {type(c).__name__}")
        k, v = c.keys, c.values  # (1, n_kv, capacity, hd), lazy
        layers.append(LayerKV(k.shape[1], k.shape[3], v.shape[3], getattr(c, "window", None)))
    return layers, caches[0].keys.dtype


def kv_position_bytes(layer: LayerKV, dtype_bytes: int, kv=None) -> int:
    """Bytes one position of one layer takes: K and V, dense or as mlx-lm's quantized triple."""
    def one(hd: int) -> int:
        if kv is None:
            return hd * dtype_bytes
        return hd * kv.bits // 8 + 2 * (hd // kv.group_size) * dtype_bytes  # packed + scales + biases

    return layer.n_kv_heads * (one(layer.k_head_dim) + one(layer.v_head_dim))


def kv_cache_bytes(layers: Sequence[LayerKV], context: int, dtype_bytes: int, kv=None,
                   max_rollback: int = _DEFAULT_ROLLBACK, step: int = _STEP) -> int:
    """Bytes the caches hold after `context` positions (kv: a cache.KVQuant or None). Quantized only when the
    context is past kv.start (the cache switches at the first update at or after it)."""
    if context <= 0:
        return 0
    if kv is not None and context <= kv.start:
        kv = None
    total = 0
    for layer in layers:
        positions = -(-context // step) * step if layer.window is None else layer.window + 1 + max_rollback + step
        total += positions * kv_position_bytes(layer, dtype_bytes, kv)
    return total


def kv_peak_bytes(layers: Sequence[LayerKV], context: int, dtype_bytes: int, kv=None,
                  max_rollback: int = _DEFAULT_ROLLBACK) -> int:
    """The most the caches hold on the way to `context`: at the switch to quantized K/V (quantized_kv_start
    > 0) the full-precision buffers are kept for one more pass next to the quantized ones."""
    end = kv_cache_bytes(layers, context, dtype_bytes, kv, max_rollback)
    if kv is None or kv.start <= 0 or context <= kv.start:
        return end
    at_switch = kv.start + 1
    both = kv_cache_bytes(layers, kv.start, dtype_bytes, None, max_rollback)
    both += kv_cache_bytes(layers, at_switch, dtype_bytes, kv, max_rollback)
    return max(end, both)


def weights_bytes_on_disk(model_dir) -> int:
    """What a model directory's weight files hold (safetensors: the arrays plus a small header)."""
    from .checkpoint import weight_files

    return sum(f.stat().st_size for f in weight_files(Path(model_dir)))


def kv_dtype_bytes(config: dict) -> int:
    """Bytes per K/V element of a model loaded by mlx_spec: float32 for a quantized model on MLX's CPU
    backend (loading.default_dtype casts it), else the config's dtype (bfloat16 when unsaid)."""
    text = config.get("text_config") or config
    if config.get("quantization") and mx.default_device() == mx.cpu:
        return 4
    dtype = str(config.get("torch_dtype") or config.get("dtype") or text.get("dtype") or "bfloat16")
    return 4 if "32" in dtype else 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a generation needs, by part; `total` is what to compare with the device's limit."""

    weights: int
    drafter: int
    kv: int
    context: int
    kv_bits: Optional[int] = None
    kv_group_size: Optional[int] = None
    slots: int = 1  # caches held at once (a server's prompt-cache slots), each up to `context`

    @property
    def total(self) -> int:
        return self.weights + self.drafter + self.kv


def estimate_memory(layers: Sequence[LayerKV], context: int, *, weights: int, drafter: int = 0,
                    dtype_bytes: int = 2, kv=None, draft_layers: Sequence[LayerKV] = (),
                    max_rollback: int = _DEFAULT_ROLLBACK, slots: int = 1) -> MemoryEstimate:
    """Weights + drafter + K/V (the base's, and a draft model's own cache, in full precision) at `context`,
    for each of `slots` caches (a server keeps one per conversation, each up to the context)."""
    kv_one = kv_peak_bytes(layers, context, dtype_bytes, kv, max_rollback)
    kv_one += kv_cache_bytes(draft_layers, context, dtype_bytes, None, max_rollback)
    return MemoryEstimate(weights, drafter, slots * kv_one, context, kv.bits if kv else None,
                          kv.group_size if kv else None, slots)


def memory_limit() -> Tuple[int, str]:
    """(bytes, where the number comes from): the device's recommended working set, or the machine's RAM
    where the device reports none (CPU, CUDA: the K/V live in host or device memory the OS also uses)."""
    limit = recommended_working_set()
    if limit:
        return limit, "the device's recommended working set"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (AttributeError, ValueError, OSError):
        return 0, "unknown"


@dataclass(frozen=True)
class FitAdvice:
    fits: bool
    estimate: MemoryEstimate
    limit: int
    flags: str = ""  # what to add to the command line to fit ("" when it fits as asked, or nothing can)
    message: str = ""


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def advise(layers: Sequence[LayerKV], context: int, *, weights: int, drafter: int = 0, dtype_bytes: int = 2,
           kv=None, limit: int, headroom: float = DEFAULT_HEADROOM, draft_layers: Sequence[LayerKV] = (),
           max_rollback: int = _DEFAULT_ROLLBACK, group_size: Optional[int] = None, slots: int = 1,
           kv_start: int = 0) -> FitAdvice:
    """Whether weights + drafter + K/V for `slots` caches of `context` positions (the context in use: what
    the run can hold, after every cap) fit in headroom * limit, and if not, the first of --kv-bits 8,
    --kv-bits 4, then (4-bit K/V where it saves anything) fewer --prompt-cache-slots, then a shorter
    --max-context that does. A proposed --max-context is never longer than `context`. kv_start: where
    K/V proposed with --kv-bits would start being quantized (the commands' --quantized-kv-start default)."""
    from .cache import DEFAULT_KV_GROUP_SIZE, KVQuant

    budget = int(headroom * limit)

    def est(kv_, ctx, n=slots):
        return estimate_memory(layers, ctx, weights=weights, drafter=drafter, dtype_bytes=dtype_bytes, kv=kv_,
                               draft_layers=draft_layers, max_rollback=max_rollback, slots=n)

    asked = est(kv, context)
    if not limit or asked.total <= budget:
        return FitAdvice(True, asked, limit)
    per_slot = f" x {slots} slots" if slots > 1 else ""
    what = (f"weights {_gib(weights + drafter)} + K/V {_gib(asked.kv)} at {context} tokens{per_slot} = "
            f"{_gib(asked.total)}, over {_gib(budget)} ({headroom:.0%} of {_gib(limit)})")
    group = group_size or (kv.group_size if kv else DEFAULT_KV_GROUP_SIZE)
    start = kv.start if kv else kv_start

    def quantized(bits: int):
        """(flags, KVQuant) for `bits`-bit K/V: from where the flags start it, then from the first position."""
        if kv is None or kv.bits > bits:
            yield f"--kv-bits {bits} ", KVQuant(bits, group, start)
        if start > 0:
            yield f"--kv-bits {bits} --quantized-kv-start 0 ", KVQuant(bits, group, 0)

    for bits in (8, 4):
        for flags, option in quantized(bits):
            fitted = est(option, context)
            if fitted.total <= budget:
                return FitAdvice(False, asked, limit, flags.strip(), f"{what}; {flags}needs {_gib(fitted.total)}")

    def least(ctx: int, n: int) -> Tuple[str, MemoryEstimate]:
        """(flags, estimate): the K/V setting that takes least at ctx and n slots, the fewest flags on a tie."""
        return min([("", est(kv, ctx, n))] + [(f, est(q, ctx, n)) for f, q in quantized(4)],
                   key=lambda option: option[1].total)

    if slots > 1:  # the slots multiply the K/V: keep the context, hold fewer conversations
        bits, one = least(context, 1)
        n = min(slots - 1, (budget - weights - drafter) // one.kv) if one.kv else 0
        if n >= 1:
            flags = f"{bits}--prompt-cache-slots {n}"
            return FitAdvice(False, asked, limit, flags, f"{what}; {flags} needs {_gib(least(context, n)[1].total)}")
    lo, hi = 0, context  # the longest context that fits, one slot: K/V grows with context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if least(mid, 1)[1].total <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo <= 0 or least(lo, 1)[1].kv == 0:
        return FitAdvice(False, asked, limit, "", f"{what}; the weights alone do not fit: use a smaller model "
                         "or quantization (mlx_spec.convert -q --q-bits 4)")
    lo = lo // _STEP * _STEP or lo
    bits, fitted = least(lo, 1)
    flags = bits + ("--prompt-cache-slots 1 " if slots > 1 else "") + f"--max-context {lo}"
    return FitAdvice(False, asked, limit, flags, f"{what}; {flags} needs {_gib(fitted.total)}")

"""What the block drafters (DFlash, DSpark) share: a context of the base's captured layer outputs, and one
non-causal pass over a block of positions after it.

A block drafter reads the outputs of some of the base's decoder layers at every position the base has run
(`target_layer_ids`, concatenated: (1, S, n*H_base)). It projects them once (fc, hidden_norm, then each
drafter layer's K/V projections) into its context: per-layer K/V held in rewindable caches (cache.py), one
entry per base position, so the engine rolls them back with the base's. A round runs the block
[last token, mask, mask, ...] at positions p, p+1, ... (p = the context's length, the last token's
position) in one pass: each block row attends to the visible context and to every block row.

Visible context: all of it on a full-attention drafter layer; on a sliding one (z-lab's 31B drafter has
some), the W-1 positions before p, the window of the block's first position, for every block row (what
mlx-vlm 0.7.10 keeps, stated as a rule on positions rather than as a property of its ring buffer). With
`causal` (a dflash_config option) row j sees only context and block positions <= p+j within the window.

Knows K/V tensors and positions; nothing of rounds, drafts or sampling.
"""

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from ..cache import DEFAULT_MAX_ROLLBACK, FullKVCache, SlidingKVCache

SLIDING, FULL = "sliding_attention", "full_attention"


def make_context_cache(layer_types: Sequence[str], window: Optional[int],
                       max_rollback: int = DEFAULT_MAX_ROLLBACK) -> list:
    """One rewindable cache per drafter layer; a sliding layer keeps only its window (plus rollback slack)."""
    return [SlidingKVCache(window, max_rollback) if t == SLIDING else FullKVCache() for t in layer_types]


def visible_context(cache, window: Optional[int]) -> Optional[Tuple[mx.array, mx.array]]:
    """(K, V) (1, n_kv, S, hd) of the context a block sees (see the module docstring); None when empty."""
    if cache.offset == 0:
        return None
    keys, values = cache.state  # every retained position, in order (never quantized: made here unquantized)
    if window is not None and keys.shape[2] > window - 1:
        keys, values = keys[..., keys.shape[2] - (window - 1):, :], values[..., values.shape[2] - (window - 1):, :]
    return keys, values


def block_mask(n_ctx: int, L: int, window: Optional[int], causal: bool) -> Optional[mx.array]:
    """(L, n_ctx + L) bool for a block whose first row sits right after its n_ctx visible context positions;
    None (everything visible) unless `causal`."""
    if not causal:
        return None
    q = mx.arange(n_ctx, n_ctx + L)[:, None]
    k = mx.arange(n_ctx + L)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask


def attend(q: mx.array, k_blk: mx.array, v_blk: mx.array, context, scale: float, mask) -> mx.array:
    """Block queries q (1, n_heads, L, hd) onto [context; block] K/V (GQA as mlx's kernel does it)."""
    if context is not None:
        k_blk = mx.concatenate([context[0].astype(k_blk.dtype), k_blk], axis=2)
        v_blk = mx.concatenate([context[1].astype(v_blk.dtype), v_blk], axis=2)
    return mx.fast.scaled_dot_product_attention(q, k_blk, v_blk, scale=scale, mask=mask)


def heads(x: mx.array, n: int) -> mx.array:
    """(1, L, n*hd) -> (1, n, L, hd)."""
    B, L, _ = x.shape
    return x.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """(1, n, L, hd) -> (1, L, n*hd)."""
    B, n, L, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, n * hd)


def check_target_layers(ids: List[int], where: str) -> List[int]:
    """Strictly increasing integer ids (-1 allowed: DeepSpec's embedding output), else ValueError."""
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, int) and i >= -1 for i in ids):
        raise ValueError(f"{where}: target_layer_ids must be a non-empty list of layer indices, got {ids!r}")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"{where}: target_layer_ids must be strictly increasing, got {ids!r}")
    return list(ids)

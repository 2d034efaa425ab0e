"""Strict decoding: every decode-phase base pass runs with the same number of rows.

On a backend whose kernels depend on the row count (Metal's qmv vs qmm, a vector vs a tiled attention
kernel), a verify row and a one-token step round differently, so speculative greedy can leave plain greedy
at a near-tie. Padding every decode pass, plain steps included, to one row count M makes a row's
arithmetic independent of how many drafts were verified. The padding is copies of the last token; they sit
after the real rows, so causal attention keeps them out of the real rows, and the cache gives their K/V back.

Knows the forward's signature and the caches' rollback; nothing of drafts, acceptance or sampling.
"""

from typing import Callable, Optional, Tuple

import mlx.core as mx

from ..cache import rollback_all

Forward = Callable[[mx.array, list], Tuple[mx.array, Optional[mx.array]]]  # (1, L) tokens, cache -> logits, hidden


def padded_forward(model_forward: Forward, tokens: mx.array, cache: list, rows: int):
    """Run L <= rows real tokens (1, L) as a (1, rows) pass padded with copies of the last token, then roll
    the padding back out of `cache`. Returns what the forward returns ((logits (1, L, V), hidden (1, L, H)
    or None), and captured layer outputs for `forward_layers`), cut to the real rows.

    The cache must be able to roll back rows - 1 positions on top of what the caller rolls back itself
    (cache.py's max_rollback)."""
    L = tokens.shape[1]
    if not 1 <= L <= rows:
        raise ValueError(f"padded_forward needs 1 <= L <= rows tokens, got L={L} for rows={rows}")
    if L < rows:
        tokens = mx.concatenate([tokens, mx.repeat(tokens[:, -1:], rows - L, axis=1)], axis=1)  # (1, rows)
    out = model_forward(tokens, cache)
    rollback_all(cache, rows - L)
    return tuple(x[:, :L] if x is not None else None for x in out)

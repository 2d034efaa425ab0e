"""Rewindable KV caches: the base keeps verified drafts, then gives back the rejected ones.

Speculative decoding appends k+1 positions per verify pass and must remove the rejected tail exactly.
mlx-lm's `RotatingKVCache` cannot: once its ring has wrapped (context > sliding window) it silently
refuses to trim, and rejected drafts stay in the window forever (ref/gemma4-mtp.md pitfall E.1).

Here the sliding-window cache keeps entries in temporal order, retains a slack of `max_rollback` extra
positions beyond the window, and applies the window with an explicit mask. `rollback(n)` is checked every
time: it returns what it removed and raises `CacheRollbackError` rather than leave the cache wrong.

This module knows K/V tensors and positions; it knows nothing of models, drafts or tokens.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .errors import CacheRollbackError

MAX_DRAFT_TOKENS = 16  # the most drafts one round verifies
DEFAULT_MAX_ROLLBACK = MAX_DRAFT_TOKENS + 1  # a whole verify pass: what a base cache must be able to give back


class FullKVCache(KVCache):
    """mlx-lm's growable full-attention cache with a checked rollback."""

    def rollback(self, n: int) -> int:
        if n < 0 or n > self.offset:
            raise CacheRollbackError(f"cannot roll back {n} tokens from a full cache holding {self.offset}")
        self.offset -= n
        return n

    def trim(self, n: int) -> int:  # mlx-lm's name, same contract
        return self.rollback(min(n, self.offset))

    def drafter_view(self):
        """(K, V) of every cached position, in order: (B, n_kv, offset, hd)."""
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


class SlidingKVCache:
    """Sliding-window cache that can roll back up to `max_rollback` positions at any context length.

    Holds the last `window + 1 + max_rollback` positions (more right after an update) in temporal order.
    Attention sees all returned entries, so `make_mask` restricts every query to its own window.
    """

    step = 256

    def __init__(self, window: int, max_rollback: int = DEFAULT_MAX_ROLLBACK):
        self.window = window
        self.max_rollback = max_rollback
        # W+1: the drafter's view of the window (HF's flipped mask); +max_rollback: rejected drafts.
        self.keep = window + 1 + max_rollback
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # absolute positions seen (the next token's position)
        self._start = 0  # physical index of the oldest retained entry
        self._end = 0  # physical index one past the newest entry

    @property
    def length(self) -> int:
        return self._end - self._start

    def _retained_before_update(self) -> int:
        return min(self.length, self.keep)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        S = keys.shape[2]  # keys: (B, n_kv, S, hd)
        retained = self._retained_before_update()
        start = self._end - retained
        if self.keys is None or self._end + S > self.keys.shape[2]:
            B, n_kv, _, k_hd = keys.shape
            capacity = retained + S + self.step
            new_k = mx.zeros((B, n_kv, capacity, k_hd), keys.dtype)
            new_v = mx.zeros((B, n_kv, capacity, values.shape[3]), values.dtype)
            if retained:
                new_k[..., :retained, :] = self.keys[..., start : self._end, :]
                new_v[..., :retained, :] = self.values[..., start : self._end, :]
            self.keys, self.values = new_k, new_v
            start, self._end = 0, retained
        self.keys[..., self._end : self._end + S, :] = keys
        self.values[..., self._end : self._end + S, :] = values
        self._start, self._end = start, self._end + S
        self.offset += S
        return self.keys[..., self._start : self._end, :], self.values[..., self._start : self._end, :]

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        """Mask for N new queries against what `update_and_fetch` will return next: (N, L_kv) bool."""
        window = window_size or self.window
        L_kv = self._retained_before_update() + N
        if N == 1 and L_kv <= window and not return_array:
            return None
        q_pos = mx.arange(self.offset, self.offset + N)[:, None]
        k_pos = mx.arange(self.offset + N - L_kv, self.offset + N)[None]
        return (k_pos <= q_pos) & (q_pos - k_pos < window)

    def rollback(self, n: int) -> int:
        """Forget the newest n positions; raise if the window would then be incomplete."""
        if n < 0 or n > self.offset:
            raise CacheRollbackError(f"cannot roll back {n} tokens from a cache at offset {self.offset}")
        needed = min(self.offset - n, self.window + 1)
        if self.length - n < needed:
            raise CacheRollbackError(
                f"sliding cache holds {self.length} positions; rolling back {n} would leave fewer than the "
                f"{needed} the window needs (max_rollback={self.max_rollback} is too small for this k)"
            )
        self._end -= n
        self.offset -= n
        return n

    def trim(self, n: int) -> int:  # mlx-lm's name, same contract
        return self.rollback(min(n, self.offset))

    def is_trimmable(self) -> bool:
        return True

    def drafter_view(self):
        """(K, V) of the last window+1 positions, in order: (B, n_kv, <=W+1, hd)."""
        start = max(self._start, self._end - (self.window + 1))
        return self.keys[..., start : self._end, :], self.values[..., start : self._end, :]

    def size(self) -> int:
        return self.length

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys[..., self._start : self._end, :], self.values[..., self._start : self._end, :]


def make_rewindable(caches: list, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> list:
    """Replace mlx-lm caches (from any model's `make_cache`) with rewindable equivalents."""
    out = []
    for c in caches:
        if isinstance(c, (FullKVCache, SlidingKVCache)):
            out.append(c)
        elif isinstance(c, RotatingKVCache) and c.keep == 0:
            out.append(SlidingKVCache(c.max_size, max_rollback))
        elif type(c) is KVCache:
            out.append(FullKVCache())
        else:
            raise NotImplementedError(
                f"speculative decoding needs rewindable caches; {type(c).__name__} is not supported"
            )
    return out


def rollback_all(caches: list, n: int) -> None:
    """Roll every cache back by n positions (no-op for n == 0)."""
    if n:
        for c in caches:
            c.rollback(n)

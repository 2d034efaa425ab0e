"""Rewindable KV caches: the base keeps verified drafts, then gives back the rejected ones.

Speculative decoding appends k+1 positions per verify pass and must remove the rejected tail exactly.
mlx-lm's `RotatingKVCache` cannot: once its ring has wrapped (context > sliding window) it silently
refuses to trim, and rejected drafts stay in the window forever (ref/gemma4-mtp.md pitfall E.1).

Here the sliding-window cache keeps entries in temporal order, retains a slack of `max_rollback` extra
positions beyond the window, and applies the window with an explicit mask. `rollback(n)` is checked every
time: it returns what it removed and raises `CacheRollbackError` rather than leave the cache wrong.

Quantized K/V (`KVQuant`, mlx-lm's --kv-bits/--kv-group-size/--quantized-kv-start): each position is
quantized on its own (groups run along head_dim), so rolling back and re-appending writes the same bytes
as never having appended. A quantized buffer is mlx-lm's triple (packed uint32, scales, biases), which
mlx-lm's attention recognises by the cache's `bits`/`group_size`.

This module knows K/V tensors and positions; it knows nothing of models, drafts or tokens.
"""

from typing import NamedTuple, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .errors import CacheRollbackError
from .kv_quant import DEFAULT_KV_GROUP_SIZE, KV_BITS, KV_GROUP_SIZES, KVQuant  # noqa: F401  (re-exported)

MAX_DRAFT_TOKENS = 16  # the most drafts one round verifies
DEFAULT_MAX_ROLLBACK = MAX_DRAFT_TOKENS + 1  # a whole verify pass: what a base cache must be able to give back


# -- K/V buffers: an array (B, n_kv, T, hd), or mlx-lm's quantized triple of arrays (B, n_kv, T, *)
def _is_quantized(buf) -> bool:
    return isinstance(buf, (tuple, list))


def _take(buf, a: int, b: int):
    if _is_quantized(buf):
        return tuple(x[..., a:b, :] for x in buf)
    return buf[..., a:b, :]


def _put(buf, x, a: int) -> None:
    """Write x (same kind as buf) at positions a.. of buf, in place (through buf's handles)."""
    if _is_quantized(buf):
        for dst, src in zip(buf, x):
            dst[..., a : a + src.shape[2], :] = src
    else:
        buf[..., a : a + x.shape[2], :] = x


def _zeros_like(buf, capacity: int):
    """An empty buffer of the same kind, shape and dtype as buf, for `capacity` positions."""
    if _is_quantized(buf):
        return tuple(_zeros_like(x, capacity) for x in buf)
    B, n, _, d = buf.shape
    return mx.zeros((B, n, capacity, d), buf.dtype)


def _length(buf) -> int:
    return (buf[0] if _is_quantized(buf) else buf).shape[2]


def _nbytes(buf) -> int:
    if buf is None:
        return 0
    return sum(x.nbytes for x in buf) if _is_quantized(buf) else buf.nbytes


def quantize(x: mx.array, q: KVQuant):
    """mlx-lm's triple for x (..., hd): (packed uint32 (..., hd*bits/32), scales, biases (..., hd/group))."""
    if x.shape[-1] % q.group_size:
        q.validate((x.shape[-1],))  # raises, naming the flag
    return tuple(mx.quantize(x, group_size=q.group_size, bits=q.bits))


def dequantize(buf, q: Optional[KVQuant]) -> mx.array:
    if not _is_quantized(buf):
        return buf
    return mx.dequantize(*buf, group_size=q.group_size, bits=q.bits)


class QuantizedKV(NamedTuple):
    """A quantized K or V as a cache holds it: mlx-lm's triple (B, n_kv, T, *) and its format."""

    packed: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    def first(self) -> "QuantizedKV":
        """The batch's first row: (n_kv, T, *)."""
        return QuantizedKV(self.packed[0], self.scales[0], self.biases[0], self.group_size, self.bits)


class _Quantizable:
    """What both caches share about quantization: the switch at `kv.start`, and a way back below it.

    The switch happens at the start of an update whose cache already holds >= start positions, so which
    queries saw full precision depends only on positions (the model splits a pass that straddles `start`,
    see `quantization_split`). A rollback below `start` right after the switch restores the full-precision
    buffers kept for that one round; later it raises (the precise K/V are gone).
    """

    kv: Optional[KVQuant] = None
    quantized = False
    _fallback = None  # (the full-precision state, offset when it switched) while a rollback may need it

    @property
    def bits(self) -> int:  # mlx-lm's attention takes the quantized path when the cache has `bits`
        if not self.quantized:
            raise AttributeError("bits")
        return self.kv.bits

    @property
    def group_size(self) -> int:
        if not self.quantized:
            raise AttributeError("group_size")
        return self.kv.group_size

    @property
    def quantized_next(self) -> bool:
        """Whether the next update stores, and returns, quantized K/V."""
        return self.quantized or (self.kv is not None and self.offset >= self.kv.start)

    def _before_update(self) -> None:
        if self._fallback is not None and self.offset > self._fallback[1]:
            self._fallback = None  # the engine never rolls back past the start of the last pass
        if self.kv is not None and not self.quantized and self.offset >= self.kv.start:
            self._quantize_buffers()

    def _quantize_buffers(self) -> None:
        self._fallback = (self._snapshot(), self.offset) if self.offset else None
        if self.keys is not None:
            self.keys, self.values = quantize(self.keys, self.kv), quantize(self.values, self.kv)
        self.quantized = True

    def _below_start(self, n: int) -> bool:
        """True when rolling back n positions returns to full precision (restored from the fallback)."""
        if not (self.quantized and self.offset - n < self.kv.start):
            return False
        if self._fallback is None:
            raise CacheRollbackError(
                f"cannot roll back to {self.offset - n} positions: the cache was quantized at "
                f"--quantized-kv-start {self.kv.start} and no longer holds the full-precision K/V before it"
            )
        return True

    def compact(self, keep: Sequence[int], written: int) -> int:
        """After a pass that wrote `written` positions (a tree verify), keep its rows `keep` (increasing, from
        row 0) at consecutive positions, row keep[j] at the pass's j-th, and forget the others. Checked like
        `rollback`; returns the positions given back."""
        keep, (first, end) = list(keep), self._slots()
        if not keep or keep[0] != 0 or keep[-1] >= written or any(b <= a for a, b in zip(keep, keep[1:])) \
                or written > end - first:
            raise CacheRollbackError(f"cannot keep rows {keep} of a pass of {written} (the cache holds {end - first})")
        if keep[-1] != len(keep) - 1:  # rows to move: one gather, written back in place
            index = mx.array(keep, mx.int32) + (end - written)
            for buf in (self.keys, self.values):
                take = lambda x: mx.take(x, index, axis=2)  # noqa: E731
                _put(buf, tuple(map(take, buf)) if _is_quantized(buf) else take(buf), end - written)
        return self.rollback(written - len(keep))

    def _new(self, keys: mx.array, values: mx.array):
        """The incoming K/V (B, n_kv, S, hd) in this cache's storage form."""
        if self.quantized:
            return quantize(keys, self.kv), quantize(values, self.kv)
        return keys, values

    def _for_drafter(self, view):
        """The drafter's (K, V): arrays, or `QuantizedKV` when the cache is quantized. The drafter attends
        through quantized matmuls rather than dequantizing on read: a k=3 round, CPU, as a ratio to a
        full-precision cache (examples/kv_cache/drafter_reads.py, two runs): trained tiny pair at 1024 tokens
        0.95-0.99 vs 1.35-1.40 dequantized; E2B drafter shape at 4096 tokens 0.82-0.87 vs 1.15-1.30."""
        if not self.quantized:
            return view
        return tuple(QuantizedKV(*b, self.kv.group_size, self.kv.bits) for b in view)


class SharedQuantizedKV:
    """Stands in for a KV-shared layer's cache when its producer's K/V are quantized: the layer then attends
    them quantized and stores nothing (update is identity)."""

    quantized_next = True

    def __init__(self, producer):
        self.bits, self.group_size = producer.bits, producer.group_size

    def update_and_fetch(self, keys, values):
        return keys, values


class FullKVCache(_Quantizable, KVCache):
    """Full-attention cache (every position) with a checked rollback, optionally quantized.

    Capacity grows in whole multiples of `step` positions, so its size after T positions is
    ceil(T / step) * step whatever the chunking (memory.py predicts it exactly)."""

    def __init__(self, kv: Optional[KVQuant] = None):
        super().__init__()
        self.kv = kv

    def _snapshot(self):
        return self.keys, self.values

    def _slots(self):
        return 0, self.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self._before_update()
        keys, values = self._new(keys, values)
        prev, S = self.offset, _length(keys)
        if self.keys is None or prev + S > _length(self.keys):
            capacity = -(-(prev + S) // self.step) * self.step
            new_k, new_v = _zeros_like(keys, capacity), _zeros_like(values, capacity)
            if prev:
                _put(new_k, _take(self.keys, 0, prev), 0)
                _put(new_v, _take(self.values, 0, prev), 0)
            self.keys, self.values = new_k, new_v
        _put(self.keys, keys, prev)
        _put(self.values, values, prev)
        self.offset = prev + S
        return _take(self.keys, 0, self.offset), _take(self.values, 0, self.offset)

    def rollback(self, n: int) -> int:
        if n < 0 or n > self.offset:
            raise CacheRollbackError(f"cannot roll back {n} tokens from a full cache holding {self.offset}")
        if self._below_start(n):
            (self.keys, self.values), _ = self._fallback
            self._fallback, self.quantized = None, False
        self.offset -= n
        return n

    def trim(self, n: int) -> int:  # mlx-lm's name, same contract
        return self.rollback(min(n, self.offset))

    def keys_and_values(self):
        return _take(self.keys, 0, self.offset), _take(self.values, 0, self.offset)

    def drafter_view(self):
        """(K, V) of every cached position, in order: (B, n_kv, offset, hd)."""
        return self._for_drafter(self.keys_and_values())

    @property
    def state(self):
        return self.keys_and_values() if self.keys is not None else (None, None)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    def copy(self) -> "FullKVCache":
        """An independent cache holding the same positions (new handles on the same K/V)."""
        return _copy(self)


class SlidingKVCache(_Quantizable):
    """Sliding-window cache that can roll back up to `max_rollback` positions at any context length.

    Holds the last `window + 1 + max_rollback` positions (more right after an update) in temporal order.
    Attention sees all returned entries, so `make_mask` restricts every query to its own window.
    Its buffer is always `keep + step` positions (a long prefill chunk is returned whole to attention but
    not stored whole), so its size does not depend on the context (memory.py predicts it exactly).
    """

    step = 256

    def __init__(self, window: int, max_rollback: int = DEFAULT_MAX_ROLLBACK, kv: Optional[KVQuant] = None):
        self.window = window
        self.max_rollback = max_rollback
        self.kv = kv
        # W+1: the drafter's view of the window (HF's flipped mask); +max_rollback: rejected drafts.
        self.keep = window + 1 + max_rollback
        self.keys = None
        self.values = None
        self.offset = 0  # absolute positions seen (the next token's position)
        self._start = 0  # physical index of the oldest retained entry
        self._end = 0  # physical index one past the newest entry

    @property
    def capacity(self) -> int:
        return self.keep + self.step

    @property
    def length(self) -> int:
        return self._end - self._start

    def _retained_before_update(self) -> int:
        return min(self.length, self.keep)

    def _snapshot(self):
        return self.keys, self.values, self._start, self._end

    def _slots(self):
        return self._start, self._end

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self._before_update()
        keys, values = self._new(keys, values)  # (B, n_kv, S, hd) or quantized triples
        S = _length(keys)
        retained = self._retained_before_update()
        start = self._end - retained
        if S > self.step:  # a long chunk: attention needs all of it, the cache only its last `keep`
            full_k, full_v = keys, values
            if retained:
                full_k = self._concat(_take(self.keys, start, self._end), keys)
                full_v = self._concat(_take(self.values, start, self._end), values)
            kept = min(retained + S, self.keep)
            self.keys, self.values = _zeros_like(keys, self.capacity), _zeros_like(values, self.capacity)
            _put(self.keys, _take(full_k, retained + S - kept, retained + S), 0)
            _put(self.values, _take(full_v, retained + S - kept, retained + S), 0)
            self._start, self._end = 0, kept
            self.offset += S
            return full_k, full_v
        if self.keys is None or self._end + S > _length(self.keys):
            new_k, new_v = _zeros_like(keys, self.capacity), _zeros_like(values, self.capacity)
            if retained:
                _put(new_k, _take(self.keys, start, self._end), 0)
                _put(new_v, _take(self.values, start, self._end), 0)
            self.keys, self.values = new_k, new_v
            start, self._end = 0, retained
        _put(self.keys, keys, self._end)
        _put(self.values, values, self._end)
        self._start, self._end = start, self._end + S
        self.offset += S
        return self._view(self._start)

    @staticmethod
    def _concat(old, new):
        if _is_quantized(new):
            return tuple(mx.concatenate([a, b], axis=2) for a, b in zip(old, new))
        return mx.concatenate([old, new], axis=2)

    def _view(self, start: int):
        return _take(self.keys, start, self._end), _take(self.values, start, self._end)

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
        if self._below_start(n):
            (keys, values, start, end), switched_at = self._fallback
            self.keys, self.values, self._start = keys, values, start
            self._end = end - (switched_at - self.offset)  # the fallback ends where the switch happened
            self._fallback, self.quantized = None, False
        self._end -= n
        self.offset -= n
        return n

    def trim(self, n: int) -> int:  # mlx-lm's name, same contract
        return self.rollback(min(n, self.offset))

    def is_trimmable(self) -> bool:
        return True

    def drafter_view(self):
        """(K, V) of the last window+1 positions, in order: (B, n_kv, <=W+1, hd)."""
        return self._for_drafter(self._view(max(self._start, self._end - (self.window + 1))))

    def size(self) -> int:
        return self.length

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    @property
    def state(self):
        return self._view(self._start) if self.keys is not None else (None, None)

    def copy(self) -> "SlidingKVCache":
        """An independent cache holding the same positions (new handles on the same K/V)."""
        return _copy(self)


def _copy(cache):
    """New handles on the same K/V: MLX writes through a handle make new data, so neither copy's updates
    reach the other."""
    import copy

    def handles(buf):
        if buf is None:
            return None
        return tuple(mx.array(x) for x in buf) if _is_quantized(buf) else mx.array(buf)

    out = copy.copy(cache)
    out.keys, out.values = handles(cache.keys), handles(cache.values)
    if cache._fallback is not None:
        (k, v, *rest), at = cache._fallback
        out._fallback = ((handles(k), handles(v), *rest), at)
    return out


def quantization_split(caches: list, n: int) -> Optional[int]:
    """How many of n new positions to run before a cache switches to quantized K/V (it switches at the
    start of an update), or None when no switch falls strictly inside the n positions."""
    for c in caches or ():
        kv = getattr(c, "kv", None)
        if kv is not None and not c.quantized and c.offset < kv.start < c.offset + n:
            return kv.start - c.offset
    return None


def forward_split_at_switch(forward, tokens: mx.array, caches: list):
    """forward(tokens) -> array or tuple of arrays (B, L, ...), run as two passes when the caches switch to
    quantized K/V inside it, so that which queries saw full precision depends on positions, not on how
    the tokens were batched (a verify pass gives what one-token steps give)."""
    split = quantization_split(caches, tokens.shape[1])
    if not split:
        return forward(tokens)
    first, rest = forward(tokens[:, :split]), forward(tokens[:, split:])
    if isinstance(first, tuple):
        return tuple(None if a is None else mx.concatenate([a, b], axis=1) for a, b in zip(first, rest))
    return mx.concatenate([first, rest], axis=1)


def make_rewindable(caches: list, max_rollback: int = DEFAULT_MAX_ROLLBACK, kv_bits: Optional[int] = None,
                    kv_group_size: int = DEFAULT_KV_GROUP_SIZE, quantized_kv_start: int = 0) -> list:
    """Replace mlx-lm caches (from any model's `make_cache`) with rewindable equivalents, quantized when
    kv_bits is given. The group size is checked against head_dim at the first update (unknown here)."""
    kv = KVQuant.from_flags(kv_bits, kv_group_size, quantized_kv_start)
    out = []
    for c in caches:
        if isinstance(c, (FullKVCache, SlidingKVCache)):
            if c.kv != kv:
                raise ValueError("make_rewindable got a rewindable cache with a different quantization")
            out.append(c)
        elif isinstance(c, RotatingKVCache) and c.keep == 0:
            out.append(SlidingKVCache(c.max_size, max_rollback, kv))
        elif type(c) is KVCache:
            out.append(FullKVCache(kv))
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

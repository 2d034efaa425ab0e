"""K/V caches for B requests decoding together: every row keeps its own length, and gives back its own tail.

A row's positions sit in temporal order at physical slots `[end - length, end)` of its row of one
(B, n_kv, C, hd) buffer (or mlx-lm's quantized triple). A pass writes each row's L new positions at its
own `end` (a scatter), and attention reads the whole buffer with a per-row mask: a slot whose position is
past the query's, outside its window, rejected earlier, or padding scores -inf, never a zeroed key. So
`rollback([n_0, .., n_B-1])` gives back exactly each row's rejected tail, with no clamp to the batch's
shortest acceptance, and no row's padding or rejected drafts reach another step's attention.

Why temporal order and not a ring: attention sums a row's terms in slot order, and MLX's CPU backend adds
masked slots before or after a row's keys without changing a bit (tested), while a rotated order changes
the float sums. A row therefore computes exactly what a one-row cache (cache.py) computes.

Full layers: position p at slot p (capacity grows in steps of 256, as FullKVCache). Sliding layers: the
last `keep = window + 1 + max_rollback` positions of each row, compacted to slot 0 when a row would run
past the buffer (one gather for all rows), so memory does not grow with the context.

Rows join (`stack` of one-row caches, after their prefill) and leave (`select`, `row`) between passes.
Knows K/V tensors and positions; nothing of models, drafts or tokens.
"""

from typing import List, Optional, Sequence

import mlx.core as mx

from ..cache import (DEFAULT_MAX_ROLLBACK, FullKVCache, KVQuant, QuantizedKV, SlidingKVCache, _is_quantized,
                     quantize)
from ..errors import CacheRollbackError

FULL_STEP = 256  # as FullKVCache: capacity grows in whole steps
SLIDING_SLACK = 64  # positions a sliding row may grow past `keep` before the rows are compacted


def _map(buf, fn):
    """fn applied to an array, or to each array of a quantized triple."""
    return tuple(fn(x) for x in buf) if _is_quantized(buf) else fn(buf)


def _width(buf) -> int:
    return (buf[0] if _is_quantized(buf) else buf).shape[2]


def _pad_to(buf, capacity: int):
    """buf (B, n_kv, T, *) with zero slots appended up to `capacity`."""
    def pad(x):
        extra = capacity - x.shape[2]
        if extra <= 0:
            return x
        return mx.concatenate([x, mx.zeros((*x.shape[:2], extra, x.shape[3]), x.dtype)], axis=2)
    return _map(buf, pad)


def _scatter(buf, new, slots: mx.array):
    """Write new (B, n_kv, L, *) into buf at per-row slots (B, L)."""
    index = slots[:, None, :, None]
    if _is_quantized(buf):
        return tuple(mx.put_along_axis(b, index, n, axis=2) for b, n in zip(buf, new))
    return mx.put_along_axis(buf, index, new, axis=2)


def _gather(buf, slots: mx.array):
    """(B, n_kv, S, *): buf at per-row slots (B, S)."""
    index = slots[:, None, :, None]
    return _map(buf, lambda x: mx.take_along_axis(x, index, axis=2))


class _RowsCache:
    """What full and sliding rows share: per-row offsets and ends, the scatter, masks, rollback, joins."""

    def __init__(self, keys, values, offsets: Sequence[int], ends: Sequence[int], kv: Optional[KVQuant],
                 quantized: bool):
        self.keys, self.values = keys, values  # (B, n_kv, C, hd) or quantized triples
        self.offsets = list(offsets)  # positions each row holds (its next position)
        self.ends = list(ends)  # physical slot one past each row's newest position
        self.quant, self.quantized = kv, quantized  # not `kv`: the scheduler, not the model, splits at a switch
        self.last_written = 0  # L of the latest pass: what a rollback may give back

    # -- what mlx-lm's attention and RoPE read
    @property
    def offset(self) -> mx.array:
        """(B,) int32: each row's next position (RoPE takes per-row offsets)."""
        return mx.array(self.offsets, mx.int32)

    @property
    def bits(self) -> int:  # mlx-lm's attention takes the quantized path when the cache has `bits`
        if not self.quantized:
            raise AttributeError("bits")
        return self.quant.bits

    @property
    def group_size(self) -> int:
        if not self.quantized:
            raise AttributeError("group_size")
        return self.quant.group_size

    @property
    def quantized_next(self) -> bool:
        return self.quantized

    @property
    def rows(self) -> int:
        return len(self.offsets)

    @property
    def capacity(self) -> int:
        return _width(self.keys)

    # -- a pass
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """keys, values (B, n_kv, L, hd), row b's at positions offsets[b]..; returns the whole buffers."""
        L = keys.shape[2]
        if self.quantized:
            keys, values = quantize(keys, self.quant), quantize(values, self.quant)
        self._make_room(L)
        slots = mx.array(self.ends, mx.int32)[:, None] + mx.arange(L, dtype=mx.int32)[None]  # (B, L)
        self.keys, self.values = _scatter(self.keys, keys, slots), _scatter(self.values, values, slots)
        self.offsets = [o + L for o in self.offsets]
        self.ends = [e + L for e in self.ends]
        self.last_written = L
        return self.keys, self.values

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        """(B, 1, N, C) bool for N new queries per row against the buffers `update_and_fetch` returns next."""
        capacity, ends = self._layout_after(N)
        return self._mask(N, capacity, ends, window_size or self._window())

    def _mask(self, N: int, capacity: int, ends: Sequence[int], window: Optional[int]):
        """Row b's query i is at position offsets[b] + i; slot j holds position j + offsets[b] - ends[b]
        (ends before this pass's writes)."""
        offsets = mx.array(self.offsets, mx.int32)[:, None, None]  # (B, 1, 1)
        base = offsets - mx.array(ends, mx.int32)[:, None, None]
        q = offsets + mx.arange(N, dtype=mx.int32)[None, :, None]  # (B, N, 1)
        p = base + mx.arange(capacity, dtype=mx.int32)[None, None, :]  # (B, 1, C)
        mask = p <= q
        if window is not None:
            mask = mask & (q - p < window)
        return mask[:, None]

    def tree_mask(self, depths: mx.array, ancestors: mx.array) -> mx.array:
        """(B, 1, L, C) bool for a pass whose row b has query i at position offsets[b] + depths[b, i] (a tree
        verify, trees/views.py): it sees the cached positions inside its window and the pass's slots that
        hold itself or an ancestor (ancestors[b, i, j]). A chain's depths and ancestors give `make_mask`'s."""
        B, L = depths.shape
        capacity, ends = self._layout_after(L)
        window = self._window()
        offsets, E = mx.array(self.offsets, mx.int32)[:, None, None], mx.array(ends, mx.int32)[:, None, None]
        slot = mx.arange(capacity, dtype=mx.int32)[None, None]  # (1, 1, C)
        q, p = offsets + depths[:, :, None], offsets - E + slot  # (B, L, 1), (B, 1, C)
        j = mx.clip(slot - E, 0, L - 1)[:, 0]  # (B, C): the pass's row each slot holds
        cached = slot < E
        seen = mx.take_along_axis(ancestors, mx.broadcast_to(j[:, None], (B, L, capacity)), axis=2)  # (B, L, C)
        new = (slot >= E) & (slot < E + L) & seen
        if window is not None:
            cached = cached & (q - p < window)
            new = new & (depths[:, :, None] - mx.take_along_axis(depths, j, axis=1)[:, None] < window)
        return (cached | new)[:, None]

    def compact(self, keeps: Sequence[Sequence[int]]) -> None:
        """After a pass (a tree verify in some rows), row b keeps the pass's rows keeps[b] (increasing, from
        row 0) at consecutive positions, row keeps[b][j] at the pass's j-th, and gives back the rest. Checked
        like `rollback`."""
        L = self.last_written
        if len(keeps) != self.rows:
            raise ValueError(f"compact got {len(keeps)} rows of kept positions for {self.rows} rows")
        for b, keep in enumerate(keeps):
            if not keep or keep[0] != 0 or keep[-1] >= L or any(y <= x for x, y in zip(keep, keep[1:])):
                raise CacheRollbackError(f"row {b}: cannot keep rows {list(keep)} of a pass of {L}")
        if any(k[-1] != len(k) - 1 for k in keeps):  # rows to move: one gather and one scatter for all rows
            M = max(len(k) for k in keeps)
            src = mx.array([[e - L + (k[j] if j < len(k) else j) for j in range(M)]
                            for e, k in zip(self.ends, keeps)])
            dst = mx.array([[e - L + j for j in range(M)] for e in self.ends])
            self.keys = _scatter(self.keys, _gather(self.keys, src), dst)
            self.values = _scatter(self.values, _gather(self.values, src), dst)
        self.rollback([L - len(k) for k in keeps])

    def rollback(self, counts: Sequence[int]) -> None:
        """Give back the newest counts[b] positions of row b (each at most the last pass's L)."""
        if len(counts) != self.rows:
            raise ValueError(f"rollback got {len(counts)} counts for {self.rows} rows")
        for b, n in enumerate(counts):
            if n < 0 or n > self.last_written or n > self.offsets[b]:
                raise CacheRollbackError(f"row {b}: cannot roll back {n} positions (the last pass wrote "
                                         f"{self.last_written}; the row holds {self.offsets[b]})")
        self.offsets = [o - n for o, n in zip(self.offsets, counts)]
        self.ends = [e - n for e, n in zip(self.ends, counts)]

    # -- rows joining and leaving
    def select(self, rows: Sequence[int]) -> "_RowsCache":
        """A cache of these rows only, in this order (rows that finished leave; nothing is copied for them)."""
        index = mx.array(list(rows), mx.int32)
        take = lambda x: mx.take(x, index, axis=0)  # noqa: E731
        return type(self)._like(self, _map(self.keys, take), _map(self.values, take),
                                [self.offsets[r] for r in rows], [self.ends[r] for r in rows])

    def merge(self, other: "_RowsCache") -> "_RowsCache":
        """self's rows, then other's: one cache (joining rows)."""
        if self.quantized != other.quantized:
            raise ValueError("rows with full-precision and quantized K/V cannot share a cache")
        C = max(self.capacity, other.capacity)
        cat = lambda a, b: mx.concatenate([a, b], axis=0)  # noqa: E731
        keys = _zip_map(cat, _pad_to(self.keys, C), _pad_to(other.keys, C))
        values = _zip_map(cat, _pad_to(self.values, C), _pad_to(other.values, C))
        return type(self)._like(self, keys, values, self.offsets + other.offsets, self.ends + other.ends)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for b in (self.keys, self.values) for x in (b if _is_quantized(b) else (b,)))


def _zip_map(fn, a, b):
    if _is_quantized(a):
        return tuple(fn(x, y) for x, y in zip(a, b))
    return fn(a, b)


class RowsFullCache(_RowsCache):
    """Full-attention K/V of B rows: row b's position p at slot p."""

    @staticmethod
    def _like(other, keys, values, offsets, ends):
        return RowsFullCache(keys, values, offsets, ends, other.quant, other.quantized)

    def _window(self):
        return None

    def _layout_after(self, N: int):
        need = max(self.ends) + N
        capacity = self.capacity if need <= self.capacity else -(-need // FULL_STEP) * FULL_STEP
        return capacity, self.ends

    def _make_room(self, N: int) -> None:
        capacity, _ = self._layout_after(N)
        if capacity > self.capacity:
            self.keys, self.values = _pad_to(self.keys, capacity), _pad_to(self.values, capacity)

    @classmethod
    def from_row(cls, cache: FullKVCache, capacity: int = 0) -> "RowsFullCache":
        """One row from a one-row cache (a request's prefill), padded to at least `capacity` slots."""
        keys, values = cache.keys_and_values()
        need = max(capacity, -(-(cache.offset + 1) // FULL_STEP) * FULL_STEP)
        return cls(_pad_to(keys, need), _pad_to(values, need), [cache.offset], [cache.offset], cache.kv,
                   cache.quantized)

    def row(self, b: int) -> FullKVCache:
        """Row b as a one-row cache (what a request keeps when it leaves: its prompt-cache slot)."""
        out = FullKVCache(self.quant)
        n = self.offsets[b]
        capacity = -(-max(n, 1) // out.step) * out.step
        cut = lambda x: _pad_to(x[b : b + 1, :, :n], capacity)  # noqa: E731
        out.keys, out.values, out.offset, out.quantized = _map(self.keys, cut), _map(self.values, cut), n, self.quantized
        return out

    def row_drafter_view(self, b: int):
        """Row b's (K, V) as a one-row cache's `drafter_view` gives them: (1, n_kv, offset, hd)."""
        cut = lambda x: x[b : b + 1, :, : self.ends[b]]  # noqa: E731
        return _for_drafter(self, (_map(self.keys, cut), _map(self.values, cut)))

    def drafter_views(self):
        """(K, V) of all rows (B, n_kv, C, hd), and the valid-slot mask (B, C) for a query at each row's
        next position (every earlier position)."""
        slots = mx.arange(self.capacity, dtype=mx.int32)[None]
        return _for_drafter(self, (self.keys, self.values)), slots < mx.array(self.ends, mx.int32)[:, None]


class RowsSlidingCache(_RowsCache):
    """Sliding-window K/V of B rows: each row's last `keep` positions (more between compactions)."""

    def __init__(self, keys, values, offsets, ends, kv, quantized, window: int,
                 max_rollback: int = DEFAULT_MAX_ROLLBACK):
        super().__init__(keys, values, offsets, ends, kv, quantized)
        self.window, self.max_rollback = window, max_rollback
        self.keep = window + 1 + max_rollback  # as SlidingKVCache: the drafter's W+1, and a rollback

    @staticmethod
    def _like(other, keys, values, offsets, ends):
        return RowsSlidingCache(keys, values, offsets, ends, other.quant, other.quantized, other.window,
                                other.max_rollback)

    def _window(self):
        return self.window

    def _layout_after(self, N: int):
        """(capacity, ends before the write): compaction moves every row's last `keep` to slot 0."""
        if max(self.ends) + N <= self.capacity:
            return self.capacity, self.ends
        return self.capacity, [min(e, self.keep) for e in self.ends]

    def _make_room(self, N: int) -> None:
        _, ends = self._layout_after(N)
        if ends == self.ends:
            return
        start = mx.array([e - n for e, n in zip(self.ends, ends)], mx.int32)[:, None]  # (B, 1)
        slots = mx.minimum(start + mx.arange(self.keep, dtype=mx.int32)[None], self.capacity - 1)
        keep = lambda buf: _pad_to(_gather(buf, slots), self.capacity)  # noqa: E731
        self.keys, self.values, self.ends = keep(self.keys), keep(self.values), ends

    def rollback(self, counts: Sequence[int]) -> None:
        for b, n in enumerate(counts):
            needed = min(self.offsets[b] - n, self.window + 1)
            if self.ends[b] - n < needed:
                raise CacheRollbackError(f"row {b}: rolling back {n} would leave fewer than the {needed} "
                                         "positions its window needs")
        super().rollback(counts)

    @classmethod
    def from_row(cls, cache: SlidingKVCache, slack: int = SLIDING_SLACK) -> "RowsSlidingCache":
        """One row from a one-row sliding cache: its retained positions, in order, from slot 0."""
        keys, values = cache.state
        if keys is None:  # an empty cache: nothing retained yet
            raise ValueError("a row joins a batch after its prefill: its cache cannot be empty")
        n = min(cache.length, cache.keep)  # right after an update it may hold more than `keep`
        capacity = cache.keep + slack
        last = lambda x: _pad_to(x[:, :, x.shape[2] - n :], capacity)  # noqa: E731
        return cls(_map(keys, last), _map(values, last), [cache.offset], [n], cache.kv, cache.quantized,
                   cache.window, cache.max_rollback)

    def row(self, b: int) -> SlidingKVCache:
        """Row b as a one-row cache holding its last min(offset, keep) positions, in order."""
        out = SlidingKVCache(self.window, self.max_rollback, self.quant)
        n = min(self.ends[b], self.keep, self.offsets[b])
        take = lambda x: _pad_to(x[b : b + 1, :, self.ends[b] - n : self.ends[b]], out.capacity)  # noqa: E731
        out.keys, out.values = _map(self.keys, take), _map(self.values, take)
        out._start, out._end, out.offset, out.quantized = 0, n, self.offsets[b], self.quantized
        return out

    def row_drafter_view(self, b: int):
        """Row b's last window + 1 positions (fewer early on), as SlidingKVCache.drafter_view gives them."""
        end = self.ends[b]
        cut = lambda x: x[b : b + 1, :, end - min(self.window + 1, end) : end]  # noqa: E731
        return _for_drafter(self, (_map(self.keys, cut), _map(self.values, cut)))

    def drafter_views(self):
        """(K, V) of all rows and the valid-slot mask (B, C) for a query at each row's next position: the
        last window + 1 positions (the drafter's view, as SlidingKVCache.drafter_view)."""
        slots = mx.arange(self.capacity, dtype=mx.int32)[None]
        ends = mx.array(self.ends, mx.int32)[:, None]
        valid = (slots < ends) & (slots >= ends - (self.window + 1))
        return _for_drafter(self, (self.keys, self.values)), valid


def _for_drafter(cache: _RowsCache, view):
    """The drafter's (K, V): arrays, or `QuantizedKV` when the rows are quantized."""
    if not cache.quantized:
        return view
    return tuple(QuantizedKV(*b, cache.quant.group_size, cache.quant.bits) for b in view)


def stack_rows(caches: List[list]) -> list:
    """Per layer, one rows-cache from one-row caches (each a request's list of per-layer caches)."""
    out = []
    for layer in zip(*caches):
        joined = None
        for c in layer:
            row = RowsFullCache.from_row(c) if isinstance(c, FullKVCache) else RowsSlidingCache.from_row(c)
            joined = row if joined is None else joined.merge(row)
        out.append(joined)
    return out


def join_rows(batch: Optional[list], caches: list) -> list:
    """The batch's per-layer caches with one more row (a request's one-row caches) appended."""
    new = stack_rows([caches])
    return new if batch is None else [b.merge(n) for b, n in zip(batch, new)]


def select_rows(batch: list, rows: Sequence[int]) -> list:
    return [c.select(rows) for c in batch]


def rollback_rows(batch: list, counts: Sequence[int]) -> None:
    if any(counts):
        for c in batch:
            c.rollback(counts)

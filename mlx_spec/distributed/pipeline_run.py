"""One pipelined pass of a Gemma 4 trunk (pipeline.py says why it is shaped so).

What travels is one array (B, L, W) in fixed slots: the hidden state, the new K and V rows of every producer
layer, and the outputs of the layers a block drafter captures. Stage s receives the slots of the layers
before it, fills its own and sends the array on; rank 0's complete array is then gathered to every rank. A
slot its stage has not reached yet is zeros. Every rank issues the same collectives in the same order.
"""

from typing import Dict, List, Sequence, Tuple

import mlx.core as mx

from ..cache import SharedQuantizedKV
from ..errors import CacheRollbackError
from ..models.base import EMBEDDING_OUTPUT

HIDDEN = ("h", 0)  # the hidden state's slot: each stage overwrites it with its output


class PositionCache:
    """The cache of a layer another rank runs: it holds nothing but counts positions, so offsets and rollbacks
    agree with the caches that hold K/V."""

    kv, quantized, keys, values, nbytes = None, False, None, None, 0

    def __init__(self):
        self.offset = 0

    def advance(self, n: int) -> None:
        self.offset += n

    def rollback(self, n: int) -> int:
        if n < 0 or n > self.offset:
            raise CacheRollbackError(f"cannot roll back {n} tokens from a cache holding {self.offset}")
        self.offset -= n
        return n

    def trim(self, n: int) -> int:
        return self.rollback(min(n, self.offset))


class _Tap:
    """Stands in for a producer layer's cache during its layer: records the K/V rows the layer stores (full
    precision, before any quantization), so the mirrors can store exactly what the owner stores."""

    def __init__(self, cache):
        self.cache, self.rows = cache, None

    def update_and_fetch(self, keys, values):
        self.rows = (keys, values)
        return self.cache.update_and_fetch(keys, values)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def _rows(x: mx.array) -> mx.array:
    """K/V (B, n_kv, L, D) -> (B, L, n_kv * D)."""
    B, n, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, n * D)


def _unrows(x: mx.array, n_kv: int) -> mx.array:
    """(B, L, n_kv * D) -> (B, n_kv, L, D)."""
    B, L, W = x.shape
    return x.reshape(B, L, n_kv, W // n_kv).transpose(0, 2, 1, 3)


def _pack(slots, values: Dict, like: mx.array) -> mx.array:
    B, L, _ = like.shape
    return mx.concatenate([values[(kind, i)].astype(like.dtype) if (kind, i) in values
                           else mx.zeros((B, L, w), like.dtype) for kind, i, w in slots], axis=-1)


def _unpack(slots, payload: mx.array) -> Dict:
    out, at = {}, 0
    for kind, i, w in slots:
        out[(kind, i)] = payload[..., at : at + w]
        at += w
    return out


class PipelinedTrunk:
    """A Gemma 4 trunk that runs its stage's layers (mixed into Gemma4TextModel by pipeline.py)."""

    def _slots(self, capture: Sequence[int]) -> List[Tuple[str, int, int]]:
        """(kind, layer, width) of every slot, the same on every rank."""
        H = self.config.hidden_size
        slots = [(*HIDDEN, H)]
        for p in sorted(set(self.stage.producers.values())):
            attn = self.layers[p].self_attn
            slots += [("k", p, attn.n_kv_heads * attn.head_dim), ("v", p, attn.n_kv_heads * attn.head_dim)]
        return slots + [("out", c, H) for c in capture if c != EMBEDDING_OUTPUT]

    def _stage_per_layer_inputs(self, inputs: mx.array, h: mx.array) -> mx.array:
        """mlx-lm's per-layer inputs for this stage's layers only: (B, L, n_stage, P)."""
        B, L = inputs.shape
        P = self.hidden_size_per_layer_input
        table = (self.embed_tokens_per_layer(inputs) * self.embed_tokens_per_layer_scale).reshape(B, L, -1, P)
        projected = self.per_layer_model_projection(h) * self.per_layer_projection_scale
        projected = self.per_layer_projection_norm(projected.reshape(B, L, -1, P))
        return (projected + table) * self.per_layer_input_scale

    def _mirror(self, cache, rows: Dict, p: int):
        """Feed a producer's mirror the rows its owner stored: (K, V as the layer returns them, offset)."""
        n_kv = self.layers[p].self_attn.n_kv_heads
        offset = mx.array(cache.offset)
        keys, values = (_unrows(rows[(kind, p)], n_kv) for kind in ("k", "v"))
        return cache.update_and_fetch(keys, values), offset

    def run(self, inputs: mx.array, cache=None, per_layer_inputs=None, capture: Sequence[int] = ()):
        """gemma4_text's `run` over this stage's layers; every rank returns the same (hidden, captured)."""
        stage, n = self.stage, len(self.layers)
        h = self.embed_tokens(inputs) * self.embed_scale  # (B, L, H)
        pli = self._stage_per_layer_inputs(inputs, h) if self.hidden_size_per_layer_input else None
        cache = list(cache or []) + [None] * (n - len(cache or []))
        masks = self._make_masks(h, [cache[stage.producers[layer.layer_type]] for layer in self.layers])
        slots, embedded = self._slots(capture), h
        got = {}
        if not stage.last:  # the layers before this stage ran on the next rank
            got = _unpack(slots, mx.distributed.recv_like(_pack(slots, {}, h), stage.rank + 1, group=stage.group))
            h = got[HIDDEN]
        intermediates = [(None, None)] * n
        for p in set(stage.producers.values()):
            if p < stage.start:  # a mirror, fed what its owner stored
                intermediates[p] = self._mirror(cache[p], got, p)
        values = {key: v for key, v in got.items() if key != HIDDEN}
        for i in range(stage.start, stage.end):
            h = self._layer(i, h, cache, masks[i], pli, intermediates, values)
            if i in capture:
                values[("out", i)] = h
        values[HIDDEN] = h
        return self._finish(slots, values, embedded, cache, capture)

    def _layer(self, i: int, h: mx.array, cache: list, mask, pli, intermediates: list, values: Dict) -> mx.array:
        layer, c, prev = self.layers[i], cache[i], self.previous_kvs[i]
        kvs, offset = intermediates[prev]  # KV-shared layers reuse their producer's K/V and offset
        if c is None and prev != i and getattr(cache[prev], "quantized", False):
            c = SharedQuantizedKV(cache[prev])
        tap = _Tap(c) if i in self.stage.producers.values() else c
        pl = pli[:, :, i - self.stage.start, :] if pli is not None else None
        h, kvs, offset = layer(h, mask, tap, per_layer_input=pl, shared_kv=kvs, offset=offset)
        intermediates[i] = (kvs, offset)
        if tap is not c:
            values[("k", i)], values[("v", i)] = (_rows(x) for x in tap.rows)
        return h

    def _finish(self, slots, values: Dict, embedded: mx.array, cache: list, capture: Sequence[int]):
        """Send this stage's slots on, gather rank 0's to every rank, feed the mirrors of later stages'
        producers, and count the positions of the layers other ranks ran."""
        stage = self.stage
        payload = _pack(slots, values, embedded)
        if stage.rank != 0:
            payload = mx.distributed.send(payload, stage.rank - 1, group=stage.group)
        final = _unpack(slots, mx.distributed.all_gather(payload, group=stage.group)[: payload.shape[0]])
        for p in set(stage.producers.values()):
            if p >= stage.end:
                self._mirror(cache[p], final, p)
        L = embedded.shape[1]
        for c in cache:
            if isinstance(c, PositionCache):
                c.advance(L)
        # a prefill evaluates only the caches: tie the collectives to one, so every rank runs them
        anchor = cache[min(stage.producers.values())]
        anchor.keys = _depends(anchor.keys, final[HIDDEN])
        captured = [embedded if c == EMBEDDING_OUTPUT else final[("out", c)] for c in capture]
        return self.norm(final[HIDDEN]), captured


def _depends(buf, on: mx.array):
    if isinstance(buf, (tuple, list)):
        return (mx.depends(buf[0], on), *buf[1:])
    return mx.depends(buf, on)

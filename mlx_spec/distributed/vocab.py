"""Vocabulary-sharded embeddings and output head: each rank keeps 1/N of the rows.

A lookup takes the rows a rank holds, zeros for the others, and sums over the ranks: adding zeros is exact,
so every rank gets the rows one process would. The head gives each rank the logits of its rows, gathered
before anyone samples, so every rank holds the same full (..., V) logits, bytes moved, not re-added.
For a Gemma 4 E2B the per-layer-input table is most of the weights (262144 x 35 x 256), so this is what makes
each rank's share about 1/N. Knows embeddings and linears; nothing of models.
"""

import mlx.core as mx
import mlx.nn as nn

from ..errors import DistributedError
from .slicing import extend, take_rows


def gather_last(x: mx.array, group) -> mx.array:
    """(..., V/N) on each rank -> (..., V) on every rank, rank r's part at columns r*V/N."""
    parts = mx.distributed.all_gather(mx.expand_dims(x, 0), group=group)  # (N, ..., V/N)
    return mx.moveaxis(parts, 0, -2).reshape(*x.shape[:-1], -1)


class _VocabRows:
    """An embedding holding rows first .. first+count of the vocabulary."""

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.first
        mine = (local >= 0) & (local < self.count)
        rows = super().__call__(mx.where(mine, local, 0))  # (..., D)
        return mx.distributed.all_sum(mx.where(mine[..., None], rows, mx.zeros_like(rows)), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return gather_last(super().as_linear(x), self.group)


class _GatheredOutput:
    """A linear holding output rows first .. first+count (an untied LM head): its outputs are gathered."""

    def __call__(self, x: mx.array) -> mx.array:
        return gather_last(super().__call__(x), self.group)


def row_range(total: int, group, what: str):
    N, r = group.size(), group.rank()
    if total % N:
        raise DistributedError(f"{what} has {total} rows, which {N} ranks cannot split evenly")
    per = total // N
    return r * per, per


def shard_embedding(embedding: nn.Module, group, what: str) -> None:
    """nn.Embedding or nn.QuantizedEmbedding, in place: this rank's rows, lookups and as_linear collective."""
    first, count = row_range(embedding["weight"].shape[0], group, what)
    take_rows(embedding, first, first + count)
    extend(embedding, _VocabRows, first=first, count=count, group=group)


def shard_head(linear: nn.Module, group) -> None:
    """An untied LM head (nn.Linear or nn.QuantizedLinear), in place: this rank's vocabulary rows, gathered."""
    first, count = row_range(linear["weight"].shape[0], group, "the LM head")
    take_rows(linear, first, first + count)
    extend(linear, _GatheredOutput, group=group)

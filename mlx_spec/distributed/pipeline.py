"""Pipeline parallel Gemma 4: the decoder layers split over the ranks, as mlx-lm's `--pipeline` splits them.

Rank r runs a contiguous stage of layers; the last rank runs the first layers and rank 0 the last (mlx-lm's
order), so a pass goes N-1 -> ... -> 0 by send/recv, and rank 0's output is then shared with every rank,
which computes the same logits from it (embeddings, final norm and head on every rank, as in mlx-lm). No
sum changes order, so the logits are one process's. One hop per stage per pass: for links too slow for an
all-reduce per layer.

What Gemma 4 adds (pipeline_run.py does the pass): KV-shared layers (E2B/E4B) may sit on a later stage than
the layer whose K/V they read, and an MTP drafter on every rank reads the producer layers' K/V. So the new
K/V rows of each producer layer travel with the hidden state, and every rank keeps the producer caches it
does not run as mirrors, fed the same rows, rolled back with the rest: the same bytes as the owner's. A
block drafter's chosen layer outputs travel the same way. Each rank keeps only its layers' columns of the
per-layer-input table. Layers other ranks run are stubs (their type and K/V geometry, no weights), and their
caches count positions only.
"""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List

import mlx.nn as nn

from ..errors import DistributedError
from .pipeline_run import PipelinedTrunk, PositionCache
from .slicing import extend, take_columns, take_rows


@dataclass(frozen=True)
class Stage:
    """Rank `rank` of `size` runs layers [start, end); `producers` maps each layer type to the layer whose
    K/V the KV-shared layers (and an MTP drafter) read."""

    group: object
    rank: int
    size: int
    start: int
    end: int
    producers: Dict[str, int]

    @property
    def last(self) -> bool:  # runs the first layers: nothing to receive
        return self.rank == self.size - 1


def split(n_layers: int, size: int) -> List[int]:
    """Layers per rank: an even split, the low ranks (which run the last layers) taking the extra ones."""
    if n_layers < size:
        raise DistributedError(f"{size} ranks cannot split {n_layers} decoder layers (each rank needs one); use at "
                               f"most {n_layers} ranks")
    base, extra = divmod(n_layers, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def stage_of(n_layers: int, producers: Dict[str, int], group) -> Stage:
    sizes = split(n_layers, group.size())
    r = group.rank()
    start = sum(sizes[r + 1:])
    return Stage(group, r, group.size(), start, start + sizes[r], dict(producers))


class RemoteLayer(nn.Module):
    """A decoder layer another rank runs: its type and K/V geometry (what caches and drafters ask), no weights."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer_type, self.layer_idx = layer.layer_type, layer.layer_idx
        attn = layer.self_attn
        self.self_attn = SimpleNamespace(head_dim=attn.head_dim, n_kv_heads=attn.n_kv_heads, n_heads=attn.n_heads)


class _PipelinedModel:
    """A gemma4_text Model whose trunk runs one stage: caches for its layers and the producers' mirrors."""

    def make_cache(self, *args, **kwargs) -> list:
        stage, caches = self.model.stage, super().make_cache(*args, **kwargs)
        keep = set(range(stage.start, stage.end)) | set(stage.producers.values())
        return [c if i in keep else PositionCache() for i, c in enumerate(caches)]


def _slice_per_layer_inputs(trunk: nn.Module, start: int, end: int) -> None:
    """Keep the per-layer-input table's and projection's columns for layers [start, end) (E2B: most weights)."""
    P = trunk.hidden_size_per_layer_input
    take_columns(trunk.embed_tokens_per_layer, start * P, end * P)
    take_rows(trunk.per_layer_model_projection, start * P, end * P)


def pipeline_text_model(model: nn.Module, group) -> str:
    """Split a gemma4_text Model's layers over `group`, in place; returns what each rank runs, in words."""
    trunk, n = model.model, len(model.layers)
    stage = stage_of(n, model.producer_layers, group)
    if trunk.hidden_size_per_layer_input:
        _slice_per_layer_inputs(trunk, stage.start, stage.end)
    trunk.layers = [layer if stage.start <= i < stage.end else RemoteLayer(layer) for i, layer in enumerate(trunk.layers)]
    extend(trunk, PipelinedTrunk, stage=stage)
    extend(model, _PipelinedModel)
    sizes = split(n, group.size())
    spans = []
    for r in range(group.size()):
        start = sum(sizes[r + 1:])
        spans.append(f"rank {r} layers {start}-{start + sizes[r] - 1}")
    return f"{', '.join(spans)}; embeddings and head on every rank"

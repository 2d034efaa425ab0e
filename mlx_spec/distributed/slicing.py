"""Cutting a module's parameters down to one rank's part, before they are materialized.

Weights come from safetensors lazily (mx.load), so a slice taken here is all a rank ever keeps: the full
tensor is read once while the slice is copied (mx.contiguous) and then dropped. Quantized layers are cut
along their quantization groups. Knows modules and parameters; nothing of models.
"""

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..errors import DistributedError


def take_rows(module: nn.Module, start: int, stop: int) -> None:
    """Keep rows start:stop (axis 0) of every parameter: a linear's output features, an embedding's
    vocabulary rows, a switch layer's experts. Quantized weights keep whole rows, so any cut works."""
    module.update(tree_map(lambda p: mx.contiguous(p[start:stop]), module.parameters()))


def take_columns(module: nn.Module, start: int, stop: int) -> None:
    """Keep input features (the last axis) start:stop of a linear or embedding, quantized or not."""
    bits, group = getattr(module, "bits", None), getattr(module, "group_size", None)
    if bits is None:
        module.update(tree_map(lambda p: mx.contiguous(p[..., start:stop]), module.parameters()))
        return
    if start % group or stop % group:
        raise DistributedError(f"columns {start}:{stop} do not fall on the {group}-wide quantization groups")
    packed = 32 // bits if 32 % bits == 0 else None
    if packed is None or start % packed:
        raise DistributedError(f"{bits}-bit weights cannot be cut at column {start}")
    cuts = {"weight": (start // packed, stop // packed), "scales": (start // group, stop // group),
            "biases": (start // group, stop // group)}
    module.update({name: mx.contiguous(module[name][..., a:b]) for name, (a, b) in cuts.items() if name in module})


@functools.cache
def _subclass(mixin: type, cls: type) -> type:
    return type(f"{mixin.__name__.strip('_')}{cls.__name__}", (mixin, cls), {})


def extend(module: nn.Module, mixin: type, **attributes) -> nn.Module:
    """Give `module` the behaviour of `mixin` (its methods first, the module's own after), in place: its
    parameters and their names stay, so checkpoints load into it unchanged."""
    module.__class__ = _subclass(mixin, type(module))
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


def parameter_bytes(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))

"""Range checks for the numbers in a model config, made before a model is built from them.

A config is untrusted input: `num_attention_heads: 0` divides by zero deep in a layer, `intermediate_size:
10**12` overflows MLX's int32 shapes, `sliding_window: 0` or `max_position_embeddings: -1` build a model
that decodes garbage or has no context bound, and a fractional `block_size` crashes mid-generation. Each
check raises ValueError naming the field, the value and the range; `loading.build_model` turns that into
one error naming the config file. Booleans and floats are not integers here, even 8.0: the configs these
fields come from write integers.

Knows numbers and field names; nothing of layers or weights.
"""

import math
from typing import Iterable, Optional

MAX_DIM = 2**31 - 1  # MLX shapes (and RoPE offsets) are int32


def integer(value, name: str, low: int = 1, high: int = MAX_DIM, optional: bool = False) -> Optional[int]:
    """`value` if it is an integer in [low, high] (or None when `optional`), else ValueError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        if high != MAX_DIM:
            span = f"in [{low}, {high}]"
        elif isinstance(value, int) and not isinstance(value, bool) and value > high:
            span = f"<= {high} (the largest dimension MLX builds)"
        else:
            span = f">= {low}"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    return value


def integers(args, names: Iterable[str], low: int = 1, optional: bool = False) -> None:
    """`integer` for each named attribute of args."""
    for name in names:
        integer(getattr(args, name), name, low, optional=optional)


def positive_number(value, name: str, optional: bool = False) -> Optional[float]:
    """`value` if it is a finite number > 0 (or None when `optional`), else ValueError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        none = " or null" if optional else ""
        raise ValueError(f"{name} must be a finite number > 0{none}, got {value!r}")
    return value


def heads_divide(n_heads: int, n_kv_heads: int, what: str) -> None:
    """Grouped-query attention shares each K/V head among n_heads / n_kv_heads query heads."""
    if n_heads % n_kv_heads:
        raise ValueError(f"num_attention_heads {n_heads} is not a multiple of {what} {n_kv_heads} (each K/V head "
                         "serves a whole group of query heads)")


def rope(params, name: str) -> None:
    """A RoPE parameter block: rope_theta > 0 and a partial_rotary_factor in (0, 1], where given."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise ValueError(f"{name} must be an object, got {params!r}")
    if "rope_theta" in params:
        positive_number(params["rope_theta"], f"{name}.rope_theta")
    factor = params.get("partial_rotary_factor")
    if factor is not None and (positive_number(factor, f"{name}.partial_rotary_factor") > 1):
        raise ValueError(f"{name}.partial_rotary_factor must be in (0, 1], got {factor!r}")


"""How K/V is quantized: the settings (mlx-lm's --kv-bits, --kv-group-size, --quantized-kv-start), checked
against a model's head sizes. The caches that store it are cache.py's."""

from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import MlxSpecError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize supports
DEFAULT_KV_GROUP_SIZE = 64


@dataclass(frozen=True)
class KVQuant:
    """How a cache quantizes its K/V, with mlx-lm's meaning: a cache holds full precision until it holds
    `start` positions; from the next update on, all of it (earlier positions too) is stored in `bits`-bit
    groups of `group_size` along head_dim, and each new position is quantized as it arrives."""

    bits: int
    group_size: int = DEFAULT_KV_GROUP_SIZE
    start: int = 0

    def validate(self, head_dims: Sequence[int] = ()) -> "KVQuant":
        if self.bits not in KV_BITS:
            raise MlxSpecError(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))}, got {self.bits}")
        if self.group_size not in KV_GROUP_SIZES:
            raise MlxSpecError(f"--kv-group-size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, "
                               f"got {self.group_size}")
        if self.start < 0:
            raise MlxSpecError(f"--quantized-kv-start must be >= 0, got {self.start}")
        bad = sorted({d for d in head_dims if d % self.group_size})
        if bad:
            fits = [g for g in KV_GROUP_SIZES if all(d % g == 0 for d in head_dims)]
            hint = f"use --kv-group-size {max(fits)}" if fits else "this model's K/V cannot be quantized"
            raise MlxSpecError(f"--kv-group-size {self.group_size} does not divide the model's head_dim "
                               f"{', '.join(map(str, bad))}: {hint}")
        return self

    @classmethod
    def from_flags(cls, kv_bits: Optional[int], kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
                   quantized_kv_start: int = 0, head_dims: Sequence[int] = ()) -> Optional["KVQuant"]:
        """None when kv_bits is None (full precision), else a validated KVQuant."""
        if kv_bits is None:
            return None
        return cls(int(kv_bits), int(kv_group_size), int(quantized_kv_start)).validate(head_dims)

    def as_dict(self) -> dict:
        return {"kv_bits": self.bits, "kv_group_size": self.group_size, "quantized_kv_start": self.start}

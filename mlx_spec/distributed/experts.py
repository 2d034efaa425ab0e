"""Experts split across ranks (Gemma 4 26B-A4B: 128 experts, 8 per token): each rank holds E/N whole experts.

The router stays replicated, so every rank picks the same top-k. A rank computes the chosen experts it holds
and gives the others weight zero; one sum over the ranks adds the parts. mlx-lm instead cuts every expert's
intermediate width, which needs moe_intermediate_size / N to be a whole number of quantization groups
(704 / 2 = 352 is not, at the usual 64); whole experts always cut. The price: with a fixed graph (no
host-side routing) a rank also runs the chosen experts it does not hold, against a stand-in, weighted zero.
"""

import mlx.core as mx
import mlx.nn as nn

from ..errors import DistributedError
from .slicing import extend, take_rows


class _LocalExperts:
    """Experts first .. first+count of the model's; the module's output summed over the ranks."""

    def __call__(self, x: mx.array, top_k_indices: mx.array, top_k_weights: mx.array) -> mx.array:
        local = top_k_indices - self.first
        mine = (local >= 0) & (local < self.count)  # (B, L, k)
        weights = mx.where(mine, top_k_weights, mx.zeros_like(top_k_weights))
        y = super().__call__(x, mx.where(mine, local, 0), weights)  # (B, L, H), this rank's experts only
        return mx.distributed.all_sum(y, group=self.group)


def check_experts(n_experts: int, group) -> None:
    if n_experts % group.size():
        raise DistributedError(f"{group.size()} ranks cannot split the {n_experts} experts evenly; use a number of "
                               f"ranks that divides {n_experts}, or --pipeline")


def shard_experts(experts: nn.Module, n_experts: int, group) -> None:
    """mlx-lm's Gemma 4 `Experts` (a SwitchGLU of E experts), in place: this rank's E/N experts."""
    check_experts(n_experts, group)
    count = n_experts // group.size()
    first = group.rank() * count
    take_rows(experts.switch_glu, first, first + count)
    extend(experts, _LocalExperts, first=first, count=count, group=group)

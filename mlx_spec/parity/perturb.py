"""A row-count-dependent linear layer, for tests.

MLX's CPU backend computes a row of a matmul the same way whatever the number of rows, so on this machine
nothing shows what a GPU's kernel switch (Metal: qmv for one row, qmm for several) does to a verify pass.
`row_dependent(model)` injects that: while it is active, the model's linear layers compute an input with
more than one row in a different accumulation order, which rounds differently by an ulp or so, enough to
flip a top-1 token only at a near-tie, as a real kernel switch would.

Knows mlx.nn's Linear and QuantizedLinear; nothing of caches, drafts or the engine.
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

KINDS = ("matmul", "quantized_matmul")


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


def _split_matmul(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T with the input dimension accumulated as two halves, added afterwards. x (..., in), w (out, in)."""
    h = w.shape[1] // 2
    return x[..., :h] @ w[:, :h].T + x[..., h:] @ w[:, h:].T


class _SplitLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) <= 1:
            return super().__call__(x)
        y = _split_matmul(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class _SplitQuantizedLinear(nn.QuantizedLinear):
    """Several rows: dequantized weights, split accumulation (the CPU's qmm equals dequantize-then-matmul
    bit for bit, so the split is what makes it differ)."""

    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) <= 1:
            return super().__call__(x)
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                          bits=self.bits, mode=self.mode).astype(x.dtype)  # (out, in)
        y = _split_matmul(x, w)
        return y + self["bias"] if "bias" in self else y


_SWAPS = {"matmul": (nn.Linear, _SplitLinear), "quantized_matmul": (nn.QuantizedLinear, _SplitQuantizedLinear)}


@contextmanager
def row_dependent(model: nn.Module, kind: str = "matmul"):
    """Within the block, the model's `kind` layers ("matmul": nn.Linear, "quantized_matmul":
    nn.QuantizedLinear) round a multi-row input differently from a one-row input. Yields how many layers
    were changed; restores them on exit."""
    if kind not in _SWAPS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    plain, perturbed = _SWAPS[kind]
    changed = [m for _, m in model.named_modules() if type(m) is plain]
    for m in changed:
        m.__class__ = perturbed
    try:
        yield len(changed)
    finally:
        for m in changed:
            m.__class__ = plain

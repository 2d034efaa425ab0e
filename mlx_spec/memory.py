"""Unified memory: keep base + drafter weights resident, and say so before a load that will not fit.

On Apple silicon the GPU may page out weights it has not touched recently; mlx-lm raises the wired limit to
the device's recommended working set while generating, and so do we (for the base and the drafter
together). On devices that report no working set (CPU, CUDA) these are no-ops.
"""

import sys
from contextlib import contextmanager

import mlx.core as mx
from mlx.utils import tree_reduce


def recommended_working_set() -> int:
    """Bytes the device recommends keeping resident, or 0 when it reports none (CPU, CUDA)."""
    try:
        return int(mx.device_info().get("max_recommended_working_set_size", 0) or 0)
    except (AttributeError, RuntimeError):
        return 0


def weight_bytes(*modules) -> int:
    return sum(tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, m, 0)
               for m in modules if m is not None)


def warn_if_too_big(nbytes: int, what: str) -> bool:
    """Warn on stderr (never stdout: it carries generated text) when nbytes exceeds 90% of the working set."""
    limit = recommended_working_set()
    if limit and nbytes > 0.9 * limit:
        print(f"warning: {what} needs {nbytes / 2**30:.1f} GiB, close to or above this device's recommended "
              f"working set of {limit / 2**30:.1f} GiB; expect swapping. Use a smaller quantization "
              "(mlx_spec.convert -q --q-bits 4) or a smaller model.", file=sys.stderr)
        return True
    return False


@contextmanager
def resident(*modules):
    """Raise the wired limit to the recommended working set while generating (base and drafter together)."""
    limit = recommended_working_set()
    if not limit:
        yield
        return
    warn_if_too_big(weight_bytes(*modules), "the model and drafter")
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)

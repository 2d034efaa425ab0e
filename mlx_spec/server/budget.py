"""How much K/V the running requests may hold: the memory left beside the weights, and what one request's
K/V take at its longest (prompt + max_tokens), so the scheduler queues a request rather than overcommit.

The K/V sizes are memory.py's (exact for our caches: tested against their bytes); a request's draft model,
if any, keeps a cache of its own, counted with the base's layers' share of it left out (it is small next to
the base's, and a request never draws one without the other).
"""

from typing import Callable, Optional, Tuple

from ..cache import KVQuant
from ..memory import kv_cache_bytes, kv_layers_from_model, memory_limit, weight_bytes

HEADROOM = 0.9  # of the memory limit: what the OS, activations and MLX's buffer cache also need


def memory_budget(model, drafter, kv: Optional[KVQuant]) -> Tuple[Optional[int], Optional[Callable]]:
    """(bytes the running requests' K/V may take, row_bytes(engine)), or (None, None) where the memory or the
    model's caches cannot be sized (the scheduler then bounds only the row count)."""
    limit, _ = memory_limit()
    try:
        layers, dtype = kv_layers_from_model(model)
    except (TypeError, ValueError, AttributeError):
        return None, None
    if not limit:
        return None, None
    dtype_bytes = dtype.size

    def row_bytes(engine) -> int:
        return kv_cache_bytes(layers, len(engine.request.prompt) + engine.max_tokens, dtype_bytes, kv)

    return max(0, int(limit * HEADROOM) - weight_bytes(model, drafter)), row_bytes

"""Peak memory by context length: what a long conversation costs, plain and speculative, with the run's K/V
quantization (--kv-bits), next to the estimate that the commands check before loading (memory.py).

For each context N: a synthetic prompt of N tokens is prefilled, then a few tokens are decoded, plainly and
with each proposer family at its first k; the peak memory of the whole run is what the device had to hold.
"""

from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from ..cache import KVQuant
from ..engine import Engine
from ..memory import kv_cache_bytes, kv_layers_from_model
from ..models.base import vocab_size
from ..tuning import FixedK
from .runner import Config
from ..request import Request

DECODE_TOKENS = 8


def peak_by_context(model, configs: List[Config], contexts: List[int], kv: Optional[KVQuant], log) -> List[dict]:
    """One row per context: peak bytes plain and per proposer family, the measured and the estimated K/V."""
    layers, dtype = kv_layers_from_model(model)
    families: Dict[str, Config] = {}
    for c in configs:
        if c.family not in families and isinstance(c.k, int):
            families[c.family] = c
    rng = np.random.default_rng(0)
    rows = []
    for n in contexts:
        log(f"peak memory at a {n}-token context")
        prompt = rng.integers(4, vocab_size(model) or 256, size=n).tolist()
        row = {"context": n, "kv": kv.as_dict() if kv else None,
               "kv_estimate_bytes": kv_cache_bytes(layers, n + DECODE_TOKENS, dtype.size, kv)}
        for name, cfg in [("plain", None)] + list(families.items()):
            mx.clear_cache()
            mx.reset_peak_memory()
            eng = Engine(model, Request(prompt, max_tokens=DECODE_TOKENS, kv=kv),
                         proposer=cfg.make(0) if cfg else None, policy=FixedK(cfg.k) if cfg else None)
            for _ in eng.run():
                pass
            row[f"{name}_peak_bytes"] = int(mx.get_peak_memory())
            if cfg is None:
                row["kv_bytes"] = int(sum(c.nbytes for c in eng.cache))
        rows.append(row)
    return rows


def format_memory(rows: List[dict]) -> str:
    if not rows:
        return ""
    names = [k[: -len("_peak_bytes")] for k in rows[0] if k.endswith("_peak_bytes")]
    mb = 1024 * 1024
    lines = ["", "peak memory by context (MB)" + (f", K/V {rows[0]['kv']['kv_bits']}-bit" if rows[0]["kv"] else ""),
             f"{'context':>8}" + "".join(f"{n:>14}" for n in names) + f"{'K/V':>10}{'estimate':>10}"]
    for r in rows:
        lines.append(f"{r['context']:>8}" + "".join(f"{r[n + '_peak_bytes'] / mb:>14.1f}" for n in names)
                     + f"{r['kv_bytes'] / mb:>10.2f}{r['kv_estimate_bytes'] / mb:>10.2f}")
    return "\n".join(lines)

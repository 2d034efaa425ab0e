"""Peak memory by context length and kv_bits on a Gemma 4 shape with random weights (default E2B, 4-bit).

    python examples/kv_cache/memory_by_context.py [--shape e2b] [--dtype bfloat16] [--contexts 1024,8192,32768]

Prefilling long contexts on a CPU takes hours, so the caches are filled with random K/V of N positions
(what they hold does not change their size), then one real 4-token verify pass and one MTP round (k=3)
run on them. Prints, per context and kv_bits: K/V bytes measured and as memory.py estimates them, and the
peak (weights + drafter + K/V + what the pass allocates). Not included: a prefill chunk's activations.
"""

import argparse
import json
import time

import mlx.core as mx

from mlx_spec import memory, shapes
from mlx_spec.cache import KVQuant, rollback_all
from mlx_spec.sampling import Sampler, SamplingParams
from mlx_spec.loading import DTYPES
from mlx_spec.proposers.base import RoundContext
from mlx_spec.proposers.mtp import MTPProposer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="e2b")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--contexts", default="1024,8192,32768")
    p.add_argument("--kv-group-size", type=int, default=64)
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    base, drafter = shapes.random_pair(args.shape, dtype=dtype, q_bits=4)
    mx.clear_cache()
    weights, drafter_bytes = memory.weight_bytes(base), memory.weight_bytes(drafter)
    layers = memory.kv_layers_from_config(shapes.base_config(args.shape))
    print(json.dumps({"shape": args.shape, "dtype": args.dtype, "weights": weights, "drafter": drafter_bytes,
                      "build_s": round(time.perf_counter() - start, 1)}), flush=True)
    proposer = MTPProposer(drafter, base)
    for n in (int(c) for c in args.contexts.split(",")):
        for bits in (None, 8, 4):
            kv = KVQuant(bits, args.kv_group_size) if bits else None
            cache = base.make_cache(17, kv_bits=bits, kv_group_size=args.kv_group_size)
            for c, layer in zip(cache, layers):
                for s in range(0, n, 2048):
                    m = min(2048, n - s)
                    c.update_and_fetch(mx.random.normal((1, layer.n_kv_heads, m, layer.k_head_dim), dtype=dtype),
                                       mx.random.normal((1, layer.n_kv_heads, m, layer.v_head_dim), dtype=dtype))
                    mx.eval(c.state)
            mx.clear_cache()
            kv_bytes = sum(c.nbytes for c in cache)
            mx.reset_peak_memory()
            t = time.perf_counter()
            logits, hidden = base.forward(mx.array([[5, 6, 7, 8]]), cache)
            mx.eval(logits, hidden)
            verify_s = time.perf_counter() - t
            rollback_all(cache, 3)
            ctx = RoundContext(list(range(n + 1)), n, hidden[:, :1], cache, Sampler(SamplingParams(), 0))
            mx.eval(proposer.propose(ctx, 3).tokens)
            peak = mx.get_peak_memory()
            print(json.dumps({"context": n, "kv_bits": bits, "kv_bytes": kv_bytes,
                              "kv_estimate": memory.kv_cache_bytes(layers, n, dtype.size, kv), "peak": peak,
                              "pass_bytes": peak - weights - drafter_bytes - kv_bytes,
                              "verify_s": round(verify_s, 1)}), flush=True)
            del cache, logits, hidden
            mx.clear_cache()


if __name__ == "__main__":
    main()

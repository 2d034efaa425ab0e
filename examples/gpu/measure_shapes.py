"""Measure verify cost by k and MTP drafter step cost on Gemma 4-shaped models with random weights.

    python examples/gpu/measure_shapes.py --shapes e2b [--q-bits 4] [--context 512] --out costs.json

Random weights are enough for costs (a (k+1)-token base pass and a drafter step cost the same whatever the
weights); acceptance needs real weights. Runs wherever MLX runs: Metal, CUDA (mlx[cuda13]) or the CPU.
"""

import argparse
import json
import platform
import sys
import time

import mlx.core as mx

from mlx_spec.loading import DTYPES
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.shapes import BASE_SHAPES, random_pair
from mlx_spec.tuning import measure_costs


def default_dtype() -> str:
    """bfloat16 as Google ships the models; float32 on MLX's CPU backend, as mlx_spec.load runs a quantized
    model there (its half-precision quantized matmul is ~9x slower)."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def measure(shape: str, q_bits: int, context: int, reps: int, dtype: str) -> dict:
    start = time.perf_counter()
    base, drafter = random_pair(shape, dtype=DTYPES[dtype], q_bits=q_bits)
    built = time.perf_counter() - start
    costs = measure_costs(base, MTPProposer(drafter, base), context=context, reps=reps)
    best = {k: round((k + 1) / costs.round_cost(k), 3) for k in range(1, costs.k_max + 1)}
    return {"shape": shape, "q_bits": q_bits, "dtype": dtype, "context": context, "build_s": round(built, 1),
            "plain_step_ms": round(costs.plain_step_s * 1e3, 3),
            "verify_cost": {k: round(v, 3) for k, v in enumerate(costs.verify)},
            "draft_fixed_cost": round(costs.draft_fixed, 4), "draft_step_cost": round(costs.draft_step, 4),
            "speedup_if_all_accepted": best, "peak_memory_bytes": mx.get_peak_memory()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="e2b", help=f"comma-separated, of {', '.join(BASE_SHAPES)}")
    p.add_argument("--q-bits", type=int, default=4, help="base quantization (0 = bf16)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype(),
                   help="weights (of a quantized base: scales, biases, norms) and the drafter "
                        "(default: float32 on the CPU backend, else bfloat16)")
    p.add_argument("--out", default="costs.json")
    args = p.parse_args()
    results = {"environment": {"machine": platform.machine(), "system": platform.system(), "mlx": mx.__version__,
                               "device": str(mx.default_device()), "device_info": {k: str(v) for k, v in
                                                                                  mx.device_info().items()}},
               "shapes": []}
    for shape in args.shapes.split(","):
        r = measure(shape, args.q_bits, args.context, args.reps, args.dtype)
        print(json.dumps(r), file=sys.stderr, flush=True)
        results["shapes"].append(r)
        mx.clear_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

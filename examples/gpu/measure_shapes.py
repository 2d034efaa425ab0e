"""Measure verify cost by k, MTP drafter step cost, block drafters' cost by block size (DFlash, DSpark,
where one is published for the shape) and verify-vs-step parity on Gemma 4-shaped models with random
weights.

    python examples/gpu/measure_shapes.py --shapes e2b,12b,31b --q-bits 4,0 [--context 512] [--parity]
                                          [--block-sizes 2,3,5,9,16] [--layers N] [--budget-s 300] --out costs.json

Block drafters: verify_cost is measured up to the largest block (k = its drafts), and each drafter's cost
of proposing k drafts (one pass over a block of k+1 rows for DFlash, k for DSpark) for every block size in
--block-sizes, in plain steps. `--layers N` keeps N of the base's decoder layers (its pattern), for a
machine that cannot hold the whole model; the ratios then weigh the head more than the full model does.

Random weights are enough for costs (a (k+1)-token base pass and a drafter step cost the same whatever the
weights); acceptance needs real weights. Parity (--parity: mlx_spec.doctor's probe, strict off and on, and
strict's cost) does depend on the weights through the margins: random weights give small logits, so near-
ties, so its flip counts are an upper-end estimate; whether a row is bitwise equal does not depend on them.
Configurations run in order, all shapes at the first --q-bits, then the next; the JSON is rewritten after
each, and none starts once --budget-s has gone, so a time limit keeps what was measured.
Runs wherever MLX runs: Metal, CUDA (mlx[cuda13]) or the CPU.
"""

import argparse
import json
import platform
import sys
import time

import mlx.core as mx

from mlx_spec.loading import DTYPES
from mlx_spec.parity.probe import probe
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.shapes import BASE_SHAPES, BLOCK_DRAFTER_SHAPES, random_block_drafter, random_pair
from mlx_spec.tuning import measure_costs
from mlx_spec.tuning.probe import measure_drafting

DEFAULT_BLOCK_SIZES = (2, 3, 5, 9, 16)  # rows of a DFlash block (drafts + 1); DSpark: the drafts
DEFAULT_PARITY_KS = (1, 2, 4, 8)
DEFAULT_PARITY_TOKENS = 128
DEFAULT_PARITY_COST_REPS = 3


def default_dtype() -> str:
    """bfloat16 as Google ships the models; float32 on MLX's CPU backend, as mlx_spec.load runs a quantized
    model there (its half-precision quantized matmul is ~9x slower)."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def parity(base, name: str, ks, tokens: int, cost_reps: int) -> dict:
    """The probe's headline numbers, strict (every decode pass padded to max k + 1 rows) off and on."""
    r = probe(base, ks=ks, tokens=tokens, padding=True, cost_reps=cost_reps, name=name)
    per_k = lambda rows: {p.k: {"bitwise_fraction": round(p.bitwise_fraction, 4), "max_abs_diff": p.max_abs_diff,
                                "flips_per_1000": round(p.flips_per_1000, 2),
                                "flip_margins": [round(f.margin, 5) for f in p.flips]} for p in rows}
    out = {"context": r.context, "tokens": r.tokens, "row_invariant": r.row_invariant,
           "strict_exact": r.strict_exact, "row_dependent_ops": r.row_dependent_ops,
           "first_differing_op": r.first_differing_op, "verdict": r.verdict,
           "strict_off": per_k(r.unpadded), "strict_on": per_k(r.padded), "strict_rows": r.padded_rows,
           "ops": [{"kind": o.kind, "shape": o.shape, "dtype": o.dtype, "differs_at": o.differs_at,
                    "max_abs_diff": o.max_abs_diff} for o in r.ops if not o.row_invariant],
           "seconds": round(r.seconds, 1)}
    if r.cost is not None:
        out["strict_cost"] = {"plain_step_ms": round(r.cost.plain_step_s * 1e3, 3),
                              "padded_step_ms": round(r.cost.padded_step_s * 1e3, 3),
                              "plain_ratio": round(r.cost.plain_ratio, 3),
                              "verify_ratio": {k: round(r.cost.verify_ratio(k), 3) for k in r.cost.verify_s}}
    print(r.report(), file=sys.stderr, flush=True)
    return out


def block_drafters(shape: str, base, dtype: str, layers: int, block_sizes, context: int, reps: int,
                   plain_step_s: float, q_bits: int = 0) -> dict:
    """family -> {drafts k: cost of proposing k drafts in plain steps}, for the block drafters published
    for the shape, quantized to q_bits (0: DSpark at 8 bits, as its authors recommend, DFlash unquantized)."""
    out = {}
    for (s, family), d in BLOCK_DRAFTER_SHAPES.items():
        if s != shape:
            continue
        bits = q_bits or (8 if family == "dspark" else 0)
        drafter = random_block_drafter(shape, family, dtype=DTYPES[dtype], layers=layers, q_bits=bits)
        proposer = make_proposer(base, drafter=drafter)
        ks = sorted({min(b - 1 if family == "dflash" else b, drafter.max_drafts) for b in block_sizes} - {0})
        seconds = measure_drafting(base, proposer, ks, context=context, reps=reps)
        out[family] = {"block_size": d["block_size"], "max_drafts": drafter.max_drafts, "q_bits": bits,
                       "draft_ms": {k: round(t * 1e3, 2) for k, t in seconds.items()},
                       "draft_cost": {k: round(t / plain_step_s, 4) for k, t in seconds.items()}}
        print(f"  {family}: draft cost by drafts {out[family]['draft_cost']}", file=sys.stderr, flush=True)
        del drafter, proposer
        mx.clear_cache()
    return out


def measure(shape: str, q_bits: int, context: int, reps: int, dtype: str, parity_args=None, layers: int = 0,
            block_sizes=DEFAULT_BLOCK_SIZES, block_q_bits: int = 0) -> dict:
    start = time.perf_counter()
    base, drafter = random_pair(shape, dtype=DTYPES[dtype], q_bits=q_bits, layers=layers)
    built = time.perf_counter() - start
    native = [d["block_size"] - (f == "dflash") for (s, f), d in BLOCK_DRAFTER_SHAPES.items() if s == shape]
    has_block = bool(native)
    k_max = max(8, min(max(block_sizes) - 1, max(native))) if has_block else 8  # verify the largest block too
    costs = measure_costs(base, MTPProposer(drafter, base), context=context, reps=reps, k_max=k_max)
    best = {k: round((k + 1) / costs.round_cost(k), 3) for k in range(1, costs.k_max + 1)}
    result = {"shape": shape, "q_bits": q_bits, "dtype": dtype, "context": context, "build_s": round(built, 1),
              "layers": layers or BASE_SHAPES[shape]["num_hidden_layers"],
              "plain_step_ms": round(costs.plain_step_s * 1e3, 3),
              "verify_cost": {k: round(v, 3) for k, v in enumerate(costs.verify)},
              "draft_fixed_cost": round(costs.draft_fixed, 4), "draft_step_cost": round(costs.draft_step, 4),
              "speedup_if_all_accepted": best}
    del drafter
    if has_block:
        result["block_drafters"] = block_drafters(shape, base, dtype, layers, block_sizes, context, reps,
                                                  costs.plain_step_s, block_q_bits)
    if parity_args is not None:
        name = f"random {shape}, {f'{q_bits}-bit' if q_bits else 'unquantized'}"
        result["parity"] = parity(base, name, *parity_args)
    result["peak_memory_bytes"] = mx.get_peak_memory()
    return result


def int_list(value: str):
    return [int(x) for x in value.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="e2b", help=f"comma-separated, of {', '.join(BASE_SHAPES)}")
    p.add_argument("--q-bits", type=int_list, default=[4], help="base quantization, comma-separated (0 = bf16)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--layers", type=int, default=0, help="keep this many decoder layers (0: all)")
    p.add_argument("--block-sizes", type=int_list, default=list(DEFAULT_BLOCK_SIZES),
                   help="block drafters: block sizes to time (DFlash rows = drafts + 1)")
    p.add_argument("--block-q-bits", type=int, default=0,
                   help="quantize the block drafters to this many bits (0: DSpark 8, DFlash unquantized)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype(),
                   help="weights (of a quantized base: scales, biases, norms) and the drafter "
                        "(default: float32 on the CPU backend, else bfloat16)")
    p.add_argument("--parity", action="store_true", help="also run mlx_spec.doctor's probe, strict off and on")
    p.add_argument("--parity-ks", type=int_list, default=list(DEFAULT_PARITY_KS))
    p.add_argument("--parity-tokens", type=int, default=DEFAULT_PARITY_TOKENS)
    p.add_argument("--parity-cost-reps", type=int, default=DEFAULT_PARITY_COST_REPS)
    p.add_argument("--budget-s", type=float, default=None, help="start no configuration after this many seconds")
    p.add_argument("--out", default="costs.json")
    args = p.parse_args()
    started = time.perf_counter()
    results = {"environment": {"machine": platform.machine(), "system": platform.system(), "mlx": mx.__version__,
                               "device": str(mx.default_device()), "device_info": {k: str(v) for k, v in
                                                                                  mx.device_info().items()}},
               "shapes": [], "skipped": []}
    parity_args = (args.parity_ks, args.parity_tokens, args.parity_cost_reps) if args.parity else None
    for q_bits in args.q_bits:
        for shape in args.shapes.split(","):
            elapsed = time.perf_counter() - started
            if args.budget_s is not None and elapsed > args.budget_s:
                results["skipped"].append({"shape": shape, "q_bits": q_bits, "reason": f"budget: {elapsed:.0f} s gone"})
                continue
            print(f"[{elapsed:.0f} s] {shape} {f'{q_bits}-bit' if q_bits else 'unquantized'} ...", file=sys.stderr, flush=True)
            r = measure(shape, q_bits, args.context, args.reps, args.dtype, parity_args, args.layers, args.block_sizes,
                        args.block_q_bits)
            print(json.dumps({k: v for k, v in r.items() if k != "parity"}), file=sys.stderr, flush=True)
            results["shapes"].append(r)
            mx.clear_cache()
            mx.reset_peak_memory()
            with open(args.out, "w") as f:  # after every configuration: a time limit keeps what was measured
                json.dump(results, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

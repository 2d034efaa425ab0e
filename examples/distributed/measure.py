"""What splitting a model over ranks costs and saves: the numbers in docs/DISTRIBUTED.md.

    # one process (the baseline), then the same under mlx.launch (tensor, then pipeline parallel)
    python examples/distributed/measure.py speed --model M [--drafter D]
    mlx.launch --backend ring -n 2 -- python examples/distributed/measure.py speed --model M [--drafter D] [--pipeline]
    # each rank's weights for every published shape (4-bit, nothing materialized: the arrays stay lazy)
    mlx.launch --backend ring -n 2 -- python examples/distributed/measure.py shapes [--pipeline]
    # write a random-weight E2B-shaped checkpoint (real widths, fewer layers) to measure on
    python examples/distributed/measure.py write-e2b OUT_DIR --layers 7

`speed` prints one JSON line (rank 0): plain and speculative tok/s (medians over prompts and repeats,
interleaved), the base's one-token step and 4-token verify pass in ms, the round-trip of one small all-sum,
and how many collectives a base pass issues.
"""

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

PROMPTS = ["import os\nimport sys\n\n\ndef main(argv):\n    ", "class Parser:\n    def __init__(self, text):\n",
           "def read_config(path):\n    \"\"\"Read a JSON file.\"\"\"\n"]


def _median_ms(fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def pass_costs(model, reps: int) -> dict:
    """The base's one-token step and 4-token verify pass after a 64-token context, in ms."""
    from mlx_spec.cache import rollback_all
    from mlx_spec.models.base import as_base

    base = as_base(model)
    cache = base.make_cache()
    mx.eval(base.forward(mx.arange(8, 72)[None], cache)[0])

    def run(n):
        mx.eval(base.forward(mx.arange(8, 8 + n)[None], cache)[0])
        rollback_all(cache, n)

    return {"step_ms": _median_ms(lambda: run(1), reps), "verify4_ms": _median_ms(lambda: run(4), reps)}


def collective_latency_ms(ranks) -> float:
    if ranks is None:
        return 0.0
    x = mx.ones((1, 256))
    return _median_ms(lambda: mx.eval(ranks.all_sum(x)), reps=50)


def speed(args) -> None:
    from mlx_spec import generate, load, load_drafter, stream_generate  # noqa: F401
    from mlx_spec.distributed import launched
    from mlx_spec.distributed import load as load_sharded

    mode = "pipeline" if args.pipeline else "tensor"
    model, tokenizer = load_sharded(args.model, mode) if launched() else load(args.model)
    ranks = getattr(model, "ranks", None)
    drafter = load_drafter(args.drafter, model) if args.drafter else None
    runs = {"plain": [], "spec": []}
    for _ in range(args.repeats):
        for prompt in PROMPTS:
            for name in ("plain", "spec") if drafter is not None else ("plain",):
                kw = dict(drafter=drafter, num_draft_tokens=args.k) if name == "spec" else {}
                last = None
                for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, **kw):
                    pass
                runs[name].append(last.stats.generation_tps)
    out = {"mode": mode if ranks else "one process", "ranks": ranks.size if ranks else 1,
           "plain_tps": statistics.median(runs["plain"]),
           "spec_tps": statistics.median(runs["spec"]) if runs["spec"] else None,
           "all_sum_ms": collective_latency_ms(ranks), **pass_costs(model, args.reps)}
    if ranks is None or ranks.is_root:
        print(json.dumps(out), flush=True)


def shapes(args) -> None:
    """Each rank's weight bytes for every published shape at 4 bits (lazy: nothing is computed)."""
    import mlx.nn as nn

    from mlx_spec import shapes as published
    from mlx_spec.distributed.group import Ranks, connect
    from mlx_spec.distributed.slicing import parameter_bytes
    from mlx_spec.models import gemma4_text

    ranks = Ranks(connect(), "pipeline" if args.pipeline else "tensor")
    for shape in ("e2b", "e4b", "12b", "26b", "31b"):
        model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(published.base_config(shape)))
        predicate = model.quant_predicate
        nn.quantize(model, group_size=64, bits=4,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and predicate(p, m))
        whole = parameter_bytes(model)
        held = model.shard(ranks.group) if ranks.mode == "tensor" else model.pipeline(ranks.group)
        mine = [b[0] for b in ranks.gather_ints([parameter_bytes(model)])]
        if ranks.is_root:
            print(json.dumps({"shape": shape, "mode": ranks.mode, "whole_gb": whole / 1e9,
                              "by_rank_gb": [b / 1e9 for b in mine], "held": held}), flush=True)


def write_e2b(args) -> None:
    """A random-weight E2B-shaped base (published widths, `--layers` decoder layers, 4-bit) in the MLX layout."""
    from pathlib import Path

    from mlx.utils import tree_flatten

    from mlx_spec import shapes as published

    out = Path(args.out)
    out.mkdir(parents=True)
    model = published.random_base("e2b", q_bits=4, layers=args.layers)
    config = {**published.base_config("e2b", args.layers), "quantization": {"group_size": 64, "bits": 4}}
    (out / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    tiny = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gemma4-tiny-code" / "base"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((tiny / name).read_bytes())  # any tokenizer: ids are what is measured


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--model", required=True)
    s.add_argument("--drafter")
    s.add_argument("--pipeline", action="store_true")
    s.add_argument("--k", type=int, default=3)
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--reps", type=int, default=20, help="timed passes for the step and verify costs")
    h = sub.add_parser("shapes")
    h.add_argument("--pipeline", action="store_true")
    w = sub.add_parser("write-e2b")
    w.add_argument("out")
    w.add_argument("--layers", type=int, default=7)
    args = p.parse_args()
    {"speed": speed, "shapes": shapes, "write-e2b": write_e2b}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())

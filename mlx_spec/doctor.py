"""`mlx_spec.doctor`: does this device compute a verify row exactly like a one-token step?

    mlx_spec.doctor --model M [--num-draft-tokens 1,2,4,8] [--tokens N] [--context N] [--json PATH]

Teacher-forces a trace through the model two ways (one-token steps; the engine's verify rounds of k+1
tokens with rollback) and reports, per k: the share of verify rows bitwise equal to the step, the max
|diff| of the logits, top-1 flips per 1,000 rows with the step's top-2 margin at each, which op kinds
(matmul, quantized matmul, attention, norm, ...) depend on the row count at the model's shapes, and
whether padding every decode pass to one row count (--strict) makes them equal, at what cost.
The report goes to stdout; progress to stderr.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from .cli import ArgumentParser, run
from .errors import MlxSpecError
from .loading import DTYPES, load_model
from .parity.probe import (DEFAULT_COST_REPS, DEFAULT_KS, DEFAULT_TOKENS, check_ks, check_positions, default_context,
                           probe)


def k_list(value: str):
    try:
        ks = [int(x) for x in value.split(",") if x.strip()]
        return check_ks(ks)
    except (ValueError, MlxSpecError) as e:
        raise argparse.ArgumentTypeError(f"expected draft lengths like 1,2,4,8: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.doctor", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="MLX or Hugging Face model directory, hub repo id, or .gguf file")
    p.add_argument("--num-draft-tokens", type=k_list, default=list(DEFAULT_KS), metavar="K,K,..",
                   help=f"draft lengths k to verify (k+1 rows a pass; default: {','.join(map(str, DEFAULT_KS))})")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="positions compared per k")
    p.add_argument("--context", type=int, default=None,
                   help="prompt length (default: the sliding window + 32, so every row is past the window)")
    p.add_argument("--trace", choices=("greedy", "random"), default="greedy",
                   help="continuation: the model's greedy tokens (default) or pseudo-random ones")
    p.add_argument("--padding", choices=("auto", "on", "off"), default="auto",
                   help="also measure strict mode (every decode pass padded to max k + 1 rows): auto does "
                        "so only where unpadded verify rows differ")
    p.add_argument("--cost-reps", type=int, default=DEFAULT_COST_REPS,
                   help="timed passes for the padding cost (0: do not time)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast the float weights (default: as mlx_spec.load runs the model)")
    p.add_argument("--seed", type=int, default=0, help="the pseudo-random prompt's seed")
    p.add_argument("--json", metavar="PATH", help="also write the full result (every flip) as JSON")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    return p


def main_args(args) -> int:
    if args.tokens < 2:
        raise MlxSpecError(f"--tokens must be at least 2, got {args.tokens}")
    if args.context is not None and args.context < 1:
        raise MlxSpecError(f"--context must be at least 1, got {args.context}")
    if args.cost_reps < 0:
        raise MlxSpecError(f"--cost-reps must be >= 0, got {args.cost_reps}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise MlxSpecError(f"--json {args.json}: its directory does not exist")
    if args.model.endswith(".gguf"):
        from .gguf import load_gguf

        model = load_gguf(args.model, dtype=args.dtype)[0]
    else:
        model = load_model(args.model, dtype=args.dtype)[0]
    check_positions(model, args.context or default_context(model), args.tokens, max(args.num_draft_tokens))
    print(f"probing {args.model}: {args.tokens} positions x k = {','.join(map(str, args.num_draft_tokens))} ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = probe(model, ks=args.num_draft_tokens, tokens=args.tokens, context=args.context, trace=args.trace,
                   padding={"auto": None, "on": True, "off": False}[args.padding], cost_reps=args.cost_reps,
                   seed=args.seed, name=args.model)
    print(result.report())
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
        except OSError as e:
            raise MlxSpecError(f"cannot write --json {args.json}: {e}") from e
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

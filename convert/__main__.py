"""`python -m convert` / `mlx_spec.convert`: a Gemma 4 checkpoint in, mlx-lm's MLX layout out.

    mlx_spec.convert --hf-path google/gemma-4-E2B-it --mlx-path gemma-4-e2b-4bit -q [--q-bits 4]
                     [--q-group-size 64] [--quant-predicate embed_8] [--dtype bfloat16] [--force]

Flags as mlx_lm.convert spells them. A user mistake prints one `error: ...` line and exits 2 (the
traceback only with --verbose); nothing is left at --mlx-path.
"""

import argparse
import sys

from mlx_spec.cli import ArgumentParser, run
from mlx_spec.errors import ConversionError
from mlx_spec.loading import DTYPES

from .pipeline import convert
from .recipes import Q_BITS, Q_GROUP_SIZES, RECIPES

DEFAULT_MLX_PATH = "mlx_model"
DEFAULT_Q_BITS = 4
DEFAULT_Q_GROUP_SIZE = 64


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.convert", description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", "--model", required=True,
                   help="Hugging Face checkpoint: a local directory or a hub repo id (downloaded)")
    p.add_argument("--mlx-path", default=DEFAULT_MLX_PATH, help=f"output directory (default: {DEFAULT_MLX_PATH})")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, choices=Q_BITS, default=None,
                   help=f"bits per weight (default: {DEFAULT_Q_BITS})")
    p.add_argument("--q-group-size", type=int, choices=Q_GROUP_SIZES, default=None,
                   help=f"quantization group size (default: {DEFAULT_Q_GROUP_SIZE})")
    p.add_argument("--quant-predicate", "--quant-recipe", dest="recipe", choices=RECIPES, default=None,
                   help="mixed-precision recipe: uniform (default); embed_8 = embeddings at 8 bits, the rest at "
                        "--q-bits; mixed_L_H = mlx-lm's recipes. The MoE router is always 8-bit, drafter "
                        "centroids never quantized")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the unquantized weights (default: the checkpoint's; bfloat16 for drafters)")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path model directory")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    return p


def main_args(args: argparse.Namespace) -> int:
    if not args.quantize:
        given = [flag for flag, v in (("--q-bits", args.q_bits), ("--q-group-size", args.q_group_size),
                                      ("--quant-predicate", args.recipe)) if v is not None]
        if given:
            raise ConversionError(f"{', '.join(given)} only apply with -q/--quantize; add -q or drop them")
    convert(args.hf_path, args.mlx_path, quantize=args.quantize,
            q_bits=args.q_bits or DEFAULT_Q_BITS, q_group_size=args.q_group_size or DEFAULT_Q_GROUP_SIZE,
            dtype=args.dtype, recipe=args.recipe, force=args.force)
    return 0


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

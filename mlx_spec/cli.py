"""Pieces every command line shares: model/draft/sampling flags (mlx-lm spellings) and error handling.

A user mistake prints one `error: ...` line to stderr and exits 2; `--verbose` shows the traceback.
"""

import argparse
import sys
from typing import Callable

from .engine import DEFAULT_NUM_DRAFT_TOKENS, MAX_DRAFT_TOKENS
from .errors import MlxSpecError

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMP = 0.0


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (with a pointer to --help), not usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def num_draft_tokens(value: str):
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None
    if not 0 <= k <= MAX_DRAFT_TOKENS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_DRAFT_TOKENS}, got {k}")
    return k


def add_model_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="MLX or Hugging Face model directory, or hub repo id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--drafter", help="Gemma 4 MTP assistant drafter (directory or hub repo id; 'auto' finds "
                   "<base>-assistant)")
    g.add_argument("--draft-model", help="a smaller model with the same tokenizer, used as the proposer")
    g.add_argument("--ngram", nargs="?", const=3, type=int, metavar="N",
                   help="prompt-lookup drafts from the last N tokens (default N: 3)")
    p.add_argument("--num-draft-tokens", type=num_draft_tokens, default=DEFAULT_NUM_DRAFT_TOKENS,
                   metavar="K|auto", help="drafts per round, or 'auto': chosen each round from this machine's "
                   f"measured costs, plain decoding when drafting does not pay (default: {DEFAULT_NUM_DRAFT_TOKENS})")
    p.add_argument("--no-draft", action="store_true", help="plain decoding (baseline), ignoring any proposer")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--acceptance", choices=("rejection", "match"), default="rejection",
                   help="T>0 acceptance rule: rejection sampling (default) or token match")


def check_sampling_args(args) -> None:
    if args.temp < 0:
        raise MlxSpecError(f"--temp must be >= 0, got {args.temp}")
    if not 0 < args.top_p <= 1:
        raise MlxSpecError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise MlxSpecError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.min_p <= 1:
        raise MlxSpecError(f"--min-p must be in [0, 1], got {args.min_p}")


def check_length_args(args) -> None:
    """--max-tokens and --max-context, for the commands that take both (chat, server)."""
    if args.max_tokens < 1:
        raise MlxSpecError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_context is not None and args.max_context < 2:
        raise MlxSpecError(f"--max-context must be >= 2, got {args.max_context}")


def load_models(args):
    """(model, tokenizer, drafter kwargs for stream_generate) from the model/draft flags."""
    from .api import load
    from .drafting import load_drafter

    model, tokenizer = load(args.model)
    draft = {}
    if not args.no_draft:
        if args.drafter:
            draft["drafter"] = load_drafter(args.drafter, model, base_path=args.model)
        elif args.draft_model:
            draft["draft_model"] = load(args.draft_model)[0]
        elif args.ngram is not None:
            draft["ngram"] = args.ngram
    return model, tokenizer, draft


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse, run, and turn user errors into one line on stderr with a non-zero exit."""
    args = parser.parse_args(argv)
    try:
        return main(args) or 0
    except MlxSpecError as e:
        if getattr(args, "verbose", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

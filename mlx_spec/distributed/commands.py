"""The commands under `mlx.launch`: connect, let rank 0 alone write, load the sharded model, agree on errors.

Every rank runs the same command line. Rank 0 writes the text, the statistics and the line on how the model
is sharded; the other ranks write nothing but their own errors (one `error:` line, prefixed with the rank)
and tracebacks. Errors every rank can meet alone (a missing file, a split that does not divide) are agreed
(group.Ranks.agree): rank 0 prints one `error:` line naming the rank, and every rank exits 2.
"""

import sys
from typing import Callable, TypeVar

from ..errors import MlxSpecError
from .group import PIPELINE, TENSOR, Ranks, connect
from .loading import load

T = TypeVar("T")
# flags whose state cannot be split over ranks (yet): their K/V files hold one process's caches
UNSUPPORTED = (("prompt_cache_file", "--prompt-cache-file", "its file holds one process's K/V caches"),
               ("strict", "--strict", "its op check runs the layers one by one"),
               ("tree_nodes", "--tree-nodes", "a tree's verify pass over split layers is not checked yet; "
                "drafts stay chains (leave --tree-nodes out)"))


class _ErrorsOnly:
    """A non-root rank's stderr: only `error:` lines get through (prefixed with the rank), whole lines."""

    def __init__(self, stream, rank: int):
        self.stream, self.prefix, self.line = stream, f"[rank {rank}] ", ""

    def write(self, text: str) -> int:
        self.line += text
        while "\n" in self.line:
            line, self.line = self.line.split("\n", 1)
            if line.startswith("error:"):
                self.stream.write(self.prefix + line + "\n")
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _quiet_unless_root(ranks: Ranks) -> None:
    """Rank 0 alone writes text and statistics; a crash on any rank still shows its traceback."""
    if ranks.is_root:
        return
    import os

    real = sys.stderr
    sys.stdout = open(os.devnull, "w")
    sys.stderr = _ErrorsOnly(real, ranks.rank)

    def excepthook(kind, value, tb):
        import traceback

        real.write(f"[rank {ranks.rank}] " + "".join(traceback.format_exception(kind, value, tb)))

    sys.excepthook = excepthook


def _refuse_unsupported(args) -> None:
    for name, flag, why in UNSUPPORTED:
        if getattr(args, name, None):
            raise MlxSpecError(f"{flag} is not supported across ranks: {why}")


def load_for_command(args) -> tuple:
    """(model, tokenizer) for a command run under mlx.launch: --pipeline picks the mode, --check-ranks the
    per-token digest check. Refuses flags whose state cannot be split over ranks."""
    ranks = Ranks(connect(), PIPELINE if getattr(args, "pipeline", False) else TENSOR)
    _quiet_unless_root(ranks)
    ranks.agree(lambda: _refuse_unsupported(args), "starting")
    model, tokenizer = load(args.model, ranks.mode, group=ranks.group, check=getattr(args, "check_ranks", False))
    if getattr(args, "num_draft_tokens", None) == "auto" and not getattr(args, "no_draft", False) and ranks.is_root \
            and (args.drafter or args.draft_model or args.ngram is not None):
        from .requests import DISTRIBUTED_K

        print(f"note: across ranks --num-draft-tokens auto drafts a fixed {DISTRIBUTED_K} per round (its timing probe "
              "and round clock run on each rank apart); set --num-draft-tokens to choose", file=sys.stderr)
    return model, tokenizer


def agreed(model, step: Callable[[], T], what: str) -> T:
    """`step()`, agreed over the model's ranks (one process: just run it)."""
    from ..models.base import as_base

    ranks = as_base(model).ranks
    return step() if ranks is None else ranks.agree(step, what)

"""What every command line shares: model/draft/sampling flags (mlx-lm spellings), loading what they name,
the chat-template prompt, the statistics lines, and error handling.

A user mistake prints one `error: ...` line to stderr and exits 2; `--verbose` shows the traceback. When the
reader of stdout goes away (`| head`), a command stops quietly, as Unix tools do.
Text from the command line or stdin that is not valid UTF-8 is decoded with U+FFFD for the bad bytes, and
a warning says so (the tokenizer cannot encode the surrogates Python uses for them).
"""

import argparse
import os
import re
import select
import signal
import sys
from typing import Callable, Optional, Tuple

from .cache import MAX_DRAFT_TOKENS
from .errors import MlxSpecError
from .proposers import make_proposer
from .proposers.base import Proposer
from .sampling import ACCEPTANCE_MODES, DEFAULT_ACCEPTANCE, SamplingError, SamplingParams, check_seed
from .stats import GenerationStats
from .tuning.tuner import AutoTuner

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMP = 0.0
DEFAULT_NUM_DRAFT_TOKENS = "auto"  # commands own an AutoTuner; the library's default is a fixed k
_SURROGATE = re.compile("[\ud800-\udfff]")  # how Python carries bytes that are not UTF-8 (surrogateescape)


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


def tree_nodes(value: str):
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None
    if not 0 <= n <= MAX_DRAFT_TOKENS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_DRAFT_TOKENS}, got {n}")
    return n


def add_model_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="MLX or Hugging Face model directory, or hub repo id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--drafter", help="a Gemma 4 drafter: MTP assistant, DFlash or DSpark block drafter (directory or "
                   "hub repo id; the family is read from its config; 'auto' finds <base>-assistant)")
    g.add_argument("--draft-model", help="a smaller model with the same tokenizer, used as the proposer")
    g.add_argument("--ngram", nargs="?", const=3, type=int, metavar="N",
                   help="prompt-lookup drafts from the last N tokens (default N: 3)")
    p.add_argument("--num-draft-tokens", type=num_draft_tokens, default=DEFAULT_NUM_DRAFT_TOKENS,
                   metavar="K|auto", help="drafts per round, or 'auto': chosen each round from this machine's "
                   f"measured costs, plain decoding when drafting does not pay (default: {DEFAULT_NUM_DRAFT_TOKENS})")
    p.add_argument("--tree-nodes", type=tree_nodes, default=0, metavar="N|auto",
                   help="draft a tree of N nodes per round (branches no deeper than an integer --num-draft-tokens), "
                   "or 'auto' (with --num-draft-tokens auto): a chain or a tree each round, whichever this machine's "
                   "measured costs favour; 0 (default): chains (docs/TREES.md)")
    p.add_argument("--no-draft", action="store_true", help="plain decoding (baseline), ignoring any proposer")
    p.add_argument("--strict", action="store_true",
                   help="byte-identical to plain decoding (with --strict) even where the device's kernels change "
                        "with the row count: every decode pass padded to one row count; free where the device is "
                        "row-invariant (mlx_spec.doctor tells)")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    add_rank_args(p)


def add_rank_args(p: argparse.ArgumentParser) -> None:
    """How a command run under mlx.launch splits the model over the ranks (docs/DISTRIBUTED.md)."""
    g = p.add_argument_group("under mlx.launch (several ranks)")
    g.add_argument("--pipeline", action="store_true",
                   help="split the layers over the ranks (pipeline parallel) instead of the heads and MLPs (tensor "
                        "parallel, the default): one hop per stage instead of an all-reduce per layer")
    g.add_argument("--check-ranks", action="store_true",
                   help="after every token, check that every rank holds the same tokens (debugging; one collective "
                        "per token)")


def add_sampling_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    if seed:
        p.add_argument("--seed", type=int, default=None,
                       help="fixes every random draw: the same seed gives the same text (any integer)")
    p.add_argument("--acceptance", choices=ACCEPTANCE_MODES, default=DEFAULT_ACCEPTANCE,
                   help="T>0 acceptance rule: coupled (output is exactly plain sampling with the seed, for any k), "
                        "rejection (Leviathan/Chen: accepts the most), match (token match, for comparison); "
                        "auto (default): coupled with --seed, rejection without")


def sampling_params(args) -> SamplingParams:
    """The SamplingParams the flags say, validated; a bad value is one error naming its flag."""
    try:
        if getattr(args, "seed", None) is not None:
            check_seed(args.seed)
        return SamplingParams(args.temp, args.top_p, args.top_k, args.min_p, args.acceptance).validate()
    except SamplingError as e:
        raise MlxSpecError(f"--{e.field.replace('_', '-')} {e.message}") from None


def valid_text(text: str, where: str) -> str:
    """`text` with each byte that was not UTF-8 (a surrogate, in argv or a surrogateescape stream) replaced
    by U+FFFD, saying so on stderr."""
    cleaned, n = _SURROGATE.subn("\ufffd", text)
    if n:
        print(f"warning: {where} is not valid UTF-8: {n} byte{'s' if n > 1 else ''} replaced with U+FFFD",
              file=sys.stderr)
    return cleaned


def read_stdin(where: str = "stdin") -> str:
    """All of stdin as text (bytes that are not UTF-8 replaced, with a warning)."""
    buffer = getattr(sys.stdin, "buffer", None)
    data = buffer.read().decode("utf-8", "surrogateescape") if buffer is not None else sys.stdin.read()
    return valid_text(data, where)


def tolerate_stdin() -> None:
    """Read stdin with surrogateescape, so a line that is not UTF-8 reaches `valid_text` instead of raising."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def check_length_args(args) -> None:
    """--max-tokens and --max-context, for the commands that take both (chat, server)."""
    if args.max_tokens < 1:
        raise MlxSpecError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_context is not None and args.max_context < 2:
        raise MlxSpecError(f"--max-context must be >= 2, got {args.max_context}")


def load_models(args, with_proposer: Optional[bool] = None) -> Tuple[object, object, Optional[Proposer]]:
    """(model, tokenizer, proposer or None) from the model/draft flags. `with_proposer` (default: not
    --no-draft) loads the proposer even with --no-draft, for surfaces that can turn drafting on later."""
    from .api import load, load_drafter
    from .distributed import launched
    from .distributed.commands import agreed, load_for_command

    if not launched() and (getattr(args, "pipeline", False) or getattr(args, "check_ranks", False)):
        print("note: --pipeline and --check-ranks apply under mlx.launch only (docs/DISTRIBUTED.md)", file=sys.stderr)
    model, tokenizer = load_for_command(args) if launched() else load(args.model)  # launched: sharded over ranks
    if not (with_proposer if with_proposer is not None else not args.no_draft):
        return model, tokenizer, None
    if args.drafter:
        drafter = agreed(model, lambda: load_drafter(args.drafter, model, base_path=args.model), "loading the drafter")
        print(f"[mlx_spec] drafter: {drafter.describe()}", file=sys.stderr, flush=True)
        return model, tokenizer, make_proposer(model, drafter=drafter)
    if args.draft_model:
        draft_model = agreed(model, lambda: load_draft_model(args.draft_model), "loading the draft model")
        return model, tokenizer, make_proposer(model, draft_model=draft_model)
    if args.ngram is not None:
        if args.ngram < 1:
            raise MlxSpecError(f"--ngram N must be >= 1, got {args.ngram}")
        return model, tokenizer, make_proposer(model, ngram=args.ngram)
    return model, tokenizer, None


def load_draft_model(path: str):
    """The language model --draft-model names. A Gemma 4 drafter (MTP assistant, DFlash, DSpark, EAGLE-3) cannot
    run on its own (it reads the base's K/V or layer outputs): one error that names --drafter."""
    from .api import load
    from .checkpoint import read_config
    from .families import checkpoint_type, drafter_types
    from .loading import resolve_model_path

    if not str(path).endswith(".gguf"):
        kind = checkpoint_type(read_config(resolve_model_path(path)))
        if kind in drafter_types():
            raise MlxSpecError(f"--draft-model {path} is a Gemma 4 drafter ({kind}), not a language model that "
                               "drafts on its own: pass it with --drafter")
    return load(path)[0]


def make_tuner(args) -> Optional[AutoTuner]:
    """An AutoTuner for --num-draft-tokens auto (it says on stderr when a first use stops to measure)."""
    from .distributed import launched

    if args.num_draft_tokens != "auto" or launched():  # across ranks auto becomes a fixed k (distributed/requests.py)
        return None
    return AutoTuner(log=lambda line: print(line, file=sys.stderr, flush=True))


def format_prompt(tokenizer, prompt: str, system: str = None, use_template: bool = True):
    """Apply the tokenizer's chat template (as mlx-lm does) unless asked not to or there is none."""
    if not use_template or not getattr(tokenizer, "has_chat_template", False):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def format_positions(rates) -> str:
    """Acceptance by draft position; '-' where nothing was drafted (undefined, not 0)."""
    return ", ".join("-" if a is None else f"{a:.2f}" for a in rates)


def print_stats(stats: GenerationStats, file=None, drafting: bool = False) -> None:
    """mlx-lm's summary lines, plus one for speculation when a proposer was in use (`drafting`)."""
    file = file or sys.stderr
    print(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tokens-per-sec", file=file)
    print(f"Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens-per-sec", file=file)
    plain = f"; {stats.plain_steps} tokens without drafts" if stats.plain_steps else ""
    if stats.rounds:
        rounds = f"{stats.rounds} rounds" + (f" ({stats.tree_rounds} trees)" if stats.tree_rounds else "")
        print(f"Speculation: {rounds}, tau {stats.tau:.2f}, accepted {stats.accepted}/{stats.drafted} "
              f"({stats.acceptance_rate:.1%}); by position [{format_positions(stats.acceptance_by_position)}]{plain}",
              file=file)
    elif drafting and stats.generation_tokens > 1:
        print("Speculation: no drafted rounds (auto expected no gain from drafting on this machine, or the "
              "proposer had nothing to offer; mlx_spec.bench shows why)", file=file)
    if stats.strict:
        print("Strict: " + (f"every decode pass padded to {stats.strict_rows} rows (this device's kernels change "
                            "with the row count; mlx_spec.doctor measures the cost)" if stats.strict_rows else
                            "nothing to pad (this device computes a verify row exactly like a one-token step)"),
              file=file)
    print(f"Peak memory: {stats.peak_memory_bytes / 1e9:.3f} GB", file=file)


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse, run, and turn user errors into one line on stderr with a non-zero exit."""
    args = parser.parse_args(argv)
    try:
        return main(args) or 0
    except MlxSpecError as e:
        if getattr(args, "verbose", False):
            raise
        if not getattr(e, "reported_by_root", False):  # an error all ranks agreed on is printed once, by rank 0
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise  # a socket or another pipe: not the reader of our output going away
        try:  # the interpreter flushes stdout at exit: let that go to /dev/null, not into a second traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 128 + signal.SIGPIPE  # what a shell reports for a Unix tool whose reader left (`| head`)


def stdout_reader_gone() -> bool:
    """True when stdout is a pipe or socket whose other end is closed (poll reports an error or hang-up)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor, or closed
        return False
    if not hasattr(select, "poll"):
        return True  # no way to ask (Windows): a broken pipe at the top is almost always stdout's
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))

"""`mlx_spec.generate`: one prompt in, generated text out on stdout; statistics on stderr.

    mlx_spec.generate --model M [--drafter D | --draft-model M2 | --ngram [N]] --prompt P
                      [--max-tokens N] [--temp T] [--seed S] [--num-draft-tokens K|auto] [--no-draft]
"""

import argparse
import sys

from .api import generate, stream_generate  # noqa: F401  (re-exported: `from mlx_spec import generate`)
from .cli import (DEFAULT_MAX_TOKENS, ArgumentParser, add_model_args, add_sampling_args, format_prompt, load_models,
                  make_tuner, print_stats, run, sampling_params)
from .errors import MlxSpecError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.generate", description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--prompt", "-p", default="-", help="prompt text, or '-' to read it from stdin")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--system-prompt", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    add_sampling_args(p)
    return p


def main_args(args) -> int:
    sampling = sampling_params(args)
    if args.max_tokens < 0:
        raise MlxSpecError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer, proposer = load_models(args)
    text = format_prompt(tokenizer, prompt.replace("\\n", "\n"), args.system_prompt, not args.ignore_chat_template)
    last = None
    for r in stream_generate(model, tokenizer, text, proposer=proposer, max_tokens=args.max_tokens, sampling=sampling,
                             seed=args.seed, num_draft_tokens=args.num_draft_tokens, tuner=make_tuner(args),
                             strict=args.strict):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    sys.stdout.write("\n")
    if last is not None:
        print_stats(last.stats, drafting=proposer is not None)
    return 0


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

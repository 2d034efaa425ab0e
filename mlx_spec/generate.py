"""`mlx_spec.generate`: one prompt in, generated text out on stdout; statistics on stderr.

    mlx_spec.generate --model M [--drafter D | --draft-model M2 | --ngram [N]] --prompt P
                      [--max-tokens N] [--temp T] [--num-draft-tokens K|auto] [--no-draft]
"""

import argparse
import sys

from .api import generate, stream_generate  # noqa: F401  (re-exported: `from mlx_spec import generate`)
from .cli import DEFAULT_MAX_TOKENS, ArgumentParser, add_model_args, add_sampling_args, check_sampling_args, load_models, run
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


def format_prompt(tokenizer, prompt: str, system: str = None, use_template: bool = True):
    """Apply the tokenizer's chat template (as mlx-lm does) unless asked not to or there is none."""
    if not use_template or not getattr(tokenizer, "has_chat_template", False):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def print_stats(stats, file=None, drafting: bool = False) -> None:
    """mlx-lm's summary lines, plus one for speculation when a proposer was in use (`drafting`)."""
    file = file or sys.stderr
    print(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tokens-per-sec", file=file)
    print(f"Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens-per-sec", file=file)
    plain = f"; {stats.plain_steps} tokens without drafts" if stats.plain_steps else ""
    if stats.rounds:
        by_pos = ", ".join(f"{a:.2f}" for a in stats.acceptance_by_position)
        print(f"Speculation: {stats.rounds} rounds, tau {stats.tau:.2f}, accepted {stats.accepted}/{stats.drafted} "
              f"({stats.acceptance_rate:.1%}); by position [{by_pos}]{plain}", file=file)
    elif drafting and stats.generation_tokens > 1:
        print("Speculation: no drafted rounds (auto expected no gain from drafting on this machine, or the "
              "proposer had nothing to offer; mlx_spec.bench shows why)", file=file)
    print(f"Peak memory: {stats.peak_memory_bytes / 1e9:.3f} GB", file=file)


def main_args(args) -> int:
    check_sampling_args(args)
    if args.max_tokens < 0:
        raise MlxSpecError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer, draft = load_models(args)
    text = format_prompt(tokenizer, prompt.replace("\\n", "\n"), args.system_prompt, not args.ignore_chat_template)
    last = None
    for r in stream_generate(model, tokenizer, text, max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p,
                             top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                             num_draft_tokens=args.num_draft_tokens, acceptance=args.acceptance, **draft):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    sys.stdout.write("\n")
    if last is not None:
        print_stats(last.stats, drafting=bool(draft))
    return 0


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

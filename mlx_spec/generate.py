"""`mlx_spec.generate`: one prompt in, generated text out on stdout; statistics on stderr.

    mlx_spec.generate --model M [--drafter D | --draft-model M2 | --ngram [N]] --prompt P
                      [--max-tokens N] [--temp T] [--seed S] [--num-draft-tokens K|auto] [--tree-nodes N|auto]
                      [--no-draft]
                      [--max-context N] [--kv-bits 4|8] [--prompt-cache-file F]

The context (the model's max_position_embeddings, or --max-context) bounds prompt + output, as llama.cpp
does: a prompt that fills it is refused with one line; otherwise --max-tokens is cut to what fits, with a
note on stderr. Before loading, weights + drafter + K/V at that context are checked against the device's
memory, and a warning names the flag that would fit (--kv-bits, a shorter --max-context). With
--prompt-cache-file (from mlx_spec.cache_prompt) the prompt continues the cached one, as in mlx-lm.
"""

import argparse
import sys

from .api import encode_prompt, generate, stream_generate  # noqa: F401  (`from mlx_spec import generate`)
from .cli import (DEFAULT_MAX_TOKENS, ArgumentParser, add_model_args, add_sampling_args, format_prompt, load_models,
                  make_tuner, print_stats, read_stdin, run, sampling_params, valid_text)
from .distributed.group import launched
from .errors import MlxSpecError
from .long_context import (PrefillProgress, add_kv_args, check_memory, fit_context, kv_flags, kv_settings,
                           load_session, model_dir_context)
from .models.base import context_length

QUERY = "<query>"  # where --prompt goes in the chat template's rendering, after a cached prefix (mlx-lm's trick)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.generate", description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--prompt", "-p", default="-", help="prompt text, or '-' to read it from stdin")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--max-context", type=int, default=None,
                   help="most prompt + generated tokens (default: the model's max_position_embeddings)")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--prompt-cache-file", default=None,
                   help="continue from a saved prompt (mlx_spec.cache_prompt): --prompt is appended to it")
    add_kv_args(p)
    add_sampling_args(p)
    return p


def continuation_ids(tokenizer, cached: list, prompt: str, use_template: bool) -> list:
    """The full prompt after a cached one: its tokens, then --prompt and (with a chat template) the end of
    the user turn and the model's turn, which is what the template renders after a user message's text."""
    if use_template and getattr(tokenizer, "has_chat_template", False):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": QUERY}], add_generation_prompt=True,
                                                 tokenize=False)
        prompt += rendered[rendered.index(QUERY) + len(QUERY):]
    return list(cached) + tokenizer.encode(prompt, add_special_tokens=False)


def main_args(args) -> int:
    sampling = sampling_params(args)
    if args.max_tokens < 0:
        raise MlxSpecError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.max_context is not None and args.max_context < 2:
        raise MlxSpecError(f"--max-context must be >= 2, got {args.max_context}")
    if args.prompt == "-" and launched():
        raise MlxSpecError("under mlx.launch stdin never ends (mlx.launch does not pass its end on): give the prompt "
                           "with --prompt TEXT")
    prompt = read_stdin() if args.prompt == "-" else valid_text(args.prompt, "--prompt")
    system = valid_text(args.system_prompt, "--system-prompt") if args.system_prompt else None
    kv = kv_settings(args)
    # K/V for what this run can hold: prompt + --max-tokens, cut to the context as fit_context cuts it (the
    # prompt's characters bound its tokens, unknown before the tokenizer is loaded)
    context = args.max_context or model_dir_context(args.model)
    used = args.max_tokens + len(prompt) + len(system or "")
    check_memory(args.model, args.drafter, min(used, context) if context else used, kv)
    model, tokenizer, proposer = load_models(args)
    cache = None
    if args.prompt_cache_file:
        cache, cached = load_session(args.prompt_cache_file, model, kv)
        ids = continuation_ids(tokenizer, cached, prompt.replace("\\n", "\n"), not args.ignore_chat_template)
    else:
        text = format_prompt(tokenizer, prompt.replace("\\n", "\n"), system, not args.ignore_chat_template)
        ids = encode_prompt(tokenizer, text)
    max_tokens = fit_context(len(ids), args.max_tokens, args.max_context or context_length(model),
                             "--max-context" if args.max_context else "the model's max_position_embeddings")
    last = None
    for r in stream_generate(model, tokenizer, ids, proposer=proposer, max_tokens=max_tokens, sampling=sampling,
                             seed=args.seed, num_draft_tokens=args.num_draft_tokens, tree_nodes=args.tree_nodes,
                             tuner=make_tuner(args),
                             strict=args.strict, prompt_cache=cache, on_prefill=PrefillProgress(), **kv_flags(kv)):
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

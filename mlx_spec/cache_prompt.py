"""`mlx_spec.cache_prompt`: prefill a long prompt once and save its K/V, to continue from it later.

    mlx_spec.cache_prompt --model M --prompt P|- --prompt-cache-file F [--system-prompt S]
                          [--ignore-chat-template] [--kv-bits 4|8] [--kv-group-size G] [--quantized-kv-start N]
    mlx_spec.generate --model M --prompt-cache-file F --prompt "the question about it"

As mlx-lm's cache_prompt: with a chat template, the prompt is cached as the start of an open user turn, and
generate's --prompt continues that turn (then the template closes it and opens the model's). The file holds
the base's caches (sliding layers with their window), the token ids and what they fit (model, dtype, K/V
quantization, window); loading refuses a file that does not match with one line. It is written atomically:
an interrupted run (Ctrl-C during the prefill) leaves nothing.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from .api import encode_prompt, load
from .cache import DEFAULT_MAX_ROLLBACK
from .cli import ArgumentParser, read_stdin, run, valid_text
from .errors import MlxSpecError
from .long_context import PrefillProgress, add_kv_args, fit_context, kv_flags, kv_settings
from .models.base import as_base, context_length
from .prefill import prefill as run_chunks


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.cache_prompt", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MLX or Hugging Face model directory, or hub repo id")
    p.add_argument("--prompt", "-p", default="-", help="the prompt to cache, or '-' to read it from stdin")
    p.add_argument("--prompt-cache-file", required=True, help="where to save it (a .safetensors file)")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="cache the prompt as raw text")
    add_kv_args(p)
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    return p


def cached_text(tokenizer, prompt: str, system, use_template: bool) -> str:
    """The text whose tokens are cached: an open user turn when the tokenizer has a chat template."""
    if not use_template or not getattr(tokenizer, "has_chat_template", False):
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


def prefill(model, ids, kv, progress) -> list:
    """Every token of `ids` run into fresh caches, in chunks (progress after each)."""
    base = as_base(model)
    caches = base.make_cache(DEFAULT_MAX_ROLLBACK, **kv_flags(kv))
    run_chunks(lambda x: base.forward(x, caches), ids, lambda: caches, on_progress=progress)
    return caches


def writable_output(arg: str) -> Path:
    """The file --prompt-cache-file names, once its directory is known to take a new file: checked before
    the model is loaded, so a typo does not cost a long prefill."""
    from .session_file import session_path

    path = session_path(Path(arg).expanduser())
    if path.is_dir():
        raise MlxSpecError(f"--prompt-cache-file {arg}: {path} is a directory; name a file in it")
    if not path.parent.is_dir():
        raise MlxSpecError(f"--prompt-cache-file {arg}: the directory {path.parent} does not exist; create it first")
    try:  # the one test that covers permissions, read-only filesystems and quotas alike: write a file there
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise MlxSpecError(f"--prompt-cache-file {arg}: cannot write in {path.parent} ({e.strerror or e})") from e
    return path


def main_args(args) -> int:
    from .session_file import SessionFileError, save_prompt_cache, session_identity

    kv = kv_settings(args)
    prompt = read_stdin() if args.prompt == "-" else valid_text(args.prompt, "--prompt")
    if not prompt:
        raise MlxSpecError("--prompt is empty: there is nothing to cache")
    system = valid_text(args.system_prompt, "--system-prompt") if args.system_prompt else None
    out = writable_output(args.prompt_cache_file)
    model, tokenizer = load(args.model)
    ids = encode_prompt(tokenizer, cached_text(tokenizer, prompt.replace("\\n", "\n"), system,
                                               not args.ignore_chat_template))
    # generate refuses a saved prompt that leaves no room to generate: refuse it before the prefill
    fit_context(len(ids), 1, context_length(model), "the model's max_position_embeddings")
    caches = prefill(model, ids, kv, PrefillProgress())
    try:
        path = save_prompt_cache(out, caches, ids, {**session_identity(model), "model": args.model})
    except SessionFileError as e:
        raise MlxSpecError(f"--prompt-cache-file: {e}") from e
    print(f"cached {len(ids)} tokens in {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

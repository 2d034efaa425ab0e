"""What the commands share for long contexts: the K/V flags (mlx-lm's spellings), the memory check made
before loading, the context bound on prompt + output, prefill progress, and saved sessions
(`--prompt-cache-file`).

Knows flags, files and stderr; the caches themselves are cache.py's, the estimates memory.py's, the file
format session_file.py's.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from .cache import DEFAULT_KV_GROUP_SIZE, KV_BITS, KVQuant
from .errors import MlxSpecError

DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's command-line default: short prompts keep full precision
PROGRESS_AFTER = 4096  # prompts longer than this show prefill progress


def add_kv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                   help="store K/V quantized to 4 or 8 bits (less memory for long contexts; default: full precision)")
    p.add_argument("--kv-group-size", type=int, default=DEFAULT_KV_GROUP_SIZE,
                   help=f"quantization group size along head_dim (default: {DEFAULT_KV_GROUP_SIZE})")
    p.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                   help="quantize K/V once a cache holds this many positions (default: "
                        f"{DEFAULT_QUANTIZED_KV_START}, as mlx-lm)")


def kv_settings(args) -> Optional[KVQuant]:
    """The flags' KVQuant (validated; the model checks the group size against its head_dim), or None."""
    if args.kv_bits is None:
        return None
    return KVQuant.from_flags(args.kv_bits, args.kv_group_size, args.quantized_kv_start)


def kv_flags(kv: Optional[KVQuant]) -> dict:
    """stream_generate's keywords for `kv`."""
    return kv.as_dict() if kv is not None else {}


def check_memory(model_path: str, drafter_path: Optional[str], context: Optional[int], kv: Optional[KVQuant],
                 file=None, slots: int = 1) -> bool:
    """Before loading: weights + drafter + K/V for `slots` caches of `context` positions (the context the run
    will use, after its caps) against the device's working set (or RAM). Prints one warning with the flag
    that would make it fit; returns whether it fits. Paths that are not local directories (hub ids before
    their download, .gguf files) are not estimated."""
    from .checkpoint import read_config
    from .memory import advise, kv_dtype_bytes, kv_layers_from_config, memory_limit, weights_bytes_on_disk

    model_dir = Path(model_path).expanduser()
    if not (model_dir / "config.json").is_file() or not context:
        return True
    config = read_config(model_dir)
    drafter = 0
    if drafter_path and (Path(drafter_path).expanduser() / "config.json").is_file():
        drafter = weights_bytes_on_disk(Path(drafter_path).expanduser())
    limit, source = memory_limit()
    try:
        advice = advise(kv_layers_from_config(config), context, weights=weights_bytes_on_disk(model_dir),
                        drafter=drafter, dtype_bytes=kv_dtype_bytes(config), kv=kv, limit=limit, slots=slots,
                        kv_start=DEFAULT_QUANTIZED_KV_START)  # what --kv-bits alone gives
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError):
        return True  # sizes that are not numbers in range: loading refuses the config next, naming the field
    if not advice.fits:
        print(f"warning: {advice.message} ({source}); expect swapping", file=file or sys.stderr)
    return advice.fits


def fit_context(n_prompt: int, max_tokens: int, context, source: str) -> int:
    """--max-tokens cut to what fits the context after the prompt (with a note); a prompt that leaves no
    room is an error. Past the context the model runs on positions it was never trained on."""
    if not context or max_tokens == 0:
        return max_tokens
    room = context - n_prompt
    if room <= 0:
        raise MlxSpecError(f"the prompt is {n_prompt} tokens and the context holds {context} ({source}): no room to "
                           "generate; shorten the prompt")
    if max_tokens > room:
        print(f"note: the prompt is {n_prompt} tokens and the context holds {context} ({source}), so at most {room} "
              f"of --max-tokens {max_tokens} are generated", file=sys.stderr)
        return room
    return max_tokens


def model_dir_context(model_path: str) -> Optional[int]:
    """max_position_embeddings from a local model directory's config, before loading (None: unknown)."""
    from .checkpoint import read_config

    path = Path(model_path).expanduser() / "config.json"
    if not path.is_file():
        return None
    config = read_config(path.parent)
    text = config.get("text_config") or config
    n = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    return n if isinstance(n, int) and n > 0 else None


class PrefillProgress:
    """`on_prefill` for stream_generate: a line on stderr per chunk of a long prompt (done / total, tok/s)."""

    def __init__(self, file=None):
        self.file = file or sys.stderr
        self.start: Optional[float] = None

    def __call__(self, done: int, total: int) -> None:
        if total <= PROGRESS_AFTER:
            return
        now = time.perf_counter()
        if self.start is None:
            self.start = now - 1e-9
            self.first = done
        rate = (done - self.first) / (now - self.start) if done > self.first else 0.0
        speed = f", {rate:.0f} tok/s" if rate else ""
        print(f"prefill: {done}/{total} tokens{speed} (Ctrl-C cancels)", file=self.file, flush=True)


def load_session(path: str, model, kv: Optional[KVQuant]) -> Tuple[list, List[int]]:
    """(caches, token ids) from a --prompt-cache-file, refused with one line if it does not fit the model or
    the K/V flags given (without --kv-bits, the file's own quantization is used)."""
    from .session_file import FROM_FILE, load_prompt_cache

    if not Path(path).expanduser().is_file():
        raise MlxSpecError(f"--prompt-cache-file {path} does not exist; make one with mlx_spec.cache_prompt")
    return load_prompt_cache(Path(path).expanduser(), model, kv=kv if kv is not None else FROM_FILE)

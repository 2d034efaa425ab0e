"""Loading a Gemma 4 model sharded over the ranks: each rank keeps (and reads into memory) only its part.

The checkpoint is opened lazily (mx.load maps safetensors without reading them), the whole model is built
and checked on those lazy arrays, cut to this rank's part (tensor.py or pipeline.py), and only then
materialized: a rank never holds another rank's weights. Every step that can fail on one rank alone (a
missing directory, a split that does not divide) is agreed (group.Ranks.agree), so all ranks stop with the
same error instead of waiting for each other. Ends with the one stderr line that says how the model is
sharded.
"""

import sys
from typing import Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint import read_config, read_weights, weight_files
from ..errors import DistributedError, ModelLoadError
from ..families import PRODUCER_KV, of_drafter
from ..loading import DTYPES, build_model, default_dtype, load_tokenizer, materialize, resolve_model_path
from ..memory import warn_if_too_big
from ..models.base import as_base
from .group import PIPELINE, TENSOR, Ranks, connect
from .slicing import parameter_bytes
from .tensor import shard_drafter

MODES = (TENSOR, PIPELINE)


def _lazy_model(path_or_repo: str, dtype: Optional[str], ranks: Ranks):
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir = resolve_model_path(path_or_repo)
    config = read_config(model_dir)
    share = sum(f.stat().st_size for f in weight_files(model_dir)) // ranks.size
    warn_if_too_big(share, f"this rank's 1/{ranks.size} of {model_dir}")
    cast = DTYPES[dtype] if dtype else default_dtype(bool(config.get("quantization")))
    model = build_model(config, read_weights(model_dir), model_dir, cast, lazy=True)  # nothing read yet
    model.source_path = str(model_dir)
    return model, config, model_dir


def _materialize_one_by_one(model) -> None:
    """Evaluate the parameters one at a time: each reads its whole tensor from the file and keeps its slice, so
    at most one whole tensor is in memory beside this rank's part (all at once, MLX would read them first)."""
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    materialize(model)  # the rest (RoPE tables and the like)


def _split(model, ranks: Ranks) -> str:
    base = as_base(model)
    return base.shard(ranks.group) if ranks.mode == TENSOR else base.pipeline(ranks.group)


def load(path_or_repo: str, mode: str = TENSOR, *, group=None, check: bool = False, dtype: Optional[str] = None,
         log=None) -> Tuple[object, object]:
    """(model, tokenizer), the model sharded over `group` (default: the launched group) in `mode` (TENSOR:
    heads, MLP, experts and vocabulary split; PIPELINE: layers split). `check`: every rank compares a digest
    of its tokens with the others' after each token (tests, debugging). `log(line)` gets the line that says
    how the model is sharded (default: stderr on rank 0). Each rank must run this with the same arguments."""
    if mode not in MODES:
        raise DistributedError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    ranks = Ranks(group or connect(), mode, check)
    model, config, model_dir = ranks.agree(lambda: _lazy_model(path_or_repo, dtype, ranks), "loading the model")
    whole = parameter_bytes(model)
    held = ranks.agree(lambda: _split(model, ranks), f"splitting the model ({mode} parallel)")
    _materialize_one_by_one(model)
    model.ranks = ranks
    tokenizer = ranks.agree(lambda: load_tokenizer(model_dir, config), "loading the tokenizer")
    mine = parameter_bytes(model)
    per_rank = [b[0] for b in ranks.gather_ints([mine])]  # also a barrier: every rank has its weights now
    line = (f"[mlx_spec] distributed: {ranks.describe()}; {held}; weights by rank "
            f"{', '.join(_size(b) for b in per_rank)} (one process: {_size(whole)})")
    if log is not None:
        log(line)
    elif ranks.is_root:
        print(line, file=sys.stderr, flush=True)
    return model, tokenizer


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def share_drafter(drafter, base) -> None:
    """Fit a drafter loaded on every rank to its sharded base: an MTP assistant of a tensor-sharded base reads
    that rank's K/V heads (tensor.shard_drafter); every other drafter is replicated as loaded (block drafters
    read the base's layer outputs, which every rank holds whole; a pipeline's mirrors hold the whole K/V)."""
    ranks = as_base(base).ranks
    family = of_drafter(drafter)
    if ranks is None or ranks.mode != TENSOR or family is None or family.reads != PRODUCER_KV:
        return
    ranks.agree(lambda: shard_drafter(drafter, as_base(base), ranks.group), "splitting the drafter")
    materialize(drafter)

"""Hugging Face Gemma 4 checkpoint -> mlx-lm's on-disk layout: read -> build (sanitize, check) -> cast ->
quantize -> write atomically.

Reading, sanitizing and checking are `mlx_spec.loading`'s, so a directory converts exactly as it loads.
The output is what `mlx_lm.convert` writes (config.json with a `quantization` block, `model*.safetensors`
+ index, tokenizer files), with the text config written out in full: mlx-lm's Gemma 4 defaults differ
from transformers' (`use_double_wide_mlp`, `num_kv_shared_layers`, `final_logit_softcapping`, kv heads,
...), so a key left implicit would load as a different model there.
"""

import contextlib
import dataclasses
import sys
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_spec.checkpoint import read_config, read_weights
from mlx_spec.errors import ConversionError, ModelLoadError, UnsupportedModelError
from mlx_spec.families import for_type
from mlx_spec.loading import DTYPES, build_model, load_tokenizer, resolve_model_path
from mlx_spec.models import checkpoint_type, own_types

from .recipes import Q_BITS, Q_GROUP_SIZES, RECIPES, make_predicate
from .writer import atomic_directory, check_destination

MULTIMODAL_TYPES = ("gemma4", "gemma4_unified")
DEFAULT_DRAFTER_DTYPE = "bfloat16"
# Copied verbatim: the tokenizer, its chat template and the generation defaults (eos ids).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
TOKENIZER_DATA = ("tokenizer.json", "tokenizer.model")  # tokenizer_config.json alone is not a tokenizer
TOWER_CONFIGS = ("vision_config", "audio_config")
DTYPE_KEYS = ("dtype", "torch_dtype")


def info(msg: str) -> None:
    print(f"[INFO] {msg}", file=sys.stderr, flush=True)  # stdout may carry generated text (load from hub)


def _check_options(quantize: bool, q_bits: int, q_group_size: int, dtype: Optional[str], recipe: Optional[str]) -> None:
    if q_bits not in Q_BITS:
        raise ConversionError(f"q_bits must be one of {Q_BITS}, got {q_bits}")
    if q_group_size not in Q_GROUP_SIZES:
        raise ConversionError(f"q_group_size must be one of {Q_GROUP_SIZES}, got {q_group_size}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if recipe is not None and recipe not in RECIPES:
        raise ConversionError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if recipe is not None and not quantize:
        raise ConversionError(f"the quantization recipe {recipe!r} needs quantize=True (-q/--quantize)")


def _default_dtype(config: dict) -> Optional[str]:
    """Drafters: bf16 (Google ships and tests them so); bases: the dtype the checkpoint says it holds."""
    if for_type(checkpoint_type(config)) is not None:
        return DEFAULT_DRAFTER_DTYPE
    for where in (config, config.get("text_config") or {}):
        for key in DTYPE_KEYS:
            if where.get(key) in DTYPES:
                return where[key]
    return None  # keep each tensor's stored dtype


def _explicit_text_config(original: dict, args) -> dict:
    """The original text config with every field the model was built from written out (normalized)."""
    text = {k: v for k, v in (original or {}).items() if k != "per_layer_config"}  # resolved into the fields below
    text.update(dataclasses.asdict(args))
    return text


def output_config(config: dict, model: nn.Module, dtype: Optional[str]) -> dict:
    """config.json for the MLX layout, loadable by both mlx_spec and mlx-lm 0.32."""
    out = {k: v for k, v in config.items() if k not in TOWER_CONFIGS}
    model_type = checkpoint_type(config)
    family = for_type(model_type)
    if family is not None and family.published_config:
        pass  # flat fields the loaders (ours, mlx-vlm's, z-lab's, DeepSpec's) read as they are
    elif model_type == "gemma4_text":
        out = _explicit_text_config(out, model.text_args)
    else:
        # gemma4/gemma4_unified stay multimodal-typed with the text config nested and weights named
        # `language_model.model.*`: exactly what mlx_lm.convert writes for Google's repos, so mlx-community
        # conversions, per-layer quantization paths and LoRA adapters stay interchangeable with ours.
        # mlx-lm's gemma4 ModelArgs overwrites text_config.vocab_size with the top-level vocab_size
        # (default 262144), so that is written too.
        out["text_config"] = _explicit_text_config(config.get("text_config"), model.text_args)
        if model_type in MULTIMODAL_TYPES:
            out["vocab_size"] = model.text_args.vocab_size
    if dtype is not None:
        for where in (out, out.get("text_config") or {}):
            for key in DTYPE_KEYS:
                if key in where:
                    where[key] = dtype
    return out


def _quantize(model: nn.Module, config: dict, q_bits: int, q_group_size: int, recipe: Optional[str]):
    from mlx_lm.utils import quantize_model

    predicate = make_predicate(model, recipe, q_bits, q_group_size)
    with contextlib.redirect_stdout(sys.stderr):  # mlx-lm prints its bits-per-weight line; stdout stays empty
        return quantize_model(model, config, q_group_size, q_bits, mode="affine", quant_predicate=predicate)


def _save(model: nn.Module, config: dict, src: Path, out: Path) -> None:
    from mlx_lm.utils import save_config, save_model

    save_model(out, model)
    save_config(config, config_path=out / "config.json")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def check_finite(model: nn.Module, src: Path, dtype: Optional[str]) -> None:
    """Refuse NaN or infinite weights, naming the tensor: a model converted with them decodes garbage (or
    only <pad>) without a word. One streaming read of the (cast) weights, tensor by tensor."""
    for name, w in tree_flatten(model.parameters()):
        if not mx.issubdtype(w.dtype, mx.floating):
            continue
        nan, inf = mx.isnan(w).sum(), mx.isinf(w).sum()
        mx.eval(nan, inf)
        if nan.item() or inf.item():
            what = " and ".join(f"{n} {kind}" for n, kind in ((nan.item(), "NaN"), (inf.item(), "infinite"))
                                if n)
            cast = f", or its values overflow {dtype} (try --dtype float32)" if dtype else ""
            raise ConversionError(f"tensor {name!r} from {src} holds {what} value(s){cast}; the checkpoint is corrupt, "
                                  "re-download it")


def _check_tokenizer(src: Path, config: dict) -> None:
    """Fail before converting, with one line, if the tokenizer is missing or does not load."""
    if not any((src / name).is_file() for name in TOKENIZER_DATA):
        raise ModelLoadError(f"no tokenizer in {src} (expected {' or '.join(TOKENIZER_DATA)}); copy the tokenizer "
                             "files from the original checkpoint into it")
    try:
        load_tokenizer(src, config)
    except ModelLoadError as e:  # transformers' messages span lines
        raise ModelLoadError(" ".join(str(e).split())) from e


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def convert(hf_path, mlx_path, *, quantize: bool = False, q_bits: int = 4, q_group_size: int = 64,
            dtype: Optional[str] = None, recipe: Optional[str] = None, force: bool = False) -> Path:
    """Convert a Gemma 4 checkpoint (local directory or hub repo id) into mlx-lm's layout at `mlx_path`.

    dtype: "float16" | "bfloat16" | "float32" for float tensors (default: the checkpoint's `dtype` /
    `torch_dtype` for base models, bfloat16 for drafters); quantize with q_bits/q_group_size and a recipe
    from `convert.recipes.RECIPES`. An existing `mlx_path` is replaced only with force. Returns the output
    directory. Raises an `MlxSpecError` (ModelLoadError, ConversionError, ...) for anything a user can fix;
    on any failure nothing is left at `mlx_path`.
    """
    _check_options(quantize, q_bits, q_group_size, dtype, recipe)
    dest = Path(mlx_path).expanduser().absolute()
    check_destination(dest, force)  # before a download, not after
    src = resolve_model_path(str(hf_path)).absolute()
    if _inside(dest.resolve(), src.resolve()) or _inside(src.resolve(), dest.resolve()):
        raise ConversionError(f"--mlx-path {dest} overlaps the input directory {src}; choose another --mlx-path")

    try:
        config = read_config(src)
    except OSError as e:  # permissions, a directory named config.json, ...; read_config covers bad JSON
        raise ModelLoadError(f"cannot read {src / 'config.json'}: {e.strerror or e}") from e
    model_type = checkpoint_type(config)
    if model_type not in own_types():
        raise UnsupportedModelError(
            f"{src / 'config.json'} has model_type {model_type!r}, which this converter does not support; "
            f"supported: {', '.join(own_types())} (use mlx_lm.convert for other architectures)"
        )
    if quantize and config.get("quantization"):
        raise ConversionError(f"{src} is already quantized; convert from the original (unquantized) checkpoint")
    if for_type(model_type) is None:  # a drafter decodes with its base's tokenizer; a base needs its own
        _check_tokenizer(src, config)

    dtype = dtype or _default_dtype(config)
    info(f"Loading {src} ({model_type})" + (f" as {dtype}" if dtype else ""))
    weights = read_weights(src)
    model = build_model(config, weights, src, DTYPES[dtype] if dtype else None, lazy=True)
    del weights
    check_finite(model, src, dtype)
    out_config = output_config(config, model, dtype)
    if quantize:
        info(f"Quantizing: {q_bits}-bit, group size {q_group_size}, recipe {recipe or 'uniform'}")
        model, out_config = _quantize(model, out_config, q_bits, q_group_size, recipe)

    info(f"Writing {dest}")
    try:
        with atomic_directory(dest, force) as tmp:  # a full disk is its ConversionError
            _save(model, out_config, src, tmp)
    except OSError as e:
        raise ConversionError(f"cannot write {dest}: {e}; nothing was written") from e
    except RuntimeError as e:
        if "Unable to write" not in str(e):  # MLX's message for a failed write; anything else is a bug
            raise
        raise ConversionError(f"cannot write {dest} ({e}); nothing was written") from e
    return dest

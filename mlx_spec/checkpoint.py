"""Reading checkpoints from disk, as untrusted input: config.json, safetensors (single, sharded, indexed).

Both Hugging Face checkpoints and mlx-lm's MLX layout are read here; the layouts share file names and
differ only in tensor names and quantization, which the model's `sanitize` and `quantization` handle.
mlx-vlm's layout of a text-only model (its wrapper's `language_model.` before every name) is unwrapped
here too (`unwrap_language_model`).
Every failure becomes a `ModelLoadError` that names the file and says what to do.
"""

import json
import re
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import mlx.core as mx

from .errors import ModelLoadError, WeightMismatchError

CONFIG_FILE = "config.json"
ATTENTION_TENSOR = re.compile(r"layers\.\d+\.self_attn\.")  # its shape or presence depends on the layer's type
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path, what: str = "config") -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: a model directory needs its {what} file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); re-download or re-convert the model") from None
    except OSError as e:  # a directory in its place, no permission, ...
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_config(model_dir: Path) -> dict:
    """config.json, with generation_config.json's eos_token_id merged in (as mlx-lm does)."""
    config = read_json(model_dir / CONFIG_FILE)
    if "model_type" not in config and "speculators_model_type" not in config:  # Speculators drafters name their family there
        raise ModelLoadError(f"{model_dir / CONFIG_FILE} has no 'model_type'; is this a model directory?")
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            eos = None
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def weight_files(model_dir: Path) -> list:
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no 'weight_map'; re-download the checkpoint")
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weight files in {model_dir}")
    return files


def is_mlx_layout(model_dir: Path, config: dict) -> bool:
    """True for a directory written by mlx-lm's or our converter (quantized, or tagged format=mlx)."""
    if config.get("quantization"):
        return True
    try:
        path = weight_files(model_dir)[0]
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 1 << 26)))
    except (ModelLoadError, OSError, ValueError):
        return False
    return isinstance(header, dict) and (header.get("__metadata__") or {}).get("format") == "mlx"


def read_weights(model_dir: Path) -> Dict[str, mx.array]:
    """All tensors of a checkpoint; a truncated or corrupt file raises naming that file."""
    weights = {}
    for path in weight_files(model_dir):
        try:
            weights.update(mx.load(str(path)))
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt, re-download it"
            ) from None
    return weights


def check_weights(expected: Dict[str, tuple], weights: Dict[str, mx.array], source: Path,
                  layout_note: Optional[str] = None) -> None:
    """Compare tensor names and shapes with what the model expects; raise on the first mismatch.
    `layout_note` says why an attention tensor may not fit when the layer layout was derived, not stated;
    it replaces the guess that the checkpoint is incomplete or mismatched for such tensors."""
    def blame(name: str, default: str) -> str:
        return layout_note if layout_note and ATTENTION_TENSOR.search(name) else default

    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightMismatchError(f"tensor {missing[0]!r}{more} is missing from {source}; "
                                  + blame(missing[0], "the checkpoint is incomplete"))
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightMismatchError(
            f"{source} has tensor {unexpected[0]!r}{more} that this model's config does not use; "
            + blame(unexpected[0], "config.json and the weights do not match")
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise WeightMismatchError(
                f"tensor {name!r} in {source} has shape {tuple(weights[name].shape)}, expected {tuple(shape)} "
                "from config.json; " + blame(name, "the config and the weights do not match")
            )


def check_dtypes(expected: Dict[str, "mx.Dtype"], weights: Dict[str, mx.array], source: Path) -> None:
    """Integers where the model computes in floats (or floats where it expects packed integers) are a corrupt
    or mislabeled checkpoint: MLX would load them and compute garbage. Raise naming the first."""
    for name, want in expected.items():
        w = weights.get(name)
        if w is not None and mx.issubdtype(w.dtype, mx.floating) != mx.issubdtype(want, mx.floating):
            kind = "floating-point" if mx.issubdtype(want, mx.floating) else f"{want} (quantized)"
            raise WeightMismatchError(f"tensor {name!r} in {source} is stored as {w.dtype}, but the model expects "
                                      f"{kind} values there; the checkpoint is corrupt or mislabeled, re-download it")


WRAPPER_PREFIX = "language_model."


def unwrap_language_model(expected: Iterable[str], weights: Dict[str, mx.array], config: dict
                          ) -> Tuple[Dict[str, mx.array], dict]:
    """(weights, config) with mlx-vlm's wrapper prefix removed when the model has no such wrapper.

    mlx-vlm (`mlx_vlm.convert`) loads every checkpoint through a multimodal-style wrapper, so a text-only
    `gemma4_text` model comes out with `model_type: gemma4_text` but tensors named
    `language_model.model.layers...` and per-module quantization entries keyed the same way. Our (and
    mlx-lm's) gemma4_text names start at `model.`; Google's multimodal `gemma4` layout keeps the prefix,
    and its model expects it, so nothing is changed there. The prefix is stripped only when the model
    expects no `language_model.` name and every tensor has one.
    """
    if not weights or any(name.startswith(WRAPPER_PREFIX) for name in expected):
        return weights, config
    if not all(name.startswith(WRAPPER_PREFIX) for name in weights):
        return weights, config
    n = len(WRAPPER_PREFIX)
    weights = {name[n:]: w for name, w in weights.items()}
    quantization = config.get("quantization")
    if isinstance(quantization, dict):
        config = dict(config, quantization={
            (k[n:] if k.startswith(WRAPPER_PREFIX) else k): v for k, v in quantization.items()})
    return weights, config

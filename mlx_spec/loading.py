"""Turning a path or hub id into a ready model: resolve, read, sanitize, quantize, check, load.

An MLX-layout directory (from our converter, mlx-lm's, or mlx-community) and an unconverted Hugging Face
directory go through the same steps; an HF checkpoint is simply sanitized and cast in memory. Converting
a hub checkpoint once to disk is the API's business (api.load), not this module's: the runtime never
imports the converter (the converter imports this).
"""

import importlib
import os
import re
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import check_dtypes, check_weights, read_config, read_weights, unwrap_language_model, weight_files
from .errors import HubUnreachableError, ModelLoadError, WeightMismatchError
from .memory import warn_if_too_big
from .models import checkpoint_type, get_model_classes
from .models.gemma4_text import layer_pattern_note

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Never cast: an index table (cast to float it would silently corrupt the drafter's vocabulary order).
INTEGER_TENSORS = ("token_ordering",)
DEFAULT_HUB_TIMEOUT = 10.0  # seconds for the hub to answer a lookup (huggingface_hub's etag default)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def follows_layer_pattern(kind: str) -> bool:
    """Whether a checkpoint type's layer layout follows gemma4_text's rule when config.json does not list
    it: the Gemma 4 bases, and the MTP assistants (their text config is a gemma4_text one)."""
    from . import families
    from .models import BASE_TYPES

    return kind in BASE_TYPES or kind in families.MTP.model_types


def resolve_model_path(path_or_repo: str) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, downloaded into the hub cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass the model directory that holds config.json")
    if not is_hub_id(path_or_repo):
        raise ModelLoadError(f"model directory {path_or_repo} does not exist (and it is not a hub repo id 'org/name')")
    return _download(path_or_repo)


def hub_timeout() -> float:
    """Seconds a hub lookup may wait for an answer: HF_HUB_ETAG_TIMEOUT (read now, not at import), else 10."""
    try:
        value = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_HUB_TIMEOUT)
    except ValueError:
        return DEFAULT_HUB_TIMEOUT
    return value if value > 0 else DEFAULT_HUB_TIMEOUT


def _transport_errors() -> Tuple[tuple, tuple, tuple]:
    """(timeout, proxy, any transport) exception classes of the HTTP library huggingface_hub uses (httpx2 in
    2.x, httpx in 1.x, requests before)."""
    for name, timeout, proxy, transport in (("httpx2", "TimeoutException", "ProxyError", "TransportError"),
                                            ("httpx", "TimeoutException", "ProxyError", "TransportError"),
                                            ("requests", "Timeout", "ProxyError", "ConnectionError")):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        return (getattr(mod, timeout), TimeoutError), (getattr(mod, proxy),), (getattr(mod, transport), ConnectionError)
    return (TimeoutError,), (), (ConnectionError,)


def _hub_problem(e: BaseException, endpoint: str, timeout: float) -> Optional[str]:
    """What kept the hub from answering (a timeout, a proxy, the network), or None for another error."""
    timeouts, proxies, transport = _transport_errors()
    if isinstance(e, proxies):  # before transport: a ProxyError is one
        return (f"the proxy in HTTPS_PROXY/HTTP_PROXY refused the connection to {endpoint} ({e}); fix or unset the "
                "proxy")
    if isinstance(e, timeouts):
        return (f"{endpoint} did not answer within {timeout:g} s (HF_HUB_ETAG_TIMEOUT); check the network, HF_ENDPOINT "
                "and any proxy")
    if isinstance(e, transport):
        return f"cannot reach {endpoint} ({type(e).__name__}: {e}); check the network, HF_ENDPOINT and any proxy"
    return None


def _download(repo: str) -> Path:
    """The repo's files from the hub cache, downloaded first where needed. The lookup that resolves the
    revision (huggingface_hub sends it without a timeout: an endpoint that accepts and never answers hangs
    it forever) is made here with hub_timeout(); when the hub cannot be asked, the cache still serves, as
    huggingface_hub does offline."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    check_repo_id(repo)
    timeout, endpoint = hub_timeout(), constants.ENDPOINT
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    revision, problem = None, None
    if not offline:
        try:
            revision = HfApi().repo_info(repo, timeout=timeout).sha
        except HfHubHTTPError:
            pass  # the hub answered (not found, gated, down): snapshot_download says which, or uses the cache
        except Exception as e:
            problem = _hub_problem(e, endpoint, timeout)
            if problem is None:
                raise
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, etag_timeout=timeout,
                                      local_files_only=offline or problem is not None))
    except LocalEntryNotFoundError:
        if problem:
            raise HubUnreachableError(f"cannot get {repo}: {problem}; it is not in the local hub cache") from None
        raise ModelLoadError(
            f"{repo} is not in the local hub cache and cannot be downloaded"
            + (" (HF_HUB_OFFLINE is set)" if offline else " (no network?)")
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot download {repo} from the Hugging Face hub: {e}") from None
    except Exception as e:
        problem = _hub_problem(e, endpoint, timeout)
        if problem is None:
            raise
        raise HubUnreachableError(f"cannot download {repo}: {problem}") from None


def check_repo_id(repo: str) -> None:
    """A path that does not exist and is no valid hub repo id ('foo/..', 'org/bad..name') is one error,
    before the hub is asked (huggingface_hub raises HFValidationError for it, which no lookup handles)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        reason = " ".join(str(e).split())
        raise ModelLoadError(f"{repo!r} is neither a local directory nor a valid Hugging Face repo id "
                             f"({reason})") from None


def _quantize_like_checkpoint(model: nn.Module, config: dict, weights: dict) -> None:
    """Swap in quantized layers wherever the checkpoint stores scales (mlx-lm's rule)."""
    from mlx_lm.utils import infer_quant_config

    quantization = config["quantization"]

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def cast_weights(weights: dict, dtype) -> dict:
    """Cast floating tensors to dtype; keep integer tables (token_ordering) and packed weights as they are."""
    out = {}
    for name, w in weights.items():
        if name.endswith(INTEGER_TENSORS):
            out[name] = w.astype(mx.int32)
        elif dtype is not None and mx.issubdtype(w.dtype, mx.floating):
            out[name] = w.astype(dtype)
        else:
            out[name] = w
    return out


def build_model(config: dict, weights: dict, source: Path, dtype=None, lazy: bool = False) -> nn.Module:
    """Instantiate the model for config, sanitize and check the weights, and load them.

    lazy=True leaves the weights unevaluated (memory-mapped), so a converter can stream a large model."""
    model_class, args_class = get_model_classes(config)
    kind = checkpoint_type(config)
    try:
        args = args_class.from_dict(config)
        check_layer_count(args, weights)
        model = model_class(args)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:  # Overflow: past MLX's int32 shapes
        raise ModelLoadError(f"{source / 'config.json'} cannot configure a {kind} model: {e}") from e
    weights, config = unwrap_language_model((k for k, _ in tree_flatten(model.parameters())), weights, config)
    try:
        weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    except (ValueError, IndexError) as e:
        raise WeightMismatchError(f"the weights in {source} do not fit a {config.get('model_type')} model: {e}") from e
    weights = cast_weights(weights, dtype)
    if config.get("quantization"):
        _quantize_like_checkpoint(model, config, weights)
    params = dict(tree_flatten(model.parameters()))
    note = layer_pattern_note(config) if follows_layer_pattern(kind) else None
    check_weights({k: v.shape for k, v in params.items()}, weights, source, note)
    check_dtypes({k: v.dtype for k, v in params.items()}, weights, source)
    model.eval()
    model.load_weights(list(weights.items()), strict=False)
    if not lazy:
        materialize(model)
    return model


def check_layer_count(args, weights: dict) -> None:
    """A config that declares more decoder layers than the weights hold is refused before the layers are
    built (10**6 of them would take minutes and then fail on the weights)."""
    text = getattr(args, "text_config", None)
    declared = getattr(args, "num_hidden_layers", None) if not isinstance(text, dict) else text.get("num_hidden_layers")
    held = {int(m.group(1)) for name in weights for m in [LAYER_INDEX.search(name)] if m}
    if isinstance(declared, int) and held and declared > max(held) + 1:
        raise ValueError(f"num_hidden_layers is {declared} but the weights hold layers 0..{max(held)}")


def materialize(*models) -> None:
    """Evaluate every array the models hold, private ones included (e.g. RoPE frequencies).

    MLX streams are per thread: an array left lazy on the loading thread cannot be evaluated on another
    (a server's worker thread), so nothing may stay lazy after a load.
    """
    arrays = []
    for model in models:
        if not hasattr(model, "modules"):
            continue
        for module in model.modules():
            for value in list(module.values()) + list(vars(module).values()):
                if isinstance(value, mx.array):
                    arrays.append(value)
    mx.eval(arrays)


def is_hub_id(path_or_repo: str) -> bool:
    """'org/name' that is not a local path."""
    return not Path(path_or_repo).expanduser().exists() and path_or_repo.count("/") == 1 \
        and not path_or_repo.startswith((".", "/", "~"))


def default_dtype(quantized: bool):
    """float32 for a quantized model on MLX's CPU backend, else None (the file's dtypes).

    The CPU quantized matmul computes in the scales' dtype, and with bfloat16 / float16 scales it is ~9x /
    ~40x slower than with float32 ones (measured: a 2048x512 4-bit matmul, 0.7 ms vs 6.2 / 30 ms); a
    bf16 4-bit model decodes 2-5x faster cast. What gets cast is small in a quantized model (scales,
    biases, norms); its packed weights stay as they are. Metal and CUDA have fast half-precision kernels,
    so elsewhere nothing changes."""
    return mx.float32 if quantized and mx.default_device() == mx.cpu else None


def load_model(path_or_repo: str, dtype: Optional[str] = None) -> Tuple[nn.Module, dict, Path]:
    """(model, config, resolved directory) from a local directory or a hub repo id (downloaded as is).
    `dtype` casts the float weights (of a quantized model: scales, biases and the unquantized rest;
    default: `default_dtype`)."""
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir = resolve_model_path(path_or_repo)
    config = read_config(model_dir)
    warn_if_too_big(sum(f.stat().st_size for f in weight_files(model_dir)), f"loading {model_dir}")
    weights = read_weights(model_dir)
    cast = DTYPES[dtype] if dtype else default_dtype(bool(config.get("quantization")))
    model = build_model(config, weights, model_dir, cast)
    model.source_path = str(model_dir)  # identifies the model in the costs file and bench records
    return model, config, model_dir


def load_tokenizer(model_dir: Path, config: dict):
    """mlx-lm's TokenizerWrapper (streaming detokenizer, chat template, eos ids); remote code stays off."""
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"no tokenizer in {model_dir} (expected tokenizer.json or tokenizer.model); copy the tokenizer "
            "files from the original checkpoint into it"
        )
    from mlx_lm.tokenizer_utils import load as load_tokenizer_wrapper

    eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else eos
    try:
        return load_tokenizer_wrapper(model_dir, eos_token_ids=eos_ids)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        reason = " ".join(str(e).split())  # its messages span several lines; ours is one
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {reason}") from e

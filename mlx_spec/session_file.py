"""Saved sessions: a base model's prompt cache in one file, so a long system prompt or document is prefilled
once. The file holds the K/V of every cached layer, the token ids they hold, the sliding layers' state and
the quantization, in mlx-lm's prompt-cache layout (a safetensors file) where the cache types map.

Layout, as mlx-lm's `save_prompt_cache` writes it: tensor "i.j" (or "i.j.m" for a quantized triple) is
element j of cache i's `state`; metadata "0.<key>" is free-form, "1.i" names cache i's class and "2.*" says
which state elements are scalars. Full-attention layers are written as mlx-lm's `KVCache` (its
`QuantizedKVCache` when quantized) and sliding layers as its `RotatingKVCache(max_size=window, keep=0)`
holding their last positions in temporal order, so `mlx_lm.models.cache.load_prompt_cache` loads the
file and mlx-lm's Gemma 4 continues from it (tested). A quantized sliding layer has no mlx-lm type (mlx-lm
cannot quantize a RotatingKVCache): it is written as `mlx_spec.SlidingKVCache`, and such a file (any
Gemma 4 saved with --kv-bits) loads in mlx_spec only.

mlx_spec's own metadata ("0.mlx_spec", JSON): format version, the model identity, the token ids, the
quantization, each layer's kind and offset, and a sha256 of the tensors' bytes. Every file is untrusted
input: the header is parsed and checked (offsets tile the data exactly, dtypes and shapes match the
model's geometry) before a tensor is built, tensors are read with plain file reads (nothing is unpickled
or handed unchecked to a loader), the checksum is verified, and the K/V must be finite (a checksum finds
damage, not a crafted file). Any mismatch, deep JSON nesting or a field of the wrong type raises one
SessionFileError line that names the file and what differs.

Knows caches, token ids and files; nothing of engines, tokenizers or chat.
"""

import hashlib
import json
import os
import struct
from dataclasses import asdict, is_dataclass
from math import prod
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .atomic import disk_full
from .cache import DEFAULT_MAX_ROLLBACK, FullKVCache, KVQuant, SlidingKVCache
from .errors import MlxSpecError
from .models.base import as_base

FORMAT = 1
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 256 * 2**20  # token ids live in the header: 256 MiB is ~30M tokens
FROM_FILE = "file"  # load_prompt_cache(kv=...): accept whatever quantization the file has
_DTYPES = {  # safetensors dtype -> (numpy type to read the bytes as, the mlx dtype, bytes per element)
    "F32": (np.float32, mx.float32, 4), "F16": (np.float16, mx.float16, 2), "BF16": (np.uint16, mx.bfloat16, 2),
    "U32": (np.uint32, mx.uint32, 4), "I32": (np.int32, mx.int32, 4),
}
_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32"}


class SessionFileError(MlxSpecError):
    """A prompt-cache file cannot be used: unreadable, corrupted, or saved for another model or setting."""


# -- identity
def session_identity(model) -> dict:
    """What a prompt cache depends on: architecture and config, weights (a sample), K/V dtype and geometry."""
    from .memory import kv_layers_from_model

    layers, dtype = kv_layers_from_model(model)
    args = getattr(model, "args", None)
    config = asdict(args) if is_dataclass(args) else {}
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    sample = [p.reshape(-1)[:8] for _, p in params]
    mx.eval(sample)
    h = hashlib.sha256()
    for (name, p), s in zip(params, sample):
        h.update(f"{name}:{p.shape}:{p.dtype};".encode())
        h.update(np.asarray(s.astype(mx.float32) if s.dtype == mx.bfloat16 else s).tobytes())
    return {
        "model_type": getattr(model, "model_type", type(model).__name__),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": h.hexdigest(),
        "kv_dtype": str(dtype).replace("mlx.core.", ""),
        "kv_layers": [[l.n_kv_heads, l.k_head_dim, l.v_head_dim, l.window] for l in layers],
    }


_WHAT = {"model_type": "model type", "config_sha256": "config", "weights_sha256": "weights",
         "kv_dtype": "K/V dtype (another --dtype?)", "kv_layers": "K/V layers (heads, head_dim, window)"}


# -- writing
def _kv_state(buf) -> list:
    return list(buf) if isinstance(buf, tuple) else buf


def _cache_entry(c) -> Tuple[str, list, dict]:
    """(mlx-lm class name, state list, our per-layer record) for one cache."""
    if isinstance(c, FullKVCache):
        k, v = c.state
        if c.quantized:
            return "QuantizedKVCache", [_kv_state(k), _kv_state(v), c.offset, c.kv.group_size, c.kv.bits], \
                {"kind": "full", "quantized": True, "offset": c.offset}
        return "KVCache", [k, v, c.offset], {"kind": "full", "quantized": False, "offset": c.offset}
    if isinstance(c, SlidingKVCache):
        n = min(c.length, c.keep)  # what the cache promises to hold (more only right after an update)
        k, v = (tuple(x[..., c.length - n :, :] for x in b) if isinstance(b, tuple) else b[..., c.length - n :, :]
                for b in c.state)
        record = {"kind": "sliding", "quantized": c.quantized, "offset": c.offset, "window": c.window}
        if c.quantized:
            return "mlx_spec.SlidingKVCache", [_kv_state(k), _kv_state(v), c.offset, c.kv.group_size, c.kv.bits,
                                               c.window], record
        return "RotatingKVCache", [k, v, c.offset, 0, c.window, n], record
    raise SessionFileError(f"cannot save a {type(c).__name__}: only mlx_spec's rewindable caches are supported")


def _tensor_bytes(a: mx.array) -> bytes:
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()


def _checksum(tensors: Dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        h.update(tensors[name])
    return h.hexdigest()


def session_path(path: Union[str, Path]) -> Path:
    """Where a session named `path` is written: ".safetensors" appended if missing, as mlx-lm does."""
    path = Path(path)
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


def save_prompt_cache(path: Union[str, Path], caches: list, tokens: List[int], model_identity: dict,
                      metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write caches (holding exactly `tokens`) to `session_path(path)`, atomically: a temporary file in the
    same directory, then a rename. Returns the path written; a write that fails (no such directory, a full
    disk, read-only) raises SessionFileError and leaves nothing. `model_identity`: `session_identity(model)`,
    plus anything informative (a "model" path is also what mlx-lm's generate reads). `metadata`: more
    free-form strings for the file's metadata."""
    path = session_path(path)
    tokens = [int(t) for t in tokens]
    offsets = {c.offset for c in caches}
    if offsets != {len(tokens)}:
        raise ValueError(f"the caches hold {sorted(offsets)} positions but {len(tokens)} token ids were given")
    classes, states, layers = zip(*(_cache_entry(c) for c in caches)) if caches else ((), (), ())
    scalars: list = [""]  # mlx-lm's layout: must be non-empty
    arrays = {}
    for name, value in tree_flatten(list(states)):
        if isinstance(value, mx.array):
            arrays[name] = value
        else:
            scalars.append((name, "scalar"))
            arrays[name] = mx.array(value)
    mx.eval(list(arrays.values()))
    kv = next((c.kv for c in caches if c.kv is not None), None)
    ours = {"format": FORMAT, "identity": dict(model_identity), "tokens": tokens, "layers": list(layers),
            "kv": kv.as_dict() if kv else None,
            "sha256": _checksum({n: _tensor_bytes(a) for n, a in arrays.items()})}
    user = {"model": str(model_identity.get("model", "")), "tokenizer_config": "{}", **(metadata or {}),
            "mlx_spec": json.dumps(ours)}
    meta = dict(tree_flatten([user, list(classes), scalars]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{SUFFIX}")
    try:
        mx.save_safetensors(str(tmp), arrays, meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # MLX reports a failed open or write as a RuntimeError
        reason = disk_full(e, path.parent)
        reason = f"the disk is full: {reason}" if reason else (getattr(e, "strerror", None) or str(e))[:200]
        raise SessionFileError(f"prompt cache file {path} cannot be written ({reason}); nothing was saved") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# -- reading
def _fail(path: Path, what: str) -> SessionFileError:
    return SessionFileError(f"prompt cache file {path}: {what}")


def _read_header(path: Path, f, size: int) -> Tuple[dict, Dict[str, str], int]:
    """(tensor table, metadata, offset of the data section), every entry checked against the file size."""
    corrupt = "is corrupted or truncated ({}); save it again"
    if size < 8:
        raise _fail(path, corrupt.format("shorter than a safetensors header"))
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise _fail(path, corrupt.format(f"header of {n} bytes in a file of {size}"))
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, corrupt.format(f"unreadable header: {e}")) from e
    except RecursionError as e:
        raise _fail(path, corrupt.format("header nested too deeply")) from e
    if not isinstance(header, dict):
        raise _fail(path, corrupt.format("header is not a table"))
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, corrupt.format("metadata is not a table of strings"))
    data_len, spans = size - 8 - n, []
    for name, t in header.items():
        ok = (isinstance(t, dict) and t.get("dtype") in _DTYPES and isinstance(t.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in t["shape"]) and isinstance(t.get("data_offsets"), list)
              and len(t["data_offsets"]) == 2 and all(isinstance(o, int) for o in t["data_offsets"]))
        if not ok:
            raise _fail(path, corrupt.format(f"bad entry for tensor {name!r}"))
        a, b = t["data_offsets"]
        if not 0 <= a <= b <= data_len or b - a != prod(t["shape"]) * _DTYPES[t["dtype"]][2]:
            raise _fail(path, corrupt.format(f"tensor {name!r} lies outside the file's {data_len} data bytes"))
        if b > a:
            spans.append((a, b))
    end = 0
    for a, b in sorted(spans):
        if a != end:
            raise _fail(path, corrupt.format("tensors overlap or leave gaps"))
        end = b
    if end != data_len:
        raise _fail(path, corrupt.format(f"{data_len - end} bytes past the last tensor"))
    return header, meta, 8 + n


def _expected(kind: str, quantized: bool, layer, T: int, dtype, q: Optional[KVQuant], window: Optional[int]):
    """(class name, {tensor name suffix: (shape, dtype)}, scalar suffixes) for one layer's state."""
    n_kv, hd_k, hd_v, _ = layer

    def kv(j: int, hd: int) -> dict:
        if not quantized:
            return {f"{j}": ((1, n_kv, T, hd), dtype)}
        groups = (1, n_kv, T, hd // q.group_size)
        return {f"{j}.0": ((1, n_kv, T, hd * q.bits // 32), mx.uint32), f"{j}.1": (groups, dtype),
                f"{j}.2": (groups, dtype)}

    tensors = {**kv(0, hd_k), **kv(1, hd_v)}
    if kind == "full":
        return ("QuantizedKVCache" if quantized else "KVCache"), tensors, \
            ({"2": None, "3": q.group_size, "4": q.bits} if quantized else {"2": None})
    if quantized:
        return "mlx_spec.SlidingKVCache", tensors, {"2": None, "3": q.group_size, "4": q.bits, "5": window}
    return "RotatingKVCache", tensors, {"2": None, "3": 0, "4": window, "5": T}


def _parse_kv(value) -> Optional[KVQuant]:
    if value is None:
        return None
    return KVQuant(value["kv_bits"], value["kv_group_size"], value["quantized_kv_start"]).validate()


def _describe(kv: Optional[KVQuant]) -> str:
    if kv is None:
        return "no --kv-bits"
    return f"--kv-bits {kv.bits} --kv-group-size {kv.group_size} --quantized-kv-start {kv.start}"


def load_prompt_cache(path: Union[str, Path], model, *, kv: Union[KVQuant, None, str] = FROM_FILE,
                      max_rollback: Optional[int] = None) -> Tuple[list, List[int]]:
    """(caches, token ids they hold) from a file written by `save_prompt_cache`, checked against `model`.

    kv: the quantization the caller runs with (a KVQuant, or None for full precision); a file saved with
    another is refused. The default accepts the file's. max_rollback: as for `make_cache` (default: the
    engine's). Raises SessionFileError (one line: the file and what is wrong) for any mismatch or damage."""
    path = Path(path)
    if not path.exists() and path.suffix != SUFFIX and path.with_name(path.name + SUFFIX).exists():
        path = path.with_name(path.name + SUFFIX)
    max_rollback = DEFAULT_MAX_ROLLBACK if max_rollback is None else max_rollback
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        header, meta, data_start = _read_header(path, f, size)
        if "0.mlx_spec" not in meta:
            raise _fail(path, "was not written by mlx_spec (no 'mlx_spec' metadata); prefill the prompt again "
                        "and save it with mlx_spec")
        fmt, identity, tokens, layers, file_kv, digest = _read_ours(path, meta["0.mlx_spec"])
        if fmt != FORMAT:
            raise _fail(path, f"has format {fmt!r}; this mlx_spec reads format {FORMAT}: save it again")

        mine = session_identity(model)
        differs = [_WHAT[k] for k in mine if identity.get(k) != mine[k]]
        if differs:
            model_name = identity.get("model")
            saved_for = f" (saved for {model_name[:200]})" if isinstance(model_name, str) and model_name else ""
            raise _fail(path, f"was saved for another model{saved_for}: its {', '.join(differs)} differ")
        if kv != FROM_FILE and kv != file_kv:
            raise _fail(path, f"was saved with {_describe(file_kv)}, this run uses {_describe(kv)}: use the same "
                        "flags or save it again")
        vocab = getattr(getattr(model, "args", None), "vocab_size", None) or 2**31
        if (not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens)
                or not isinstance(layers, list) or len(layers) != len(mine["kv_layers"])):
            raise _fail(path, "is corrupted (token ids or layer records out of range)")

        caches = _fresh_caches(model, max_rollback, file_kv)
        dtype = getattr(mx, mine["kv_dtype"])
        want: Dict[str, tuple] = {}
        scalars: Dict[str, object] = {}
        for i, (c, rec, geo) in enumerate(zip(caches, layers, mine["kv_layers"])):
            kind = "full" if isinstance(c, FullKVCache) else "sliding"
            try:
                quantized, offset = bool(rec["quantized"]), int(rec["offset"])
            except (KeyError, TypeError, ValueError, OverflowError) as e:  # int(Infinity) overflows
                raise _fail(path, f"is corrupted (layer {i}'s record: {str(e)[:200]})") from e
            first = header.get(f"{i}.0.0" if quantized else f"{i}.0")
            T = first["shape"][2] if first and len(first["shape"]) == 4 else -1  # positions held
            window = c.window if kind == "sliding" else None
            fits = T == offset if kind == "full" else min(offset, window + 1) <= T <= min(offset, c.keep)
            if (rec.get("kind") != kind or offset != len(tokens) or not fits
                    or (quantized and (file_kv is None or offset < file_kv.start))):
                raise _fail(path, f"does not match this model's layer {i} ({kind} attention"
                            f"{f', window {window}' if window else ''})")
            cls, tensors, fixed = _expected(kind, quantized, geo, T, dtype, file_kv, window)
            if meta.get(f"1.{i}") != cls:
                raise _fail(path, f"layer {i} is a {meta.get(f'1.{i}')!r}, expected {cls!r}")
            want.update({f"{i}.{k}": v for k, v in tensors.items()})
            want.update({f"{i}.{k}": ((), mx.int32) for k in fixed})
            scalars.update({f"{i}.{k}": (offset if v is None else v) for k, v in fixed.items()})
        if set(header) != set(want):
            extra, missing = sorted(set(header) - set(want)), sorted(set(want) - set(header))
            raise _fail(path, f"does not match this model (unexpected tensors {extra[:4]}, missing {missing[:4]})")
        for name, (shape, dt) in want.items():
            if tuple(header[name]["shape"]) != shape or header[name]["dtype"] != _NAMES[dt]:
                raise _fail(path, f"tensor {name} is {header[name]['dtype']} {header[name]['shape']}, expected "
                            f"{_NAMES[dt]} {list(shape)} for this model")

        raw = {}
        for name in want:
            a, b = header[name]["data_offsets"]
            f.seek(data_start + a)
            raw[name] = f.read(b - a)
            if len(raw[name]) != b - a:
                raise _fail(path, "is truncated; save it again")
        if _checksum(raw) != digest:
            raise _fail(path, "is corrupted (its tensors do not match their checksum); save it again")

    arrays = {name: _to_mx(raw.pop(name), header[name]) for name in list(raw)}
    _check_finite(path, arrays)
    for name, value in scalars.items():
        if arrays[name].item() != value:
            raise _fail(path, f"is corrupted ({name} is {arrays[name].item()}, expected {value})")
    for i, (c, rec) in enumerate(zip(caches, layers)):
        _restore(c, arrays, i, bool(rec["quantized"]), int(rec["offset"]))
    return caches, tokens


_FIELDS = {"format": (int, "a number"), "identity": (dict, "an object"), "tokens": (list, "a list"),
           "layers": (list, "a list"), "kv": ((dict, type(None)), "an object or null"),
           "sha256": (str, "a string")}  # mlx_spec's metadata: each field's JSON type


def _read_ours(path: Path, text: str) -> tuple:
    """(format, identity, token ids, layer records, K/V quantization, checksum) from mlx_spec's metadata,
    each of the type the checks that follow rely on (a file is untrusted: `identity` may be a list)."""
    try:
        ours = json.loads(text)
        if not isinstance(ours, dict):
            raise TypeError("it is not an object")
        for k, (kind, name) in _FIELDS.items():
            if not isinstance(ours.get(k, ...), kind):
                raise TypeError(f"'{k}' is missing or not {name}")
        if not all(isinstance(rec, dict) for rec in ours["layers"]):
            raise TypeError("a layer record is not an object")
        return (ours["format"], ours["identity"], ours["tokens"], ours["layers"], _parse_kv(ours["kv"]),
                ours["sha256"])
    except RecursionError as e:
        raise _fail(path, "is corrupted (its mlx_spec metadata is nested too deeply)") from e
    except (ValueError, KeyError, TypeError, MlxSpecError) as e:  # JSONDecodeError is a ValueError
        raise _fail(path, f"is corrupted (its mlx_spec metadata is unreadable: {str(e)[:200]})") from e


def _check_finite(path: Path, arrays: Dict[str, mx.array]) -> None:
    """The checksum finds damage, not a crafted file: K/V with a NaN or an infinity would turn every token
    after the prompt into garbage (<pad><pad>...) without a word."""
    for name, a in arrays.items():
        if mx.issubdtype(a.dtype, mx.floating) and not mx.all(mx.isfinite(a)).item():
            raise _fail(path, f"is corrupted (layer {name.split('.')[0]} holds non-finite K/V: NaN or infinity); "
                        "save it again")


def _fresh_caches(model, max_rollback: int, kv: Optional[KVQuant]) -> list:
    flags = dict(kv_bits=kv.bits, kv_group_size=kv.group_size, quantized_kv_start=kv.start) if kv else {}
    return as_base(model).make_cache(max_rollback=max_rollback, **flags)  # mlx-lm models: rewindable too


def _to_mx(data: bytes, entry: dict) -> mx.array:
    np_type, dtype, _ = _DTYPES[entry["dtype"]]
    a = mx.array(np.frombuffer(data, dtype=np_type).reshape(entry["shape"]))
    return a.view(mx.bfloat16) if dtype == mx.bfloat16 else a


def _restore(c, arrays: dict, i: int, quantized: bool, offset: int) -> None:
    """Fill a fresh cache with layer i's tensors; it then holds exactly `offset` positions."""
    def buf(j: int):
        return tuple(arrays[f"{i}.{j}.{m}"] for m in range(3)) if quantized else arrays[f"{i}.{j}"]

    c.keys, c.values, c.offset, c.quantized = buf(0), buf(1), offset, quantized
    if isinstance(c, SlidingKVCache):
        c._start, c._end = 0, (c.keys[0] if quantized else c.keys).shape[2]

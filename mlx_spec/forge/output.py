"""Writing a forged drafter: its family's published layout, atomically, or nothing at all.

The directory is what the family's authors publish, so their loaders, transformers and mlx-vlm read it
unchanged: config.json in the family's form (the objective's `output_config`: Google's `gemma4_assistant`
for MTP, z-lab's DFlash config, DeepSpec's DSpark config, the Speculators EAGLE-3 config) and
model.safetensors under the published tensor names (the model files keep them), index tables as they are
stored (`token_ordering` int32, EAGLE-3's `d2t` int64 and `t2d` bool: never cast), and the base's
tokenizer files. `load_drafter` and `mlx_spec.generate --drafter` read it too.

Everything goes into a temporary directory beside the destination and is renamed into place
(mlx_spec/atomic.py): a full disk or an interrupt leaves no half-written drafter behind. Before a job
starts, every output path is checked here: apart from every input (a typo must not let --force or a write
destroy what the user had) and in a directory that can be written (so nothing fails after training).

Knows nothing of training.
"""

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..atomic import atomic_directory
from ..errors import MlxSpecError
from ..loading import DTYPES, INTEGER_TENSORS

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
MODEL_MARKER = "config.json"
DTYPE_KEYS = ("dtype", "torch_dtype")
NESTED_CONFIGS = ("text_config", "transformer_layer_config")  # MTP's, EAGLE-3's


class OutputError(MlxSpecError):
    """The output directory cannot be written (exists, not a model directory, disk full)."""


def check_out(dest: Path, force: bool) -> None:
    """Refuse an existing --out unless --force, and even then anything that is not a model directory."""
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if not force:
        raise OutputError(f"--out {dest} already exists; pass --force to replace it, or choose another --out")
    if dest.is_symlink() or not dest.is_dir() or (any(dest.iterdir()) and not (dest / MODEL_MARKER).exists()):
        raise OutputError(f"refusing to replace --out {dest}: it is not a model directory; remove it yourself "
                          "or choose another --out")


def overlaps(a: Path, b: Path) -> bool:
    """a is b, lies inside it, or holds it."""
    return a == b or a in b.parents or b in a.parents


def check_apart(outputs: Dict[str, Path], inputs: Dict[str, Optional[str]]) -> None:
    """Refuse an output directory that is an input, lies inside one or holds one, and outputs that overlap
    each other: replacing --out with --force, or filling --checkpoint-dir, would destroy what is there.
    Inputs that are not on disk (hub repo ids) hold nothing to lose."""
    resolved = {flag: Path(p).expanduser().resolve() for flag, p in outputs.items()}
    for flag, out in resolved.items():
        for name, given in inputs.items():
            if given and Path(given).expanduser().exists() and overlaps(out, Path(given).expanduser().resolve()):
                raise OutputError(f"{flag} {outputs[flag]} overlaps {name} {given}: forge would write into (or "
                                  f"replace) what it reads; choose another {flag}")
    flags = list(resolved)
    for i, a in enumerate(flags):
        for b in flags[i + 1:]:
            if overlaps(resolved[a], resolved[b]):
                raise OutputError(f"{a} {outputs[a]} and {b} {outputs[b]} overlap; give them separate directories")


def check_writable(flag: str, path: Path, directory: Path) -> None:
    """`directory`, or its nearest ancestor that exists (the rest is created), must be a writable directory."""
    d = Path(directory).expanduser().absolute()
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise OutputError(f"cannot write {flag} {path}: {d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {flag} {path}: {d} is not writable")


def check_report_path(path: Path, out: Path, inputs: Dict[str, Optional[str]]) -> None:
    """--report-json: a file, not inside an input, in a writable directory that exists (or is --out, which
    is written before the report)."""
    path = Path(path).expanduser().absolute()
    if path.is_dir() or path == Path(out).expanduser().absolute():
        raise OutputError(f"--report-json {path} is a directory; give a file name")
    for name, given in inputs.items():
        if given and Path(given).expanduser().exists() and overlaps(path.resolve(), Path(given).expanduser().resolve()):
            raise OutputError(f"--report-json {path} is inside {name} {given}; write the report elsewhere")
    if path.parent != Path(out).expanduser().absolute():
        if not path.parent.is_dir():
            raise OutputError(f"--report-json {path}: its directory does not exist")
        check_writable("--report-json", path, path.parent)


def check_paths(out: Path, checkpoint_dir: Path, report_json: Optional[str], inputs: Dict[str, Optional[str]]):
    """Every output apart from every input and writable, before anything is read, trained or deleted."""
    check_apart({"--out": out, "--checkpoint-dir": checkpoint_dir}, inputs)
    check_writable("--out", out, Path(out).parent)
    check_writable("--checkpoint-dir", checkpoint_dir, checkpoint_dir)
    if report_json:
        check_report_path(Path(report_json), out, inputs)


def write_json(path: Path, body: dict, what: str) -> None:
    """body as JSON at path, through a temporary file renamed into place (no half-written report)."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(disk_message(e, what)) from e


def drafter_weights(drafter, dtype: Optional[str]) -> dict:
    """Every tensor under its published name; floats cast to dtype, token_ordering int32, other index tables
    (EAGLE-3's d2t, t2d) as they are."""
    out = {}
    for name, w in tree_flatten(drafter.parameters()):
        if name.endswith(INTEGER_TENSORS):
            out[name] = w.astype(mx.int32)
        elif dtype and mx.issubdtype(w.dtype, mx.floating):
            out[name] = w.astype(DTYPES[dtype])
        else:
            out[name] = w
    return out


def with_dtype(config: dict, dtype: Optional[str]) -> dict:
    """A deep copy of config with `dtype` (and `torch_dtype` where present) set, at the top and in the nested
    configs that carry their own."""
    config = json.loads(json.dumps(config))
    if dtype:
        for where in [config] + [config[k] for k in NESTED_CONFIGS if isinstance(config.get(k), dict)]:
            for key in DTYPE_KEYS:
                if key in where or key == "dtype":
                    where[key] = dtype
    return config


def drafter_config(drafter, config: dict, dtype: Optional[str]) -> dict:
    """The config.json forge writes for a drafter: its family's published form."""
    from .objective import of_drafter

    return of_drafter(drafter).output_config(config, dtype)


def save_drafter_files(directory: Path, drafter, config: dict, dtype: Optional[str], tokenizer_dir: Optional[Path]):
    """The files of a drafter directory, written into `directory` (which exists)."""
    directory = Path(directory)
    weights = drafter_weights(drafter, dtype)
    save_safetensors(directory / "model.safetensors", weights)
    with open(directory / "config.json", "w") as f:
        json.dump(drafter_config(drafter, config, dtype), f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer_dir is not None:
        for name in COPIED_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, directory / name)


def write_drafter(dest, drafter, config: dict, dtype: Optional[str] = None, tokenizer_dir: Optional[Path] = None,
                  force: bool = False, extra_files: Optional[dict] = None) -> Path:
    """Write the drafter directory at dest atomically; raise OutputError (nothing written) on failure.

    extra_files: name -> text, written beside the model files (e.g. the forge report)."""
    dest = Path(dest).expanduser().absolute()

    def full(reason: str) -> OutputError:
        return OutputError(f"disk full while writing --out {dest} ({reason}); nothing was written")

    try:
        with atomic_directory(dest, check=lambda d: check_out(d, force), full=full) as tmp:
            save_drafter_files(tmp, drafter, config, dtype, tokenizer_dir)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
    except OSError as e:
        raise OutputError(disk_message(e, f"--out {dest}") + "; nothing was written") from e
    return dest


def save_safetensors(path: Path, weights: dict) -> None:
    """Through a Python file, so a full disk raises OSError(ENOSPC) (the path form can fail silently)."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, weights, metadata={"format": "pt"})


def disk_message(e: OSError, what: str) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {what}"
    return f"cannot write {what}: {e.strerror or e}"

"""What a measurement or a learnt estimate is valid for: this machine and MLX build, a model, its weights.

Read from the objects themselves (config, dtypes, quantization, a sample of the weights) and hashed;
callers that ask often keep the result (tuning.store does, per model object).
"""

import dataclasses
import hashlib
import json
import os
import platform
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .version import __version__


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _chip_name() -> str:
    if platform.system() == "Darwin":
        try:
            import subprocess

            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_info() -> dict:
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:  # older MLX, or no such device  # noqa: BLE001
        return {}
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}


def machine_identity() -> dict:
    """The machine and MLX build a measurement was taken on."""
    # our own version too: a release that changes how a round is built changes what it costs
    return {"machine": platform.machine(), "system": platform.system(), "chip": _chip_name(),
            "cpus": os.cpu_count(), "mlx": mx.__version__, "mlx_spec": __version__, "device": str(mx.default_device()),
            "device_info": _device_info()}


def _quantization(model) -> Optional[dict]:
    found = set()
    for _, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size"):
            found.add((int(m.bits), int(m.group_size), str(getattr(m, "mode", "affine"))))
    if not found:
        return None
    bits, group, mode = max(found)
    out = {"bits": bits, "group_size": group, "mode": mode}
    if len(found) > 1:
        out["mixed"] = sorted([list(f) for f in found])
    return out


def model_identity(model) -> dict:
    """What distinguishes one model from another for timing: config, dtype, quantization, a weight sample,
    and the path it was loaded from when the loader recorded it (`model.source_path`)."""
    args = getattr(model, "args", None)
    config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {"type": type(model).__name__}
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    by_dtype: Dict[str, int] = {}
    for _, p in params:
        if mx.issubdtype(p.dtype, mx.floating):
            by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.nbytes
    ident = {
        "path": str(getattr(model, "source_path", "") or ""),
        "model_type": getattr(model, "model_type", type(model).__name__),
        "config_hash": short_hash(config),
        "dtype": max(by_dtype, key=by_dtype.get).replace("mlx.core.", "") if by_dtype else None,
        "quantization": _quantization(model),
        "parameter_bytes": int(sum(p.nbytes for _, p in params)),
        "weights_hash": weights_fingerprint(model),
    }
    return ident


def weights_fingerprint(module) -> str:
    """A short hash of a module's parameter names, shapes and first values: tells two weight sets apart."""
    params = sorted(tree_flatten(module.parameters()), key=lambda kv: kv[0])
    sample = [np.asarray(p.reshape(-1)[:64].astype(mx.float32)).round(6).tolist() for _, p in params[:4]]
    return short_hash([[n, list(p.shape)] for n, p in params] + sample)

"""Where mlx_spec keeps what it writes for itself: `$XDG_CACHE_HOME/mlx_spec` (default ~/.cache/mlx_spec)."""

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_spec"

"""The converter's output directory: refused unless new (or --force over a model directory), written
atomically through mlx_spec/atomic.py (a temporary directory renamed into place, nothing left behind on
any failure, the umask's permissions); a full disk is one ConversionError naming --mlx-path.

Knows nothing about models: it hands out a directory and installs it.
"""

from pathlib import Path

from mlx_spec.atomic import atomic_directory as _atomic_directory
from mlx_spec.errors import ConversionError

MODEL_MARKER = "config.json"  # --force only replaces a directory that looks like a model (or is empty)


def check_destination(dest: Path, force: bool) -> None:
    """Refuse an existing destination unless --force, and even then anything that is not a model directory."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not force:
        raise ConversionError(f"{dest} already exists; pass --force to replace it, or choose another --mlx-path")
    if dest.is_symlink() or not dest.is_dir():
        raise ConversionError(f"{dest} exists and is not a directory; remove it yourself or choose another --mlx-path")
    if any(dest.iterdir()) and not (dest / MODEL_MARKER).exists():
        raise ConversionError(
            f"refusing to replace {dest}: it is not empty and holds no {MODEL_MARKER}, so it does not look like a "
            "model directory; remove it yourself or choose another --mlx-path"
        )


def atomic_directory(dest: Path, force: bool = False):
    """A context manager yielding an empty temporary directory; when the block succeeds, it becomes `dest`.

    With force, an existing `dest` is moved aside and deleted only once the new directory is in place, so
    an interrupted replace keeps the old model.
    """
    dest = Path(dest)

    def full(reason: str) -> ConversionError:
        return ConversionError(f"the disk is full at {dest.parent} ({reason}); nothing was written: free some "
                               "space or choose another --mlx-path")

    return _atomic_directory(dest, check=lambda d: check_destination(d, force), full=full)

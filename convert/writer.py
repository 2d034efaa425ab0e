"""Atomic output directories: everything is written into a temporary directory next to the destination
(same filesystem) and renamed into place at the end; on any failure, KeyboardInterrupt included, the
temporary directory (and any parent directory created for it) is removed and nothing is left behind.
The installed directory and its files get the permissions the user's umask gives new ones (0755 / 0644
under umask 022), not the temporary directory's private 0700. A full disk is one ConversionError.

Knows nothing about models: it hands out a directory and installs it.
"""

import errno
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

from mlx_spec.errors import ConversionError

MODEL_MARKER = "config.json"  # --force only replaces a directory that looks like a model (or is empty)
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 64 << 20  # free bytes under which a write MLX could not do is taken as a full disk


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


def _make_parents(parent: Path) -> List[Path]:
    """mkdir -p, returning the directories it created (outermost first) so a failure can remove them."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


@contextmanager
def atomic_directory(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds, it becomes `dest`.

    With force, an existing `dest` is moved aside and deleted only once the new directory is in place, so
    an interrupted replace keeps the old model.
    """
    dest = Path(dest)
    check_destination(dest, force)
    created = _make_parents(dest.parent)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        yield tmp
        _set_permissions(tmp)
        _install(tmp, dest, force)
    except BaseException as e:
        full = tmp is not None and _disk_full(e, tmp)  # measured before the partial output is removed
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        if full:
            raise ConversionError(f"the disk is full at {dest.parent} ({full}); nothing was written: free some space "
                                  "or choose another --mlx-path") from e
        raise


def _disk_full(e: BaseException, where: Path) -> Optional[str]:
    """What says the write failed for lack of space (an errno, or MLX's bare "Unable to write" with almost
    nothing free), or None."""
    if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
        return e.strerror or os.strerror(e.errno)
    if isinstance(e, RuntimeError) and "Unable to write" in str(e):
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            return None
        return f"{free / 1e6:.0f} MB free" if free < NEARLY_FULL else None
    return None


def _set_permissions(root: Path) -> None:
    """Give the tree the modes the umask gives new directories and files (mkdtemp's directory is 0700)."""
    probe = root / ".umask-probe"
    probe.mkdir(0o777)  # the kernel applies the umask: no os.umask() race with other threads
    dir_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    file_mode = dir_mode & 0o666
    for d, _, files in os.walk(root):
        os.chmod(d, dir_mode)
        for f in files:
            os.chmod(os.path.join(d, f), file_mode)


def _install(tmp: Path, dest: Path, force: bool) -> None:
    check_destination(dest, force)  # again: it may have appeared while we were writing
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)

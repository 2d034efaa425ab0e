"""Atomic output directories: everything is written into a temporary directory next to the destination
(same filesystem) and renamed into place at the end; on any failure, KeyboardInterrupt included, the
temporary directory (and any parent directory created for it) is removed and nothing is left behind.
The installed directory and its files get the permissions the user's umask gives new ones (0755 / 0644
under umask 022), not the temporary directory's private 0700.

Shared by the converter (convert/writer.py) and forge's drafters and checkpoints, so it lives in the
runtime package: the runtime never imports the converter. Knows nothing about models or flags: the
caller says which destinations to refuse (`check`) and what a full disk is reported as (`full`).
"""

import errno
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 64 << 20  # free bytes under which a write MLX could not do is taken as a full disk


def _accept(dest: Path) -> None:
    pass


@contextmanager
def atomic_directory(dest: Path, check: Callable[[Path], None] = _accept,
                     full: Optional[Callable[[str], BaseException]] = None) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds, it becomes `dest`.

    check(dest) raises to refuse the destination; it is asked before anything is written and again just
    before the rename (the destination may have appeared meanwhile). A `dest` that `check` lets through is
    replaced: moved aside and deleted only once the new directory is in place, so an interrupted replace
    keeps the old one. full(reason) gives the exception raised instead of the failure's own when the disk
    was full (None: the failure's own).
    """
    dest = Path(dest)
    check(dest)
    created = _make_parents(dest.parent)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        yield tmp
        _set_permissions(tmp)
        check(dest)
        _install(tmp, dest)
    except BaseException as e:
        reason = disk_full(e, tmp) if tmp is not None else None  # measured before the partial output is removed
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        if reason and full is not None:
            raise full(reason) from e
        raise


def disk_full(e: BaseException, where: Path) -> Optional[str]:
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


def _install(tmp: Path, dest: Path) -> None:
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

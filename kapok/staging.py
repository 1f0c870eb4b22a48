"""Jobs that replace a folder of outputs do it all or nothing: a failed run loses nothing."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _staging(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _backup(out: Path) -> Path:
    return out.with_name(out.name + ".old")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    """Delete a folder, or only the link when it is a symbolic link to one."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover(out: Path) -> None:
    """Finish a folder swap that a crash interrupted (only the two-rename fallback can leave
    one): with `out` missing and `out.old` present, the previous output comes back; with both
    present, the new output was already in place and the old copy goes."""
    backup = _backup(out)
    if not _exists(backup):
        return
    if _exists(out):
        _remove(backup)
    else:
        os.rename(backup, out)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a sibling staging folder; it replaces `out` only if the block completes.

    On any exception the staging folder is removed and `out` is left exactly as it was. The
    swap itself never leaves a moment without `out` on Linux (one atomic exchange of the two
    folders); elsewhere it is two renames with the old folder kept as `out.old` until the new
    one is in place, and a crash between them is undone by `recover` on the next run.
    """
    recover(out)
    staging = _staging(out)
    _remove(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, out)


def _swap_in(staging: Path, out: Path) -> None:
    if not _exists(out):
        os.rename(staging, out)
        return
    if _exchange(staging, out):  # `out` is the new folder now, `staging` holds the old one
        _remove(staging)
        return
    backup = _backup(out)
    _remove(backup)
    os.rename(out, backup)
    os.rename(staging, out)  # a crash before this line: `recover` restores `out` from backup
    _remove(backup)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE). False where
    the platform, the C library or the file system cannot: the caller then renames twice."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; it replaces `target` only if the block completes
    (a reader never sees half a file, a failed write leaves the old one). The new file gets the
    permissions of a normally created file, not mkstemp's 0600."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> Path:
    """Write UTF-8 text to `target` through `staged_file`."""
    with staged_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target

"""Jobs that replace a folder of outputs do it all or nothing: a failed run loses nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a sibling staging folder; it replaces `out` only if the block completes.

    On any exception the staging folder is removed and `out` is left exactly as it was.
    """
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        backup = out.with_name(out.name + ".old")
        shutil.rmtree(backup, ignore_errors=True)
        out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup)
    else:
        staging.rename(out)


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

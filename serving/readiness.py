"""Readiness of a server of several worker processes: ready once every worker has loaded.

BentoML asks each worker `__is_ready__` for /readyz, and whichever worker takes the probe
answers it. With one worker per core, a worker that had loaded answered 200 while its sibling was
still loading and answered the next /score with 503. So each worker, once loaded, leaves a marker
(its pid, in a file named for its worker index) in a directory shared by the workers of one
server, and a worker is ready only when every worker's marker names a live process. A worker
that dies and is restarted under the same index is not ready again until it has loaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (not ours, but not dead either)
        return True
    return True


class WorkerReadiness:
    """Markers of the `workers` workers of one server in `directory`; this worker is `index`
    (1-based, as BentoML numbers them)."""

    def __init__(self, directory: Path, workers: int, index: int) -> None:
        if not 1 <= index <= workers:
            raise ValueError(f"worker index {index} outside 1..{workers}")
        self.directory = directory
        self.workers = workers
        self.index = index

    @classmethod
    def for_this_server(cls, workers: int, index: int | None) -> WorkerReadiness:
        """The workers of one server share a parent process (BentoML's arbiter): the directory
        is named for it, so servers running side by side do not see each other's markers."""
        directory = Path(tempfile.gettempdir()) / f"kapok-ready-{os.getuid()}-{os.getppid()}"
        return cls(directory, workers, index or 1)

    def mark_ready(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        marker = self.directory / str(self.index)
        partial = marker.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(str(os.getpid()))
        partial.replace(marker)  # atomic: a reader sees the old pid or the new one

    def all_ready(self) -> bool:
        for index in range(1, self.workers + 1):
            try:
                pid = int((self.directory / str(index)).read_text())
            except (OSError, ValueError):
                return False
            if not _alive(pid):
                return False
        return True

"""/readyz across worker processes: ready only once every worker has loaded (serving/readiness)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.readiness import WorkerReadiness


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_ready_only_when_every_worker_has_loaded(tmp_path):
    first = WorkerReadiness(tmp_path / "server", workers=2, index=1)
    second = WorkerReadiness(tmp_path / "server", workers=2, index=2)
    assert not first.all_ready() and not second.all_ready()
    first.mark_ready()
    # the probe reaches the loaded worker: it must not say ready while its sibling loads
    assert not first.all_ready()
    assert not second.all_ready()
    second.mark_ready()
    assert first.all_ready() and second.all_ready()


def test_a_restarted_worker_is_not_ready_until_it_has_loaded_again(tmp_path):
    directory = tmp_path / "server"
    WorkerReadiness(directory, workers=2, index=1).mark_ready()
    WorkerReadiness(directory, workers=2, index=2).mark_ready()
    (directory / "2").write_text(str(dead_pid()))  # worker 2 died; its marker names a dead pid
    assert not WorkerReadiness(directory, workers=2, index=1).all_ready()
    WorkerReadiness(directory, workers=2, index=2).mark_ready()  # its successor loaded
    assert WorkerReadiness(directory, workers=2, index=1).all_ready()


def test_a_single_worker_server_is_ready_once_loaded(tmp_path):
    only = WorkerReadiness(tmp_path / "server", workers=1, index=1)
    assert not only.all_ready()
    only.mark_ready()
    assert only.all_ready()


def test_servers_side_by_side_do_not_share_markers(tmp_path):
    WorkerReadiness(tmp_path / "a", workers=1, index=1).mark_ready()
    assert not WorkerReadiness(tmp_path / "b", workers=1, index=1).all_ready()


def test_a_worker_index_outside_the_server_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"outside 1\.\.2"):
        WorkerReadiness(tmp_path, workers=2, index=3)

"""`kapok ui`: the MLflow UI for KAPOK_HOME's tracking store, stopped whole by Ctrl-C.

MLflow's own `mlflow ui` left huey_consumer processes running after Ctrl-C. `kapok ui` runs the
UI in a process group of its own and stops the whole group; here it runs as a user runs it (the
installed script, a process of its own), gets SIGINT as Ctrl-C sends it to the foreground
process, and no process of the UI may remain.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.cli_processes import kapok_command

START_TIMEOUT = 120  # s; 30-55 s on a busy 2-core machine: two processes import MLflow and
# MLflow creates the tables of the new store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_ui_answers_on_loopback_and_ctrl_c_stops_its_whole_process_group(tmp_path: Path):
    home = tmp_path / "home"
    (home / "mlruns").mkdir(parents=True)
    (home / "mlruns" / "mlflow.db").touch()  # an empty SQLite store: MLflow creates its tables
    port = free_port()
    env = {**os.environ, "KAPOK_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    kapok = subprocess.Popen(
        [*kapok_command(), "ui", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    groups: set[int] = set()
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in kapok.stdout], daemon=True
    )
    reader.start()
    try:
        # the user waits for the line that says the UI is ready; then it must answer
        deadline = time.monotonic() + START_TIMEOUT
        while not any("MLflow UI ready" in line for line in seen):
            assert time.monotonic() < deadline, "no ready line: " + "".join(seen)
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                assert kapok.poll() is None, "".join(seen)
        assert f"MLflow UI ready: http://127.0.0.1:{port}" in "".join(seen), seen
        assert answers(port)
        ui = psutil.Process(kapok.pid).children(recursive=True)
        groups = {os.getpgid(p.pid) for p in ui}
        # the server and its worker, in a group of their own (not kapok's, which a terminal's
        # Ctrl-C reaches), on loopback only
        assert len(ui) >= 2, [p.cmdline() for p in ui]
        assert os.getpgid(kapok.pid) not in groups
        listening = {
            c.laddr for p in ui for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN
        }
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening

        kapok.send_signal(signal.SIGINT)  # what Ctrl-C sends
        kapok.wait(timeout=60)
        reader.join(timeout=10)
        while not lines.empty():
            seen.append(lines.get())
        output = "".join(seen)
        assert kapok.returncode == 0, output
        assert "Traceback" not in output, output
        assert "MLflow UI stopped" in output, output
        left = [p for p in ui if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [p.cmdline() for p in left]
        assert not any(group_alive(g) for g in groups), groups
        assert not answers(port)
    finally:
        stop_everything(kapok, groups)


def stop_everything(kapok: subprocess.Popen, groups: set[int]) -> None:
    """Never leave kapok or a server behind, even when the test failed."""
    if kapok.poll() is None:
        kapok.kill()
        kapok.wait()
    for g in groups - {os.getpgrp()}:  # never this test's own group
        if group_alive(g):
            os.killpg(g, signal.SIGKILL)

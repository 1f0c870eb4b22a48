"""`kapok serve` stops whole: SIGTERM to its pid (a service manager) or Ctrl-C stops BentoML and
every worker; nothing is left holding the port."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.cli_processes import kapok_command
from tests.test_cli_ui import answers, free_port, group_alive, stop_everything

START_TIMEOUT = 120  # s: BentoML imports and starts its worker (2-core machine, busy)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_its_server_and_workers_on_sigterm_and_ctrl_c(tmp_path: Path, stop):
    port = free_port()
    # a policy file that is a named pipe no one writes: the worker starts, answers /livez, and
    # waits for its policy in the background: a server that is up but never ready (an empty
    # home would not do: a worker that cannot load its models ends `kapok serve` by itself)
    policy = tmp_path / "policy.toml"
    os.mkfifo(policy)
    env = {**os.environ, "KAPOK_HOME": str(tmp_path / "home"), "KAPOK_WORKERS": "1",
           "KAPOK_POLICY": str(policy)}  # fmt: skip
    kapok = subprocess.Popen(
        [*kapok_command(), "serve", "--demo", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        server: list[psutil.Process] = []
        while not server or not answers(port, "/livez"):
            assert kapok.poll() is None, kapok.communicate()[0]
            assert time.monotonic() < deadline, "the server never answered /livez"
            server = psutil.Process(kapok.pid).children(recursive=True)
            time.sleep(0.5)
        groups = {os.getpgid(p.pid) for p in server}
        assert os.getpgid(kapok.pid) not in groups  # its own group: stopped by kapok, whole
        kapok.send_signal(stop)
        output = kapok.communicate(timeout=60)[0]
        assert "Traceback" not in output.split("try:")[0], output
        assert "Kapok API stopped" in output, output
        left = [p for p in server if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [p.cmdline() for p in left]
        assert not any(group_alive(g) for g in groups), groups
        assert not answers(port, "/livez")
    finally:
        stop_everything(kapok, groups)

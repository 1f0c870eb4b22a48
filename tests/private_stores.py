"""Stores that a test can break: a private PostgreSQL server it stops and restarts, and a tiny
filesystem it fills. Never the shared PostgreSQL at 127.0.0.1:5432.

PrivatePostgres runs initdb and pg_ctl from /usr/lib/postgresql/15/bin (or KAPOK_TEST_PG_BIN, or
the PATH) on a free loopback port, trust authentication, no Unix socket. PostgreSQL refuses to
run as root: under root its directory belongs to the `postgres` user and its commands run as
that user. Locally a missing PostgreSQL skips the test; under CI=true it fails it.

tiny_filesystem mounts a tmpfs of a few megabytes (root only: mount(2) needs CAP_SYS_ADMIN);
fill() writes a ballast file until the filesystem answers ENOSPC; removing it gives the space
back. Without the privilege the test is skipped, in CI too: it is a property of the machine,
not a missing server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("KAPOK_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_program(name: str) -> str:
    candidate = PG_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        message = f"PostgreSQL's {name} is not installed (looked in {PG_BIN} and on the PATH)"
        if _ci():
            pytest.fail(message + " (CI=true: the decision-log fault tests must run)")
        pytest.skip(message)
    return found


class PrivatePostgres:
    """A PostgreSQL server of the test's own with one database, `kapok`. Its URL carries a
    password (trust authentication never asks for it) so that a test can check that no message
    shows it."""

    PASSWORD = "pw-never-shown-9d2f"

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_program("initdb"), _pg_program("pg_ctl")
        self.port = _free_port()
        # not pytest's tmp_path: its 0700 parents keep the postgres user out when run as root
        self.dir = Path(tempfile.mkdtemp(prefix="kapok-pg-"))
        self.data, self.log = self.dir / "data", self.dir / "postgres.log"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            try:
                entry = pwd.getpwnam(self.user)
            except KeyError:
                pytest.fail("running as root and there is no postgres user to run PostgreSQL")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.url = f"postgresql+psycopg2://postgres:{self.PASSWORD}@127.0.0.1:{self.port}/kapok"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            args, user=self.user, capture_output=True, text=True, timeout=120, cwd=self.dir
        )
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)}: {done.stdout}{done.stderr}{log}")

    def create(self) -> None:
        """initdb, start, CREATE DATABASE kapok."""
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-sync", "--no-instructions")  # fmt: skip
        self.start()
        import psycopg2

        admin = psycopg2.connect(host="127.0.0.1", port=self.port, dbname="postgres",
                                 user="postgres")  # fmt: skip
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                cur.execute("CREATE DATABASE kapok")
        finally:
            admin.close()

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """pg_ctl stop: 'immediate' ends every server process at once, as a crash would (the
        next start replays the WAL)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        pid = self.data / "postmaster.pid"
        return pid.exists()

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            if self.running():
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the duration (root only, else the test skips)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tiny tmpfs, and mounting one needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (no CAP_SYS_ADMIN?): {done.stderr.strip()}")
    try:
        yield where
    finally:
        for _ in range(20):  # a server still closing its files keeps it busy for a moment
            if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(filesystem: Path) -> Path:
    """Write a ballast file until the filesystem is full (ENOSPC); returns it (unlink it to give
    the space back)."""
    ballast = filesystem / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]  # down to the last byte
    finally:
        os.close(fd)
    return ballast

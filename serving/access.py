"""Access limits the request gate (serving/gate.py) applies once it knows the caller: the body
size (413), the request rate per key (429), and demo mode on loopback only (403).

- **Body size.** `KAPOK_MAX_BODY_BYTES` (kapok/settings.py): a Content-Length above it is
  refused before a byte of the body is read; a body sent without one (chunked) is counted as it
  streams and refused as soon as it passes the limit, so no more than the limit is ever read.
- **Rate per key.** `KAPOK_RATE_LIMIT` (e.g. "600/minute"; off by default): a token bucket per
  key name, `N` tokens refilled at N per period. A server runs several worker processes
  (`KAPOK_WORKERS`), each taking requests of the same keys, so the buckets are shared: one row
  per key in a small SQLite file under KAPOK_HOME, taken by one atomic UPSERT per request
  (WAL, synchronous=OFF: a counter lost to a power cut refills anyway). Several servers sharing
  one KAPOK_HOME share the buckets too. A refused request learns when a token will be there
  (Retry-After, whole seconds ≥ 1).
- **Demo mode** (no keys, everyone is admin) is an environment setting read at start-up
  (KAPOK_DEMO); nothing in a request turns it on. A demo server answers only on loopback: when
  the socket it listens on, or the address a request came in on, is not a loopback address,
  every request is answered 403 `forbidden` "demo mode serves loopback only".
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kapok.settings import RateLimit, paths
from serving.sqlite_race import retry_racing

logger = logging.getLogger("kapok.api")

DEMO_LOOPBACK_ONLY = "demo mode serves loopback only"


# -- loopback -------------------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x), 'localhost'. Any other name is not: a demo
    server is started with an address, not a name that may resolve elsewhere."""
    if host is None:
        return False
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@cache
def listening_hosts() -> tuple[str, ...]:
    """The addresses this worker's listening sockets are bound to ('0.0.0.0', '127.0.0.1', …).

    BentoML hands each worker its listening socket as `--fd N` (the arbiter binds it with
    `bentoml serve --host`); read back from the socket itself, it is the bind address whatever
    configured it (CLI, bentoml configuration, a Bento). Empty when not run by a BentoML worker:
    then only the address each request came in on is checked."""
    hosts: list[str] = []
    argv = sys.argv
    for i, arg in enumerate(argv):
        fd = None
        if arg == "--fd" and i + 1 < len(argv):
            fd = argv[i + 1]
        elif arg.startswith("--fd="):
            fd = arg.split("=", 1)[1]
        if fd is None or not fd.isdigit():
            continue
        try:
            with socket.socket(fileno=os.dup(int(fd))) as s:
                if s.family in (socket.AF_INET, socket.AF_INET6):
                    hosts.append(str(s.getsockname()[0]))
                else:
                    hosts.append("unix")  # a Unix socket: only this machine can connect
        except OSError:
            continue
    return tuple(hosts)


def demo_refusal(server: tuple[str, int] | list | None) -> str | None:
    """Why a demo server must not answer a request that came in on `server` (the ASGI scope's
    local address), or None. Call only in demo mode."""
    bound = [h for h in listening_hosts() if h != "unix"]
    outside = [h for h in bound if not is_loopback(h)]
    if outside:
        return f"{DEMO_LOOPBACK_ONLY}: this server listens on {outside[0]}"
    came_in_on = server[0] if server and server[1] is not None else None  # (host, port)
    if isinstance(came_in_on, str) and not is_loopback(came_in_on):
        return f"{DEMO_LOOPBACK_ONLY}: this request came in on {server[0]}"
    return None


# -- the body size --------------------------------------------------------------------------
def too_large_message(path: str, limit: int, size: int | None = None) -> str:
    said = f"the body is {size:,} bytes" if size is not None else "the body is larger"
    what = (
        "split the applicants into several /screen requests"
        if path == "/screen"
        else "send a smaller body"
    )
    return f"{said}, above this server's limit of {limit:,} bytes (KAPOK_MAX_BODY_BYTES): {what}"


# -- the rate per key -----------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # whole seconds until a token is there (when refused)


class RateLimiter:
    """Token buckets per key name in a SQLite file shared by every worker (and every server) of
    one KAPOK_HOME: `limit.requests` tokens, refilled at `limit.requests` per `limit.seconds`."""

    _SCHEMA = """CREATE TABLE IF NOT EXISTS buckets (
        caller TEXT PRIMARY KEY, tokens REAL NOT NULL, at REAL NOT NULL)"""
    # one statement: refill by the time elapsed, take a token if there is one; no row comes back
    # when there is none (the bucket is left as it was)
    _TAKE = """INSERT INTO buckets (caller, tokens, at) VALUES (:caller, :capacity - 1, :now)
        ON CONFLICT (caller) DO UPDATE SET
            tokens = min(:capacity, tokens + max(0, :now - at) * :rate) - 1, at = :now
        WHERE min(:capacity, tokens + max(0, :now - at) * :rate) >= 1
        RETURNING tokens"""

    def __init__(self, limit: RateLimit, path: Path | None = None) -> None:
        self.limit = limit
        self.path = path or default_path()
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    def _connection(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # never a connection across a fork
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA busy_timeout = 2000")
                _set_up(db, self._SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            self._db, self._pid = db, os.getpid()
        return self._db

    def take(self, caller: str, now: float | None = None) -> Verdict:
        """Take one token of `caller`'s bucket. A rate store that cannot be used lets the request
        through (logged): a broken counter must not stop lending."""
        now = time.time() if now is None else now
        rate = self.limit.requests / self.limit.seconds
        params = {"caller": caller, "capacity": float(self.limit.requests), "now": now,
                  "rate": rate}  # fmt: skip
        try:
            db = self._connection()
            if db.execute(self._TAKE, params).fetchone() is not None:
                return Verdict(True)
            row = db.execute("SELECT tokens, at FROM buckets WHERE caller = ?", (caller,))
            tokens, at = row.fetchone() or (0.0, now)
        except sqlite3.Error as e:
            logger.warning("rate limit not applied: %s: %s", self.path, e)
            return Verdict(True)
        available = min(self.limit.requests, tokens + max(0.0, now - at) * rate)
        return Verdict(False, max(1, math.ceil((1 - available) / rate)))

    def message(self, retry_after: int) -> str:
        return (
            f"more than {self.limit} for this key (KAPOK_RATE_LIMIT): try again in "
            f"{retry_after} s (Retry-After)"
        )


def _set_up(db: sqlite3.Connection, schema: str) -> None:
    """WAL and the table, on a connection to a rate store that other worker processes may be
    creating at the same moment (serving.sqlite_race); a refused set-up let that worker's
    requests through uncounted until it reconnected."""

    def step() -> None:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = OFF")
        db.execute(schema)

    def racing(e: BaseException) -> bool:
        return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))

    retry_racing(step, racing)


def default_path() -> Path:
    # not "serving/": under the default KAPOK_HOME (the checkout) that is the package's folder
    return paths().home / "api" / "rate_limit.db"

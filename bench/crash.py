"""Crash durability: kill -9 the lending API under load, restart it, and check that no answered
decision is missing from the decision log and no record is half-written (issue 12, item 4).

    python bench/crash.py --home /tmp/kh                                   # SQLite, 20 kills
    python bench/crash.py --home /tmp/kh --log postgresql://postgres@127.0.0.1:5432/test
    python bench/crash.py --home /tmp/kapok-bench-smoke --reps 2 --min-load 1 --max-load 3  # CI

The server is `kapok serve --demo` on a loopback port with the home's models and its own decision
log: SQLite in a temporary folder (default), or, with `--log postgresql://USER@HOST:PORT/DB`, a
fresh database `kapok_crash_<hex>` created on that PostgreSQL server (through DB) and dropped at
the end (`--keep` keeps it and the SQLite folder). Each repetition: `--clients` concurrent
clients (asyncio, httpx, closed loop) send a mix of /score, /limit, /price and /screen of
`--screen` applicants, each a different enterprise, and keep every request_id a 200 answer
carries; after a random `--min-load`..`--max-load` seconds the clients stop starting requests
and every process of the server (`kapok serve`, BentoML's arbiter and its workers, in their
process groups) gets SIGKILL at once; the requests in flight then fail (connection reset:
expected, counted apart). The server is started again on the same port and the clock runs until
/readyz answers 200 (restart time). After the last repetition the server is stopped and the log
is read through DecisionLog:

- lost: a request_id answered 200 with no record, or with more than one (must be 0);
- half-written: a record that does not read back whole through `DecisionLog.get` (JSON fields,
  features and response decode, every field present, pd in [0, 1], the response's request_id the
  record's own) or whose pd and decision differ from the client's answer (must be 0);
- orphans: records whose answer never reached the client (decided and committed, then killed
  before the answer left): allowed, counted, and at most the decisions in flight at the kills;
- SQLite: `PRAGMA integrity_check` must say ok.

Exit status 1 on a lost or half-written record, an orphan surplus, a failed integrity check or a
server that does not come back. Run by hand (bench/RESULTS.md); `make bench-smoke` runs 2
repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Kapok's `serving` package before bench/serving.py

import httpx
import numpy as np
import soak  # bench/soak.py: request bodies; it loads bench/serving.py

from serving.decision_log import DecisionLog

bench_serving = soak.bench_serving
free_port, process_tree = bench_serving.free_port, bench_serving.process_tree
enterprise_ids, server_env = bench_serving.enterprise_ids, bench_serving.server_env

KAPOK = str(Path(sys.executable).with_name("kapok"))  # the venv's `kapok` script
MIX = (("score", 0.4), ("limit", 0.2), ("price", 0.2), ("screen", 0.2))  # every one logged


# -- the server ----------------------------------------------------------------------------------
class Server(bench_serving.Server):
    """bench/serving.py's server (ready wait, log tail, stop), started as `kapok serve --demo`
    on the same port every time, and killed whole."""

    def start(self) -> None:
        self.port = self.port or free_port()
        cmd = [KAPOK, "serve", "--demo", "--port", str(self.port)]
        with self.log.open("a") as out:
            out.write(f"\n--- {time.strftime('%H:%M:%S')} start ---\n")
            out.flush()
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def kill(self) -> int:
        """SIGKILL to every process of the server at once: the process groups of `kapok serve`
        and of BentoML (its own session), then any straggler by pid. Returns how many."""
        assert self.proc is not None
        pids = process_tree(self.proc.pid)
        groups = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        groups.discard(os.getpgrp())  # never our own group
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in pids if alive(pid)]
        if left:
            raise RuntimeError(f"processes {left} survived SIGKILL")
        return len(pids)

    def stop(self) -> None:
        """SIGTERM to `kapok serve` (it stops BentoML's group); then SIGKILL to what is left."""
        pids = process_tree(self.proc.pid) if self.proc is not None else []
        super().stop()
        for pid in filter(alive, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


# -- the load ------------------------------------------------------------------------------------
@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    answered: dict[str, tuple[float, str]] = field(default_factory=dict)  # id -> (pd, decision)
    at_kill: Counter = field(default_factory=Counter)  # exception kind of requests cut by a kill
    in_flight_decisions: int = 0  # decisions those requests asked for
    other: Counter = field(default_factory=Counter)  # any other error: status or exception


class Ids:
    def __init__(self, ids: list[str]) -> None:
        self.ids, self.cursor = ids, 0

    def take(self, n: int) -> list[str]:
        out = [self.ids[(self.cursor + i) % len(self.ids)] for i in range(n)]
        self.cursor += n
        return out


async def load_until_kill(
    server: Server, seconds: float, clients: int, screen: int, ids: Ids, tally: Tally, rng
) -> int:
    """`clients` closed-loop clients for `seconds`, then kill -9 the server with their requests
    in flight; returns the number of processes killed."""
    stop = asyncio.Event()
    killed = asyncio.Event()
    names = [m[0] for m in MIX]
    shares = np.array([m[1] for m in MIX])
    shares = shares / shares.sum()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    json_body = {"content-type": "application/json"}

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            endpoint = names[rng.choice(len(names), p=shares)]
            chosen = ids.take(screen if endpoint == "screen" else 1)
            tally.sent += 1
            try:
                r = await http.post(
                    f"/{endpoint}", content=soak.body(endpoint, chosen), headers=json_body
                )
            except httpx.HTTPError as e:
                kind = type(e).__name__
                if killed.is_set():
                    tally.at_kill[kind] += 1
                    tally.in_flight_decisions += len(chosen)
                else:
                    tally.other[kind] += 1
                continue
            if r.status_code != 200:
                tally.other[f"HTTP {r.status_code}"] += 1
                continue
            tally.ok += 1
            answer = r.json()
            for item in answer["ranked"] if endpoint == "screen" else [answer]:
                tally.answered[item["request_id"]] = (item["pd"], item["decision"])

    async with httpx.AsyncClient(base_url=server.base, timeout=60, limits=limits) as http:
        tasks = [asyncio.create_task(client(http)) for _ in range(clients)]
        await asyncio.sleep(seconds)
        stop.set()  # no new request from here: every request still open is in flight
        killed.set()
        n = server.kill()
        await asyncio.gather(*tasks)
    return n


# -- the log -------------------------------------------------------------------------------------
def fresh_postgres(admin_url: str) -> tuple[str, object]:
    """A new database on admin_url's server; returns its SQLAlchemy URL and a drop function."""
    import psycopg2
    import sqlalchemy as sa

    url = sa.make_url(admin_url)
    name = f"kapok_crash_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(
        host=url.host or "127.0.0.1", port=url.port or 5432, dbname=url.database or "postgres",
        user=url.username, password=url.password,
    )  # fmt: skip
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    fresh = url.set(drivername="postgresql+psycopg2", database=name)
    return fresh.render_as_string(hide_password=False), drop


def half_written(record, answered: tuple[float, str] | None) -> str | None:
    """Why the record read back is not whole, or None."""
    text = ("request_id", "caller", "endpoint", "enterprise_id", "product", "model_name",
            "model_version", "grade", "decision")  # fmt: skip
    for name in text:
        if not isinstance(getattr(record, name), str) or not getattr(record, name):
            return f"{name} empty"
    if not (isinstance(record.pd, float) and 0.0 <= record.pd <= 1.0):
        return f"pd {record.pd!r}"
    if not math.isfinite(record.score):
        return f"score {record.score!r}"
    if not isinstance(record.features, dict) or not record.features:
        return "no feature vector"
    bad = [k for k, v in record.features.items() if not isinstance(v, str | int | float | None)]
    if bad:
        return f"feature values not scalars: {bad[:3]}"
    for name in ("request", "feature_timestamps", "response"):
        if not isinstance(getattr(record, name), dict) or not getattr(record, name):
            return f"{name} empty"
    if not isinstance(record.reasons, list):
        return "reasons not a list"
    if record.response.get("request_id") != record.request_id:
        return f"response request_id {record.response.get('request_id')!r}"
    if record.request.get("enterprise_id") != record.enterprise_id:
        return "request enterprise_id differs"
    if answered is not None:
        pd, decision = answered
        logged = (record.response.get("pd"), record.response.get("decision"))
        if logged != (pd, decision) or record.decision != decision:  # the response as answered
            return f"client saw pd {pd} {decision}, the logged response has {logged}"
    return None


def check_log(url: str, answered: dict[str, tuple[float, str]]) -> dict:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:  # every id and how many rows carry it
        query = "SELECT request_id, count(*) FROM decisions GROUP BY request_id"
        copies = {rid: n for rid, n in conn.execute(sa.text(query))}
    engine.dispose()
    with DecisionLog(url) as log:
        problems: dict[str, str] = {}
        names: dict[str, Counter] = {}  # model name@version -> feature name sets seen
        keys: dict[str, tuple[str, frozenset]] = {}
        for rid in copies:
            try:
                record = log.get(rid)
                why = (
                    "not found by get"
                    if record is None
                    else half_written(record, answered.get(rid))
                )
            except Exception as e:  # any failure to read it back is the finding
                why = f"{type(e).__name__}: {e}"
            if why:
                problems[rid] = why
            elif record is not None:
                model = f"{record.model_name}@{record.model_version}"
                keys[rid] = (model, frozenset(record.features))
                names.setdefault(model, Counter())[keys[rid][1]] += 1
    for rid, (model, vector) in keys.items():  # every vector of a model has all its features
        usual = names[model].most_common(1)[0][0]
        if vector != usual:
            problems[rid] = f"{len(vector)} features, {len(usual)} in the other {model} records"
    lost = [rid for rid in answered if copies.get(rid, 0) != 1]
    return {
        "rows": sum(copies.values()),
        "lost": lost,
        "duplicated": [rid for rid, n in copies.items() if n > 1],
        "half_written": problems,
        "orphans": [rid for rid in copies if rid not in answered],
    }


# -- main ----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KAPOK_HOME", ".")))
    parser.add_argument("--log", default="sqlite",
                        help="sqlite (a temporary file) or postgresql://USER@HOST:PORT/DB "
                        "(a fresh database is created on that server)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=20, help="kills (each followed by a restart)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--screen", type=int, default=3, help="applicants per /screen")
    parser.add_argument("--min-load", type=float, default=2.0, help="seconds of load, at least")
    parser.add_argument("--max-load", type=float, default=8.0, help="seconds of load, at most")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the log and the server's output")
    args = parser.parse_args()
    home = args.home.resolve()
    rng = np.random.default_rng(args.seed)
    pick = random.Random(args.seed)
    ids = Ids(enterprise_ids(home))
    work = Path(tempfile.mkdtemp(prefix="kapok-crash-"))
    env = server_env(home, work, "kapok")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    drop = None
    if args.log.startswith("postgresql"):
        env["KAPOK_DECISION_LOG"], drop = fresh_postgres(args.log)
        store = "PostgreSQL " + env["KAPOK_DECISION_LOG"].rsplit("/", 1)[-1]
    elif args.log == "sqlite":
        store = "SQLite " + env["KAPOK_DECISION_LOG"].removeprefix("sqlite:///")
    else:
        parser.error("--log: sqlite or postgresql://USER@HOST:PORT/DB")
    load = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load[0]:.2f}/{load[1]:.2f}/"
        f"{load[2]:.2f}; {args.reps} kills, {args.clients} clients, "
        f"{args.min_load:g}-{args.max_load:g} s of load each; log {store}",
        flush=True,
    )
    server = Server("kapok", "serving.service:Kapok", env, work / "serve.log")
    tally = Tally()
    restarts: list[float] = []
    failure = None
    try:
        server.start()
        first = server.wait_ready()
        print(f"server ready in {first:.1f} s", flush=True)
        for rep in range(1, args.reps + 1):
            seconds = pick.uniform(args.min_load, args.max_load)
            before = (tally.sent, tally.ok, sum(tally.at_kill.values()))
            killed = asyncio.run(
                load_until_kill(server, seconds, args.clients, args.screen, ids, tally, rng)
            )
            server.start()
            restarts.append(server.wait_ready())
            print(
                f"rep {rep:2d}: {seconds:4.1f} s load, {tally.sent - before[0]} sent, "
                f"{tally.ok - before[1]} answered 200, "
                f"{sum(tally.at_kill.values()) - before[2]} cut by the kill of {killed} "
                f"processes; ready again in {restarts[-1]:.1f} s",
                flush=True,
            )
    except RuntimeError as e:
        failure = str(e)
        print(f"FAIL: {failure}", flush=True)
    finally:
        server.stop()
    try:
        found = check_log(env["KAPOK_DECISION_LOG"], tally.answered)
        integrity = "n/a"
        if args.log == "sqlite":
            path = env["KAPOK_DECISION_LOG"].removeprefix("sqlite:///")
            with sqlite3.connect(path) as db:
                integrity = "; ".join(r[0] for r in db.execute("PRAGMA integrity_check"))
    finally:
        if drop is not None and not args.keep:
            drop()
    load = os.getloadavg()

    orphans = len(found["orphans"])
    rows = [
        ("repetitions (kill -9, restart)", f"{len(restarts)}"),
        ("requests sent", f"{tally.sent:,}"),
        ("answered 200", f"{tally.ok:,} ({len(tally.answered):,} decisions)"),
        ("cut by a kill (expected)", fmt(tally.at_kill)),
        ("other errors", fmt(tally.other)),
        ("records in the log", f"{found['rows']:,}"),
        ("lost decisions (must be 0)", f"{len(found['lost'])}"),
        ("half-written records (must be 0)", f"{len(found['half_written'])}"),
        ("orphan records (logged, answer not received)",
         f"{orphans} of {tally.in_flight_decisions} decisions in flight at the kills"),
        ("restart to /readyz p50 / max",
         f"{np.median(restarts):.1f} s / {max(restarts):.1f} s" if restarts else "-"),
        ("SQLite integrity_check", integrity),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"load after {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for rid in found["lost"][:10]:
        where = "more than one row" if rid in found["duplicated"] else "not in the log"
        print(f"LOST {rid}: answered 200 (pd, decision {tally.answered[rid]}), {where}")
    for rid, why in list(found["half_written"].items())[:10]:
        print(f"HALF-WRITTEN {rid}: {why}")
    if args.keep:
        print(f"kept: {work} (server output serve.log)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    failed = (
        failure is not None
        or found["lost"]
        or found["half_written"]
        or orphans > tally.in_flight_decisions
        or integrity not in ("ok", "n/a")
    )
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


def fmt(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.most_common()) if counts else "0"


if __name__ == "__main__":
    sys.exit(main())

"""Two `kapok serve` replicas sharing one PostgreSQL decision log (issue 12, item 5): both
answer /score, /limit, /price and /screen at the same time, every answered decision is in the
log exactly once, the chain has one order with no gap, `kapok audit verify` passes, and after
one field of one record is edited in the database it fails naming that record.

test_audit.py races two plain processes writing the log; this runs the two real servers a
deployment would run (each a BentoML server with its own group-commit writer), as a user would
start them: `kapok serve` with the same KAPOK_HOME and the same KAPOK_DECISION_LOG.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import psutil
import pytest
import sqlalchemy as sa

from features import store as fs
from features.build import read_summary
from features.schema import PRODUCTS
from kapok.settings import Paths
from serving.auth import add_key
from serving.decision_log import decisions
from tests.cli_processes import kapok_command, run_kapok
from tests.conftest import linked_home, require_service
from tests.test_audit import _drop_triggers, _sql
from tests.test_cli_ui import free_port, stop_everything

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

START_TIMEOUT = 400  # s: two servers loading BentoML, MLflow and 3 models at once (2 busy cores)
CLIENTS = 8  # client threads, each sending to the two replicas in turn
SINGLES = 240  # /score, /limit and /price requests, 80 each
SCREENS = 16  # /screen requests of SCREEN_SIZE applicants each
SCREEN_SIZE = 5


@dataclass(frozen=True)
class ReplicaHome:
    paths: Paths
    keys: dict[str, str]  # key name -> plaintext key (role lender)
    enterprises: list[str]


@pytest.fixture(scope="module")
def replica_home(tmp_path_factory, small_system, trained_home) -> ReplicaHome:
    """The session's trained home made servable: its data and its kapok-microloan registry
    (v1 @champion) copied into a home of its own, the other products trained (few trials) and
    the online store materialized; two lender keys."""
    from training.data import product_data
    from training.train import train

    require_service("127.0.0.1", 5432, "PostgreSQL")  # before minutes of training, not after
    p = linked_home(tmp_path_factory.mktemp("replicas_home"), small_system)
    p.mlruns.mkdir(parents=True, exist_ok=True)
    # the registry as it is (its artifacts stay where they are, read only): SQLite's backup, not
    # a file copy, so that nothing half-written is copied
    source = sqlite3.connect(trained_home.paths.mlruns / "mlflow.db")
    target = sqlite3.connect(p.mlruns / "mlflow.db")
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    for product in PRODUCTS:
        if product != "microloan":
            train(product_data(p, product), p, trials=2, seed=7)
    store = fs.feature_store(p)
    start, end = fs.materialize_window(read_summary(p.features), full=False)
    fs.materialize(store, start, end)
    keys_file = p.home / "api_keys.toml"
    keys = {name: add_key(keys_file, name, "lender") for name in ("branch-east", "branch-west")}
    registered = pl.read_parquet(small_system.paths.raw / "registration" / "*.parquet")
    return ReplicaHome(p, keys, registered["enterprise_id"].to_list()[:120])


def _post(base: str, path: str, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"error": text}


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen
    log: Path
    groups: set[int]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _start(name: str, env: dict[str, str], tmp_path: Path) -> Replica:
    """`kapok serve` on a free port, not waiting for it (both replicas start at once)."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*kapok_command(), "serve", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    return Replica(name, port, process, log, set())


def _wait_ready(replicas: list[Replica]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    waiting = list(replicas)
    while waiting:
        for r in list(waiting):
            assert r.process.poll() is None, f"{r.name} ended:\n{r.output()}"
            try:  # the server's process groups, to stop whatever is left if the test fails
                children = psutil.Process(r.process.pid).children(recursive=True)
                r.groups |= {os.getpgid(c.pid) for c in children}
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
            if _ready(r.port):
                waiting.remove(r)
        assert time.monotonic() < deadline, f"not ready: {[r.name for r in waiting]}"
        time.sleep(0.5)


def _stop(replicas: list[Replica]) -> None:
    """SIGTERM to each `kapok serve`, as a service manager stops it; both stop whole."""
    for r in replicas:
        r.process.send_signal(signal.SIGTERM)
    for r in replicas:
        r.process.wait(timeout=60)
        assert "Kapok API stopped" in r.output(), r.output()


def _jobs(home: ReplicaHome) -> list[tuple[str, dict]]:
    """The requests, mixed: /score, /limit and /price over the three products, and /screen."""
    eids = itertools.cycle(home.enterprises)
    jobs: list[tuple[str, dict]] = []
    for i in range(SINGLES):
        path = ("/score", "/limit", "/price")[i % 3]
        product = PRODUCTS[(i // 3) % len(PRODUCTS)]
        amount_key = "amount" if path == "/price" else "requested_amount"
        body = {"enterprise_id": next(eids), "product": product, amount_key: 200_000,
                "term_months": 12}  # fmt: skip
        jobs.append((path, body))
        if i % (SINGLES // SCREENS) == 0:
            applicants = [
                {"enterprise_id": next(eids), "requested_amount": 150_000, "term_months": 12}
                for _ in range(SCREEN_SIZE)
            ]
            jobs.append(("/screen", {"product": product, "applicants": applicants}))
    return jobs


@dataclass(frozen=True)
class Answered:
    endpoint: str
    caller: str
    enterprise_id: str
    replica: str


def _drive(replicas: list[Replica], home: ReplicaHome) -> tuple[dict[str, Answered], list]:
    """Every job sent by CLIENTS threads at once, to the replicas in turn, with the two keys in
    turn: the request id of every decision answered 200 (each ranked applicant of a /screen),
    and every other answer."""
    jobs = _jobs(home)
    names = list(home.keys)
    answered: dict[str, Answered] = {}
    others: list[tuple[str, int, dict]] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        start.wait()
        for n, i in enumerate(range(c, len(jobs), CLIENTS)):
            path, body = jobs[i]
            replica = replicas[(c + n) % len(replicas)]  # each client: A, B, A, B, ...
            caller = names[(c + n // len(replicas)) % len(names)]  # each key to both replicas
            status, answer = _post(replica.base, path, body, home.keys[caller])
            with lock:
                if status != 200:
                    others.append((path, status, answer))
                    continue
                ranked = answer["ranked"] if path == "/screen" else [answer]
                for decision in ranked:
                    rid = decision["request_id"]
                    eid = decision.get("enterprise_id", body.get("enterprise_id"))
                    assert rid not in answered, f"request id {rid} answered twice"
                    answered[rid] = Answered(path[1:], caller, eid, replica.name)

    with ThreadPoolExecutor(CLIENTS) as pool:
        for done in [pool.submit(client, c) for c in range(CLIENTS)]:
            done.result()
    return answered, others


def _logged(url: str) -> list[sa.Row]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            columns = ("seq", "request_id", "endpoint", "caller", "enterprise_id", "prev_hash",
                       "hash")  # fmt: skip
            query = sa.select(*(decisions.c[n] for n in columns)).order_by(decisions.c.seq)
            return list(conn.execute(query))
    finally:
        engine.dispose()


# run alone, setting up counts too: the session's small system and trained home, then two more
# products trained and the online store materialized (~15 min at a load of 12 on 2 cores)
@pytest.mark.timeout(1800)
def test_two_replicas_sharing_one_postgresql_log_keep_one_verifiable_chain(
    replica_home: ReplicaHome,
    pg_url: str,
    tmp_path: Path,
):
    home = replica_home
    env = {**os.environ, "KAPOK_HOME": str(home.paths.home), "KAPOK_DECISION_LOG": pg_url,
           "KAPOK_API_KEYS": str(home.paths.home / "api_keys.toml"), "KAPOK_WORKERS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{home.paths.mlruns / 'mlflow.db'}"}  # fmt: skip
    for name in ("KAPOK_DEMO", "KAPOK_POLICY", "KAPOK_ONLINE_STORE", "KAPOK_RATE_LIMIT"):
        env.pop(name, None)
    clock = time.monotonic()
    took: dict[str, float] = {}
    replicas = [_start(name, env, tmp_path) for name in ("replica-a", "replica-b")]
    try:
        _wait_ready(replicas)
        took["start"], clock = time.monotonic() - clock, time.monotonic()
        answered, others = _drive(replicas, home)
        took["requests"], clock = time.monotonic() - clock, time.monotonic()
        _stop(replicas)
        took["stop"], clock = time.monotonic() - clock, time.monotonic()
    finally:
        for r in replicas:
            print(f"--- {r.name}\n{r.output()}")  # shown by pytest when the test failed
            stop_everything(r.process, r.groups)
    print("seconds:", {k: round(v, 1) for k, v in took.items()})

    # every answer is a decision, or an enterprise the online store does not know: never a
    # 503 (the log could not be written) nor a 500
    assert all(status == 404 for _, status, _ in others), others[:5]
    assert {a.endpoint for a in answered.values()} == {"score", "limit", "price", "screen"}
    assert len(answered) >= SINGLES // 2 + SCREENS, (len(answered), others[:5])

    rows = _logged(pg_url)
    logged = [row.request_id for row in rows]
    assert len(logged) == len(set(logged)), "a request id is logged twice"
    assert set(logged) - set(answered) == set(), "records no answer was given for"
    assert set(answered) - set(logged) == set(), "answered decisions missing from the log"
    for row in rows:  # each record is the decision that was answered, by its caller
        a = answered[row.request_id]
        assert (row.endpoint, row.caller, row.enterprise_id) == (
            a.endpoint, a.caller, a.enterprise_id,
        )  # fmt: skip
    seqs = [row.seq for row in rows]
    repeated = sorted(seq for seq, n in Counter(seqs).items() if n > 1)
    assert not repeated, f"two records share seq {repeated[:10]}: the chain forked"
    assert seqs == list(range(1, len(rows) + 1)), "a gap in seq"  # one chain, no gap
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    # the two replicas wrote at the same time: their records interleave in the chain
    owners = [answered[rid].replica for rid in logged]
    switches = sum(a != b for a, b in itertools.pairwise(owners))
    print(f"{len(rows)} decisions logged ({len(others)} answers 404), the chain switches "
          f"replica {switches} times")  # fmt: skip
    assert switches >= 4, owners

    cli_env = {"KAPOK_HOME": str(home.paths.home), "KAPOK_DECISION_LOG": pg_url}
    verified = run_kapok(["audit", "verify"], env=cli_env, cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout == f"{len(rows):,} records, chain intact, head {rows[-1].hash}\n"

    # someone with database access changes one decision replica B chained right after one of
    # replica A's (the append-only triggers dropped first)
    edited = next(
        row for before, row in itertools.pairwise(rows[:-1])
        if (owners[before.seq - 1], owners[row.seq - 1]) == ("replica-a", "replica-b")
    )  # fmt: skip
    _drop_triggers(pg_url)
    _sql(
        pg_url,
        "UPDATE decisions SET decision = CASE decision WHEN 'approve' THEN 'decline' "
        "ELSE 'approve' END WHERE seq = :seq",
        seq=edited.seq,
    )
    tampered = run_kapok(["audit", "verify"], env=cli_env, cwd=tmp_path)
    assert tampered.returncode == 1, tampered.stderr
    assert tampered.stdout == "" and "Traceback" not in tampered.stderr, tampered.stderr
    assert tampered.stderr_lines[-1] == (
        f"error: edited: record seq {edited.seq} ({edited.request_id}) was changed: its "
        "content does not give its hash"
    ), tampered.stderr

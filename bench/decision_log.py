"""How many decisions a second can the decision log take from concurrent API threads? Times it.

    nice .venv/bin/python bench/decision_log.py [--threads 16] [--each 120]
                                                [--backend both|sqlite|postgresql] [--pg URL]

`--threads` threads each log `--each` decisions, one write per decision as the API does (every
thread waits for its own decision to be committed before the next), all starting together:

  (a) naive: the old path, kept here as a baseline: old encoding (spaced JSON, the whole response
      body) and one INSERT + COMMIT per decision on a plain SQLAlchemy engine. On SQLite the old
      default rollback journal; (a') the same on a WAL database with synchronous=FULL, to tell what
      WAL gives from what group commit gives.
  (b) group commit: `serving.decision_log.DecisionLog.write` (one writer thread, one transaction
      and one fsync per batch of whatever callers handed it meanwhile).

It prints decisions/s of each, the ratio (b)/(a), and bytes per decision (old vs new encoding:
the JSON text and REAL columns of a row, and the database's size per row), with the machine load
before and after and the command line. SQLite runs in a temporary folder; PostgreSQL in throwaway
schemas of database `test` (dropped at the end). Records are realistic /price decisions: the 56
model features, four reasons with English and Chinese text, the price, and a response body that
repeats the score fields, the reasons and the price. Takes well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

# run as `python bench/x.py`, sys.path[0] is bench/, where serving.py (the load benchmark)
# would shadow the serving package: look in the repository instead
sys.path[0] = str(Path(__file__).resolve().parents[1])

import kapok  # noqa: F401  (telemetry off before anything else is imported)
from features.schema import ALL_FEATURES
from serving.decision_log import (
    RECORD_COLUMNS,
    DecisionLog,
    DecisionRecord,
    decisions,
    json_safe,
    new_request_id,
)

JSON_FIELDS = ("request", "features", "feature_timestamps", "price", "reasons", "response")
DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


# -- realistic decisions -------------------------------------------------------------------------
def realistic_record(rng: random.Random) -> DecisionRecord:
    """A /price decision as serving/service.py logs it."""
    now = dt.datetime.now(dt.UTC)
    eid = f"9131{rng.randrange(10**14):014d}"
    values: dict[str, Any] = {}
    for f in ALL_FEATURES:
        if f.categorical:
            values[f.name] = rng.choice(["C13", "F51", "310115", "small", "micro"])
        elif f.dtype == "int" or f.name.endswith(("_months", "_12m", "_24m")):
            values[f.name] = rng.randrange(0, 40)
        elif rng.random() < 0.05:
            values[f.name] = None
        else:
            values[f.name] = rng.lognormvariate(10, 2) if rng.random() < 0.5 else rng.gauss(0, 1)
    families = sorted({f.family for f in ALL_FEATURES if f.family != "request"})
    stamps = {
        fam: (now - dt.timedelta(days=rng.randrange(1, 60)))
        .replace(hour=0, minute=0, second=0, microsecond=0)
        .isoformat()
        for fam in families
    }
    reasons = []
    for f in rng.sample([f for f in ALL_FEATURES if not f.categorical], 4):
        v = values[f.name]
        shown = "missing" if v is None else f"{v:,.4g}" if isinstance(v, float) else v
        reasons.append(
            {
                "code": "R_" + f.name.upper(),
                "feature": f.name,
                "value": v,
                "impact": round(rng.random(), 6),
                "knockout": False,
                "text_en": f"{f.description}: {shown}",
                "text_zh": f"{f.description_zh}：{shown}",
            }
        )
    amount, term = float(rng.randrange(10, 500) * 1000), rng.choice([6, 12, 24, 36])
    pd_, score = rng.random() * 0.2, 600 + rng.random() * 200
    parts = {
        k: rng.random() * 0.05
        for k in ("expected_loss_rate", "expected_loss_loading", "cost_of_funds",
                  "operating_cost", "capital_charge", "margin")
    }  # fmt: skip
    rate = sum(parts.values())
    price = {
        "product": "microloan", "pd": pd_, "amount": amount, "term_months": term, "lgd": 0.45,
        "expected_loss": pd_ * 0.45 * amount, "expected_loss_lifetime": pd_ * 0.5 * amount,
        **parts, "capital_k": rng.random() * 0.1, "rate_name": "annual_rate", "rate": rate,
        "annual_rate": rate, "fee_rate": None, "premium_rate": None, "extra_annual_cost": 0.0,
        "all_in_rate": rate, "cap": 0.24, "within_cap": True,
    }  # fmt: skip
    request_id = new_request_id()
    request = {"enterprise_id": eid, "product": "microloan", "requested_amount": amount,
               "term_months": term}  # fmt: skip
    grade, decision = rng.choice("ABCDE"), rng.choice(["approve", "refer", "decline"])
    body = {
        "request_id": request_id, "product": "microloan", "model_name": "kapok-microloan",
        "model_version": "3", "features_as_of": max(stamps.values()),
        "decided_at": now.isoformat(), "pd": round(pd_, 6), "score": round(score, 1),
        "grade": grade, "decision": decision,
        "policy_path": ["no knock-out fires", f"grade {grade}: {decision}",
                        f"amount {amount:,.0f} within the product maximum"],
        "reasons": reasons, "price": price,
    }  # fmt: skip
    return DecisionRecord(
        request_id=request_id, decided_at=body["decided_at"], caller="acme-microloans",
        endpoint="price", enterprise_id=eid, product="microloan", request=request,
        model_name="kapok-microloan", model_version="3", features=values,
        feature_timestamps=stamps, pd=pd_, score=score, grade=grade, decision=decision,
        limit_amount=None, price=price, reasons=reasons, response=body,
    )  # fmt: skip


def old_row(record: DecisionRecord) -> dict[str, Any]:
    """The row as the old decision log encoded it (spaced JSON, the whole response)."""
    row = {name: getattr(record, name) for name in RECORD_COLUMNS}  # unchained, as it was
    for name in ("pd", "score"):
        row[name] = float(row[name])
    for name in JSON_FIELDS:
        value = row[name]
        row[name] = None if value is None else json.dumps(
            json_safe(value), allow_nan=False, ensure_ascii=False, sort_keys=True
        )  # fmt: skip
    return row


# -- the runs ------------------------------------------------------------------------------------
CPU: dict[str, float] = {}  # run label -> this process's CPU seconds (all threads)


def _timed(threads: list[list[DecisionRecord]], log_one: Callable[[DecisionRecord], None]) -> float:
    """Seconds from the start signal until every thread has logged all of its records (and the
    process's CPU seconds meanwhile in CPU["last"])."""
    start = threading.Barrier(len(threads) + 1)
    errors: list[BaseException] = []

    def work(mine: list[DecisionRecord]) -> None:
        start.wait()
        try:
            for r in mine:
                log_one(r)
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=work, args=(mine,)) for mine in threads]
    for w in workers:
        w.start()
    start.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    CPU["last"] = time.process_time() - c0
    if errors:
        raise errors[0]
    return seconds


def naive(url: str, threads: list[list[DecisionRecord]], wal: bool = False) -> float:
    """One INSERT + COMMIT per decision, old encoding, a plain engine (the old DecisionLog)."""
    connect_args = {"timeout": 30, "check_same_thread": False} if url.startswith("sqlite") else {}
    engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True,
                              pool_size=len(threads))  # fmt: skip
    if wal:

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA journal_mode = WAL")
            dbapi_connection.execute("PRAGMA synchronous = FULL")

    decisions.metadata.create_all(engine)

    def log_one(r: DecisionRecord) -> None:
        row = old_row(r)
        with engine.begin() as conn:
            conn.execute(decisions.insert(), [row])

    try:
        return _timed(threads, log_one)
    finally:
        engine.dispose()


def group(url: str, threads: list[list[DecisionRecord]]) -> tuple[float, int]:
    """DecisionLog.write from every thread: seconds and the number of transactions."""
    with DecisionLog(url) as log:
        log.count()  # the table first, outside the timing
        commits = [0]

        def on_commit(_conn: Any) -> None:
            commits[0] += 1

        sa.event.listen(log._engine, "commit", on_commit)
        return _timed(threads, log.write), commits[0]


# -- sizes ---------------------------------------------------------------------------------------
def payload_bytes(url: str) -> float:
    """Mean bytes of a row's values: the text columns in UTF-8, 8 per DOUBLE."""
    parts = []
    for c in decisions.columns:
        if isinstance(c.type, sa.Double):
            parts.append(f"CASE WHEN {c.name} IS NULL THEN 0 ELSE 8 END")
        elif url.startswith("sqlite"):
            parts.append(f"coalesce(length(CAST({c.name} AS BLOB)), 0)")
        else:
            parts.append(f"coalesce(octet_length({c.name}::text), 0)")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return float(conn.execute(sa.text(f"SELECT avg({' + '.join(parts)}) FROM decisions"))
                         .scalar_one())  # fmt: skip
    finally:
        engine.dispose()


def sqlite_file_bytes(path: Path, rows: int) -> float:
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return path.stat().st_size / rows


def pg_stored_bytes(url: str, rows: int) -> tuple[float, float]:
    """Mean row size as PostgreSQL stores it (pg_column_size: after TOAST compression), and the
    table with its indexes and TOAST per row."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT avg(pg_column_size(d.*)) FROM decisions d"))
            total = conn.execute(sa.text("SELECT pg_total_relation_size('decisions')"))
            return float(row.scalar_one()), total.scalar_one() / rows
    finally:
        engine.dispose()


# -- report --------------------------------------------------------------------------------------
def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _rate(n: int, seconds: float) -> str:
    cpu = CPU["last"] / n * 1000
    return f"{n / seconds:8.0f} decisions/s  ({n} in {seconds:.2f} s, CPU {cpu:.2f} ms/decision)"


def bench_sqlite(threads: list[list[DecisionRecord]]) -> None:
    n = sum(len(t) for t in threads)
    print(f"\nSQLite (temporary folder)   {_load()}")
    with tempfile.TemporaryDirectory(prefix="kapok_bench_log_") as tmp:
        old, wal, new = Path(tmp, "naive.db"), Path(tmp, "naive_wal.db"), Path(tmp, "group.db")
        t_old = naive(f"sqlite:///{old}", threads)
        print(f"  (a)  naive, rollback journal   {_rate(n, t_old)}   {_load()}")
        t_wal = naive(f"sqlite:///{wal}", threads, wal=True)
        print(f"  (a') naive, WAL + FULL         {_rate(n, t_wal)}   {_load()}")
        t_new, commits = group(f"sqlite:///{new}", threads)
        print(f"  (b)  group commit, WAL + FULL  {_rate(n, t_new)}   {_load()}")
        print(f"       {commits} transactions for {n} decisions ({n / commits:.1f} per commit)")
        print(f"  ratio (b)/(a) {t_old / t_new:.1f}x    (b)/(a') {t_wal / t_new:.1f}x")
        b_old, b_new = payload_bytes(f"sqlite:///{old}"), payload_bytes(f"sqlite:///{new}")
        f_old, f_new = sqlite_file_bytes(old, n), sqlite_file_bytes(new, n)
        print(f"  bytes/decision: values {b_old:.0f} -> {b_new:.0f} ({b_new / b_old - 1:+.0%}), "
              f"database file {f_old:.0f} -> {f_new:.0f} ({f_new / f_old - 1:+.0%})")  # fmt: skip


def bench_postgres(threads: list[list[DecisionRecord]], base: str) -> None:
    n = sum(len(t) for t in threads)
    print(f"\nPostgreSQL ({sa.make_url(base).render_as_string()})   {_load()}")
    tag = uuid.uuid4().hex[:12]
    schemas = {"naive": f"kapok_bench_naive_{tag}", "group": f"kapok_bench_group_{tag}"}
    admin = sa.create_engine(base)
    try:
        with admin.begin() as conn:
            for s in schemas.values():
                conn.exec_driver_sql(f'CREATE SCHEMA "{s}"')
        urls = {
            k: sa.make_url(base).update_query_dict({"options": f"-csearch_path={s}"})
            .render_as_string(hide_password=False)
            for k, s in schemas.items()
        }  # fmt: skip
        t_old = naive(urls["naive"], threads)
        print(f"  (a) naive                      {_rate(n, t_old)}   {_load()}")
        t_new, commits = group(urls["group"], threads)
        print(f"  (b) group commit               {_rate(n, t_new)}   {_load()}")
        print(f"      {commits} transactions for {n} decisions ({n / commits:.1f} per commit)")
        print(f"  ratio (b)/(a) {t_old / t_new:.1f}x")
        b_old, b_new = payload_bytes(urls["naive"]), payload_bytes(urls["group"])
        (r_old, s_old), (r_new, s_new) = (
            pg_stored_bytes(urls["naive"], n),
            pg_stored_bytes(urls["group"], n),
        )
        print(f"  bytes/decision: values {b_old:.0f} -> {b_new:.0f} ({b_new / b_old - 1:+.0%}), "
              f"stored row {r_old:.0f} -> {r_new:.0f} ({r_new / r_old - 1:+.0%}), "
              f"table+indexes {s_old:.0f} -> {s_new:.0f} ({s_new / s_old - 1:+.0%})")  # fmt: skip
    finally:
        with admin.begin() as conn:
            for s in schemas.values():
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=16, help="concurrent writers")
    parser.add_argument("--each", type=int, default=120, help="decisions per writer")
    parser.add_argument("--backend", choices=["both", "sqlite", "postgresql"], default="both")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL URL (a database to use)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"{os.cpu_count()} CPUs, {_load()}; {args.threads} threads x {args.each} decisions")
    rng = random.Random(args.seed)
    threads = [[realistic_record(rng) for _ in range(args.each)] for _ in range(args.threads)]
    started = time.perf_counter()
    if args.backend in ("both", "sqlite"):
        bench_sqlite(threads)
    if args.backend in ("both", "postgresql"):
        bench_postgres(threads, args.pg)
    print(f"\n{time.perf_counter() - started:.0f} s in all, {_load()}")


if __name__ == "__main__":
    main()

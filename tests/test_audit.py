"""Tamper evidence of the decision log (issue 12, item 5): the hash chain every record carries,
`kapok audit verify` naming the first edited, deleted, reordered or inserted record, and
`kapok audit anchor`; on SQLite and PostgreSQL, with concurrent writers in several processes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving import audit
from serving.decision_log import (
    _PG_FUNCTION,
    _PG_TRIGGERS,
    _SQLITE_TRIGGERS,
    GENESIS_HASH,
    RECORD_COLUMNS,
    DecisionLog,
    DecisionLogError,
    _to_row,
    canonical,
    chain_hash,
    decisions,
)
from tests.cli_processes import run_kapok
from tests.conftest import repo_root
from tests.test_decision_log import T0, record


@pytest.fixture(autouse=True)
def _no_log_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAPOK_DECISION_LOG", raising=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'decisions.db'}"
    return request.getfixturevalue("pg_url")


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url)


def _sql(url: str, *statements: str, **params) -> None:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement), params)
    finally:
        engine.dispose()


def _chain(url: str) -> list[sa.Row]:
    """(seq, request_id, prev_hash, hash) of every chained record, in seq order."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(
                        decisions.c.seq, decisions.c.request_id,
                        decisions.c.prev_hash, decisions.c.hash,
                    ).where(decisions.c.seq.is_not(None)).order_by(decisions.c.seq)
                )
            )  # fmt: skip
    finally:
        engine.dispose()


def _drop_triggers(url: str) -> None:
    """What an attacker with database access does first."""
    if url.startswith("sqlite"):
        _sql(url, "DROP TRIGGER decisions_no_update", "DROP TRIGGER decisions_no_delete")
    else:
        _sql(
            url,
            "DROP TRIGGER decisions_no_update_delete ON decisions",
            "DROP TRIGGER decisions_no_truncate ON decisions",
        )


def _fill(log: DecisionLog) -> list[str]:
    """Single writes, a batch and concurrent group-committed writes: 3 + 4 + 8 x 5 records."""
    ids = []
    for i in range(3):
        r = record(f"req_single_{i}", decided_at=T0 + dt.timedelta(seconds=i))
        log.write(r)
        ids.append(r.request_id)
    batch = [record(f"req_batch_{i}", endpoint="screen") for i in range(4)]
    log.write_many(batch)
    ids += [r.request_id for r in batch]
    start = threading.Barrier(8)

    def writer(t: int) -> None:
        start.wait()
        for i in range(5):
            log.write(record(f"req_thread_{t}_{i}", features={"t": t, "i": i, "x": 1 / (i + 3)}))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return ids


def test_every_write_is_chained_in_commit_order(url: str):
    """Single, batch and concurrent writes: seq 1..N with no gap, each record chained after the
    one before it, a batch in the order given, and the hash covers exactly what is stored."""
    with DecisionLog(url) as log:
        ids = _fill(log)
        assert log.count() == 47
    chain = _chain(url)
    assert [row.seq for row in chain] == list(range(1, 48))
    assert [row.request_id for row in chain[:7]] == ids  # the batch kept its order
    assert chain[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(chain))
    verdict = audit.verify(url)
    assert verdict.intact and verdict.records == 47 and verdict.unchained == 0
    assert verdict.head.seq == 47 and verdict.head.hash == chain[-1].hash
    # the hash of a record as written equals the hash of the record as read back
    r = record("req_single_1", decided_at=T0 + dt.timedelta(seconds=1))
    assert chain_hash(chain[0].hash, canonical(_to_row(r))) == chain[1].hash


@pytest.mark.postgres
def test_the_same_records_give_the_same_chain_on_sqlite_and_postgres(pg_url, tmp_path):
    """Canonical bytes do not depend on the database: floats, timestamps, JSON text round-trip."""
    heads = []
    for url in (f"sqlite:///{tmp_path / 'x.db'}", pg_url):
        with DecisionLog(url) as log:
            log.write(record("req_a", features={"f": 0.1 + 0.2, "g": -0.0, "h": 1e300}))
            r = dataclasses.replace(
                record("req_b"),
                decided_at=dt.datetime(2025, 3, 1, 17, 30, 0, 1, tzinfo=BEIJING),
                pd=1 / 3, score=700.0000000001, limit_amount=None, price=None,
                request={"企业": "小微", "amount": 12.5},
            )  # fmt: skip
            log.write_many([r, record("req_c", endpoint="screen")])
        heads.append(audit.anchor(url).hash)
        assert audit.verify(url).intact
    assert heads[0] == heads[1]


BEIJING = dt.timezone(dt.timedelta(hours=8))


def _forged(url: str, like_seq: int, request_id: str, seq: int | None, prev: str | None) -> None:
    """Insert a copy of record `like_seq` as `request_id`, its hash computed from `prev`."""
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            row = dict(
                conn.execute(sa.select(decisions).where(decisions.c.seq == like_seq)).one()._mapping
            )
            row |= {"request_id": request_id, "seq": seq, "prev_hash": prev, "hash": None}
            if prev is not None:
                row["hash"] = chain_hash(prev, canonical(row))
            conn.execute(decisions.insert(), [row])
    finally:
        engine.dispose()  # fmt: skip


def _shift(url: str, first: int, last: int, by: int) -> None:
    """seq += by for first..last, one row at a time in an order that keeps seq unique."""
    order = range(last, first - 1, -1) if by > 0 else range(first, last + 1)
    _sql(url, *(f"UPDATE decisions SET seq = seq + {by} WHERE seq = {s}" for s in order))


# each: what the attacker does to a log of 47 records (ids[s] is the record at seq s), and what
# verify must name: kind, seq and request_id
def _edit(url, ids):
    _sql(url, "UPDATE decisions SET decision = 'decline' WHERE seq = 10")
    return "edited", 10, ids[10]


def _edit_float(url, ids):
    _sql(url, "UPDATE decisions SET pd = pd + 1e-12 WHERE seq = 20")
    return "edited", 20, ids[20]


def _edit_json(url, ids):
    statement = "UPDATE decisions SET features = replace(features, :was, :now) WHERE seq = 30"
    _sql(url, statement, was='"x":', now='"x":1')
    return "edited", 30, ids[30]  # fmt: skip


def _delete(url, ids):
    _sql(url, "DELETE FROM decisions WHERE seq = 10")
    return "deleted", 11, ids[11]


def _delete_and_renumber(url, ids):
    _sql(url, "DELETE FROM decisions WHERE seq = 10")
    _shift(url, 11, 47, -1)
    return "deleted", 10, ids[11]


def _delete_last(url, ids):
    _sql(url, "DELETE FROM decisions WHERE seq = 47")
    return "deleted", 47, None


def _delete_head(url, ids):
    _sql(url, "DELETE FROM decisions_chain")
    with DecisionLog(url) as log, pytest.raises(DecisionLogError, match=r"head row .* is missing"):
        log.write(record("req_after"))  # nothing is logged unchained
    return "deleted", None, None


def _swap(url, ids):
    _sql(
        url,
        "UPDATE decisions SET seq = -1 WHERE seq = 10",
        "UPDATE decisions SET seq = 10 WHERE seq = 11",
        "UPDATE decisions SET seq = 11 WHERE seq = -1",
    )
    return "reordered", 10, ids[11]


def _insert_wrong_prev(url, ids):
    _forged(url, 5, "req_forged", 48, prev=ids.hashes[3])  # recomputed, but after seq 3
    return "inserted", 48, "req_forged"


def _insert_after_head(url, ids):
    _forged(url, 5, "req_forged", 48, prev=ids.hashes[47])  # a perfect link to the last record
    return "inserted", 48, "req_forged"


def _insert_in_the_middle(url, ids):
    _shift(url, 10, 47, +1)
    _forged(url, 5, "req_forged", 10, prev=ids.hashes[9])
    return "inserted", 10, "req_forged"


def _insert_unchained(url, ids):
    _forged(url, 5, "req_forged", None, prev=None)
    return "inserted", None, "req_forged"


TAMPERING = [
    *(_edit, _edit_float, _edit_json),
    *(_delete, _delete_and_renumber, _delete_last, _delete_head),
    _swap,
    *(_insert_wrong_prev, _insert_after_head, _insert_in_the_middle, _insert_unchained),
]


class _Ids(list):
    hashes: dict[int, str]


@pytest.mark.parametrize("tamper", TAMPERING, ids=lambda f: f.__name__.strip("_"))
def test_tampering_is_detected_and_the_record_named(url: str, tamper):
    with DecisionLog(url) as log:
        _fill(log)
    chain = _chain(url)
    ids = _Ids([None, *(row.request_id for row in chain)])
    ids.hashes = {row.seq: row.hash for row in chain}
    assert audit.verify(url).intact
    _drop_triggers(url)
    kind, seq, request_id = tamper(url, ids)
    finding = audit.verify(url, chunk=7).finding  # pages of 7: breaks fall inside and between
    assert finding is not None, tamper.__name__
    assert (finding.kind, finding.seq, finding.request_id) == (kind, seq, request_id), finding
    if seq is not None:
        assert f"seq {seq}" in finding.reason
    if request_id is not None:
        assert request_id in finding.reason


def test_verify_walks_in_chunks_and_reports_progress(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    with DecisionLog(url) as log:
        _fill(log)
    seen: list[int] = []
    verdict = audit.verify(url, chunk=10, progress=seen.append)
    assert verdict.intact and seen == [10, 10, 10, 10, 7]


def test_an_anchor_changes_exactly_when_a_record_is_added(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    with DecisionLog(url) as log:
        log.write(record("req_1"))
        first = audit.anchor(url)
        assert (first.seq, first.request_id) == (1, "req_1")
        assert audit.verify(url).intact and audit.anchor(url) == first  # reading moves nothing
        with pytest.raises(DecisionLogError):
            log.write(record("req_1"))  # a failed write moves nothing
        with pytest.raises(DecisionLogError):
            log.write_many([record("req_2", endpoint="screen"), record("req_1")])
        assert audit.anchor(url) == first
        log.write(record("req_2"))
        second = audit.anchor(url)
        assert (second.seq, second.request_id) == (2, "req_2") and second.hash != first.hash
        log.write_many([record("req_3", endpoint="screen"), record("req_4", endpoint="screen")])
        assert audit.anchor(url).seq == 4
    assert audit.verify(url, anchor=(first.seq, first.hash)).intact


def test_an_anchor_catches_history_rewritten_to_the_end(tmp_path):
    """Edit a record and recompute every later hash and the head: the chain is consistent again
    (plain verify passes, as it must), but the anchor taken before no longer matches."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    with DecisionLog(url) as log:
        _fill(log)
    kept = audit.anchor(url)
    _drop_triggers(url)
    engine = _engine(url)
    with engine.begin() as conn:
        rows = [
            dict(r._mapping) for r in conn.execute(sa.select(decisions).order_by(decisions.c.seq))
        ]
        prev = rows[4]["hash"]
        for row in rows[5:]:
            if row["seq"] == 6:
                row["decision"] = "decline"
            row["prev_hash"], row["hash"] = prev, chain_hash(prev, canonical(row))
            prev = row["hash"]
            conn.execute(
                decisions.update().where(decisions.c.seq == row["seq"]),
                {k: row[k] for k in (*RECORD_COLUMNS, "prev_hash", "hash") if k != "request_id"},
            )
        conn.execute(sa.text("UPDATE decisions_chain SET hash = :h"), {"h": prev})
    engine.dispose()  # fmt: skip
    assert audit.verify(url).intact
    finding = audit.verify(url, anchor=(kept.seq, kept.hash)).finding
    assert finding is not None and (finding.kind, finding.seq) == ("rewritten", 47)


def _old_log(url: str, n: int) -> None:
    """A log as an earlier Kapok wrote it: no chain columns, no head table, triggers on."""
    old = sa.MetaData()
    columns = [
        sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
        for c in decisions.columns
        if c.name in RECORD_COLUMNS
    ]
    table = sa.Table("decisions", old, *columns)
    engine = _engine(url)
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(table.insert(), [_to_row(record(f"req_old_{i}")) for i in range(n)])
        if url.startswith("sqlite"):  # the triggers an earlier Kapok created
            conn.exec_driver_sql(_SQLITE_TRIGGERS[0])
        else:
            conn.exec_driver_sql(_PG_FUNCTION)
            conn.exec_driver_sql(_PG_TRIGGERS["decisions_no_update_delete"])
    engine.dispose()  # fmt: skip


def test_a_log_written_before_chaining_keeps_its_records_and_chains_the_new_ones(url: str):
    _old_log(url, 3)
    with pytest.raises(DecisionLogError, match="not chained: its 3 records"):
        audit.verify(url)
    with DecisionLog(url) as log:
        before = log.get("req_old_1")
        log.write(record("req_new_1"))
        log.write_many(
            [record("req_new_2", endpoint="screen"), record("req_new_3", endpoint="screen")]
        )
        assert log.get("req_old_1") == before == record("req_old_1")  # not rewritten
        assert log.count() == 6
    verdict = audit.verify(url)
    assert verdict.intact and (verdict.records, verdict.unchained) == (3, 3)
    assert [row.request_id for row in _chain(url)] == ["req_new_1", "req_new_2", "req_new_3"]
    _forged(url, 2, "req_late", None, prev=None)  # an unchained record added later
    finding = audit.verify(url).finding
    assert (finding.kind, finding.seq, finding.request_id) == ("inserted", None, "req_late")
    _drop_triggers(url)
    _sql(url, "DELETE FROM decisions WHERE request_id IN ('req_late', 'req_old_0')")
    finding = audit.verify(url).finding
    assert (finding.kind, finding.seq, finding.request_id) == ("deleted", None, "req_old_0")


WRITER = textwrap.dedent(
    """
    import datetime as dt, sys, threading, time
    from serving.decision_log import DecisionLog, DecisionRecord
    url, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    def rec(rid, endpoint="score"):
        return DecisionRecord(
            request_id=rid, decided_at=dt.datetime.now(dt.UTC), caller=name, endpoint=endpoint,
            enterprise_id="91110000MA00000001", product="microloan", request={"n": rid},
            model_name="kapok-microloan", model_version="1", features={"f": 0.5},
            feature_timestamps={}, pd=0.03, score=700.0, grade="B", decision="approve",
            limit_amount=1000.0, price=None, reasons=[], response={"request_id": rid})
    log = DecisionLog(url)
    log.count()  # schema set-up before the race
    time.sleep(max(0.0, start - time.time()))
    errors = []
    def work(t):
        try:
            for i in range(30):
                if i % 10 == 9:
                    log.write_many([rec(f"{name}_{t}_{i}_{j}", "screen") for j in range(3)])
                else:
                    log.write(rec(f"{name}_{t}_{i}"))
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    log.close()
    sys.exit(f"{len(errors)} writers failed, first: {errors[0]}" if errors else 0)
    """
)


def test_two_processes_writing_one_log_keep_one_chain(url: str, tmp_path: Path):
    """Two processes (as two API replicas), six threads each, group commit in each: every
    record lands in one chain, interleaved between the processes, and verify passes."""
    env = {**os.environ, "PYTHONPATH": str(repo_root())}
    start = time.time() + 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, name, str(start)],
            env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        )
        for name in ("replica_a", "replica_b")
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    each = 6 * (27 + 3 * 3)
    verdict = audit.verify(url)
    assert verdict.intact, verdict.finding
    assert verdict.records == 2 * each
    if url.startswith("postgresql"):  # SQLite's busy wait lets one process run to its end
        owners = [row.request_id.split("_")[1] for row in _chain(url)]
        switches = sum(a != b for a, b in itertools.pairwise(owners))
        assert switches >= 2, "the two processes did not write at the same time"


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_verify_and_anchor_exit_codes(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    env = {"KAPOK_HOME": str(tmp_path / "home")}
    missing = run_kapok(["audit", "verify", "--log", url], env=env, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")
    assert "no such file" in missing.stderr and len(missing.stderr_lines) == 1
    with DecisionLog(url) as log:
        _fill(log)
    head = audit.anchor(url)
    ok = run_kapok(["audit", "verify", "--log", url], env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"47 records, chain intact, head {head.hash}"
    anchored = run_kapok(
        ["audit", "anchor", "--json"], env={**env, "KAPOK_DECISION_LOG": url}, cwd=tmp_path
    )
    assert anchored.returncode == 0, anchored.stderr
    got = json.loads(anchored.stdout)
    assert (got["seq"], got["hash"], got["request_id"]) == (47, head.hash, head.request_id)
    assert dt.datetime.fromisoformat(got["anchored_at"]).tzinfo is not None
    plain = run_kapok(["audit", "anchor", "--log", url], env=env, cwd=tmp_path)
    assert plain.stdout.startswith(f"seq 47 ({head.request_id}) head {head.hash} at ")
    _drop_triggers(url)
    _sql(url, "DELETE FROM decisions WHERE seq = 12")
    bad = run_kapok(
        ["audit", "verify", "--log", url, "--anchor", f"47:{head.hash}"], env=env, cwd=tmp_path
    )
    assert bad.returncode == 1, bad.stderr
    assert bad.stdout == "" and "Traceback" not in bad.stderr, bad.stderr
    *progress, error = bad.stderr_lines  # progress lines (not a terminal), then one error line
    assert all(line.startswith("verifying the decision log: ") for line in progress), progress
    rid = _chain(url)[11].request_id  # the record after the gap
    assert error.startswith("error: deleted: record seq 12 is missing"), error
    assert f"seq 13 ({rid})" in error
    wrong = run_kapok(["audit", "verify", "--log", url, "--anchor", "x"], env=env, cwd=tmp_path)
    assert wrong.returncode == 2 and "--anchor must be SEQ:HASH" in wrong.stderr

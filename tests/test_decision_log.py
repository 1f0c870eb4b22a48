"""The decision log: round trip, JSON-safe features, append-only, all-or-nothing batches."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from kapok.settings import paths
from serving.decision_log import DecisionLog, DecisionLogError, DecisionRecord, new_request_id

T0 = dt.datetime(2025, 3, 1, 9, 30, 0, 123456, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _no_log_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAPOK_DECISION_LOG", raising=False)


def record(
    request_id: str | None = None,
    *,
    enterprise_id: str = "91110000MA00000001",
    product: str = "working_capital",
    endpoint: str = "score",
    decided_at: dt.datetime = T0,
    features: dict | None = None,
) -> DecisionRecord:
    return DecisionRecord(
        request_id=request_id or new_request_id(),
        decided_at=decided_at,
        caller="acme-microloans",
        endpoint=endpoint,
        enterprise_id=enterprise_id,
        product=product,
        request={"enterprise_id": enterprise_id, "product": product, "amount": 50_000},
        model_name="kapok-pd",
        model_version="3",
        features=features if features is not None else {"tax_revenue_12m": 1.2e6, "age": 7},
        feature_timestamps={"tax": "2025-02-28T00:00:00+00:00"},
        pd=0.031,
        score=712.5,
        grade="B",
        decision="approve",
        limit_amount=80_000.0,
        price={"apr": 0.112, "fee": 0.01},
        reasons=[{"feature": "tax_revenue_12m", "impact": -0.4}],
        response={"request_id": "x", "decision": "approve"},
    )


@pytest.fixture
def log():
    with DecisionLog() as log:
        yield log


def test_request_id_format():
    rid = new_request_id()
    assert rid.startswith("req_") and len(rid) == 36 and rid != new_request_id()


def test_round_trip_sqlite_under_kapok_home(log: DecisionLog):
    r = record()
    log.write(r)
    assert (paths().home / "decisions" / "decisions.db").is_file()
    assert log.get(r.request_id) == r
    assert log.get("req_missing") is None
    assert log.count() == 1


def test_url_from_environment(tmp_path, monkeypatch: pytest.MonkeyPatch):
    db = tmp_path / "elsewhere" / "log.db"
    monkeypatch.setenv("KAPOK_DECISION_LOG", f"sqlite:///{db}")
    with DecisionLog() as log:
        log.write(record())
    assert db.is_file()
    assert not (paths().home / "decisions").exists()


def test_features_are_json_safe(log: DecisionLog):
    r = record(features={"a": float("nan"), "b": float("inf"), "c": 1.5, "d": None})
    log.write(r)
    with sa.create_engine(
        f"sqlite:///{paths().home / 'decisions' / 'decisions.db'}"
    ).connect() as c:
        raw = c.execute(sa.text("SELECT features FROM decisions")).scalar_one()
    assert "NaN" not in raw and "Infinity" not in raw
    assert log.get(r.request_id).features == {"a": None, "b": None, "c": 1.5, "d": None}


def test_numpy_and_datetime_values_are_stored_as_plain_json(log: DecisionLog):
    import numpy as np

    r = record(
        features={"f": np.float64("nan"), "i": np.int64(3), "b": np.bool_(True), "v": np.ones(2)}
    )
    r = dataclasses.replace(r, feature_timestamps={"tax": T0}, pd=np.float64(0.25))
    log.write(r)
    got = log.get(r.request_id)
    assert got.features == {"f": None, "i": 3, "b": True, "v": [1.0, 1.0]}
    assert got.feature_timestamps == {"tax": T0.isoformat()}
    assert got.pd == 0.25 and type(got.pd) is float


def test_duplicate_request_id_is_rejected_and_original_kept(log: DecisionLog):
    original = record("req_dup")
    log.write(original)
    clash = record("req_dup", enterprise_id="other", product="invoice")
    with pytest.raises(DecisionLogError, match="append-only"):
        log.write(clash)
    assert log.get("req_dup") == original
    assert log.count() == 1


def _raw_sql(url: str, statement: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def test_update_and_delete_rejected_by_trigger(log: DecisionLog):
    r = record()
    log.write(r)
    url = f"sqlite:///{paths().home / 'decisions' / 'decisions.db'}"
    with pytest.raises(sa.exc.DatabaseError, match="append-only"):
        _raw_sql(url, "UPDATE decisions SET decision = 'decline'")
    with pytest.raises(sa.exc.DatabaseError, match="append-only"):
        _raw_sql(url, "DELETE FROM decisions")
    assert log.get(r.request_id) == r
    assert not hasattr(log, "update") and not hasattr(log, "delete")


def test_unwritable_location_raises_decision_log_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a regular file")
    log = DecisionLog(f"sqlite:///{blocker / 'decisions.db'}")  # constructing does not connect
    try:
        with pytest.raises(DecisionLogError, match="decision log"):
            log.write(record())
    finally:
        log.close()


def test_unreachable_database_raises_decision_log_error():
    log = DecisionLog("postgresql+psycopg2://nobody@127.0.0.1:1/none")
    with log, pytest.raises(DecisionLogError, match=r"not written|cannot create"):
        log.write(record())


def test_invalid_and_unsupported_urls():
    with pytest.raises(DecisionLogError, match="not a valid"):
        DecisionLog("not a url")
    with pytest.raises(DecisionLogError, match="unsupported"):
        DecisionLog("mysql://root@localhost/x")


def test_write_many_is_all_or_nothing(log: DecisionLog):
    log.write(record("req_existing"))
    batch = [record("req_new_1", endpoint="screen"), record("req_existing", endpoint="screen")]
    with pytest.raises(DecisionLogError):
        log.write_many(batch)
    assert log.get("req_new_1") is None
    assert log.count() == 1
    log.write_many([record(f"req_ok_{i}", endpoint="screen") for i in range(3)])
    assert log.count() == 4
    log.write_many([])
    assert log.count() == 4


def test_recent_filters_and_orders_newest_first(log: DecisionLog):
    rows = [
        record("req_1", enterprise_id="E1", product="p1", decided_at=T0),
        record("req_2", enterprise_id="E1", product="p2", decided_at=T0 + dt.timedelta(hours=1)),
        record("req_3", enterprise_id="E2", product="p1", decided_at=T0 + dt.timedelta(hours=2)),
    ]
    log.write_many(rows)
    assert [r.request_id for r in log.recent()] == ["req_3", "req_2", "req_1"]
    assert [r.request_id for r in log.recent(limit=2)] == ["req_3", "req_2"]
    assert [r.request_id for r in log.recent(enterprise_id="E1")] == ["req_2", "req_1"]
    assert [r.request_id for r in log.recent(product="p1")] == ["req_3", "req_1"]
    assert [r.request_id for r in log.recent(enterprise_id="E1", product="p1")] == ["req_1"]
    assert log.recent(enterprise_id="nobody") == []
    with pytest.raises(ValueError):
        log.recent(limit=0)


def test_record_validation():
    with pytest.raises(ValueError, match="endpoint"):
        record(endpoint="explain")
    with pytest.raises(ValueError, match="timezone"):
        record(decided_at=dt.datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="timezone"):
        record(decided_at="2025-01-01T00:00:00")
    with pytest.raises(ValueError, match="ISO"):
        record(decided_at="yesterday")
    assert record(decided_at="2025-03-01T17:30:00.123456+08:00").decided_at == T0.replace(hour=9)


def test_timestamps_normalised_to_utc(log: DecisionLog):
    local = dt.datetime(2025, 3, 1, 17, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    log.write(record("req_tz", decided_at=local))
    got = log.get("req_tz").decided_at
    assert got == local and got.utcoffset() == dt.timedelta(0)


@pytest.mark.postgres
def test_round_trip_and_append_only_on_postgres(pg_url: str):
    url = pg_url
    log = DecisionLog(url)
    try:
        r = record(features={"x": math.nan, "y": 2.0})
        log.write(r)
        got = log.get(r.request_id)
        assert got.features == {"x": None, "y": 2.0}
        assert got == record(r.request_id, features={"x": None, "y": 2.0})
        with pytest.raises(DecisionLogError):
            log.write(r)
        log.write_many([record("req_a", endpoint="screen"), record("req_b", endpoint="screen")])
        with pytest.raises(DecisionLogError):
            log.write_many([record("req_c", endpoint="screen"), record("req_a")])
        assert log.get("req_c") is None and log.count() == 3
        for statement in (
            "UPDATE decisions SET decision = 'decline'",
            "DELETE FROM decisions",
            "TRUNCATE decisions",
        ):
            with pytest.raises(sa.exc.DatabaseError, match="append-only"):
                _raw_sql(url, statement)
        assert log.count() == 3
        with DecisionLog(url) as again:  # schema set-up is idempotent
            assert again.get(r.request_id) == got
    finally:
        log.close()


# -- group commit --------------------------------------------------------------------------------


def _count_commits(log: DecisionLog, delay: float = 0.0) -> list[int]:
    """Count the transactions the log commits from now on; `delay` stands in for a slow fsync
    (so concurrent callers pile up while one transaction is in flight, as they do on a disk)."""
    log.count()  # schema first: its transaction is not one of the writer's
    commits = [0]

    def on_commit(_conn: sa.Connection) -> None:
        commits[0] += 1
        if delay:
            time.sleep(delay)

    sa.event.listen(log._engine, "commit", on_commit)
    return commits


class _Gate:
    """Holds the writer thread inside its next commit until `open()`."""

    def __init__(self, log: DecisionLog) -> None:
        log.count()
        self.entered, self._open, self._armed = threading.Event(), threading.Event(), True
        sa.event.listen(log._engine, "commit", self._on_commit)

    def _on_commit(self, _conn: sa.Connection) -> None:
        if self._armed:
            self._armed = False
            self.entered.set()
            assert self._open.wait(30)

    def open(self) -> None:
        self._open.set()


def _in_thread(fn, *args) -> tuple[threading.Thread, list]:
    """Run fn(*args) in a thread; the list gets the exception it raised, or None."""
    outcome: list = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as e:  # the test looks at it
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _concurrent_writers(log: DecisionLog, threads: int = 32, each: int = 50) -> None:
    """threads x each decisions, one write() per decision, all at once: every one lands, each
    readable the moment write() returns, in far fewer transactions than decisions."""
    commits = _count_commits(log, delay=0.003)
    ids = [[f"req_t{t:02d}_{i:03d}" for i in range(each)] for t in range(threads)]
    start = threading.Barrier(threads)
    unreadable: list[str] = []

    def writer(mine: list[str]) -> None:
        start.wait()
        for i, rid in enumerate(mine):
            log.write(record(rid, decided_at=T0 + dt.timedelta(seconds=i)))
            if i % 10 == 0 and log.get(rid) is None:  # logged before answered
                unreadable.append(rid)

    workers = [_in_thread(writer, mine) for mine in ids]
    for thread, outcome in workers:
        thread.join(120)
        assert outcome == [None]
    total = threads * each
    assert unreadable == []
    assert log.count() == total
    assert log.known(rid for mine in ids for rid in mine) == {r for mine in ids for r in mine}
    assert log.get(ids[7][42]) == record(ids[7][42], decided_at=T0 + dt.timedelta(seconds=42))
    assert commits[0] <= total // 5, f"{commits[0]} transactions for {total} decisions"


def test_concurrent_writers_are_group_committed(log: DecisionLog):
    _concurrent_writers(log)


def test_a_duplicate_fails_only_its_own_caller(log: DecisionLog):
    _duplicate_fails_only_its_caller(log)


def _duplicate_fails_only_its_caller(log: DecisionLog) -> None:
    """Callers queued into one group-commit batch; one of them repeats a logged request_id."""
    original = record("req_dup")
    log.write(original)
    gate = _Gate(log)
    first, first_outcome = _in_thread(log.write, record("req_first"))
    assert gate.entered.wait(10)  # the writer is inside a transaction: the rest queue up
    lists = {
        i: [record(f"req_{i}_a", endpoint="screen"), record(f"req_{i}_b", endpoint="screen")]
        for i in range(8)
    }
    lists[3][1] = record("req_dup", enterprise_id="other", endpoint="screen")
    callers = {i: _in_thread(log.commit, batch) for i, batch in lists.items()}
    _wait_until(lambda: len(log._queue) == len(lists))  # all in one group-commit batch
    gate.open()
    first.join(30)
    assert first_outcome == [None]
    for i, (thread, outcome) in callers.items():
        thread.join(30)
        if i == 3:
            assert isinstance(outcome[0], DecisionLogError)
            message = str(outcome[0])
            assert "batch of 2 decisions not written: request_id already logged" in message
            assert "append-only" in message
        else:
            assert outcome == [None], i
    assert log.get("req_3_a") is None  # the failing caller's list is all or nothing
    assert log.get("req_dup") == original
    expected = {f"req_{i}_{s}" for i in range(8) if i != 3 for s in "ab"}
    assert log.known([*expected, "req_3_a"]) == expected
    assert log.count() == 2 + len(expected)


def test_commit_returns_only_once_committed(log: DecisionLog):
    gate = _Gate(log)
    r = record("req_held")
    thread, outcome = _in_thread(log.commit, [r])
    assert gate.entered.wait(10)
    time.sleep(0.2)
    assert thread.is_alive() and outcome == []  # still waiting for its commit
    assert log.get("req_held") is None  # and nothing is visible before it
    gate.open()
    thread.join(10)
    assert outcome == [None]
    assert log.get("req_held") == r


def test_sqlite_is_in_wal_mode_with_durable_commits(log: DecisionLog):
    log.write(record())
    path = paths().home / "decisions" / "decisions.db"
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    with log._engine.connect() as conn:  # every connection the log opens
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_writer_thread_is_lazy_daemon_and_stopped_by_close(tmp_path):
    log = DecisionLog(f"sqlite:///{tmp_path / 'log.db'}")
    assert log._writer is None
    log.write(record("req_1"))
    thread = log._writer.thread
    assert thread.daemon and thread.is_alive()
    log.close()
    assert not thread.is_alive() and log._writer is None
    log.write(record("req_2"))  # a closed log still writes, with a new writer
    assert log.count() == 2
    log.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_writer_fails_its_callers_instead_of_hanging(log: DecisionLog, monkeypatch):
    def crash(batch: list) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(log, "_commit_batch", crash)
    started = time.monotonic()
    with pytest.raises(DecisionLogError, match=r"req_lost not written: .*writer stopped.*boom"):
        log.write(record("req_lost"))
    assert time.monotonic() - started < 5
    monkeypatch.undo()
    log.write(record("req_after"))  # the next write starts a new writer
    assert log.known(["req_lost", "req_after"]) == {"req_after"}


def test_a_caller_gives_up_after_timeout_and_is_not_written(tmp_path):
    with DecisionLog(f"sqlite:///{tmp_path / 'log.db'}", timeout=0.5) as log:
        gate = _Gate(log)
        first, first_outcome = _in_thread(log.write, record("req_first"))
        assert gate.entered.wait(10)
        with pytest.raises(DecisionLogError, match=r"req_late not written: .* within 0\.5s"):
            log.write(record("req_late"))  # still queued: taken out, never written
        first.join(10)  # in flight: told it is not confirmed (it may still be committed)
        assert re.search(r"req_first not confirmed within 0\.5s", str(first_outcome[0]))
        gate.open()
        log.write(record("req_next"))
        assert log.known(["req_first", "req_late", "req_next"]) == {"req_first", "req_next"}


def test_in_memory_database_is_shared_by_the_writer_thread():
    with DecisionLog("sqlite://") as log:
        r = record()
        log.write(r)
        assert log.get(r.request_id) == r and log.count() == 1


# -- compact storage -----------------------------------------------------------------------------


def realistic(request_id: str | None = None) -> DecisionRecord:
    """A /price decision as the API logs it: the response repeats the record."""
    r = record(request_id, endpoint="price")
    reasons = [
        {"code": f"R_F{i}", "feature": f"f{i}", "value": 1234.5 * i, "impact": 0.1 * i,
         "knockout": False, "text_en": f"Declared sales fell {i}0% year on year",
         "text_zh": f"近12个月申报销售额同比下降{i}0%"}
        for i in range(4)
    ]  # fmt: skip
    price = {"annual_rate": 0.1123456789, "fee_rate": None, "within_cap": True, "term_months": 12}
    features = {f"feature_number_{i:02d}": 1.0 / (i + 3) for i in range(60)}
    r = dataclasses.replace(r, features=features, reasons=reasons, price=price, limit_amount=None)
    body = {
        "request_id": r.request_id, "product": r.product, "model_name": r.model_name,
        "model_version": r.model_version, "features_as_of": "2025-02-28T00:00:00+00:00",
        "decided_at": r.decided_at.isoformat(), "pd": round(r.pd, 6), "score": round(r.score, 1),
        "grade": r.grade, "decision": r.decision, "policy_path": ["no knock-out", "grade B"],
        "reasons": reasons, "price": price,
    }  # fmt: skip
    return dataclasses.replace(r, response=body)


def _raw_row(column: str) -> str:
    db = paths().home / "decisions" / "decisions.db"
    with sa.create_engine(f"sqlite:///{db}").connect() as c:
        return c.execute(sa.text(f"SELECT {column} FROM decisions")).scalar_one()


def test_compact_storage_reads_back_exactly(log: DecisionLog):
    r = realistic()
    log.write(r)
    response, features = _raw_row("response"), _raw_row("features")
    assert "近12个月" not in response and "annual_rate" not in response  # not stored twice
    assert len(response.encode()) < 200
    assert ", " not in features and ": " not in features  # compact separators
    assert "近12个月" in _raw_row("reasons")  # UTF-8 as is, no \\u escapes
    got = log.get(r.request_id)
    assert got == r and got.response == r.response
    assert list(got.response) == sorted(r.response)
    assert log.recent() == [r] and log.between() == [r]
    frame = log.frame(columns=["request_id", "response"])
    assert json.loads(frame["response"][0]) == r.response
    got.response["reasons"].append("mutated")  # what is restored is a copy, not an alias
    assert got.reasons == r.reasons


@pytest.mark.parametrize(
    "change",
    [
        {"pd": 0.5, "score": 700.0, "reasons": [], "price": {"apr": 1}},  # differ: stored
        {"limit": 80_000, "requested_amount": "50000"},  # int vs float, text vs number
        {"limit": 80_000.0, "decided_at": T0.isoformat(), "grade": "B"},  # derivable
        {"@derived": ["pd"], "pd": 0.031},  # the marker key itself
        {"@derived": {"keys": [], "value": 1}},
    ],
)
def test_response_keys_are_left_out_only_when_derivable_exactly(log: DecisionLog, change):
    r = realistic()
    r = dataclasses.replace(r, limit_amount=80_000.0, response={**r.response, **change})
    log.write(r)
    assert log.get(r.request_id) == r
    assert json.loads(log.frame(columns=["response"])["response"][0]) == r.response


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"reasons": "copy"},  # an equal copy, not the record's own list: compared as text
        {"price": "copy", "limit": 80_000.0},
        {"price": "12.0"},  # equal in Python (12 == 12.0), not in JSON text: stored
        {"price": None},
        {"@derived": ["pd"]},
    ],
)
def test_response_written_with_shared_objects_equals_the_compared_one(change):
    """A response that holds the record's own reasons / price objects is compacted without
    encoding them twice; what is stored is exactly what comparing the texts stores."""
    from serving.decision_log import _compact_response, _to_row

    r = dataclasses.replace(realistic(), limit_amount=80_000.0)
    body = dict(r.response)
    for key, value in change.items():
        body[key] = json.loads(json.dumps(getattr(r, key))) if value == "copy" else value
        if value == "12.0":
            body[key] = {**r.price, "term_months": 12.0}
            assert body[key] == r.price
    r = dataclasses.replace(r, response=body)
    row = _to_row(r)
    assert row["response"] == _compact_response(row, r.response)  # no shortcut
    if not change:
        assert "reasons" in json.loads(row["response"])["@derived"]


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"pd": 0.031000001, "grade": "b", "score": 712},  # differ, or an int: stored
        {"pd": -0.0, "score": 0.0},  # -0.0 == 0.0, but not as JSON text
        {"model_version": 3, "decision": None},
    ],
)
def test_values_compared_without_encoding_give_the_texts_comparison(change, monkeypatch):
    """Strings and floats are compared as values to save encoding them; what is stored must be
    exactly what comparing their JSON texts stores."""
    from serving import decision_log as dl

    r = realistic()
    zero = dataclasses.replace(r, pd=0.0, score=-0.0)
    for rec in (r, zero):
        rec = dataclasses.replace(rec, response={**rec.response, **change})
        row = dl._to_row(rec)
        with monkeypatch.context() as m:
            m.setattr(dl, "_same_value", lambda key, row, value: None)
            assert row["response"] == dl._compact_response(row, rec.response)


def test_features_given_as_json_text_are_stored_and_read_as_the_dict(log: DecisionLog):
    from serving.decision_log import JSONText

    r = realistic()
    r.features["missing"] = None
    text = JSONText(json.dumps(r.features, sort_keys=True, separators=(",", ":")))
    log.write_many([dataclasses.replace(r, features=text)])
    assert _raw_row("features") == text
    assert log.get(r.request_id) == r


def test_non_dict_and_empty_responses_round_trip(log: DecisionLog):
    rows = [
        dataclasses.replace(record("req_list"), response=[1, "two"]),  # type: ignore[arg-type]
        dataclasses.replace(record("req_empty"), response={}),
    ]
    log.write_many(rows)
    assert [log.get(r.request_id) for r in rows] == rows


def test_rows_written_by_the_old_encoding_still_read(log: DecisionLog):
    """Rows of the earlier format (spaced JSON, whole response) read as they always did."""
    r = realistic("req_old")
    log.count()
    row = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    for name in ("request", "features", "feature_timestamps", "price", "reasons", "response"):
        row[name] = json.dumps(row[name], ensure_ascii=False, sort_keys=True)
    row["decided_at"] = r.decided_at.isoformat(timespec="microseconds")
    columns = ", ".join(row)
    db = paths().home / "decisions" / "decisions.db"
    with sa.create_engine(f"sqlite:///{db}").begin() as c:
        c.execute(sa.text(f"INSERT INTO decisions ({columns}) VALUES (:{', :'.join(row)})"), row)
    assert log.get("req_old") == r
    assert json.loads(log.frame(columns=["response"])["response"][0]) == r.response


@pytest.mark.postgres
def test_concurrent_writers_are_group_committed_on_postgres(pg_url: str):
    with DecisionLog(pg_url) as log:
        _concurrent_writers(log)


@pytest.mark.postgres
def test_a_duplicate_fails_only_its_own_caller_on_postgres(pg_url: str):
    with DecisionLog(pg_url) as log:
        _duplicate_fails_only_its_caller(log)
        r = realistic()
        log.write(r)
        assert log.get(r.request_id) == r  # compact storage reads back exactly here too


@pytest.mark.slow  # initdb and three starts or stops of a PostgreSQL server: 5-20 s
def test_a_stopped_postgresql_fails_writes_naming_its_store_and_the_log_recovers_by_itself():
    """PostgreSQL stops under an open log (pg_ctl stop -m immediate): writes, reads and ping
    raise DecisionLogError naming the store by host:port and database (never the password);
    once it is back the same DecisionLog writes again (its pool reconnects), and only the
    records whose write returned are in the log."""
    from tests.private_stores import PrivatePostgres

    pg = PrivatePostgres()
    try:
        pg.create()
        log = DecisionLog(pg.url)
        log.write(record("req_before"))
        log.ping()
        pg.stop()
        store = f"the decision log (PostgreSQL at 127.0.0.1:{pg.port}, database kapok)"
        with pytest.raises(DecisionLogError) as caught:
            log.write(record("req_down"))
        message = str(caught.value)
        assert message.startswith(f"{store} is unreachable: decision req_down not written ("), (
            message
        )
        assert "Connection refused" in message and pg.PASSWORD not in message, message
        with pytest.raises(DecisionLogError, match=re.escape(f"{store} is unreachable: batch")):
            log.write_many([record("req_down_1"), record("req_down_2")])
        with pytest.raises(DecisionLogError, match=re.escape(f"{store} is unreachable")):
            log.ping()
        with pytest.raises(DecisionLogError, match=re.escape(f"{store} is unreachable: get")):
            log.get("req_before")
        pg.start()
        log.ping()
        log.write(record("req_after"))
        assert log.known(["req_before", "req_down", "req_down_1", "req_after"]) == {
            "req_before",
            "req_after",
        }
        log.close()
    finally:
        pg.remove()


def test_a_full_disk_fails_writes_as_full_and_they_succeed_when_space_returns(tmp_path):
    """The filesystem of a SQLite log fills up (a tiny tmpfs filled with a ballast file): a write
    raises DecisionLogError saying the log is full and is not in the log; once the space is
    back the same DecisionLog writes again."""
    from tests.private_stores import fill, tiny_filesystem

    with tiny_filesystem(tmp_path / "tiny", "4m") as disk:
        log = DecisionLog(f"sqlite:///{disk / 'decisions.db'}")
        try:
            log.write(record("req_before"))
            ballast = fill(disk)
            big = {"padding": "x" * 20_000}  # more pages than any slack the WAL file had
            for n in range(3):
                with pytest.raises(DecisionLogError) as caught:
                    log.write(record(f"req_full_{n}", features=big))
                assert str(caught.value).startswith(
                    f"the decision log (SQLite at {disk / 'decisions.db'}) is full: "
                    f"decision req_full_{n} not written (database or disk is full)"
                ), caught.value
            ballast.unlink()
            log.write(record("req_after", features=big))
            assert log.known(["req_before", "req_full_0", "req_full_2", "req_after"]) == {
                "req_before",
                "req_after",
            }
            assert log.count() == 2
        finally:
            log.close()


@pytest.mark.postgres
def test_a_connection_lost_during_commit_is_reported_as_in_doubt(pg_url: str):
    """When the connection to PostgreSQL breaks during the COMMIT itself the writer cannot know
    whether the record was committed: the error says it may or may not be in the log (rather
    than "not written"), its batch is not retried record by record, and the log goes on."""
    import psycopg2

    log = DecisionLog(pg_url)
    log.write(record("req_first"))
    admin = psycopg2.connect(sa.make_url(pg_url).set(drivername="postgresql").render_as_string())
    admin.autocommit = True
    broken = []

    def break_connection(conn: sa.Connection) -> None:  # just before the DBAPI commit
        if not broken:
            broken.append(conn.connection.dbapi_connection.get_backend_pid())
            with admin.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (broken[0],))

    sa.event.listen(log._engine, "commit", break_connection)
    try:
        with pytest.raises(DecisionLogError) as caught:
            log.write_many([record("req_doubt_1"), record("req_doubt_2")])
        message = str(caught.value)
        assert "stopped answering while it committed: batch of 2 decisions" in message, message
        assert message.endswith("it may or may not be in the log"), message
        assert "not written" not in message
        log.write(record("req_next"))  # a new connection
        assert log.known(["req_first", "req_next"]) == {"req_first", "req_next"}
    finally:
        sa.event.remove(log._engine, "commit", break_connection)
        admin.close()
        log.close()


def _first_writes(url: str, workers: int) -> list[BaseException]:
    """`workers` logs on one URL, each writing its first record at the same moment."""
    logs = [DecisionLog(url) for _ in range(workers)]
    start = threading.Barrier(workers)
    errors: list[BaseException] = []

    def first_write(log: DecisionLog) -> None:
        start.wait()
        try:
            log.write(record())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=first_write, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if not errors:
            assert logs[0].count() == workers
    finally:
        for log in logs:
            log.close()
    return errors


def test_workers_starting_together_on_a_new_sqlite_log_all_write(tmp_path) -> None:
    """The API's workers each open the log and create its schema on first use. On a new SQLite
    file they race: SQLite refuses one side's schema transaction with "database is locked" at
    once (no busy wait, to avoid a deadlock), and that worker's first request answered 503. Every
    worker's first write must succeed and be logged."""
    for round_ in range(6):
        errors = _first_writes(f"sqlite:///{tmp_path / f'race{round_}' / 'decisions.db'}", 4)
        assert not errors, f"round {round_}: {errors[0]}"


# the endpoint CHECK of a log created before prospect offers and officers' overrides existed
_OLD_CHECK = "endpoint IN ('score', 'limit', 'price', 'screen')"


def _old_log(url: str) -> None:
    """A log as an earlier Kapok created it: the narrower endpoint CHECK, one chained record."""
    from serving import decision_log as dlog

    with DecisionLog(url) as old:
        old.write(record("req_before"))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            sql = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'decisions'"
            ).scalar_one()
            version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
            conn.exec_driver_sql("PRAGMA writable_schema = ON")
            conn.execute(
                sa.text("UPDATE sqlite_master SET sql = :s WHERE name = 'decisions'"),
                {"s": sql.replace(dlog._ENDPOINT_CHECK, _OLD_CHECK)},
            )
            conn.exec_driver_sql(f"PRAGMA schema_version = {version + 1}")
            conn.exec_driver_sql("PRAGMA writable_schema = OFF")
        else:
            conn.exec_driver_sql(
                "ALTER TABLE decisions DROP CONSTRAINT decisions_endpoint_check, "
                f"ADD CONSTRAINT decisions_endpoint_check CHECK ({_OLD_CHECK})"
            )
        conn.exec_driver_sql("DROP INDEX decisions_endpoint_idx")
    engine.dispose()
    with pytest.raises(Exception, match=r"(?i)check"):  # the old log refuses a prospect offer
        _raw_sql(
            url,
            "INSERT INTO decisions SELECT 'req_x', decided_at, caller, 'prospect', enterprise_id,"
            " product, request, model_name, model_version, features, feature_timestamps, pd,"
            " score, grade, decision, limit_amount, price, reasons, response, NULL, NULL, NULL"
            " FROM decisions",
        )


def _widened(url: str) -> None:
    from serving.audit import verify

    _old_log(url)
    offer = record("req_offer", endpoint="prospect", decided_at=T0 + dt.timedelta(seconds=1))
    override = record("req_override", endpoint="override", decided_at=T0 + dt.timedelta(seconds=2))
    with DecisionLog(url) as log:
        log.write_many([offer, override])
        assert log.get("req_offer") == offer and log.get("req_override") == override
        # monitoring reads applications only unless it asks for the other kinds
        assert [r.request_id for r in log.between()] == ["req_before"]
        assert log.frame(columns=["request_id"])["request_id"].to_list() == ["req_before"]
        everything = log.between(endpoints=None)
        assert [r.request_id for r in everything] == ["req_before", "req_offer", "req_override"]
        assert [r.request_id for r in log.between(endpoints=["prospect"])] == ["req_offer"]
        with pytest.raises(ValueError, match="unknown endpoint"):
            log.between(endpoints=["nonsense"])
        with pytest.raises(DecisionLogError):  # still append-only, still checked
            log.write(record("req_offer"))
    engine = sa.create_engine(url)
    names = (
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if engine.dialect.name == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'decisions'"
    )
    with engine.connect() as conn:
        indexes = set(conn.exec_driver_sql(names).scalars())
    engine.dispose()
    assert "decisions_endpoint_idx" in indexes
    assert verify(url).intact  # the widening rewrote no record: the chain still verifies


def test_an_older_sqlite_log_is_widened_to_offers_and_overrides(tmp_path):
    _widened(f"sqlite:///{tmp_path / 'old.db'}")


@pytest.mark.postgres
def test_an_older_postgres_log_is_widened_to_offers_and_overrides(pg_url: str):
    _widened(pg_url)


def test_the_book_holds_approved_applications_and_overrides_not_offers(tmp_path):
    from review.portfolio import from_decision_log

    url = f"sqlite:///{tmp_path / 'book.db'}"
    kinds = {"91110000MA00000001": "score", "91110000MA00000002": "prospect",
             "91110000MA00000003": "override"}  # fmt: skip
    with DecisionLog(url) as log:
        log.write_many([record(enterprise_id=e, endpoint=k) for e, k in kinds.items()])
    book = from_decision_log(url, "working_capital", T0 + dt.timedelta(days=1))
    assert sorted(book["enterprise_id"]) == ["91110000MA00000001", "91110000MA00000003"]

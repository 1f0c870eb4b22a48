"""The decision log: round trip, JSON-safe features, append-only, all-or-nothing batches."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid

import pytest
import sqlalchemy as sa

from kapok.settings import paths
from serving.decision_log import DecisionLog, DecisionLogError, DecisionRecord, new_request_id
from tests.conftest import require_service

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
def test_round_trip_and_append_only_on_postgres():
    require_service("127.0.0.1", 5432, "PostgreSQL")
    import psycopg2

    name = f"kapok_log_{uuid.uuid4().hex}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
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
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

"""Feast end to end: apply, materialize, and online reads of the latest snapshot — SQLite by
default, Redis selected by configuration alone."""

from __future__ import annotations

import uuid

import polars as pl
import pytest

from features import store as fs
from features.build import read_summary
from features.online import redis_generation_key
from features.schema import FAMILIES, features_of
from kapok.settings import Paths
from tests.conftest import require_service

pytestmark = pytest.mark.slow


def latest_snapshot(p: Paths, enterprise_id: str) -> dict:
    row: dict = {}
    for fam in FAMILIES:
        table = pl.read_parquet(p.features / fam.name / "*.parquet").filter(
            pl.col("enterprise_id") == enterprise_id
        )
        last = table.sort("event_timestamp").row(-1, named=True)
        row |= {f.name: last[f.name] for f in features_of(fam.name)}
    return row


def check_online_matches_latest(p: Paths, project: str, monkeypatch) -> None:
    monkeypatch.setenv("KAPOK_FEAST_PROJECT", project)
    store = fs.feature_store(p)
    fs.apply(store, p)
    start, end = fs.materialize_window(read_summary(p.features), full=False)
    fs.materialize(store, start, end)
    try:
        ids = pl.read_parquet(p.raw / "registration" / "*.parquet")["enterprise_id"]
        known = [ids[5], ids[1234], ids[2999]]
        rows = [
            {"enterprise_id": e, "requested_amount": 300_000.0, "term_months": 6} for e in known
        ]
        online = fs.online_features(store, rows, "guarantee").to_dicts()
        for eid, got in zip(known, online, strict=True):
            want = latest_snapshot(p, eid)
            for name, value in want.items():
                if value is None:
                    assert got[name] is None, name
                else:
                    assert got[name] == pytest.approx(value), (eid, name)
            sales = want["tax_sales_12m"]
            expected_ratio = 300_000.0 / sales if sales else None
            assert got["req_loan_to_sales_12m"] == pytest.approx(expected_ratio)
            assert got["req_term_months"] == 6
        unknown = fs.online_features(
            store, [{"enterprise_id": "91440106000000000X", "requested_amount": 1.0, "term_months": 12}],  # noqa: E501
            "microloan",
        ).to_dicts()[0]  # fmt: skip
        assert unknown["tax_sales_12m"] is None
    finally:
        if project != "kapok":
            store.teardown()
            if fs.repo_config_dict(p)["online_store"]["type"] == "redis":  # materialize's marker
                import redis

                redis.Redis(host="127.0.0.1", port=6379).delete(redis_generation_key(project))


def test_sqlite_online_store(small_system, monkeypatch, tmp_path):
    p = Paths(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "features").symlink_to(small_system.paths.features)
    (tmp_path / "data" / "raw").symlink_to(small_system.paths.raw)
    check_online_matches_latest(p, "kapok", monkeypatch)
    assert (p.feast_data / "online_store.db").stat().st_size > 100_000


@pytest.mark.redis
def test_redis_online_store_by_configuration_only(small_system, monkeypatch, tmp_path):
    require_service("127.0.0.1", 6379, "Redis")
    monkeypatch.setenv("KAPOK_ONLINE_STORE", "redis://127.0.0.1:6379/0")
    p = Paths(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "features").symlink_to(small_system.paths.features)
    (tmp_path / "data" / "raw").symlink_to(small_system.paths.raw)
    assert fs.repo_config_dict(p)["online_store"]["type"] == "redis"
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    before = client.dbsize()
    check_online_matches_latest(p, f"kapok_test_{uuid.uuid4().hex[:8]}", monkeypatch)
    assert not (p.feast_data / "online_store.db").exists()  # nothing went to SQLite
    assert client.dbsize() <= before + 5  # teardown removed what the test wrote


def test_bad_online_store_url_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KAPOK_ONLINE_STORE", "memcached://localhost")
    with pytest.raises(fs.OnlineStoreConfigError, match="KAPOK_ONLINE_STORE"):
        fs.repo_config_dict(Paths(tmp_path))

"""features.online.OnlineFeatures reads exactly what Feast's get_online_features returns — from
SQLite and from Redis — and its cache never serves features older than the online store's."""

from __future__ import annotations

import math
import random
import time
import uuid
from datetime import timedelta
from typing import Any

import polars as pl
import pytest

from features import store as fs
from features.build import read_summary
from features.online import (
    OnlineFeatures,
    generation_file,
    materialization,
    online_schema,
    redis_generation_key,
    ts_column,
)
from features.schema import FAMILIES, FEATURES, features_of
from kapok.settings import Paths
from tests.conftest import System, linked_home, require_service

pytestmark = pytest.mark.slow

REDIS_URL = "redis://127.0.0.1:6379/0"
REFS = [f"{f.family}:{f.name}" for f in FEATURES]


def known_ids(p: Paths) -> list[str]:
    return sorted(pl.read_parquet(p.raw / "registration" / "*.parquet")["enterprise_id"].unique())


def request_ids(p: Paths, n: int = 300, seed: int = 5) -> list[str]:
    """Known ids (some not in the online store: closed before the window), unknown ids, a
    non-ASCII one, and duplicates, shuffled."""
    rng = random.Random(seed)
    ids = rng.sample(known_ids(p), n)
    ids += [f"91440000UNKNOWN{i:03d}" for i in range(12)] + ["不存在的企业"]
    ids += rng.sample(ids, 40)
    rng.shuffle(ids)
    return ids


def feast_reference(store, ids: list[str]) -> dict[str, list[Any]]:
    rows = [{"enterprise_id": e} for e in ids]
    return store.get_online_features(features=REFS, entity_rows=rows).to_dict(
        include_event_timestamps=True
    )


def same(got: Any, want: Any) -> bool:
    if got is None or want is None:
        return got is None and want is None
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return got == want and isinstance(got, str) == isinstance(want, str)


def assert_same_as_feast(rows: pl.DataFrame, ref: dict[str, list[Any]], ids: list[str]) -> None:
    assert rows.schema == online_schema()
    assert rows["enterprise_id"].to_list() == ids
    for f in FEATURES:
        got, want = rows[f.name].to_list(), ref[f.name]
        assert len(got) == len(want) == len(ids)
        diffs = [
            (ids[i], g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if not same(g, w)
        ]
        assert not diffs, (f.name, diffs[:5])
    for fam in FAMILIES:
        # to_dict gives whole seconds, 0 where the view has no row for the entity
        got = [0 if d is None else int(d.timestamp()) for d in rows[ts_column(fam.name)]]
        for f in features_of(fam.name):
            assert got == ref[f.name + "__ts"], (fam.name, f.name)
    found = [any(ref[f.name][i] is not None for f in FEATURES) for i in range(len(ids))]
    assert rows["found"].to_list() == found


def materialize_latest(store, p: Paths) -> tuple:
    start, end = fs.materialize_window(read_summary(p.features), full=False)
    fs.materialize(store, start, end)
    return start, end


def check_reads_match_feast(p: Paths, store) -> None:
    ids = request_ids(p)
    ref = feast_reference(store, ids)
    cold = OnlineFeatures(p, store, cache=False)
    rows = cold.read(ids)
    assert_same_as_feast(rows, ref, ids)
    found = rows.filter("found")["enterprise_id"].n_unique()
    assert 200 < found < rows["enterprise_id"].n_unique()  # both kinds are exercised
    assert rows.filter(~pl.col("found"))["enterprise_id"].str.contains("UNKNOWN").any()

    # the cache, built from the repo config dict this time: cold, warm and mixed reads agree
    cached = OnlineFeatures(p, fs.repo_config_dict(p))
    assert cached.read(ids).equals(rows)
    assert cached.read(ids).equals(rows)
    assert cached.cache_info()["hits"] >= len(set(ids))
    more = request_ids(p, n=50, seed=9) + ids[:20]
    assert_same_as_feast(cached.read(more), feast_reference(store, more), more)
    one = ids[:1]
    assert_same_as_feast(cached.read(one), feast_reference(store, one), one)
    assert cold.read([]).schema == online_schema() and cold.read([]).height == 0


def test_sqlite_reads_match_feast(small_system: System, tmp_path):
    p = linked_home(tmp_path, small_system)
    store = fs.feature_store(p)
    materialize_latest(store, p)
    check_reads_match_feast(p, store)
    assert generation_file(store).exists()


def redis_cleanup(store, project: str) -> None:
    import redis

    store.teardown()
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    client.delete(redis_generation_key(project))
    assert not list(client.scan_iter(b"*" + project.encode()))


@pytest.mark.redis
def test_redis_reads_match_feast(small_system: System, tmp_path, monkeypatch):
    require_service("127.0.0.1", 6379, "Redis")
    project = f"kapok_test_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("KAPOK_ONLINE_STORE", REDIS_URL)
    monkeypatch.setenv("KAPOK_FEAST_PROJECT", project)
    p = linked_home(tmp_path, small_system)
    store = fs.feature_store(p)
    try:
        materialize_latest(store, p)
        import redis

        state = redis.Redis(host="127.0.0.1", port=6379).get(redis_generation_key(project))
        assert state and b'"running": false' in state
        check_reads_match_feast(p, store)
    finally:
        redis_cleanup(store, project)


def home_with_own_tax(tmp_path, small_system: System) -> Paths:
    """Like linked_home, but the tax feature folder is the test's own (files linked), so a test
    can add a snapshot to it."""
    p = Paths(tmp_path)
    p.features.mkdir(parents=True)
    (p.data / "raw").symlink_to(small_system.paths.raw)
    for entry in small_system.paths.features.iterdir():
        if entry.name == "tax":
            (p.features / "tax").mkdir()
            for part in entry.iterdir():
                (p.features / "tax" / part.name).symlink_to(part)
        else:
            (p.features / entry.name).symlink_to(entry)
    return p


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_cache_never_serves_older_features(backend, small_system: System, tmp_path, monkeypatch):
    project = "kapok"
    if backend == "redis":
        require_service("127.0.0.1", 6379, "Redis")
        project = f"kapok_test_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv("KAPOK_ONLINE_STORE", REDIS_URL)
        monkeypatch.setenv("KAPOK_FEAST_PROJECT", project)
    p = home_with_own_tax(tmp_path, small_system)
    store = fs.feature_store(p)
    fs.apply(store, p)
    try:
        start, end = materialize_latest(store, p)
        reader = OnlineFeatures(p, store)
        tax = pl.read_parquet(p.features / "tax" / "*.parquet")
        latest = tax.filter(pl.col("event_timestamp") == tax["event_timestamp"].max())
        eid, other = latest.filter(pl.col("tax_sales_12m") > 0)["enterprise_id"].head(2)
        before = reader.read([eid]).row(0, named=True)
        assert reader.read([eid]).row(0, named=True) == before
        assert reader.cache_info()["hits"] == 1

        # a newer tax snapshot for eid, loaded by Kapok's materialize
        row = latest.filter(pl.col("enterprise_id") == eid)
        newer = row.with_columns(
            pl.col("event_timestamp") + timedelta(days=1),
            pl.col("tax_sales_12m") + 12_345.0,
        )
        assert newer["event_timestamp"][0] < end.astimezone(newer["event_timestamp"][0].tzinfo)
        newer.write_parquet(p.features / "tax" / "part-9999.parquet")
        fs.materialize(store, start, end)
        after = reader.read([eid]).row(0, named=True)
        assert after["tax_sales_12m"] == before["tax_sales_12m"] + 12_345.0
        assert after[ts_column("tax")] == before[ts_column("tax")] + timedelta(days=1)
        assert after["reg_firm_age_months"] == before["reg_firm_age_months"]
        ids = [eid, other, eid]
        assert_same_as_feast(reader.read(ids), feast_reference(store, ids), ids)

        # while a load runs, nothing is served from or kept in the cache
        with materialization(store):
            assert reader.read([eid, other]).equals(reader.read([eid, other]))
            assert reader.cache_info()["size"] == 0
        reader.read([eid])
        assert reader.cache_info()["size"] == 1

        if backend == "sqlite":
            # a write that bypasses Kapok (Feast's own push) changes the database file: seen too
            time.sleep(0.05)  # the file's mtime moves in kernel clock ticks
            pushed = newer.with_columns(
                pl.col("event_timestamp") + timedelta(days=1), pl.col("tax_sales_12m") + 1.0
            )
            store.write_to_online_store("tax", pushed.to_pandas())
            got = reader.read([eid]).row(0, named=True)
            assert got["tax_sales_12m"] == before["tax_sales_12m"] + 12_346.0
            assert_same_as_feast(reader.read(ids), feast_reference(store, ids), ids)
    finally:
        if backend == "redis":
            redis_cleanup(store, project)

"""KAPOK_ENGINE and KAPOK_FEAST_REGISTRY: one switch each, rendered into the Feast configuration
Feast itself accepts, and a one-line error for anything else (issue 15, item 1)."""

from __future__ import annotations

import pytest
import yaml
from feast.repo_config import RepoConfig

from features import store as fs
from kapok import engine as eng
from kapok.settings import Paths


@pytest.mark.parametrize(
    ("value", "kind", "address"),
    [
        ("", "local", None),
        ("local", "local", None),
        ("ray", "ray", None),
        ("RAY", "ray", None),
        ("auto", "ray", "auto"),
        ("ray://10.0.0.5:10001", "ray", "ray://10.0.0.5:10001"),
    ],
)
def test_engine_values(value, kind, address):
    e = eng.parse_engine(value)
    assert (e.kind, e.address) == (kind, address)


@pytest.mark.parametrize("value", ["spark", "ray://", "ray://host", "ray://host:port", "dask"])
def test_unknown_engine_is_one_clear_line(value):
    with pytest.raises(eng.EngineConfigError, match="KAPOK_ENGINE must be") as info:
        eng.parse_engine(value)
    assert "\n" not in str(info.value)


def test_local_ray_is_limited(monkeypatch):
    """A Ray started by Kapok never takes the whole machine: its cores and object store are the
    configured ones (Ray's own default is every core and 30% of memory)."""
    monkeypatch.setenv("KAPOK_ENGINE", "ray")
    monkeypatch.setenv("KAPOK_RAY_CPUS", "2")
    monkeypatch.setenv("KAPOK_RAY_MEMORY", "500_000_000")
    assert eng.ray_conf() == {"num_cpus": 2, "object_store_memory": 500_000_000}
    monkeypatch.setenv("KAPOK_RAY_CPUS", "0")
    with pytest.raises(eng.EngineConfigError, match="KAPOK_RAY_CPUS"):
        eng.ray_conf()
    monkeypatch.setenv("KAPOK_ENGINE", "ray://head:10001")
    monkeypatch.setenv("KAPOK_RAY_CPUS", "2")
    assert eng.ray_conf() == {"address": "ray://head:10001"}  # a cluster's size is its own


def _config(tmp_path, monkeypatch, **env: str) -> tuple[dict, RepoConfig]:
    for name in ("KAPOK_ENGINE", "KAPOK_FEAST_REGISTRY", "KAPOK_ONLINE_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    raw = fs.repo_config_dict(Paths(tmp_path))
    return raw, RepoConfig(**raw)


def test_local_engine_is_the_file_offline_store(tmp_path, monkeypatch):
    raw, config = _config(tmp_path, monkeypatch)
    assert raw["offline_store"] == {"type": "file"}
    assert "batch_engine" not in raw
    assert config.registry.path == str(tmp_path / "feature_repo" / "data" / "registry.db")


def test_ray_engine_renders_feasts_ray_store_and_engine(tmp_path, monkeypatch):
    """What Feast parses from the rendered config is its Ray offline store and Ray compute
    engine, limited like Kapok's own Ray, with the registry on PostgreSQL when asked."""
    raw, config = _config(
        tmp_path,
        monkeypatch,
        KAPOK_ENGINE="ray",
        KAPOK_RAY_CPUS="2",
        KAPOK_FEAST_REGISTRY="postgresql://postgres@127.0.0.1:5432/test",
        KAPOK_ONLINE_STORE="redis://127.0.0.1:6379/3",
    )
    assert type(config.offline_store).__name__ == "RayOfflineStoreConfig"
    assert type(config.batch_engine).__name__ == "RayComputeEngineConfig"
    assert config.offline_store.ray_conf["num_cpus"] == 2
    assert config.batch_engine.ray_conf["num_cpus"] == 2
    assert config.registry.registry_type == "sql"
    assert config.registry.path == "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
    assert config.online_store.connection_string == "127.0.0.1:6379,db=3"
    # the YAML a user reads has no anchors or aliases (each section is written out)
    text = yaml.safe_dump(raw, sort_keys=False)
    assert "&id" not in text and "*id" not in text


def test_ray_cluster_address_reaches_feast(tmp_path, monkeypatch):
    _, config = _config(tmp_path, monkeypatch, KAPOK_ENGINE="ray://10.0.0.5:10001")
    assert config.offline_store.ray_address == "ray://10.0.0.5:10001"
    assert config.batch_engine.ray_address == "ray://10.0.0.5:10001"
    assert config.offline_store.ray_conf is None


@pytest.mark.parametrize("value", ["mysql://root@localhost/feast", "registry.db", "postgresql://"])
def test_bad_registry_is_a_clear_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("KAPOK_FEAST_REGISTRY", value)
    with pytest.raises(fs.OnlineStoreConfigError, match="KAPOK_FEAST_REGISTRY"):
        fs.repo_config_dict(Paths(tmp_path))

"""`kapok features build` with KAPOK_ENGINE=ray (Ray Data tasks) gives the same feature tables as
the local build, and a failing shard leaves the previous tables in place.

Slow: starts a local Ray limited to 2 cores (about 20-40 s for the module on 2 cores).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import kapok.bigdata.generate as bigdata
from features.build import MANIFEST, build
from features.build_ray import ShardBuildError
from features.raw_tables import chunk_name
from features.schema import FAMILIES
from kapok.bigdata.simulate import SimulationConfig
from kapok.cli import app
from kapok.engine import ray_shutdown
from kapok.settings import paths

CHUNK = 700  # enterprises per shard: 2,000 enterprises make 3 shards, the last a short one
REGION = SimulationConfig(enterprises=2_000, months=24, seed=5)
KEYS = ["enterprise_id", "event_timestamp"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A region written in several chunks, so the Ray build runs several shards."""
    out = tmp_path_factory.mktemp("region") / "raw"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bigdata, "CHUNK_SIZE", CHUNK)
        manifest = bigdata.generate(REGION, out)
    assert manifest["chunks"] == 3
    return out


@pytest.fixture(scope="module")
def local_features(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "features"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAPOK_ENGINE", "local")
        build(raw, out)
    return out


@pytest.fixture(scope="module")
def on_ray() -> Iterator[None]:
    """KAPOK_ENGINE=ray for the module's tests; one local Ray (2 cores) serves them all."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAPOK_ENGINE", "ray")
        mp.setenv("KAPOK_RAY_CPUS", "2")
        mp.setenv("KAPOK_RAY_MEMORY", str(200 * 1024 * 1024))
        try:
            yield
        finally:
            ray_shutdown()


def family(features: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(features / name / "*.parquet").sort(KEYS)


def test_ray_build_equals_local_build(raw: Path, local_features: Path, on_ray: None, tmp_path):
    out = tmp_path / "features"
    seen: list[str] = []
    summary = build(raw, out, progress=seen.append)

    for fam in FAMILIES:
        # same part files (one per shard, named after its raw chunk), in the same folders
        names = sorted(p.name for p in (out / fam.name).iterdir())
        assert names == sorted(p.name for p in (local_features / fam.name).iterdir())
        assert names == [chunk_name(c) for c in range(3)]
        # same rows, values and dtypes, part by part (a part is one shard's enterprises)
        for part in names:
            assert_frame_equal(
                pl.read_parquet(out / fam.name / part),
                pl.read_parquet(local_features / fam.name / part),
            )
        ray_rows = family(out, fam.name)
        assert ray_rows.height > 0
        assert_frame_equal(ray_rows, family(local_features, fam.name))

    ray_manifest = json.loads((out / MANIFEST).read_text())
    local_manifest = json.loads((local_features / MANIFEST).read_text())
    assert ray_manifest == summary
    # it did run on Ray, and nothing but the engine differs
    assert (ray_manifest.pop("engine"), local_manifest.pop("engine")) == (
        "ray (local mode on this machine)",
        "local",
    )
    assert ray_manifest == local_manifest
    # the progress bar advances once per family per shard, as with the local engine
    assert sorted(seen) == sorted([f.name for f in FAMILIES] * 3)


def test_failing_shard_keeps_previous_tables(
    raw: Path, local_features: Path, on_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("KAPOK_HOME", str(tmp_path))
    p = paths()
    shutil.copytree(raw, p.raw)
    (p.raw / "registration" / chunk_name(1)).write_bytes(b"not parquet")
    shutil.copytree(local_features, p.features)
    before = {
        f.relative_to(p.features): f.read_bytes() for f in p.features.rglob("*") if f.is_file()
    }

    with pytest.raises(ShardBuildError, match=r"shard 1 \(part-0001\.parquet") as failure:
        build(p.raw, p.features)
    assert "registration" in str(failure.value)  # the cause: which table could not be read
    # the CLI says so in one line, without a traceback
    result = CliRunner().invoke(app, ["features", "build"])
    assert result.exit_code == 2, result.output
    assert "error: feature build failed on shard 1 (part-0001.parquet" in result.output
    assert "Traceback" not in result.output

    after = {
        f.relative_to(p.features): f.read_bytes() for f in p.features.rglob("*") if f.is_file()
    }
    assert after == before
    assert not p.features.with_name("features.partial").exists()

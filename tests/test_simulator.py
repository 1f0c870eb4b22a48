"""The simulated big-data system: deterministic, honest about time, realistic in its rates."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kapok import uscc
from kapok.bigdata import generate as gen
from kapok.bigdata.generate import MONTHLY_TABLES, TABLES, generate, scan
from kapok.bigdata.simulate import SimulationConfig


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_same_arguments_give_byte_identical_output(tmp_path):
    config = SimulationConfig(enterprises=1_500, months=24, seed=5)
    generate(config, tmp_path / "a")
    generate(config, tmp_path / "b")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(a) > 100
    assert a == b
    generate(SimulationConfig(enterprises=1_500, months=24, seed=6), tmp_path / "c")
    assert _digest(tmp_path / "c") != a


# sha256 of {file: sha256} over every file of the tables that existed before credit_aggregates,
# for SimulationConfig(600, 24, seed=11), as the generator wrote them before that table was added
# (with the polars of requirements.lock; a polars upgrade that changes Parquet bytes changes it)
BEFORE_AGGREGATES = "c9cb9501293e55835e28d863fa0d5573e4fd4ac10f04d0d70c74d3b59dd10be6"


def test_adding_the_credit_aggregates_moved_no_byte_of_the_other_tables(tmp_path):
    """The aggregates are counted from what was simulated, drawing no random number: every
    other table, and so every model trained on them, is exactly what it was before."""
    generate(SimulationConfig(enterprises=600, months=24, seed=11), tmp_path / "raw")
    files = _digest(tmp_path / "raw")
    others = {
        path: digest
        for path, digest in files.items()
        if path.split("/")[0] not in ("credit_aggregates", gen.MANIFEST)
    }
    assert len(others) > 80
    combined = hashlib.sha256(json.dumps(others, sort_keys=True).encode()).hexdigest()
    assert combined == BEFORE_AGGREGATES


def test_credit_aggregates_are_the_credit_reports_counted_and_published_late(tmp_path, monkeypatch):
    """City, district and industry rows count the same credit reports (over every chunk), the
    rates are those of the reports, and a month is published on the 25th of the next one."""
    monkeypatch.setattr(gen, "CHUNK_SIZE", 400)
    raw = tmp_path / "raw"
    generate(SimulationConfig(enterprises=1_100, months=24, seed=5), raw)
    agg = scan(raw, "credit_aggregates").collect()
    credit = scan(raw, "credit_history").collect()
    city = agg.filter(pl.col("dimension") == "city").sort("month")
    assert city["segment"].unique().to_list() == ["all"]
    expected = (
        credit.group_by("month")
        .agg(n=pl.len(), dpd30=pl.col("dpd30").sum(), dpd90=pl.col("dpd90").sum())
        .sort("month")
    )
    assert city["month"].to_list() == expected["month"].to_list()
    assert city["reports"].to_list() == expected["n"].to_list()
    assert city["dpd30_reports"].to_list() == expected["dpd30"].to_list()
    assert city["dpd90_reports"].to_list() == expected["dpd90"].to_list()
    assert (city["dpd30_rate"] - city["dpd30_reports"] / city["reports"]).abs().max() < 1e-12
    for dimension, column in (("district", "district"), ("industry", "industry")):
        part = agg.filter(pl.col("dimension") == dimension)
        totals = part.group_by("month").agg(pl.col("reports").sum()).sort("month")
        assert totals["reports"].to_list() == city["reports"].to_list(), dimension
        values = set(scan(raw, "registration").collect()[column].unique().to_list())
        assert set(part["segment"].unique().to_list()) <= values, dimension
    published = agg["available_at"].dt.date()
    assert (published == agg["month"].dt.offset_by("1mo").dt.offset_by("24d")).all()
    assert gen.read_manifest(raw)["rows"]["credit_aggregates"] == agg.height


def test_the_downturn_shows_in_the_published_aggregates(medium):
    """What a lender can read from the aggregates: arrears in the city climb in the downturn,
    most in the industries most exposed to the city's cycle."""
    downturn = gen.read_manifest(medium)["downturn_month"]
    agg = scan(medium, "credit_aggregates").collect()
    t = (pl.col("month").dt.year() - 2023) * 12 + pl.col("month").dt.month() - 1
    agg = agg.with_columns(t=t)

    def rate(frame: pl.DataFrame, lo: int, hi: int) -> float:
        window = frame.filter(pl.col("t").is_between(lo, hi))
        return window["dpd30_reports"].sum() / window["reports"].sum()

    city = agg.filter(pl.col("dimension") == "city")
    before, during = rate(city, downturn - 12, downturn - 7), rate(city, downturn + 1, downturn + 6)
    assert during > 1.5 * before
    industry = agg.filter(pl.col("dimension") == "industry")
    rise = {
        code: rate(industry.filter(pl.col("segment") == code), downturn + 1, downturn + 6)
        / rate(industry.filter(pl.col("segment") == code), downturn - 12, downturn - 7)
        for code in ("H", "M")  # accommodation: macro beta 1.1; research: 0.3
    }
    assert rise["H"] > rise["M"]


def test_several_chunks_give_byte_identical_output(tmp_path, monkeypatch):
    """Generation works chunk by chunk (20,000 enterprises each): with chunks of 400, 1,100
    enterprises are 3 chunks, and two runs still write the same bytes, chunk by chunk."""
    monkeypatch.setattr(gen, "CHUNK_SIZE", 400)
    config = SimulationConfig(enterprises=1_100, months=24, seed=5)
    generate(config, tmp_path / "a")
    generate(config, tmp_path / "b")
    manifest = gen.read_manifest(tmp_path / "a")
    assert (manifest["chunks"], manifest["chunk_size"]) == (3, 400)
    parts = sorted(p.name for p in (tmp_path / "a" / "registration").iterdir())
    assert parts == ["part-0000.parquet", "part-0001.parquet", "part-0002.parquet"]
    sizes = [scan(tmp_path / "a", "registration", c).select(pl.len()).collect().item()
             for c in range(3)]  # fmt: skip
    assert sizes == [400, 400, 300]
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(a) > 100 and a == b


def test_every_table_is_written_with_valid_enterprise_ids(small_system):
    raw = small_system.paths.raw
    for table in TABLES:
        assert scan(raw, table).select(pl.len()).collect().item() > 0, table
    ids = scan(raw, "registration").select("enterprise_id").collect().to_series()
    assert ids.n_unique() == small_system.config.enterprises
    assert all(uscc.is_valid(code) for code in ids.to_list())


def test_rows_become_available_only_after_their_month(small_system):
    raw = small_system.paths.raw
    for table in MONTHLY_TABLES:
        frame = scan(raw, table).select("month", "available_at").collect()
        month_end = frame["month"].dt.offset_by("1mo")
        assert (frame["available_at"].dt.date() >= month_end).all(), table
    events = scan(raw, "judicial_events").collect()
    assert (events["available_at"].dt.date() > events["event_date"]).all()


def test_outcomes_are_null_until_matured_and_oracle_is_apart(small_system):
    raw = small_system.paths.raw
    apps = scan(raw, "applications").collect()
    assert "pd_true" not in apps.columns
    assert (
        apps.filter(~pl.col("matured"))["outcome"].null_count()
        == apps.filter(~pl.col("matured")).height
    )
    assert apps.filter(pl.col("matured"))["outcome"].null_count() == 0
    end = pl.date(2026, 1, 1)  # the month after the last simulated month (2023-01 + 36)
    assert (
        apps.filter(pl.col("matured"))
        .select((pl.col("outcome_known_at").dt.date() <= end).all())
        .item()
    )
    oracle = scan(raw, "oracle").collect()
    assert oracle.height == apps.height
    assert oracle["pd_true"].is_between(0, 1).all()


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """15,000 enterprises: enough applications for stable rates (generation takes ~2 s)."""
    out = tmp_path_factory.mktemp("medium") / "raw"
    generate(SimulationConfig(enterprises=15_000, months=36, seed=21), out)
    return out


def _matured(raw: Path) -> pl.DataFrame:
    apps = scan(raw, "applications").collect().filter(pl.col("matured"))
    return apps.join(scan(raw, "oracle").collect().drop("product"), on="application_id")


def test_default_rates_are_in_a_realistic_range(medium):
    rates = _matured(medium).group_by("product").agg(pl.col("outcome").mean())
    for product, rate in rates.iter_rows():
        assert 0.03 <= rate <= 0.13, (product, rate)


def test_rates_vary_by_industry(medium):
    apps = _matured(medium).filter(pl.col("product") == "microloan")
    reg = scan(medium, "registration").select("enterprise_id", "industry").collect()
    by_industry = (
        apps.join(reg, on="enterprise_id").group_by("industry").agg(pl.col("pd_true").mean())
    )
    assert by_industry["pd_true"].max() > 1.3 * by_industry["pd_true"].min()


def test_downturn_raises_risk_and_shows_in_observables(medium):
    manifest = gen.read_manifest(medium)
    downturn = manifest["downturn_month"]
    apps = _matured(medium).filter(pl.col("product") == "microloan")
    t = (pl.col("applied_at").dt.year() - 2023) * 12 + pl.col("applied_at").dt.month() - 1
    apps = apps.with_columns(t=t)
    early = apps.filter(pl.col("t") < downturn - 12)  # windows end before the downturn
    hit = apps.filter(pl.col("t").is_between(downturn - 6, downturn))  # windows cover it
    assert hit["pd_true"].mean() > 1.25 * early["pd_true"].mean()
    assert hit["outcome"].mean() > early["outcome"].mean()
    # firms report more 30+ days past due during the downturn than a year before it
    credit = scan(medium, "credit_history").collect()
    credit = credit.with_columns(
        t=(pl.col("month").dt.year() - 2023) * 12 + pl.col("month").dt.month() - 1
    )
    before = credit.filter(pl.col("t").is_between(downturn - 12, downturn - 7))["dpd30"].mean()
    during = credit.filter(pl.col("t").is_between(downturn + 1, downturn + 6))["dpd30"].mean()
    assert during > 1.3 * before


def test_missingness_is_realistic(small_system):
    raw = small_system.paths.raw
    n = small_system.config.enterprises
    metered = scan(raw, "electricity").select(pl.col("enterprise_id").n_unique()).collect().item()
    assert 0.3 * n < metered < 0.85 * n  # service firms often have no meter of their own
    reg = scan(raw, "registration").collect()
    young = reg.filter(pl.col("founded_on") >= pl.date(2023, 1, 1))
    assert 0.08 * n < young.height < 0.25 * n
    tax_months = scan(raw, "tax").group_by("enterprise_id").agg(pl.len()).collect()
    months = reg.join(tax_months, on="enterprise_id")
    assert months.filter(pl.col("founded_on") >= pl.date(2024, 6, 1))["len"].max() < 20
    late = scan(raw, "tax").select(pl.col("filed_late").mean()).collect().item()
    assert 0.01 < late < 0.15


def test_failed_generation_leaves_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    generate(SimulationConfig(enterprises=500, months=24, seed=1), out)
    before = _digest(out)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gen, "simulate_chunk", broken)
    with pytest.raises(RuntimeError):
        generate(SimulationConfig(enterprises=800, months=24, seed=2), out)
    assert _digest(out) == before
    assert not (tmp_path / "raw.partial").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"enterprises": 0}, "--enterprises"), ({"months": 6}, "--months")],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    config = SimulationConfig(**{"enterprises": 100, "months": 24, "seed": 1, **kwargs})
    with pytest.raises(ValueError, match=message):
        generate(config, tmp_path / "raw")


def test_health_drives_observables(medium):
    """Firms that later default look worse beforehand: the features have something to find."""
    apps = _matured(medium).filter(pl.col("product") == "microloan")
    dpd = (
        scan(medium, "credit_history")
        .group_by("enterprise_id")
        .agg(pl.col("dpd30").mean().alias("dpd_rate"))
        .collect()
    )
    joined = apps.join(dpd, on="enterprise_id")
    bad = joined.filter(pl.col("outcome") == 1)["dpd_rate"].mean()
    good = joined.filter(pl.col("outcome") == 0)["dpd_rate"].mean()
    assert np.isfinite(bad) and bad > 1.5 * good

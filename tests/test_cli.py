"""The `kapok` command: the main job end to end, helpful help, clear errors without tracebacks."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kapok.cli import app
from kapok.settings import paths

runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("run", "data", "features", "KAPOK_HOME"):
        assert word in result.output
    assert "train" in result.output and "promote" in result.output
    groups = {
        "data": ("generate", "check-spec"),
        "features": ("build", "apply", "materialize", "online"),
    }
    for group, commands in groups.items():
        out = runner.invoke(app, [group, "--help"]).output
        assert all(c in out for c in commands), group


@pytest.mark.slow
def test_main_job_runs_end_to_end_in_kapok_home():
    result = runner.invoke(app, ["run", "--enterprises", "2500", "--months", "36", "--trials", "2"])
    assert result.exit_code == 0, result.output
    p = paths()
    assert (p.raw / "_manifest.json").exists()
    assert (p.features / "_manifest.json").exists()
    assert (p.feast_data / "registry.db").exists()
    assert (p.feast_data / "online_store.db").exists()
    assert (p.feature_repo / "feature_store.yaml").read_text().count(str(p.home)) >= 2
    output = " ".join(result.output.split())
    for product in ("microloan", "guarantee", "insurance"):
        assert f"kapok-{product} v1 -> @champion" in output
    assert "mlflow ui --backend-store-uri sqlite:///" in output
    import polars as pl

    eid = pl.read_parquet(p.raw / "registration" / "*.parquet")["enterprise_id"][0]
    shown = runner.invoke(app, ["features", "online", eid, "--product", "insurance"])
    assert shown.exit_code == 0, shown.output
    assert "tax_sales_12m" in shown.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "generate", "--enterprises", "0"], "--enterprises must be at least 1"),
        (["data", "generate", "--start", "2023-13"], "--start must be a month"),
        (["features", "build"], "kapok data generate"),
        (["features", "apply"], "kapok features build"),
        (["features", "online", "91440106326110621Q"], "GB 32100 check"),
        (["features", "online", "91440106326110621P", "--product", "car"], "--product"),
        (["data", "check-spec", "no/such/spec.toml"], "no/such/spec.toml"),
        (["train"], "exactly one of --product or --dataset"),
        (["train", "--product", "mortgage"], "unknown product 'mortgage'"),
        (["train", "--dataset", "no/such/spec.toml"], "no/such/spec.toml"),
        (["promote", "--product", "microloan", "--force"], "--force needs --reason"),
        (["promote", "--product", "microloan"], "kapok data generate"),
    ],
)
def test_bad_input_gives_a_clear_error_not_a_traceback(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_check_spec_summarises_a_real_dataset():
    from tests.conftest import repo_root

    result = runner.invoke(
        app, ["data", "check-spec", str(repo_root() / "datasets" / "german_credit.toml")]
    )
    assert result.exit_code == 0, result.output
    assert "1,000 rows, 300 bad (30.0%)" in result.output

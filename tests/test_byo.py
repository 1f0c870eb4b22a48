"""Bring your own data on real files: out-of-time windows for short histories, `features = "*"`
specs, and `kapok data check-spec` warnings (issue 13, item 4)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from features.spec import load_spec
from kapok.cli import app
from tests.cli_processes import run_kapok
from training.data import SplitError, out_of_time_split, spec_data

runner = CliRunner()

# rows per month, oldest first: growing volume and a small last month, as on the user's file
FIVE_MONTHS = [300, 600, 1200, 2400, 150]


def dated_rows(counts: list[int], bad_share: float = 0.2, seed: int = 0) -> pl.DataFrame:
    """`counts[i]` rows in month i of 2024 with about `bad_share` bad (at least one per month)."""
    rng = np.random.default_rng(seed)
    parts = []
    for month, count in enumerate(counts):
        day = rng.integers(0, 28, count)
        bad = rng.random(count) < bad_share
        bad[0] = True
        parts.append(
            pl.DataFrame(
                {
                    "applied_at": [
                        datetime(2024, month + 1, 1) + timedelta(days=int(d)) for d in day
                    ],
                    "label": bad.astype(np.int8),
                }
            )
        )
    return pl.concat(parts)


def write_loans(folder: Path, counts: list[int], seed: int = 0) -> Path:
    """A CSV of loans over `counts` months and a spec for it (id, timestamp, 2 features)."""
    rows = dated_rows(counts, seed=seed)
    rng = np.random.default_rng(seed)
    n = rows.height
    loans = rows.with_columns(
        pl.Series("loan_ref", [f"L{i:05d}" for i in range(n)]),
        pl.Series("income", rng.lognormal(8, 0.5, n)),
        pl.Series("region", rng.choice(["north", "south"], n)),
        pl.when(pl.col("label") == 1)
        .then(pl.lit("default"))
        .otherwise(pl.lit("paid"))
        .alias("status"),
    ).drop("label")
    loans.write_csv(folder / "loans.csv")
    spec = folder / "loans.toml"
    spec.write_text(
        'name = "loans"\npath = "loans.csv"\nid = "loan_ref"\ntimestamp = "applied_at"\n'
        '[label]\ncolumn = "status"\nbad = "default"\n'
        "[features.income]\ndirection = -1\n[features.region]\ncategorical = true\n"
    )
    return spec


# -- out-of-time windows ------------------------------------------------------------------------
def test_five_months_with_a_small_last_one_split() -> None:
    """The user's file: 5 monthly periods, the last one small, failed with 'need at least 3
    months ..., got 5'. Any 3 months or more give train, validation and test windows."""
    rows = dated_rows(FIVE_MONTHS)
    split = out_of_time_split(rows["applied_at"], labels=rows["label"])
    parts = [split.train, split.valid, split.test]
    assert all(len(p) for p in parts)
    assert sum(len(p) for p in parts) == rows.height  # every row in exactly one window
    assert split.windows["train"].startswith("2024-01")
    assert split.windows["test"].endswith("2024-05")
    months = rows["applied_at"].dt.month().to_numpy()
    assert months[split.train].max() < months[split.valid].min()  # oldest to newest
    assert months[split.valid].max() < months[split.test].min()

    for k in (3, 4):  # three or more months always split when each has bad and good rows
        short = dated_rows(FIVE_MONTHS[:k])
        assert len(out_of_time_split(short["applied_at"], labels=short["label"]).test)


def test_window_options_set_the_months(tmp_path: Path) -> None:
    data = spec_data(load_spec(write_loans(tmp_path, FIVE_MONTHS)))
    split = data.with_windows(valid_months=1, test_months=2).split()
    assert split.windows == {
        "train": "2024-01..2024-02",
        "valid": "2024-03..2024-03",
        "test": "2024-04..2024-05",
    }
    two_valid = data.with_windows(valid_months=2, test_months=None).split().windows
    assert two_valid["valid"] == "2024-02..2024-03"  # 2 months before the default test window
    assert data.with_windows(None, test_months=1).split().windows["test"] == "2024-05..2024-05"


def test_an_unsplittable_history_says_what_it_found_and_needs() -> None:
    rows = dated_rows([500, 700])
    with pytest.raises(SplitError) as info:
        out_of_time_split(rows["applied_at"], labels=rows["label"])
    message = str(info.value)
    bad = rows.group_by(rows["applied_at"].dt.month()).agg(pl.col("label").sum()).sort("applied_at")
    assert "at least 3 months" in message
    assert f"2024-01 (500 rows, {bad['label'][0]} bad)" in message
    assert f"2024-02 (700 rows, {bad['label'][1]} bad)" in message

    rows = dated_rows(FIVE_MONTHS)
    with pytest.raises(SplitError, match="--valid-months 2 and --test-months 3 leave no month"):
        out_of_time_split(rows["applied_at"], labels=rows["label"], valid_months=2, test_months=3)

    # three months, but the middle one has no bad row: no window order gives each both classes
    rows = dated_rows([400, 400, 400]).with_columns(
        pl.when(pl.col("applied_at").dt.month() == 2)
        .then(0)
        .otherwise(pl.col("label"))
        .alias("label")
    )
    with pytest.raises(SplitError, match=r"both bad and good rows.*2024-02 \(400 rows, 0 bad\)"):
        out_of_time_split(rows["applied_at"], labels=rows["label"])


def test_kapok_train_on_an_unsplittable_spec_is_one_clear_line(tmp_path: Path) -> None:
    spec = write_loans(tmp_path, [500, 700])
    ran = run_kapok(
        ["train", "--dataset", str(spec), "--trials", "1"], env={"KAPOK_HOME": str(tmp_path / "h")}
    )
    assert ran.returncode == 2, ran.stderr
    assert "Traceback" not in ran.stderr + ran.stdout
    assert len(ran.stderr_lines) == 1, ran.stderr
    line = ran.stderr_lines[0]
    assert line.startswith("error: cannot make an out-of-time split"), line
    assert "found 2 months: 2024-01 (500 rows" in line and "2024-02 (700 rows" in line, line


# -- kapok data check-spec ------------------------------------------------------------------------
def write_messy(folder: Path, counts: list[int]) -> Path:
    """Loans with one column of each kind check-spec warns about, and `features = "*"`."""
    rows = dated_rows(counts, seed=1)
    n = rows.height
    rng = np.random.default_rng(1)
    y = rows["label"].to_numpy()
    messy = rows.with_columns(
        pl.Series("income", rng.lognormal(8, 0.5, n)),  # fine
        pl.Series("ratio", [None] * (n - 3) + [0.1, 0.2, 0.3], dtype=pl.Float64),  # 99.9% empty
        pl.Series("country", ["NL"] * n),  # constant
        pl.Series("contract_code", [f"C{i:06d}" for i in range(n)]),  # unique per row
        pl.Series("customerID", rng.integers(0, n // 3, n)),  # named like an id
        pl.Series("opened_on", [f"2019-{1 + i % 12:02d}-01" for i in range(n)]),  # dates as text
        pl.Series("days_in_arrears", np.where(y == 1, rng.integers(91, 400, n), 0)),  # a leak
        pl.when(pl.col("label") == 1).then(pl.lit("bad")).otherwise(pl.lit("good")).alias("status"),
    ).drop("label")
    messy.write_csv(folder / "messy.csv")
    spec = folder / "messy.toml"
    spec.write_text(
        'name = "messy"\npath = "messy.csv"\ntimestamp = "applied_at"\nfeatures = "*"\n'
        '[label]\ncolumn = "status"\nbad = "bad"\n'
    )
    return spec


def test_check_spec_warns_about_each_kind_of_bad_column(tmp_path: Path) -> None:
    spec = write_messy(tmp_path, FIVE_MONTHS)
    result = runner.invoke(app, ["data", "check-spec", str(spec)])
    assert result.exit_code == 0, result.output  # warnings are not errors
    out = result.output
    lines = {line.strip().split(":")[0]: line.strip() for line in out.splitlines() if ": " in line}
    assert "ratio: nearly empty: 99.94% missing (4,647 of 4,650 rows)" in out
    assert lines["country"].startswith("country: constant: the one value 'NL'")
    assert lines["contract_code"].startswith("contract_code: id-like: unique per row")
    assert lines["customerID"].startswith("customerID: id-like: named like an id")
    assert lines["opened_on"].startswith("opened_on: dates as text")
    assert re.search(r"days_in_arrears: leak: .* AUC (0\.9[89]|1\.0)\d*", out), out
    for fine in ("income", "applied_at", "status"):
        assert fine not in lines, lines.get(fine)
    assert "6 warning(s)" in out
    # the split training will use, with rows and bad rows per window
    assert re.search(r"train\s+2024-01\.\.2024-03\s+2,100 rows\s+[\d,]+ bad", out), out
    assert re.search(r"valid\s+2024-04\.\.2024-04\s+2,400 rows", out), out
    assert re.search(r"test\s+2024-05\.\.2024-05\s+150 rows", out), out

    windows = runner.invoke(
        app, ["data", "check-spec", str(spec), "--valid-months", "1", "--test-months", "2"]
    )
    assert re.search(r"test\s+2024-04\.\.2024-05\s+2,550 rows", windows.output), windows.output


def test_check_spec_on_a_clean_file_and_an_unsplittable_one(tmp_path: Path) -> None:
    clean = runner.invoke(app, ["data", "check-spec", str(write_loans(tmp_path, FIVE_MONTHS))])
    assert clean.exit_code == 0, clean.output
    assert "no warnings" in clean.output

    short = write_loans(tmp_path, [500, 700])
    result = runner.invoke(app, ["data", "check-spec", str(short)])
    assert result.exit_code == 2  # the spec loads, but training could not split it
    assert "2 months with dated rows (2024-01..2024-02)" in result.output
    assert "cannot make an out-of-time split" in result.output
    assert "at least 3 months" in result.output


def test_kapok_train_on_a_spec_warns_like_check_spec_before_tuning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leak or an id-like column trains a model that looks excellent and is worthless: `kapok
    train --dataset` says so before it tunes anything, as `kapok data check-spec` would."""
    import training.train

    tuned: list[str] = []

    def no_training(data, *args, **kwargs):  # the warnings are the point, not the model
        tuned.append(data.name)
        raise ValueError("stopped here by the test")

    monkeypatch.setattr(training.train, "train", no_training)
    monkeypatch.setenv("KAPOK_HOME", str(tmp_path / "h"))
    spec = write_messy(tmp_path, FIVE_MONTHS)
    result = runner.invoke(app, ["train", "--dataset", str(spec), "--trials", "1"])
    assert tuned == ["messy"], result.output
    out = result.output
    assert "6 warning(s) about the data" in out, out
    assert re.search(r"days_in_arrears: leak: .* AUC (0\.9[89]|1\.0)\d*", out), out
    assert "contract_code: id-like: unique per row" in out, out
    assert out.index("6 warning(s)") < out.index("stopped here by the test"), out

"""Monitoring that does not cry wolf, on constructed data (no trained home): look-back features
compared on whole windows, the back-test without the model's own months, and live and
backfilled decisions never in one month.

`kapok monitor` runs here on a decision log in SQLite against a stand-in for the champion's
evidence (the training reference, its windows and the data's first month), so each rule is
checked end to end through `review.monitor.monitor` and the CLI in seconds."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import polars as pl
from typer.testing import CliRunner

from features.schema import BY_NAME

# review.lookback is imported inside the tests that use it: the monitor tests below run (and
# fail) on the code from before it, too
runner = CliRunner()
UTC = dt.UTC
START = dt.date(2023, 1, 1)  # the data's first month
YOY = "tax_sales_growth_yoy"  # looks back 14 months: whole from the 2024-03 snapshot
AGE = "reg_firm_age_months"  # no look-back
FEATURES = [YOY, AGE]
# training 2023-07..2024-02, validation 2024-03..2024-06, test 2024-07..2024-09
WINDOWS = {
    "train": {"window": "2023-07..2024-02", "rows": 1.0, "bad_rate": 0.1},
    "valid": {"window": "2024-03..2024-06", "rows": 1.0, "bad_rate": 0.1},
    "test": {"window": "2024-07..2024-09", "rows": 1.0, "bad_rate": 0.1},
}
WHOLE_FROM = dt.datetime(2024, 4, 15, tzinfo=UTC)  # tax snapshot for 2024-03, cut on 15 April


# -- the arithmetic ------------------------------------------------------------------------------
def test_whole_window_starts_at_the_snapshot_for_history_start_plus_lookback():
    from review import lookback as lb

    # 2023-01 + 14 months = the 2024-03 snapshot, cut on the tax publication day of April
    assert lb.whole_window_from(BY_NAME[YOY], START) == WHOLE_FROM
    # a 12-month count looks back 11: the 2023-12 snapshot, cut on 15 January 2024
    assert lb.whole_window_from(BY_NAME["tax_months_filed_12m"], START) == dt.datetime(
        2024, 1, 15, tzinfo=UTC
    )
    # a feature without a look-back is whole from the first snapshot
    assert lb.whole_window_from(BY_NAME[AGE], START) == dt.datetime(2023, 2, 1, tzinfo=UTC)


def test_history_start_prefers_the_run_tag_then_the_raw_manifest(tmp_path):
    from review import lookback as lb

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "_manifest.json").write_text(json.dumps({"start": "2022-05", "months": 36, "chunks": 1}))
    store = {"kapok.feature_service": "microloan_v1"}
    assert lb.history_start({**store, lb.HISTORY_TAG: "2023-01"}, raw)[0] == START
    assert lb.history_start(store, raw)[0] == dt.date(2022, 5, 1)  # a run before the tag
    # a dataset-spec model has nothing to do with the simulated data in the home
    assert lb.history_start({"kapok.dataset": "german_credit"}, raw) == (None, "unknown")


def _yoy(times: list[dt.datetime], rng: np.random.Generator) -> list[float | None]:
    """Sales growth as the pipeline gives it: missing until the snapshot holds 15 months."""
    values = rng.normal(0.05, 0.2, len(times))
    return [float(v) if t >= WHOLE_FROM else None for t, v in zip(times, values, strict=True)]


def _days(first: dt.date, last: dt.date, per_month: int, rng: np.random.Generator):
    """`per_month` times in each month from first to last (inclusive), sorted."""
    out, month = [], first
    while month <= last:
        for day in sorted(rng.integers(0, 28, per_month)):
            out.append(dt.datetime(month.year, month.month, 1 + int(day), 10, tzinfo=UTC))
        month = dt.date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return out


def _reference(per_month: int = 300, seed: int = 1) -> pl.DataFrame:
    """The training reference: applications 2023-07..2024-06 (training and validation)."""
    rng = np.random.default_rng(seed)
    at = _days(dt.date(2023, 7, 1), dt.date(2024, 6, 1), per_month, rng)
    return pl.DataFrame(
        {
            "applied_at": at,
            YOY: _yoy(at, rng),
            AGE: rng.integers(6, 200, len(at)).astype(float),
            "kapok_pd": rng.beta(2, 30, len(at)),
        },
        schema_overrides={"applied_at": pl.Datetime("us", "UTC")},
    )


def test_a_lookback_feature_missing_only_because_of_the_history_start_is_stable():
    from review import lookback as lb

    reference = _reference()
    missing = reference[YOY].is_null().mean()
    assert 0.75 < missing < 0.85  # like the simulated products' year-on-year features
    rng = np.random.default_rng(2)
    at = _days(dt.date(2024, 7, 1), dt.date(2024, 12, 1), 150, rng)
    current = pl.DataFrame({YOY: _yoy(at, rng), AGE: rng.integers(6, 200, len(at)).astype(float)})
    table = lb.feature_stability(
        lb.Sample(reference, reference["applied_at"]),
        lb.Sample(current, pl.Series(at)),
        FEATURES,
        start=START,
    )
    yoy = table.filter(pl.col("feature") == YOY).row(0, named=True)
    assert yoy["verdict"] == "stable", yoy
    assert yoy["rows_reference"] == reference.filter(pl.col(YOY).is_not_null()).height
    assert yoy["rows_current"] == len(at) and yoy["missing_reference"] == 0.0
    assert "2024-03" in yoy["compared"]
    # every row of the feature without a look-back is compared
    assert table.filter(pl.col("feature") == AGE)["rows_reference"][0] == reference.height

    # without the history start (a dataset spec) every row counts, and the same data acts
    blind = lb.feature_stability(
        lb.Sample(reference, reference["applied_at"]),
        lb.Sample(current, pl.Series(at)),
        FEATURES,
        start=None,
    )
    assert blind.filter(pl.col("feature") == YOY)["verdict"][0] == "act"

    # fewer than 200 whole-window rows in the reference: n/a with the reason, not act
    thin = _reference(per_month=60)
    few = lb.feature_stability(
        lb.Sample(thin, thin["applied_at"]),
        lb.Sample(current, pl.Series(at)),
        FEATURES,
        start=START,
    )
    row = few.filter(pl.col("feature") == YOY).row(0, named=True)
    assert row["verdict"] == "n/a" and row["csi"] is None
    assert "too few whole-window rows (reference" in row["compared"]
    assert few["feature"][-1] == YOY  # n/a rows come after the judged ones

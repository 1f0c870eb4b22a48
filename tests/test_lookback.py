"""Monitoring that does not cry wolf, on constructed data (no trained home): look-back features
compared on whole windows, the back-test without the model's own months, and live and
backfilled decisions never in one month.

`kapok monitor` runs here on a decision log in SQLite against a stand-in for the champion's
evidence (the training reference, its windows and the data's first month), so each rule is
checked end to end through `review.monitor.monitor` and the CLI in seconds."""

from __future__ import annotations

import datetime as dt
import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from features.schema import BY_NAME
from kapok.cli import app
from kapok.settings import Paths
from review import backtest as bt

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

    def stability(ref: pl.DataFrame, start: dt.date | None) -> pl.DataFrame:
        """The same current window against a reference, with or without the history start."""
        return lb.feature_stability(
            lb.Sample(ref, ref["applied_at"]),
            lb.Sample(current, pl.Series(at)),
            FEATURES,
            start=start,
        )

    table = stability(reference, START)
    yoy = table.filter(pl.col("feature") == YOY).row(0, named=True)
    assert yoy["verdict"] == "stable", yoy
    assert yoy["rows_reference"] == reference.filter(pl.col(YOY).is_not_null()).height
    assert yoy["rows_current"] == len(at) and yoy["missing_reference"] == 0.0
    assert "2024-03" in yoy["compared"]
    # every row of the feature without a look-back is compared
    assert table.filter(pl.col("feature") == AGE)["rows_reference"][0] == reference.height

    # without the history start (a dataset spec) every row counts, and the same data acts
    blind = stability(reference, None)
    assert blind.filter(pl.col("feature") == YOY)["verdict"][0] == "act"

    # fewer than 200 whole-window rows in the reference: n/a with the reason, not act
    few = stability(_reference(per_month=60), START)
    row = few.filter(pl.col("feature") == YOY).row(0, named=True)
    assert row["verdict"] == "n/a" and row["csi"] is None
    assert "too few whole-window rows (reference" in row["compared"]
    assert few["feature"][-1] == YOY  # n/a rows come after the judged ones


# -- kapok monitor end to end on a constructed log -----------------------------------------------
def _evidence(reference: pl.DataFrame) -> SimpleNamespace:
    """What monitor reads from the champion's MLflow run."""
    return SimpleNamespace(
        name="kapok-microloan",
        data_name="microloan",
        version="1",
        features=FEATURES,
        categorical=[],
        train=reference,
        windows=WINDOWS,
        metrics={"test_auc": 0.75},
        history_start=START,
        history_source="test",
    )


def _record(
    i: int, at: dt.datetime, pd_: float, yoy: float | None, age: float, *, live: bool,
    request_id: str | None = None,
):  # fmt: skip
    from serving import policy as pol
    from serving.decision_log import DecisionRecord

    policy = pol.load_policy()
    approve = policy.product("microloan").approve_max_pd
    return DecisionRecord(
        request_id=request_id or (f"req_{i:06d}" if live else f"bf_ML{i:09d}"),
        decided_at=at, caller="acme-api" if live else "backfill", endpoint="score",
        enterprise_id=f"E{i:06d}", product="microloan",
        request={"requested_amount": 100_000.0, "term_months": 12},
        model_name="kapok-microloan", model_version="1", features={YOY: yoy, AGE: age},
        feature_timestamps={} if live else {"point_in_time": at.isoformat()}, pd=pd_,
        score=pol.score_points(pd_, policy), grade=pol.grade(pd_, policy),
        decision="approve" if pd_ <= approve else "decline", limit_amount=None, price=None,
        reasons=[], response={},
    )  # fmt: skip


@pytest.fixture
def logged(tmp_path, monkeypatch):
    """A stand-in champion and an empty SQLite decision log (also the CLI's): (paths, log)."""
    import review.evidence
    from serving.decision_log import DecisionLog

    reference = _reference()
    monkeypatch.setattr(review.evidence, "load_evidence", lambda *a, **k: _evidence(reference))
    url = f"sqlite:///{tmp_path / 'log.db'}"
    monkeypatch.setenv("KAPOK_DECISION_LOG", url)
    log = DecisionLog(url)
    return Paths(tmp_path / "home"), log


def _backfilled(first: dt.date, last: dt.date, per_month: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    at = _days(first, last, per_month, rng)
    yoy = _yoy(at, rng)
    pds = rng.beta(2, 30, len(at))
    ages = rng.integers(6, 200, len(at)).astype(float)
    return [
        _record(i, t, float(p), y, float(a), live=False)
        for i, (t, p, y, a) in enumerate(zip(at, pds, yoy, ages, strict=True))
    ]


def test_monitor_judges_lookback_features_on_whole_windows(logged):
    from review.monitor import monitor

    paths, log = logged
    log.write_many(_backfilled(dt.date(2024, 7, 1), dt.date(2024, 12, 1), 150))
    result = monitor(paths, "microloan", log=log)
    row = result.stability.filter(pl.col("feature") == YOY).row(0, named=True)
    assert row["verdict"] == "stable", row  # before: act, the reference 80% missing
    assert row["missing_reference"] == 0.0 and row["missing_current"] == 0.0
    checks = {c.name: c for c in result.checks}
    assert checks["feature CSI"].verdict == "stable", checks["feature CSI"]
    assert checks["missing-rate drift"].verdict == "stable", checks["missing-rate drift"]


def test_monitor_backtest_leaves_out_the_models_development_months(logged, tmp_path):
    from review.monitor import monitor

    paths, log = logged
    records = _backfilled(dt.date(2024, 1, 1), dt.date(2024, 12, 1), 100)
    log.write_many(records)
    rng = np.random.default_rng(4)
    # in the development months the outcomes follow the PD exactly (the model learned them);
    # later they are only loosely related to it
    outcomes = pl.DataFrame(
        {
            "request_id": [r.request_id for r in records],
            "month": [f"{r.decided_at:%Y-%m}" for r in records],
            "pd": [r.pd for r in records],
        }
    ).with_columns(
        outcome=pl.when(pl.col("month") <= "2024-06")
        .then((pl.col("pd") > pl.col("pd").median()).cast(pl.Int64))
        .otherwise(pl.Series(rng.binomial(1, 0.3, len(records))))
    )
    target = tmp_path / "outcomes.parquet"
    outcomes.select("request_id", "outcome").write_parquet(target)

    result = monitor(paths, "microloan", log=log, outcomes=target)
    after = outcomes.filter(pl.col("month") >= "2024-07")
    expected = bt.auc(after["outcome"].to_numpy(), after["pd"].to_numpy())
    assert result.pooled_auc == pytest.approx(expected)  # before: the development months too
    assert result.matched_outcomes == after.height
    assert result.backtest_months == [f"2024-{m:02d}" for m in range(7, 13)]
    assert result.excluded_months == [f"2024-{m:02d}" for m in range(1, 7)]
    assert result.excluded_outcomes == outcomes.height - after.height
    assert result.auc_periods is not None
    assert result.auc_periods["period"].str.starts_with("2024-Q1").sum() == 0
    notes = " ".join(result.notes)
    assert "leaves out" in notes and "2024-01..2024-06" in notes and "2024-07..2024-12" in notes


def test_live_and_backfilled_decisions_are_never_one_month(logged, tmp_path):
    from review.monitor import monitor

    paths, log = logged
    backfilled = _backfilled(dt.date(2024, 10, 1), dt.date(2024, 10, 1), 200)
    # live API decisions in the same calendar month, all declined; one with a request id that
    # looks like a backfill's is still live (a backfill is caller "backfill" *and* "bf_")
    live = [
        _record(10_000 + i, dt.datetime(2024, 10, 20, 9, i, tzinfo=UTC), 0.5, 0.1, 50.0, live=True)
        for i in range(40)
    ]
    live[0] = _record(99, live[0].decided_at, 0.5, 0.1, 50.0, live=True, request_id="bf_x")
    log.write_many(backfilled + live)

    result = monitor(paths, "microloan", log=log)
    october = result.monthly.filter(pl.col("month") == "2024-10")
    assert october.height == 2  # before: one month mixing both
    by_source = {r["source"]: r for r in october.iter_rows(named=True)}
    assert by_source["live"]["decisions"] == 40
    assert by_source["live"]["approval_rate"] == 0.0
    assert by_source["backfill"]["decisions"] == 200
    approved = sum(r.decision == "approve" for r in backfilled) / 200
    assert by_source["backfill"]["approval_rate"] == pytest.approx(approved)
    names = {c.name for c in result.checks}
    assert {"approval-rate drift (live)", "approval-rate drift (backfill)"} <= names
    assert result.by_source == {"backfill": 200, "live": 40}

    only_live = monitor(paths, "microloan", log=log, source="live")
    assert only_live.decisions == 40 and set(only_live.monthly["source"]) == {"live"}

    out = tmp_path / "live.html"
    args = ["monitor", "--product", "microloan", "--source", "backfill", "--out", str(out)]
    ran = runner.invoke(app, args)
    assert ran.exit_code in (0, 1), ran.output
    assert "200 decisions" in " ".join(ran.output.split())
    html = out.read_text()  # the terminal's table may be cut to its width
    assert "approval-rate drift (backfill)" in html and "(live)" not in html
    bad = runner.invoke(app, ["monitor", "--product", "microloan", "--source", "api"])
    assert bad.exit_code == 2 and "--source must be one of all, live, backfill" in " ".join(
        bad.output.split()
    )


def test_development_months_and_spans_by_hand():
    assert bt.development_months(WINDOWS) == [
        *(f"2023-{m:02d}" for m in range(7, 13)),
        *(f"2024-{m:02d}" for m in range(1, 7)),
    ]
    assert bt.development_months({"all": {"window": "no timestamp"}}) == []
    assert bt.month_spans(["2024-12", "2024-10", "2024-11", "2025-02"]) == (
        "2024-10..2024-12, 2025-02"
    )
    assert bt.month_spans([]) == "none"

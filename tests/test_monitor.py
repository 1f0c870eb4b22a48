"""`kapok monitor` and `kapok backfill`: PSI by hand, back-test arithmetic by hand, the exit status
following the verdict, and a backfill that is idempotent."""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import binomtest
from typer.testing import CliRunner

from kapok.cli import app
from kapok.settings import Paths
from review import backtest as bt
from review.monitor import THRESHOLDS, approval_verdict, missing_verdict
from review.stability import psi

runner = CliRunner()


# -- PSI on constructed samples ------------------------------------------------------------------
def test_psi_of_a_shifted_sample_equals_the_hand_computed_value():
    reference = np.arange(1, 1001, dtype=float)  # deciles: 100 values in each bin
    current = np.arange(501, 1501, dtype=float)  # 100 in each of bins 6-9, 600 above the 9th
    # bins 1-5 are empty now (share floored at 1e-4), bins 6-9 keep 10%, the top bin has 60%;
    # the missing bin is empty on both sides and adds nothing
    hand = 5 * (1e-4 - 0.1) * math.log(1e-4 / 0.1) + (0.6 - 0.1) * math.log(0.6 / 0.1)
    assert psi(reference, current) == pytest.approx(hand, rel=1e-12)
    assert psi(reference, reference.copy()) == pytest.approx(0.0, abs=1e-12)


def test_psi_counts_missing_values_in_a_bin_of_their_own():
    reference = np.arange(1, 1001, dtype=float)
    current = np.concatenate([reference, np.full(1000, np.nan)])  # same values, half missing
    hand = 10 * (0.05 - 0.1) * math.log(0.05 / 0.1) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert psi(reference, current) == pytest.approx(hand, rel=1e-12)


def test_missing_and_approval_thresholds():
    assert missing_verdict(0.05) == "stable"
    assert missing_verdict(THRESHOLDS.missing_watch) == "watch"
    assert missing_verdict(0.30) == "act"
    assert approval_verdict(-0.05) == "stable"
    assert approval_verdict(-0.12) == "watch"
    assert approval_verdict(0.25) == "act"


# -- back-test arithmetic ------------------------------------------------------------------------
def _exact_two_sided(k: int, n: int, p: float) -> float:
    """The exact binomial test by hand: the probability of every count no likelier than k."""
    pmf = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
    return min(1.0, sum(x for x in pmf if x <= pmf[k] * (1 + 1e-7)))


def test_backtest_by_grade_on_known_counts():
    # A: 200 decisions at PD 1%, 2 defaults (as predicted); B: 100 at 5%, 15 defaults (far more);
    # C: 100 at 20%, 8 defaults (far fewer)
    parts = []
    for grade, n, pd_, k in (("C", 100, 0.20, 8), ("A", 200, 0.01, 2), ("B", 100, 0.05, 15)):
        parts.append(pl.DataFrame({"grade": [grade] * n, "pd": [pd_] * n,
                                   "outcome": [1] * k + [0] * (n - k)}))  # fmt: skip
    table = bt.grade_backtest(pl.concat(parts), grades=["A", "B", "C", "D"])
    assert table["grade"].to_list() == ["A", "B", "C"]  # master-scale order, empty D left out
    assert table["decisions"].to_list() == [200, 100, 100]
    assert table["defaults"].to_list() == [2, 15, 8]
    assert table["observed_rate"].to_list() == pytest.approx([0.01, 0.15, 0.08])
    assert table["predicted_pd"].to_list() == pytest.approx([0.01, 0.05, 0.20])
    hand = ((2, 200, 0.01), (15, 100, 0.05), (8, 100, 0.20))
    for row, (k, n, p) in zip(table.iter_rows(named=True), hand, strict=True):
        assert row["p_value"] == pytest.approx(binomtest(k, n, p).pvalue, rel=1e-9)
        assert row["p_value"] == pytest.approx(_exact_two_sided(k, n, p), rel=1e-6)
        assert row["ci_low"] <= row["observed_rate"] <= row["ci_high"]
    # as predicted -> stable; far more defaults (p < 0.01) -> act; far fewer -> only watch
    assert table["verdict"].to_list() == ["stable", "act", "watch"]
    assert bt.worst(table["verdict"].to_list()) == "act"


def test_binomial_verdict_rules():
    assert bt.binomial_verdict(0.005, 0.10, 0.05) == "act"
    assert bt.binomial_verdict(0.005, 0.02, 0.05) == "watch"  # fewer defaults: never act
    assert bt.binomial_verdict(0.03, 0.10, 0.05) == "watch"
    assert bt.binomial_verdict(0.2, 0.10, 0.05) == "stable"


def test_auc_and_periods_by_hand():
    # pairs (positive, negative): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4): 3 of 4
    assert bt.auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert math.isnan(bt.auc(np.array([0, 0]), np.array([0.1, 0.2])))
    t0 = dt.datetime(2025, 1, 15, tzinfo=dt.UTC)
    frame = pl.DataFrame({
        "decided_at": [t0, t0, t0 + dt.timedelta(days=40), t0 + dt.timedelta(days=40),
                       t0 + dt.timedelta(days=100), t0 + dt.timedelta(days=100)],
        "pd": [0.1, 0.4, 0.2, 0.3, 0.5, 0.6], "outcome": [0, 1, 1, 0, 0, 1],
    })  # fmt: skip
    assert bt.period_of(frame) == "quarter"  # 2 outcomes a month is far too few for monthly AUC
    by_quarter = bt.auc_by_period(frame)
    assert by_quarter["period"].to_list() == ["2025-Q1", "2025-Q2"]
    assert by_quarter["decisions"].to_list() == [4, 2]
    # Q1 positives 0.4, 0.2 vs negatives 0.1, 0.3: 3 of 4 pairs ordered; Q2: 0.6 > 0.5
    assert by_quarter["auc"].to_list() == pytest.approx([0.75, 1.0])
    by_month = bt.auc_by_period(frame, period="month")
    assert by_month["auc"].to_list() == pytest.approx([1.0, 0.0, 1.0])


# -- end to end on the trained small system ------------------------------------------------------
def linked(trained_home, tmp_path: Path) -> Paths:
    """A KAPOK_HOME of its own reading trained_home's data, Feast repo and MLflow store."""
    home = Paths(tmp_path / "home")
    home.data.mkdir(parents=True)
    src = trained_home.paths
    for name in ("raw", "features"):
        (home.data / name).symlink_to((src.data / name).resolve())
    home.feature_repo.symlink_to(src.feature_repo)
    home.mlruns.symlink_to(src.mlruns)
    return home


def _records_from(rows: pl.DataFrame, features: list[str], prefix: str):
    from serving import policy as pol
    from serving.decision_log import DecisionRecord

    policy = pol.load_policy()
    product = policy.product("microloan")
    out = []
    for i, row in enumerate(rows.iter_rows(named=True)):
        values = {f: row[f] for f in features}
        pd_ = float(row["kapok_pd"])
        decision = pol.decide(pd_, product, pol.knockouts(values, policy))
        out.append(DecisionRecord(
            request_id=f"{prefix}{i}", decided_at=row["applied_at"], caller="test",
            endpoint="score", enterprise_id=row["enterprise_id"], product="microloan",
            request={"requested_amount": 100_000.0, "term_months": 12},
            model_name="kapok-microloan", model_version="1", features=values,
            feature_timestamps={}, pd=pd_, score=pol.score_points(pd_, policy),
            grade=pol.grade(pd_, policy), decision=decision.decision, limit_amount=None,
            price=None, reasons=[], response={},
        ))  # fmt: skip
    return out


@pytest.mark.slow
def test_exit_status_follows_the_verdict(trained_home, tmp_path, monkeypatch):
    from review.evidence import load_evidence
    from review.monitor import monitor
    from serving.decision_log import DecisionLog

    home = linked(trained_home, tmp_path)
    monkeypatch.setenv("KAPOK_HOME", str(home.home))
    evidence = load_evidence(home, "microloan")
    # The stable log holds the champion's own training-window reference rows, as logged
    # decisions: the monitor must see no drift at all. (Its test-window rows are not a stable
    # case on simulated data: year-on-year features fill in as the region's history grows.)
    stable_url = f"sqlite:///{tmp_path / 'stable.db'}"
    DecisionLog(stable_url).write_many(_records_from(evidence.train, evidence.features, "s"))
    monkeypatch.setenv("KAPOK_DECISION_LOG", stable_url)
    out = tmp_path / "stable.html"
    result = runner.invoke(app, ["monitor", "--product", "microloan", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "score PSI" in result.output and "ACT" not in result.output
    checked = monitor(home, "microloan")
    assert checked.score_psi == pytest.approx(0.0, abs=1e-9)
    # n/a: a look-back feature with fewer than 200 whole-window rows in this small home's
    # reference (review.lookback) is not judged at all, which is not drift either
    assert "stable" in set(checked.stability["verdict"].to_list()) <= {"stable", "n/a"}
    assert {c.verdict for c in checked.checks} <= {"stable", "info", "n/a"}
    html = out.read_text()
    for name in ("score_distribution", "csi", "approval_volume"):
        assert f'data-figure="{name}"' in html

    # The drifted log: the same applications with every PD tripled and payment inflows cut to
    # a fifth (a 3-month sum: whole in every reference row, where the 12-month ones may be n/a)
    shifted = evidence.train.with_columns(
        (pl.col("kapok_pd") * 3).clip(upper_bound=0.999),
        pl.col("pay_inflow_3m") * 0.2,
    )
    drift_url = f"sqlite:///{tmp_path / 'drift.db'}"
    DecisionLog(drift_url).write_many(_records_from(shifted, evidence.features, "d"))
    monkeypatch.setenv("KAPOK_DECISION_LOG", drift_url)
    out = tmp_path / "drift.html"
    result = runner.invoke(app, ["monitor", "--product", "microloan", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "ACT" in result.output and out.exists()
    # and it is the drift that fired: the score PSI (PDs tripled) and the CSI of the inflows
    # (cut to a fifth) act; nothing went missing
    drifted = {c.name: c for c in monitor(home, "microloan").checks}
    assert drifted["score PSI"].verdict == "act", drifted["score PSI"]
    assert drifted["feature CSI"].verdict == "act", drifted["feature CSI"]
    assert "pay_inflow_3m" in drifted["feature CSI"].value
    assert drifted["missing-rate drift"].verdict == "stable", drifted["missing-rate drift"]
    assert re.search(r"score PSI\s.*\bact\b", result.output), result.output

    # a window without decisions is a usage error, not an empty report
    result = runner.invoke(app, ["monitor", "--product", "microloan", "--since", "2031-01-01"])
    assert result.exit_code == 2
    assert "no microloan decisions" in " ".join(result.output.split())
    result = runner.invoke(app, ["monitor", "--product", "microloan", "--since", "yesterday"])
    assert result.exit_code == 2 and "YYYY-MM-DD" in result.output


@pytest.mark.slow
def test_backfill_logs_decisions_and_outcomes_once_then_monitor_backtests(
    trained_home, tmp_path, monkeypatch
):
    from kapok.bigdata.generate import scan
    from review.monitor import monitor
    from serving.decision_log import DecisionLog
    from serving.replay import replay

    home = linked(trained_home, tmp_path)
    monkeypatch.setenv("KAPOK_HOME", str(home.home))
    monkeypatch.setenv("KAPOK_DECISION_LOG", f"sqlite:///{tmp_path / 'log.db'}")
    apps = scan(home.raw, "applications").filter(pl.col("product") == "microloan").collect()
    # the champion's last validation month (a development month: left out of the back-test)
    # and its test window
    windows = trained_home.champion.windows
    last_valid = windows["valid"]["window"].split("..")[1]
    since, until = f"{last_valid}-01", f"{windows['test']['window'].split('..')[1]}-28"
    window = apps.filter(
        (pl.col("applied_at") >= dt.datetime.fromisoformat(since + "T00:00+00:00"))
        & (pl.col("applied_at") < dt.datetime.fromisoformat(until + "T00:00+00:00")
           + dt.timedelta(days=1))
    )  # fmt: skip
    matured = window.filter(pl.col("matured")).height
    tested = window.filter(
        pl.col("matured") & (pl.col("applied_at").dt.strftime("%Y-%m") != last_valid)
    ).height
    assert window.height > 100 and matured > tested > 0

    args = ["backfill", "--product", "microloan", "--since", since, "--until", until]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    log = DecisionLog()
    assert log.count() == window.height
    outcomes = pl.read_parquet(home.data / "outcomes" / "microloan.parquet")
    assert outcomes.height == matured
    assert set(outcomes["outcome"].unique().to_list()) <= {0, 1}
    first = log.between()[0]
    assert first.caller == "backfill" and first.endpoint == "score"
    app_row = window.filter(pl.col("application_id") == first.request["application_id"])
    assert first.decided_at == app_row["applied_at"][0]
    # the batch decided exactly as the engine's one-row path does
    assert replay(first.request_id, home).same

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert log.count() == window.height
    assert pl.read_parquet(home.data / "outcomes" / "microloan.parquet").height == matured
    assert f"{window.height:,} already logged" in " ".join(again.output.split())

    out = tmp_path / "monitor.html"
    result = runner.invoke(app, ["monitor", "--product", "microloan", "--out", str(out)])
    backtested = monitor(home, "microloan")  # the same checks, to know which exit to expect
    assert backtested.matched_outcomes == tested  # the validation month's are left out
    assert backtested.excluded_months == [last_valid]
    assert backtested.excluded_outcomes == matured - tested
    assert result.exit_code == (1 if backtested.alert else 0), result.output
    assert ("ACT" in result.output) == backtested.alert
    text = " ".join(result.output.split())
    assert "back-test by grade" in text and "AUC" in text
    html = out.read_text()
    assert 'data-figure="backtest"' in html and 'data-figure="auc"' in html
    assert f"{tested:,} decisions with a matured outcome" in html
    assert f"Left out: {matured - tested:,} matured outcomes" in html

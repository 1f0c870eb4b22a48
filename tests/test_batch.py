"""`kapok decide FILE`: point-in-time features equal Feast's, decisions equal the per-row
reference, every decision logged once under its batch id, and bad files end in one clear line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from features import store as fs
from features.request import request_features
from features.schema import FEATURES
from kapok.bigdata.generate import scan
from serving import batch
from serving import policy as pol
from serving.decision_log import DecisionLog
from serving.engine import policy_outcome

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def applications(trained_home, tmp_path_factory) -> pl.DataFrame:
    """400 of the small system's microloan applications, as a lender's file would list them."""
    apps = scan(trained_home.paths.raw, "applications").filter(pl.col("product") == "microloan")
    return (
        apps.collect()
        .sample(400, seed=3)
        .select(
            "enterprise_id", "product", "requested_amount", "term_months",
            pl.col("applied_at").dt.date().alias("application_date"),
        )
    )  # fmt: skip


def test_point_in_time_features_equal_feasts(trained_home, applications):
    apps = batch.read_applications_frame(applications)
    ours = batch.point_in_time(trained_home.paths.features, apps)
    entities = apps.select("enterprise_id", "event_timestamp", "requested_amount", "term_months")
    feast = fs.historical_features(fs.feature_store(trained_home.paths), entities, "microloan")
    names = [f.name for f in FEATURES]
    assert ours.select(names).equals(feast.select(names))
    assert ours.filter(pl.col("tax__event_timestamp").is_null()).height < ours.height


def test_decide_file_equals_the_reference_and_logs_each_decision_once(
    trained_home, applications, tmp_path, monkeypatch
):
    monkeypatch.setenv("KAPOK_HOME", str(trained_home.paths.home))
    source = tmp_path / "apps.csv"
    applications.write_csv(source)
    log = DecisionLog(f"sqlite:///{tmp_path / 'log.db'}")
    policy = pol.load_policy()
    out = tmp_path / "decisions.parquet"
    first = batch.decide_file(trained_home.paths, source, out, batch_id="b1", log=log,
                              policy=policy, limits=True)  # fmt: skip
    result = pl.read_parquet(out)
    assert result.height == first.rows == 400
    decided = result.filter(pl.col("decision").is_not_null())
    assert first.logged == decided.height == log.count() > 350
    again = batch.decide_file(trained_home.paths, source, tmp_path / "again.csv", batch_id="b1",
                              log=log, policy=policy, limits=True)  # fmt: skip
    assert again.logged == 0 and log.count() == first.logged
    assert pl.read_csv(tmp_path / "again.csv")["pd"].to_list() == pytest.approx(result["pd"])

    # the reference: Feast's point-in-time features, one row at a time through policy.py
    model = batch._champions(trained_home.paths, ["microloan"])["microloan"]
    apps = batch.read_applications_frame(applications)
    feast = fs.historical_features(
        fs.feature_store(trained_home.paths),
        apps.select("enterprise_id", "event_timestamp", "requested_amount", "term_months"),
        "microloan",
    )
    checked = 0
    for r, row in enumerate(feast.to_dicts()):
        got = result.row(r, named=True)
        if got["decision"] is None:
            continue
        values = {f.name: row[f.name] for f in FEATURES}
        amount, term = row["requested_amount"], row["term_months"]
        values |= request_features(amount, term, values["tax_sales_12m"], values["pay_inflow_3m"])
        contrib = model.contributions(model.row(values))[0]
        pd_ = float(model.scorer.calibrator(np.array([contrib.sum()]))[0])
        want = policy_outcome(model, values, contrib, pd_, amount, term, policy)
        assert got["pd"] == pytest.approx(pd_, abs=1e-9)
        assert got["decision"] == want["decision"].decision
        assert got["grade"] == want["grade"]
        codes = [got[f"reason_{i}"] for i in range(1, 5)]
        if got["decision"] == "approve":
            assert codes == [None] * 4  # reasons="adverse": approvals carry none
        else:
            assert codes[: len(want["reasons"])] == [x.code for x in want["reasons"]]
        record = log.get(got["request_id"])
        assert record is not None and record.pd == pytest.approx(pd_, abs=1e-9)
        assert record.caller == "batch:b1" and record.limit_amount == got["limit"]
        checked += 1
    assert checked > 350


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop("term_months"), "missing column(s) term_months"),
        (lambda f: f.with_columns(enterprise_id=pl.lit("91440101X")), "row 1: enterprise_id"),
        (lambda f: f.with_columns(requested_amount=pl.lit(-5.0)), "row 1: requested_amount"),
        (lambda f: f.with_columns(product=pl.lit("mortgage")), "row 1: product must be one of"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(applications, tmp_path, change, message):
    source = tmp_path / "bad.csv"
    change(applications.head(3)).write_csv(source)
    run = subprocess.run(
        [sys.executable, "-m", "kapok.cli", "decide", str(source)],
        capture_output=True, text=True, env={**__import__("os").environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr

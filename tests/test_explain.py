"""`kapok explain REQUEST_ID`: one logged decision as HTML — waterfall, reasons, policy path — with
SHAP that adds up to the margin; an unknown id is a one-line error."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from kapok.cli import app
from tests.test_monitor import linked

runner = CliRunner()


def test_unknown_request_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KAPOK_DECISION_LOG", f"sqlite:///{tmp_path / 'log.db'}")
    result = runner.invoke(app, ["explain", "req_does_not_exist"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "no decision 'req_does_not_exist' in the decision log" in text
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_explain_renders_a_backfilled_decision_and_a_limit_decision(
    trained_home, tmp_path, monkeypatch
):
    from review.explain import explain
    from serving.decision_log import DecisionLog

    home = linked(trained_home, tmp_path)
    monkeypatch.setenv("KAPOK_HOME", str(home.home))
    monkeypatch.setenv("KAPOK_DECISION_LOG", f"sqlite:///{tmp_path / 'log.db'}")
    backfilled = runner.invoke(
        app, ["backfill", "--product", "microloan", "--since", "2024-01-01", "--until",
              "2024-02-28"],
    )  # fmt: skip
    assert backfilled.exit_code == 0, backfilled.output
    log = DecisionLog()
    records = log.between()
    assert records
    # the one with the most reasons, so that the page has something to show
    record = max(records, key=lambda r: (len(r.reasons), r.request_id))
    assert record.reasons

    out = tmp_path / "explain.html"
    result = runner.invoke(app, ["explain", record.request_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output and record.request_id in result.output
    html = out.read_text()
    assert 'data-figure="waterfall"' in html
    for reason in record.reasons:
        assert reason["code"] in html
    assert "Policy path" in html and "knock-outs" in html.lower()
    assert f"decision: {record.decision}" in html  # the path's last step names the outcome
    assert "http://" not in html and "https://" not in html

    e = explain(record.request_id, home)
    assert e.base + e.shap.sum() == pytest.approx(e.margin, abs=1e-9)
    assert e.additive and e.pd_matches and e.same_decision
    top = e.ranked()[0]
    assert f">{top[0]}<" in html  # the largest contribution is tabled (and drawn)

    # a /limit decision also shows the constraint that binds the limit
    limit = dataclasses.replace(
        record,
        request_id=record.request_id + "-limit",
        endpoint="limit",
        limit_amount=120_000.0,
        response={**record.response, "limit": 120_000.0,
                  "binding_constraint": "debt_service",
                  "constraints": {"policy_cap": 1_000_000.0, "debt_service": 120_000.0,
                                  "sales_multiple": None}},
    )  # fmt: skip
    log.write(limit)
    out = tmp_path / "limit.html"
    result = runner.invoke(app, ["explain", limit.request_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bound by debt_service" in " ".join(result.output.split())
    html = out.read_text()
    assert "binding constraint" in html and "debt_service" in html and "120,000" in html

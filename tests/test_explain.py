"""`kapok explain REQUEST_ID`: one logged decision as HTML — waterfall, reasons, policy path — with
SHAP that adds up to the margin; an unknown id is a one-line error."""

from __future__ import annotations

import dataclasses
import math
import re

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
    # one line on stderr, exit 2, no traceback, as a process of its own: tests/test_cli.py


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

    # a /limit decision also shows the constraint that binds the limit: the response /limit
    # gives for one of these firms (its limit search is the per-row reference's, which the core
    # is tested equal to in tests/test_core.py), at a request far above what the firm can get
    limit, found = limit_decision(home, records)
    log.write(limit)
    out = tmp_path / "limit.html"
    result = runner.invoke(app, ["explain", limit.request_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"bound by {found.binding}" in " ".join(result.output.split())
    html = out.read_text()
    assert f'<td class="text">binding constraint</td><td class="text">{found.binding}</td>' in html
    shown = re.search(r'<td class="text">limit \(CNY\)</td><td class="text">([^<]+)</td>', html)
    assert shown and amount(shown[1]) == pytest.approx(found.limit, abs=0.5), shown
    # every constraint the search computed is tabled with its amount; the binding one flagged
    rows = re.findall(
        r'<tr( class="flag")?><td class="text">(\w+)</td><td(?: class="text")?>([^<]*)</td>'
        r'<td class="text">(yes|no)</td></tr>',
        html,
    )
    tabled = {name: (amount(v), flag == ' class="flag"', binds) for flag, name, v, binds in rows}
    assert set(tabled) == set(found.constraints), tabled
    for name, value in found.constraints.items():
        binds = name == found.binding
        assert tabled[name] == (pytest.approx(value, abs=0.5), binds, "yes" if binds else "no")


def amount(text: str) -> float:
    """A CNY amount as the page shows it ("342,598", "34000.0000", "no bound")."""
    if text == "no bound":
        return math.inf
    return float(re.sub(r"[^0-9.]", "", text.split()[0]))


def limit_decision(home, records):
    """A backfilled decision logged again as the /limit answer for 5,000,000 CNY: the service's
    response fields from a real limit search, for the first firm that gets a limit."""
    from serving import policy as pol
    from serving.model import load_champion
    from tests.test_core import reference

    model, policy = load_champion(home, "microloan"), pol.load_policy()
    for record in sorted(records, key=lambda r: r.request_id):
        row = {"tax_sales_12m": None, "pay_inflow_3m": None, **record.features,
               "requested_amount": 5_000_000.0, "term_months": 12}  # fmt: skip
        found = reference(model, row, policy)["limit"]
        if found.limit > 0 and found.constraints:
            break
    else:
        raise AssertionError("no backfilled firm gets a limit")
    assert found.binding in found.constraints  # one of the constraints the search computed
    response = {
        **record.response,
        "limit": found.limit,
        "binding_constraint": found.binding,
        "constraints": {k: None if math.isinf(v) else v for k, v in found.constraints.items()},
        "pd_at_limit": found.pd_at_limit,
        "annual_rate": found.annual_rate,
        "rate_parts": found.parts,
    }
    limit = dataclasses.replace(
        record, request_id=record.request_id + "-limit", endpoint="limit",
        limit_amount=found.limit, response=response,
    )  # fmt: skip
    return limit, found

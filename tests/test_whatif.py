"""What-if (issue 14, item 3): "what would get this approved?" for one enterprise and product.

On the served test home (models trained on the small simulated region, the server's policy): a
change set the answer proposes approves when it is applied to the enterprise's stored feature
row and decided again by the decision core; the grid's cell for the requested amount and term
is the /score decision; a knock-out on a feature the enterprise cannot act on gets "no
actionable change" rather than a suggestion; nothing is written to the decision log; bad
requests are 4xx in Kapok's error shape, and the CLI prints the same answer or one line, exit 2.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from features.schema import ACTIONABLE, BY_NAME
from kapok.cli import app
from serving import core
from serving import policy as pol
from serving.api_models import ErrorBody, ScoreAnswer, WhatIfAnswer
from serving.decision_log import DecisionLog
from serving.engine import LendingEngine
from serving.whatif import MAX_CELLS, NOTE, smallest_changes
from tests.test_service import Api, served  # noqa: F401

pytestmark = pytest.mark.slow

AMOUNT, TERM = 200_000.0, 12


@pytest.fixture(scope="module")
def engine(served) -> LendingEngine:  # noqa: F811
    """The server's engine in this process: its home, its policy, the microloan champion."""
    home = served[1]
    policy = pol.load_policy(home.home / "policy.toml")
    return LendingEngine(home, policy=policy, products=("microloan",))


@pytest.fixture(scope="module")
def region(served, engine: LendingEngine) -> tuple[core.Decisions, list[str]]:  # noqa: F811
    """Every enterprise of the region decided at AMOUNT over TERM months (one core call)."""
    ids: list[str] = served[2]
    requests = [(eid, AMOUNT, TERM) for eid in ids]
    decided = engine._decide_online("microloan", requests, reasons="none")
    assert decided is not None
    d, found = decided
    return d, [ids[i] for i, _ in found]


def stored(engine: LendingEngine, eid: str) -> pl.DataFrame:
    """The enterprise's stored feature row as the online store holds it, at AMOUNT and TERM."""
    rows = engine.online.read([eid])
    assert rows["found"][0], eid
    return pl.DataFrame([rows.get_column(name) for name in core.STORED_SCHEMA]).with_columns(
        pl.lit(AMOUNT).alias("requested_amount"), pl.lit(TERM).cast(pl.Int64).alias("term_months")
    )


def applied(row: pl.DataFrame, changes: dict[str, float]) -> pl.DataFrame:
    """The row with exactly these feature values changed."""
    return row.with_columns(
        [pl.lit(v).cast(row.schema[name]).alias(name) for name, v in changes.items()]
    )


def answer_changes(engine: LendingEngine, eid: str) -> dict[str, Any]:
    from serving.whatif import what_if

    return what_if(engine, eid, "microloan", AMOUNT, TERM).as_dict()


# -- (b) the smallest actionable change --------------------------------------------------------
def test_a_proposed_change_set_approves_when_applied(engine, region) -> None:
    """Declined or referred enterprises for which the answer proposes changes: applying exactly
    those changes to the stored feature row and deciding it again with the core approves, at the
    PD the answer gives; each change's PD alone is the core's PD with that change only; and
    the set is the smallest: without any one of its changes it no longer approves."""
    d, ids = region
    model, policy = engine.model("microloan"), engine.policy
    found: list[str] = []
    sizes: set[int] = set()
    for r in np.flatnonzero(d.severity != 0).tolist():
        c = smallest_changes(d, r)
        if c.status == "found" and (len(c.changes) not in sizes or len(found) < 3):
            found.append(ids[r])
            sizes.add(len(c.changes))
        if len(found) >= 6:
            break
    assert found, "no declined or referred enterprise has an actionable change that approves"
    for eid in found:
        answer = answer_changes(engine, eid)
        WhatIfAnswer.model_validate(answer)
        changes = answer["changes"]
        assert answer["current"]["decision"] in ("refer", "decline"), answer["current"]
        assert changes["status"] == "found" and changes["changes"], changes
        row = stored(engine, eid)
        proposal = {c["feature"]: c["proposed_value"] for c in changes["changes"]}
        for c in changes["changes"]:
            feature = BY_NAME[c["feature"]]
            assert feature.actionable is not None, c
            move = feature.actionable
            # moved the way the enterprise can move it, no further than its bound
            assert (c["proposed_value"] - c["current_value"]) * move.direction > 0, c
            assert (move.bound - c["proposed_value"]) * move.direction >= 0, c
            assert row[c["feature"]][0] == pytest.approx(c["current_value"]), c
        after = core.decide(model, applied(row, proposal), policy)
        assert after.decision[0] == "approve", (eid, proposal, after.pd[0])
        assert after.pd[0] == pytest.approx(changes["final_pd"], abs=1e-6)
        assert changes["final_decision"] == "approve"
        for c in changes["changes"]:
            alone = core.decide(model, applied(row, {c["feature"]: c["proposed_value"]}), policy)
            assert alone.pd[0] == pytest.approx(c["pd_alone"], abs=1e-6), c
            assert alone.decision[0] == c["decision_alone"], c
        if len(proposal) > 1:
            for name in proposal:
                fewer = {k: v for k, v in proposal.items() if k != name}
                again = core.decide(model, applied(row, fewer), policy)
                assert again.decision[0] != "approve", (eid, fewer)
        assert answer["estimate"] is True and answer["note"] == NOTE


def test_a_knockout_the_enterprise_cannot_act_on_gets_no_actionable_change(engine, region):
    """An enterprise declined by a knock-out on its court or credit record (enforcement, a
    dishonest-debtor listing, serious delinquency) gets "no actionable change helps", naming the
    knock-out, and no change; indeed even every actionable feature at its bound does not approve
    it."""
    d, ids = region
    codes = [rule.code for rule in engine.policy.knockout_rules]
    hard = {"KO_ENFORCEMENT", "KO_DISHONEST_DEBTOR", "KO_SERIOUS_DELINQUENCY"}
    rows = [
        r
        for r in range(len(d))
        if any(d.knockouts.fired[r, i] and codes[i] in hard for i in range(len(codes)))
        and not d.knockouts.missing[r].any()
    ]
    assert rows, "no enterprise of the region is knocked out on its court or credit record"
    model, policy = engine.model("microloan"), engine.policy
    for r in rows[:3]:
        answer = answer_changes(engine, ids[r])
        WhatIfAnswer.model_validate(answer)
        changes = answer["changes"]
        assert answer["current"]["decision"] == "decline"
        assert changes["status"] == "blocked", changes
        assert changes["changes"] == [] and changes["final_pd"] is None, changes
        assert changes["message"].startswith("no actionable change helps"), changes
        assert set(changes["blocked_by"]) & hard, changes
        fired = [c for i, c in enumerate(codes) if d.knockouts.fired[r, i]]
        assert set(changes["blocked_by"]) <= set(fired)
        row = stored(engine, ids[r])
        everything = {
            f.name: f.actionable.bound  # type: ignore[union-attr]
            for f in ACTIONABLE
            if row[f.name][0] is not None
        }
        assert core.decide(model, applied(row, everything), policy).decision[0] == "decline"


def test_an_approved_enterprise_needs_no_change(engine, region) -> None:
    d, ids = region
    r = int(np.flatnonzero(d.severity == 0)[0])
    changes = answer_changes(engine, ids[r])["changes"]
    assert changes["status"] == "approved_already" and changes["changes"] == [], changes


# -- (a) the grid, over HTTP, and nothing logged -----------------------------------------------
def log_count(served) -> int:  # noqa: F811
    log = DecisionLog(f"sqlite:///{served[1].home / 'decisions' / 'decisions.db'}")
    try:
        return log.count()
    finally:
        log.close()


def whatif_body(eid: str, **more: Any) -> dict[str, Any]:
    return {"enterprise_id": eid, "product": "microloan", "amount": AMOUNT, "term_months": TERM,
            **more}  # fmt: skip


def test_the_grid_cell_of_the_request_is_the_score_decision_and_nothing_is_logged(
    served,  # noqa: F811
    region,
) -> None:
    """Over HTTP, for a referred or declined enterprise and an approved one: /whatif answers an
    estimate, says so, and writes nothing to the decision log; the grid has one cell per amount
    and term, and the cell of the requested amount and term (and the current decision) is what
    /score decides for them."""
    api: Api = served[0]
    d, ids = region
    firms = [
        ids[int(np.flatnonzero(d.severity != 0)[0])],
        ids[int(np.flatnonzero(d.severity == 0)[0])],
    ]
    grid = {"amounts": [50_000, AMOUNT, 400_000], "terms": [6, TERM, 24]}
    before = log_count(served)
    answers = []
    for eid in firms:
        status, answer = api.call("/whatif", whatif_body(eid, grid=grid), role="lender")
        assert status == 200, answer
        WhatIfAnswer.model_validate(answer)
        assert answer["estimate"] is True, answer
        assert (
            answer["note"]
            == "an estimate from the current model and policy; not a decision or an offer"
        )
        assert "request_id" not in answer
        cells = {(c["amount"], c["term_months"]): c for c in answer["grid"]}
        assert set(cells) == {(a, t) for a in grid["amounts"] for t in grid["terms"]}
        answers.append((eid, answer, cells))
    assert log_count(served) == before, "a what-if wrote to the decision log"
    for eid, answer, cells in answers:
        for amount, term in ((AMOUNT, TERM), (50_000, 24)):
            status, score = api.call(
                "/score",
                {"enterprise_id": eid, "product": "microloan", "requested_amount": amount,
                 "term_months": term},
                role="lender",
            )  # fmt: skip
            assert status == 200, score
            ScoreAnswer.model_validate(score)
            cell = cells[(amount, term)]
            assert (cell["decision"], cell["grade"]) == (score["decision"], score["grade"])
            assert cell["pd"] == pytest.approx(score["pd"], abs=2e-6)
            assert cell["score"] == pytest.approx(score["score"], abs=0.11)
            if (amount, term) == (AMOUNT, TERM):
                now = answer["current"]
                assert (now["decision"], now["pd"], now["grade"]) == (
                    score["decision"], score["pd"], score["grade"]
                )  # fmt: skip
                assert now["reasons"] == score["reasons"]
                assert answer["changes"]["decision_before"] == score["decision"]
    assert log_count(served) == before + 4  # the four /score calls, and nothing else


def test_without_a_grid_the_default_grid_is_smaller_amounts_and_longer_terms(served, region):  # noqa: F811
    api: Api = served[0]
    _, ids = region
    status, answer = api.call("/whatif", whatif_body(ids[0]), role="lender")
    assert status == 200, answer
    cells = {(c["amount"], c["term_months"]) for c in answer["grid"]}
    assert cells == {(a, t) for a in (AMOUNT, 150_000, 100_000) for t in (12, 24, 36)}


@pytest.mark.parametrize(
    ("change", "status", "code", "field", "said"),
    [
        ({"grid": {"amounts": [1e5 * k for k in range(1, 6)], "terms": [6, 12, 18, 24, 36]}},
         400, "invalid_request", "grid", f"at most {MAX_CELLS} cells"),
        ({"grid": {"terms": [12, 48]}}, 400, "invalid_request", "grid.terms[1]", "1 and 36"),
        ({"term_months": 48}, 400, "invalid_request", "term_months", "between 1 and 36"),
        ({"grid": {"amounts": [-5]}}, 400, "invalid_request", "grid.amounts[0]", "greater than 0"),
        ({"grid": {"amounts": list(range(1, 22))}}, 400, "invalid_request", "grid.amounts", "20"),
        ({"grid": {"amounts": []}}, 400, "invalid_request", "grid.amounts", "at least 1"),
        ({"amount": 0}, 400, "invalid_request", "amount", "greater than 0"),
        ({"colour": "red"}, 400, "invalid_request", "colour", "unknown field"),
        ({"product": "mortgage"}, 400, "invalid_request", "product", "microloan"),
        ({"enterprise_id": "91440112554351777N"}, 404, "enterprise_not_found", "enterprise_id",
         "no data for 91440112554351777N"),
    ],
)  # fmt: skip
def test_bad_requests_are_4xx_in_kapoks_error_shape(
    served,  # noqa: F811
    region,
    change: dict,
    status: int,
    code: str,
    field: str,
    said: str,
) -> None:
    api: Api = served[0]
    _, ids = region
    got, body = api.call("/whatif", {**whatif_body(ids[0]), **change}, role="lender")
    assert got == status, body
    ErrorBody.model_validate(body)
    assert (body["error"]["code"], body["error"]["field"]) == (code, field), body
    assert said in body["error"]["message"], body


def test_roles(served, region) -> None:  # noqa: F811
    """Lenders and admins may ask; a reviewer key is 403 and no key 401, before the body."""
    api: Api = served[0]
    _, ids = region
    for role, status in (("lender", 200), ("admin", 200), ("reviewer", 403), (None, 401)):
        got, body = api.call("/whatif", whatif_body(ids[0]), role=role)
        assert got == status, (role, body)


# -- the CLI -----------------------------------------------------------------------------------
def test_cli_prints_the_answer_and_refuses_bad_input_in_one_line(served, region, monkeypatch):  # noqa: F811
    env = served[3]
    for name in ("KAPOK_HOME", "KAPOK_POLICY"):
        monkeypatch.setenv(name, env[name])
    d, ids = region
    eid = ids[int(np.flatnonzero(d.severity != 0)[0])]
    runner = CliRunner()
    args = ["whatif", eid, "--product", "microloan", "--amount", "200000", "--term", "12"]
    shown = runner.invoke(app, [*args, "--amounts", "100000,200000", "--terms", "6,12"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert f"estimate: {NOTE}" in text and "other amounts and terms" in text, text
    assert "what the enterprise can change:" in text and "100,000" in text, text
    as_json = runner.invoke(app, [*args, "--amounts", "100000,200000", "--terms", "6,12", "--json"])
    assert as_json.exit_code == 0, as_json.output
    answer = json.loads(as_json.stdout)
    WhatIfAnswer.model_validate(answer)
    assert len(answer["grid"]) == 4 and answer["estimate"] is True
    assert answer["changes"]["status"] in ("found", "out_of_reach", "blocked")
    for extra, said in (
        (
            ["--amounts", "10000,20000,30000,40000,50000", "--terms", "6,12,18,24,36"],
            f"at most {MAX_CELLS} cells",
        ),
        (
            ["--amounts", "100000,5000000"],  # more than microloan lends at all
            "--amounts[1] must be between CNY 10,000 and 3,000,000 for microloan",
        ),
        (["--terms", "6,48"], "--terms[1] must be a whole number of months between 1 and 36"),
        (["--amounts", "1,x"], "--amounts: 'x' is not a number"),
    ):
        refused = runner.invoke(app, [*args, *extra])
        assert refused.exit_code == 2, refused.output
        lines = [line for line in refused.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and said in lines[0], lines
    unknown = runner.invoke(app, ["whatif", "91440112554351777N", "--amount", "200000"])
    assert unknown.exit_code == 2 and "no data for 91440112554351777N" in unknown.output

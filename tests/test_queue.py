"""The referral queue (issue 14, item 2): referred decisions wait for a credit officer, whose
approve / decline is its own record in the hash-chained decision log, linked to the original.

The rules are tested in-process on a decision log of hand-made records (fast); the API, the
roles and the link from a real /score refer to GET /queue and POST /queue/{request_id} over a
served BentoML API (`served`, slow); the CLI, the portfolio, `kapok monitor`'s override rates
and the model-risk report's override counts on the same log.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from serving import audit
from serving.decision_log import DecisionLog, DecisionRecord, new_request_id
from serving.policy import load_policy
from serving.queue import (
    AlreadyOverridden,
    NotInLog,
    NotReferred,
    Override,
    OverrideRefused,
    QueueError,
    open_queue,
    override,
)
from tests.test_service import served  # noqa: F401

T0 = dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC)
EID = "91440112554351777N"


def application(
    decision: str = "refer",
    *,
    at: dt.datetime = T0,
    product: str = "microloan",
    amount: float = 300_000,
    grade: str = "C3",
    limit: float | None = None,
    endpoint: str = "score",
) -> DecisionRecord:
    """A logged application decision as the API writes one."""
    rid = new_request_id()
    reasons = [
        {
            "code": "KO_ABNORMAL_OPERATIONS",
            "feature": "reg_abnormal_ops_listed",
            "value": 1,
            "impact": None,
            "knockout": True,
            "text_en": "abnormal ops",
            "text_zh": "经营异常",
        }
    ]
    price = {
        "product": product,
        "rate_name": "annual_rate",
        "rate": 0.15,
        "annual_rate": 0.15,
        "extra_annual_cost": 0.0,
        "all_in_rate": 0.15,
        "cap": 0.24,
        "within_cap": True,
    }
    return DecisionRecord(
        request_id=rid,
        decided_at=at,
        caller="acme",
        endpoint=endpoint,
        enterprise_id=EID,
        product=product,
        request={
            "enterprise_id": EID,
            "product": product,
            "requested_amount": amount,
            "term_months": 12,
        },
        model_name=f"kapok-{product}",
        model_version="1",
        features={"reg_abnormal_ops_listed": 1, "tax_sales_12m": 2.5e6},
        feature_timestamps={"registration": "2026-02-05T00:00:00+00:00"},
        pd=0.13,
        score=545.2,
        grade=grade,
        decision=decision,
        limit_amount=limit,
        price=price,
        reasons=reasons,
        response={
            "request_id": rid,
            "decision": decision,
            "policy_path": ["knock-out KO_ABNORMAL_OPERATIONS -> refer"],
        },
    )


@pytest.fixture
def log(tmp_path: Path):
    with DecisionLog(f"sqlite:///{tmp_path / 'decisions.db'}") as log:
        yield log


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def approve(reason: str = "site visit: orders confirmed", **kw: Any) -> Override:
    return Override("approve", reason, officer="officer-li", **kw)


def test_a_refer_is_in_the_queue_until_an_officer_decides_it(log, policy, tmp_path) -> None:
    """The queue lists the referred applications only (not approvals, declines, prospect offers
    or overrides), the longest waiting first; an override is a new record linked to the
    original, which stays as it was; the chain verifies; the item leaves the queue."""
    older = application(at=T0)
    newer = application(at=T0 + dt.timedelta(hours=1), product="guarantee", amount=800_000)
    log.write_many([older, newer, application("approve"), application("decline")])
    queue = open_queue(log)
    assert queue["count"] == 2
    assert [i["request_id"] for i in queue["items"]] == [older.request_id, newer.request_id]
    item = queue["items"][0]
    assert (item["amount"], item["term_months"], item["grade"]) == (300_000, 12, "C3")
    assert item["knockouts"] == ["KO_ABNORMAL_OPERATIONS"]
    assert item["referred_because"] == ["knock-out KO_ABNORMAL_OPERATIONS -> refer"]
    assert open_queue(log, product="guarantee")["count"] == 1
    assert open_queue(log, since=T0 + dt.timedelta(minutes=1))["count"] == 1
    assert open_queue(log, limit=1)["items"][0]["request_id"] == older.request_id

    before = log.get(older.request_id)
    made = override(log, policy, older.request_id, approve(limit=200_000), caller="key-li")
    logged = log.get(made.request_id)
    assert logged == made and logged.request_id != older.request_id
    assert logged.endpoint == "override" and logged.decision == "approve"
    assert logged.request["overrides"] == older.request_id
    assert logged.request["reason"] == "site visit: orders confirmed"
    assert logged.request["officer"] == "officer-li" and logged.caller == "key-li"
    assert logged.request["requested_amount"] == 300_000 and logged.request["term_months"] == 12
    assert logged.limit_amount == 200_000
    assert (logged.pd, logged.grade, logged.features) == (older.pd, older.grade, older.features)
    assert logged.reasons == older.reasons and logged.price == older.price
    assert log.get(older.request_id) == before  # the original is unchanged
    verdict = audit.verify(log.url)
    assert verdict.intact and verdict.records == 5, verdict
    assert [i["request_id"] for i in open_queue(log)["items"]] == [newer.request_id]
    # a decline sets no limit; an officer's price replaces the headline rate
    declined = override(
        log,
        policy,
        newer.request_id,
        Override("decline", "fraud doubts", "officer-wu", price=0.02),
        caller="key-wu",
    )
    assert declined.limit_amount is None and declined.decision == "decline"
    assert declined.price["rate"] == 0.02 and declined.price["model_rate"] == 0.15
    assert open_queue(log)["count"] == 0


def test_what_cannot_be_overridden(log, policy) -> None:
    """Unknown id: NotInLog (404); an approve or an override: not a refer (409, saying what it
    was); a second override: 409 naming the first one's id and officer; a limit above the
    product's maximum, the house limit or the amount asked for: 422 saying which."""
    refer, approved = application(amount=2_000_000), application("approve")
    log.write_many([refer, approved])
    with pytest.raises(NotInLog) as e:
        override(log, policy, "req_nope", approve(), caller="k")
    assert e.value.status == 404
    with pytest.raises(NotReferred, match="decided 'approve'") as e:
        override(log, policy, approved.request_id, approve(), caller="k")
    assert e.value.status == 409
    for limit, said in (
        (3_500_000, "microloan maximum"),
        (1_200_000, "house limit"),
        (5_000, "minimum"),
    ):
        with pytest.raises(OverrideRefused, match=said) as e:
            override(log, policy, refer.request_id, approve(limit=limit), caller="k")
        assert e.value.status == 422 and e.value.field == "limit"
    with pytest.raises(OverrideRefused, match="legal cap"):
        override(log, policy, refer.request_id, approve(price=0.30), caller="k")
    small = application(amount=100_000)
    log.write(small)
    with pytest.raises(OverrideRefused, match="asked for"):
        override(log, policy, small.request_id, approve(limit=150_000), caller="k")
    first = override(log, policy, refer.request_id, approve(), caller="k")
    with pytest.raises(AlreadyOverridden) as e:
        override(log, policy, refer.request_id, Override("decline", "no", "officer-wu"), caller="w")
    assert e.value.status == 409
    assert first.request_id in e.value.message and "'officer-li'" in e.value.message
    with pytest.raises(NotInLog, match="override record"):
        override(log, policy, first.request_id, approve(), caller="k")
    for bad in (
        lambda: Override("approve", "  ", "li"),
        lambda: Override("maybe", "x", "li"),
        lambda: Override("decline", "x", "li", limit=10_000),
        lambda: Override("approve", "x", "li", limit=-1),
    ):
        with pytest.raises(QueueError):
            bad()


def _race(url: str, request_id: str, officer: str, start: Any, out: Any) -> None:
    with DecisionLog(url) as log:
        start.wait()
        try:
            made = override(log, load_policy(), request_id, approve(), caller=officer)
            out.put(("won", made.request_id))
        except AlreadyOverridden as e:
            out.put(("lost", e.message))


def test_two_officers_racing_in_two_processes_one_wins(tmp_path) -> None:
    """Two processes override the same referral at the same moment, several times over: exactly
    one override is logged each time; the other is told the winner's request id."""
    racing(f"sqlite:///{tmp_path / 'race.db'}")


@pytest.mark.postgres
def test_two_officers_racing_on_a_postgresql_log(pg_url: str) -> None:
    """The same on a PostgreSQL log (the unique index there is on request::jsonb)."""
    racing(pg_url)


def racing(url: str) -> None:
    with DecisionLog(url) as log:
        refers = [application() for _ in range(3)]
        log.write_many(refers)
    ctx = multiprocessing.get_context("fork")  # no re-import of this module in the child
    for refer in refers:
        start, out = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_race, args=(url, refer.request_id, name, start, out))
            for name in ("li", "wu")
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        results = sorted(out.get(timeout=5) for _ in procs)
        assert [r[0] for r in results] == ["lost", "won"], results
        assert results[1][1] in results[0][1]  # the loser is told the winner's id
    with DecisionLog(url) as log:
        assert open_queue(log)["count"] == 0
        assert len(log.between(endpoints=["override"])) == len(refers)
    assert audit.verify(url).intact


def test_a_race_past_the_check_is_stopped_by_the_log(log, policy, monkeypatch) -> None:
    """Even when the check before the write sees nothing (the other officer's record committed
    in between), the log refuses the second override and the officer is told who won."""
    refer = application()
    log.write(refer)
    first = override(log, policy, refer.request_id, approve(), caller="k")
    real = log.override_of
    calls = []

    def blind_first_time(request_id: str):
        calls.append(request_id)
        return None if len(calls) == 1 else real(request_id)

    monkeypatch.setattr(log, "override_of", blind_first_time)
    with pytest.raises(AlreadyOverridden, match=first.request_id):
        override(log, policy, refer.request_id, approve(), caller="k")
    assert len(log.between(endpoints=["override"])) == 1


def test_override_rates_and_report_counts(log, policy, tmp_path) -> None:
    """Monitor's override rates (share of the referrals an officer decided, approve vs decline,
    by grade and by officer) and the model-risk report's counts of overrides against the model
    count the overrides; a report without a decision log says so instead of failing."""
    import polars as pl

    from review.monitor import officer_overrides, override_rates
    from review.report import override_counts

    refers = [application(grade="C2"), application(grade="C2"), application(grade="C3")]
    log.write_many([*refers, application("approve", grade="B1")])
    override(log, policy, refers[0].request_id, approve(), caller="li")
    override(log, policy, refers[2].request_id, Override("decline", "x", "officer-wu"), caller="wu")
    current = log.frame(columns=["request_id", "grade", "decision"])
    overrides = officer_overrides(log, "microloan", None)
    by_grade, totals = override_rates(current, overrides, "grade")
    assert totals == {"referred": 3, "overridden": 2, "approved": 1, "declined": 1}
    rows = {r["grade"]: r for r in by_grade.iter_rows(named=True)}
    assert set(rows) == {"C2", "C3"}  # grades with a referral only
    assert (rows["C2"]["referred"], rows["C2"]["approved"], rows["C2"]["override_rate"]) == (
        2,
        1,
        0.5,
    )
    assert (rows["C3"]["declined"], rows["C3"]["approve_share"]) == (1, 0.0)
    by_officer, _ = override_rates(current, overrides, "officer")
    assert by_officer.select("officer", "approved", "declined").rows() == [
        ("officer-li", 1, 0),
        ("officer-wu", 0, 1),
    ]
    counts = override_counts("kapok-microloan", "1", log.url)
    assert isinstance(counts, pl.DataFrame)
    assert counts.rows() == [
        ("refer", "approve", 1),
        ("refer", "decline", 1),
        ("refer", "still open", 1),
    ]
    missing = override_counts("kapok-microloan", "1", f"sqlite:///{tmp_path / 'none' / 'x.db'}")
    assert isinstance(missing, str) and missing.startswith("no decision log")
    assert not (tmp_path / "none").exists()


# -- over HTTP: a served API (tests/test_service.py's `served`) ----------------------------------
def get(api: Any, path: str, role: str | None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {api.keys[role]}"} if role else {}
    request = urllib.request.Request(api.base + path, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_the_queue_over_http(served) -> None:  # noqa: F811
    """A referred /score decision shows up in GET /queue; POSTing an override logs a new
    override record linked to it (the original unchanged, the chain intact) and it leaves the
    queue; the approval is a loan in the lender's book and monitor counts it; roles, 404, 409,
    422 and bad bodies answer Kapok's error shape."""
    from review.monitor import monitor
    from review.portfolio import from_decision_log
    from serving.api_models import ErrorBody, OverrideAnswer, QueueAnswer
    from serving.policy import load_policy as policy_at
    from tests.test_service import request

    api, home, ids, _ = served
    referred, approved = None, None
    for eid in ids[:600]:
        # a guarantee: no price cap turns a PD in the refer band into a decline
        application = request(eid, product="guarantee", amount=500_000)
        status, body = api.call("/score", application, role="lender")
        assert status == 200, body
        if body["decision"] == "refer" and referred is None:
            referred = {**body, "enterprise_id": eid}
        if body["decision"] == "approve" and approved is None:
            approved = body
        if referred and approved:
            break
    assert referred and approved, "no refer and approve among the first 600 enterprises"
    rid = referred["request_id"]

    status, queue = get(api, "/queue?product=guarantee&limit=1000", "officer")
    assert status == 200, queue
    QueueAnswer.model_validate(queue)
    item = next(i for i in queue["items"] if i["request_id"] == rid)
    assert (item["enterprise_id"], item["amount"], item["term_months"]) == (
        referred["enterprise_id"],
        500_000,
        12,
    )
    assert item["grade"] == referred["grade"] and item["reasons"] == referred["reasons"]
    assert any(s.endswith("-> refer") for s in item["referred_because"]), item

    # roles: a lender may not see the queue, an officer may not score
    for status, body in (
        get(api, "/queue", "lender"),
        api.call(f"/queue/{rid}", {"decision": "approve", "reason": "x"}, role="lender"),
        api.call("/score", request(ids[0]), role="officer"),
    ):
        assert status == 403 and body["error"]["code"] == "forbidden", body
    assert get(api, "/queue", None)[0] == 401

    # bad bodies: 400 in the error shape, nothing logged
    for bad in (
        {"decision": "maybe", "reason": "x"},
        {"decision": "approve"},
        {"decision": "approve", "reason": "   "},
        {"decision": "approve", "reason": "x", "extra": 1},
        {"decision": "decline", "reason": "x", "limit": -5},
        [1],
    ):
        status, body = api.call(f"/queue/{rid}", bad, role="officer")
        assert status == 400, (bad, body)
        ErrorBody.model_validate(body)
    status, body = api.call(f"/queue/{rid}", None, role="officer", raw=b"not json")
    assert (status, body["error"]["code"]) == (400, "invalid_json"), body
    status, body = api.call(
        f"/queue/{rid}", {"decision": "approve", "reason": "x", "limit": 800_000}, role="officer"
    )
    assert (status, body["error"]["code"], body["error"]["field"]) == (
        422,
        "override_refused",
        "limit",
    ), body

    url = f"sqlite:///{home.home / 'decisions' / 'decisions.db'}"
    with DecisionLog(url) as log:
        original = log.get(rid)
    status, answer = api.call(
        f"/queue/{rid}",
        {"decision": "approve", "reason": "site visit: orders confirmed", "limit": 400_000},
        role="officer",
    )
    assert status == 200, answer
    OverrideAnswer.model_validate(answer)
    assert answer["overrides"] == rid and answer["officer"] == "test-officer"
    with DecisionLog(url) as log:
        made = log.get(answer["request_id"])
        assert log.get(rid) == original  # the referral itself is never touched
    assert made.endpoint == "override" and made.request["overrides"] == rid
    assert made.caller == "test-officer" and made.limit_amount == 400_000
    assert made.decision == "approve" and made.response == answer
    assert audit.verify(url).intact
    _, queue = get(api, "/queue?limit=1000", "officer")
    assert rid not in {i["request_id"] for i in queue["items"]}

    status, body = api.call(f"/queue/{rid}", {"decision": "decline", "reason": "x"}, "admin")
    assert (status, body["error"]["code"]) == (409, "already_overridden"), body
    assert answer["request_id"] in body["error"]["message"] and "test-officer" in str(body)
    status, body = api.call(
        f"/queue/{approved['request_id']}", {"decision": "decline", "reason": "x"}, "officer"
    )
    assert (status, body["error"]["code"]) == (409, "not_referred"), body
    assert "'approve'" in body["error"]["message"]
    status, body = api.call("/queue/req_unknown", {"decision": "decline", "reason": "x"}, "officer")
    assert (status, body["error"]["code"]) == (404, "decision_not_found"), body

    # the approval is a loan in the lender's book, on the officer's limit
    book = from_decision_log(url, "guarantee", dt.datetime.now(dt.UTC))
    loan = book.filter(book["request_id"] == answer["request_id"])
    assert loan.height == 1 and loan["requested_amount"][0] == 400_000
    # monitor's override rates count it

    result = monitor(
        home, "guarantee", log=DecisionLog(url), policy=policy_at(home.home / "policy.toml")
    )
    grade = result.overrides_by_grade.filter(result.overrides_by_grade["grade"] == made.grade)
    assert grade["approved"][0] >= 1 and grade["overridden"][0] >= 1
    officer = result.overrides_by_officer.filter(
        result.overrides_by_officer["officer"] == "test-officer"
    )
    assert officer["approved"][0] == 1
    assert any(c.name == "officer overrides" for c in result.checks)

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
from tests.test_decision_log import pg_url  # noqa: F401

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
def test_two_officers_racing_on_a_postgresql_log(pg_url: str) -> None:  # noqa: F811
    """The same on a PostgreSQL log (the unique index there is on request::jsonb)."""
    racing(pg_url)


def racing(url: str) -> None:
    with DecisionLog(url) as log:
        refers = [application() for _ in range(3)]
        log.write_many(refers)
    ctx = multiprocessing.get_context("spawn")
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

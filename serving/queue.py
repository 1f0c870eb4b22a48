"""The referral queue: referred applications waiting for a credit officer, and their overrides.

A `refer` decision goes to a credit officer. The open queue is every logged application decision
(/score, /limit, /price, /screen, `kapok decide`, `kapok backfill`) whose decision is "refer"
and that no override record links to yet, the longest waiting first. An officer approves or
declines it with a reason (and, approving, optionally another limit; either way optionally
another price): the override is a record of its own in the append-only, hash-chained decision
log (endpoint "override"), linked to the original by `request.overrides`; the original is never
touched. One function, `override`, holds the rules for the API (POST /queue/{request_id}) and
the CLI (`kapok queue decide`); `open_queue` lists the queue for GET /queue and `kapok queue
list`.

One override per referral, across processes: the decision log has a unique index on the
overridden request id over override records (serving/decision_log.py `_OVERRIDE_ONCE`), so of
two officers racing on one referral the database takes exactly one record; the other gets
`AlreadyOverridden` naming the winner's request id and officer.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from serving.decision_log import (
    APPLICATION_ENDPOINTS,
    DecisionLog,
    DecisionLogError,
    DecisionRecord,
    json_safe,
    new_request_id,
)
from serving.policy import HEADLINE_RATE, Policy, legal_cap

OFFICER_DECISIONS = ("approve", "decline")
DEFAULT_LIMIT = 100  # items a listing shows unless asked for more
MAX_LIMIT = 1000
ORDER = "oldest first"  # the longest-waiting referral first


class QueueError(Exception):
    """A request the queue refuses: its HTTP status, a stable code, a one-line message and the
    field at fault (the API answers it in Kapok's error shape; the CLI prints the message)."""

    status: int = HTTPStatus.BAD_REQUEST
    code: str = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotInLog(QueueError):
    status, code = HTTPStatus.NOT_FOUND, "decision_not_found"


class NotReferred(QueueError):
    status, code = HTTPStatus.CONFLICT, "not_referred"


class AlreadyOverridden(QueueError):
    status, code = HTTPStatus.CONFLICT, "already_overridden"


class OverrideRefused(QueueError):
    """The officer's limit or price breaks the lending policy."""

    status, code = HTTPStatus.UNPROCESSABLE_ENTITY, "override_refused"


# -- the queue ------------------------------------------------------------------------------------
def requested(record: DecisionRecord) -> tuple[float | None, int | None]:
    """The amount and term the application asked for (/price logs `amount`)."""
    request = record.request or {}
    amount = request.get("requested_amount", request.get("amount"))
    term = request.get("term_months")
    return (
        float(amount) if isinstance(amount, int | float) else None,
        int(term) if isinstance(term, int | float) else None,
    )


def queue_item(record: DecisionRecord) -> dict[str, Any]:
    """One referral as an officer sees it: the application, the model's decision, its reasons
    and why it was referred (the knock-outs that fired and the policy path)."""
    amount, term = requested(record)
    reasons = record.reasons or []
    knockouts = [r.get("code") for r in reasons if isinstance(r, dict) and r.get("knockout")]
    path = (record.response or {}).get("policy_path")
    return json_safe(
        {
            "request_id": record.request_id,
            "decided_at": record.decided_at.isoformat(),
            "endpoint": record.endpoint,
            "caller": record.caller,
            "product": record.product,
            "enterprise_id": record.enterprise_id,
            "amount": amount,
            "term_months": term,
            "limit": record.limit_amount,
            "pd": record.pd,
            "score": record.score,
            "grade": record.grade,
            "decision": record.decision,
            "knockouts": knockouts,
            "referred_because": path if isinstance(path, list) else [],
            "reasons": reasons,
        }
    )


def open_queue(
    log: DecisionLog,
    product: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """The open referrals (optionally of one product, decided in [since, until)), the longest
    waiting first: `count` in all, `items` the first `limit` of them."""
    records, total = log.open_referrals(product, since, until, limit)
    return {"order": ORDER, "count": total, "items": [queue_item(r) for r in records]}


# -- an override ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Override:
    """What an officer decides on one referral."""

    decision: str  # approve | decline
    reason: str
    officer: str
    limit: float | None = None  # approve only
    price: float | None = None  # the headline rate (annual rate / fee / premium), annual

    def __post_init__(self) -> None:
        if self.decision not in OFFICER_DECISIONS:
            raise QueueError(
                f"decision must be approve or decline, got {self.decision!r}", "decision"
            )
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise QueueError("reason: required, a non-empty text saying why", "reason")
        if not isinstance(self.officer, str) or not self.officer.strip():
            raise QueueError("officer: required, the officer's name", "officer")
        for name in ("limit", "price"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise QueueError(f"{name} must be a number greater than 0, got {value!r}", name)
        if self.limit is not None and self.decision == "decline":
            raise QueueError(
                "limit: only an approval sets a limit (a decline lends nothing)", "limit"
            )


def _limit(original: DecisionRecord, given: Override, policy: Policy) -> float | None:
    """The override's limit: the officer's (checked against the product's range, its house
    limit and the amount asked for), else the original's; None for a decline."""
    if given.decision == "decline":
        return None
    if given.limit is None:
        return original.limit_amount
    rules = policy.product(original.product)
    amount, _ = requested(original)
    bounds = [
        (rules.amount_max, f"the {original.product} maximum of CNY {rules.amount_max:,.0f}"),
        (rules.policy_cap, f"the house limit per borrower of CNY {rules.policy_cap:,.0f}"),
    ]
    if amount is not None:
        bounds.append((amount, f"the CNY {amount:,.0f} the application asked for"))
    for most, what in bounds:
        if given.limit > most:
            raise OverrideRefused(
                f"limit: CNY {given.limit:,.0f} is above {what}; the policy does not lend more",
                "limit",
            )
    if given.limit < rules.amount_min:
        raise OverrideRefused(
            f"limit: CNY {given.limit:,.0f} is below the {original.product} minimum of "
            f"CNY {rules.amount_min:,.0f}",
            "limit",
        )
    return float(given.limit)


def _price(
    original: DecisionRecord, given: Override, limit: float | None, policy: Policy
) -> dict[str, Any] | None:
    """The original's price, or it with the officer's headline rate (and the all-in rate and
    cap check that follow from it); a rate above the legal cap is refused."""
    price = dict(original.price) if isinstance(original.price, dict) else None
    if given.price is None:
        return price
    product = original.product
    amount = limit if limit is not None else requested(original)[0] or 0.0
    cap = legal_cap(product, amount, policy)
    extra = float((price or {}).get("extra_annual_cost") or 0.0) if product == "microloan" else 0.0
    all_in = given.price + extra
    if cap is not None and all_in > cap + 1e-12:
        raise OverrideRefused(
            f"price: an all-in rate of {all_in:.2%} is above the legal cap of {cap:.2%} "
            f"for {product}",
            "price",
        )
    rate_name = (price or {}).get("rate_name") or HEADLINE_RATE.get(product, "rate")
    base = price or {"product": product}
    return {
        **base,
        "rate": float(given.price),
        rate_name: float(given.price),
        "all_in_rate": all_in,
        "cap": cap,
        "within_cap": True,
        "model_rate": base.get("rate"),
        "set_by_officer": True,
    }


def override(
    log: DecisionLog,
    policy: Policy,
    request_id: str,
    given: Override,
    caller: str,
    now: dt.datetime | None = None,
) -> DecisionRecord:
    """Record an officer's decision on the referral `request_id` as an override record in the
    decision log and return it. NotInLog (404), NotReferred / AlreadyOverridden (409),
    OverrideRefused (422); DecisionLogError when the log cannot be written."""
    original = log.get(request_id)
    if original is None or original.endpoint not in APPLICATION_ENDPOINTS:
        what = "" if original is None else f" (it is a {original.endpoint} record)"
        raise NotInLog(f"no application decision {request_id!r} in the log{what}", "request_id")
    if original.decision != "refer":
        raise NotReferred(
            f"{request_id} was decided {original.decision!r} by the model, not referred: only a "
            "refer waits for an officer",
            "request_id",
        )
    _raise_if_overridden(log, request_id)
    limit = _limit(original, given, policy)
    price = _price(original, given, limit, policy)
    decided_at = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    new_id = new_request_id()
    request = {
        **original.request,
        "overrides": request_id,
        "reason": given.reason.strip(),
        "officer": given.officer,
    }
    response = {
        "request_id": new_id,
        "overrides": request_id,
        "decided_at": decided_at.isoformat(),
        "officer": given.officer,
        "enterprise_id": original.enterprise_id,
        "product": original.product,
        "model_decision": original.decision,
        "decision": given.decision,
        "reason": request["reason"],
        "limit": limit,
        "price": price,
        "grade": original.grade,
        "pd": original.pd,
    }
    record = DecisionRecord(
        request_id=new_id,
        decided_at=decided_at,
        caller=caller,
        endpoint="override",
        enterprise_id=original.enterprise_id,
        product=original.product,
        request=request,
        model_name=original.model_name,
        model_version=original.model_version,
        features=original.features,
        feature_timestamps=original.feature_timestamps,
        pd=original.pd,
        score=original.score,
        grade=original.grade,
        decision=given.decision,
        limit_amount=limit,
        price=price,
        reasons=original.reasons,
        response=json_safe(response),
    )
    try:
        log.write(record)
    except DecisionLogError:
        # two officers raced past the check above: the unique index took the other's record
        _raise_if_overridden(log, request_id)
        raise
    return record


def _raise_if_overridden(log: DecisionLog, request_id: str) -> None:
    done = log.override_of(request_id)
    if done is not None:
        officer = (done.request or {}).get("officer", done.caller)
        raise AlreadyOverridden(
            f"{request_id} was already decided by officer {officer!r}: override "
            f"{done.request_id} ({done.decision}, {done.decided_at:%Y-%m-%d %H:%M} UTC)",
            "request_id",
        )

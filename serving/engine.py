"""The lending engine behind the API: online features, champion models, the decision core.

No web framework here: the BentoML service validates input and calls these methods; batch jobs
and tests call them directly. Every decision goes through the columnar core (serving/core.py),
one row for /score, /limit and /price, the whole list for /screen. Online features are read in
bulk straight from the online store (features/online.py, tested equal to Feast's reads) and
cached until the next materialization; a model is loaded once per start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from features import store as feature_store
from features.online import OnlineFeatures, ts_column
from features.schema import FAMILIES, PRODUCTS
from kapok.settings import Paths
from serving import core
from serving import policy as pol
from serving.model import ProductModel, load_champion
from serving.reasons import (  # noqa: F401  (re-exported: the reference path and its callers)
    MAX_REASONS,
    Reason,
    json_value,
    knockout_reasons,
    reason_code,
    reasons_from,
    reasons_json,
)

TS_COLUMNS = [ts_column(fam.name) for fam in FAMILIES]
FAMILY_NAMES = [fam.name for fam in FAMILIES]


class EnterpriseNotFound(LookupError):
    def __init__(self, enterprise_id: str):
        super().__init__(f"enterprise_not_found: the feature store has no data for {enterprise_id}")
        self.enterprise_id = enterprise_id


@dataclass(frozen=True)
class EnterpriseFeatures:
    """Which online snapshots a decision used (its values are the decision's own)."""

    enterprise_id: str
    timestamps: dict[str, str]  # family -> ISO time of the snapshot used

    @property
    def as_of(self) -> str | None:
        return max(self.timestamps.values()) if self.timestamps else None


def loan_request(eid: str, product: str, amount: float, term: int) -> dict[str, Any]:
    """The request as logged in the decision log."""
    return {
        "enterprise_id": eid,
        "product": product,
        "requested_amount": amount,
        "term_months": term,
    }


def decision_answer(
    request_id: str,
    product: str,
    model: ProductModel,
    features_as_of: str | None,
    decided_at: str,
    pd: float,
    score: float,
    grade: str,
    decision: pol.Decision,
    reasons: list[dict[str, Any]],
) -> dict[str, Any]:
    """A decision's answer as /score words it (what /limit and /price extend): the request id,
    the model, when its features were published and when it decided, PD, score, grade, the
    decision with its policy path, and the reasons (as `reasons_json` gives them). The API,
    `kapok backfill` and `kapok prospect` log the same shape."""
    return {
        "request_id": request_id,
        "product": product,
        "model_name": model.name,
        "model_version": model.version,
        "features_as_of": features_as_of,
        "decided_at": decided_at,
        "pd": round(pd, 6),
        "score": round(score, 1),
        "grade": grade,
        "decision": decision.decision,
        "policy_path": decision.path,
        "reasons": reasons,
    }


def policy_outcome(
    model: ProductModel,
    values: Mapping[str, Any],
    contrib: np.ndarray,
    pd_: float,
    amount: float,
    term_months: int,
    policy: pol.Policy,
) -> dict[str, Any]:
    """Score, grade, knock-outs, price, decision and reasons of one scored row: the policy half
    of a decision, shared by the API (one row) and batch back-fills (many)."""
    kos = pol.knockouts(values, policy)
    product_policy = policy.product(model.product)
    price = pol.price(pd_, amount, term_months, product_policy, values.get("tax_sales_12m"), policy)
    decision = pol.decide(pd_, product_policy, kos, price_ok=price.within_cap)
    reasons = knockout_reasons(kos) + reasons_from(contrib, model, values)
    return {
        "score": pol.score_points(pd_, policy),
        "grade": pol.grade(pd_, policy),
        "decision": decision,
        "price": price,
        "knockouts": kos,
        "reasons": reasons[:MAX_REASONS],
    }


class LendingEngine:
    def __init__(
        self, paths: Paths, policy: pol.Policy | None = None, products: tuple[str, ...] = PRODUCTS
    ):
        self.paths = paths
        self.policy = policy or pol.load_policy()
        self.store = feature_store.feature_store(paths)
        self.online = OnlineFeatures(paths, self.store)
        self.models = {product: load_champion(paths, product) for product in products}

    def model(self, product: str) -> ProductModel:
        if product not in self.models:
            raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, got {product!r}")
        return self.models[product]

    # -- decisions -------------------------------------------------------------------------------
    def assess(
        self, enterprise_id: str, product: str, amount: float, term_months: int, limit: bool = False
    ) -> dict[str, Any]:
        """PD, score, grade, decision and reasons for one request (and its limit when asked)."""
        found = self.assess_many(product, [(enterprise_id, amount, term_months)], limit=limit)[0]
        if isinstance(found, Exception):
            raise found
        return found

    def assess_many(
        self, product: str, requests: Sequence[tuple[str, float, int]], limit: bool = False
    ) -> list[dict[str, Any] | EnterpriseNotFound | core.DecisionInputError]:
        """One online read and one core call for many requests (/screen); an enterprise the
        feature store does not know, or whose stored features cannot be decided on, is its own
        error."""
        out: list[dict[str, Any] | EnterpriseNotFound | core.DecisionInputError] = [
            EnterpriseNotFound(eid) for eid, _, _ in requests
        ]
        decided = self._decide_online(product, requests, limits=limit)
        if decided is not None:
            d, found = decided
            values = d.rows()
            for r, (i, feats) in enumerate(found):
                try:
                    out[i] = outcome(d, r, feats, values[r])
                except core.DecisionInputError as e:
                    out[i] = e
        return out

    def _decide_online(
        self,
        product: str,
        requests: Sequence[tuple[str, float, int]],
        *,
        reasons: core.Explain = "all",
        limits: bool = False,
    ) -> tuple[core.Decisions, list[tuple[int, EnterpriseFeatures]]] | None:
        """The requests whose enterprise the online store knows, decided by the core in one
        call; with each decided row, its request's position and the snapshots it used. None
        when the store knows none of them."""
        model = self.model(product)
        rows = self.online.read([eid for eid, _, _ in requests])
        found = rows["found"].to_numpy()
        if not found.any():
            return None
        index = np.flatnonzero(found)
        # eager DataFrame operations only: a query plan costs more than one row's data
        frame = rows if found.all() else rows.filter(pl.Series(found))
        stored = pl.DataFrame(
            [frame.get_column(name) for name in core.STORED_SCHEMA]
            + [
                pl.Series("requested_amount", [float(requests[i][1]) for i in index], pl.Float64),
                pl.Series("term_months", [int(requests[i][2]) for i in index], pl.Int64),
            ]
        )
        d = core.decide(model, stored, self.policy, reasons=reasons, limits=limits)
        stamp_frame = pl.DataFrame([frame.get_column(c) for c in TS_COLUMNS])
        core.future_snapshots(d.error, stamp_frame, FAMILY_NAMES)
        stamps = stamp_frame.to_dicts()
        decided = [
            (int(i), EnterpriseFeatures(requests[i][0], _timestamps(stamps[r])))
            for r, i in enumerate(index)
        ]
        return d, decided

    def explain(
        self, enterprise_id: str, product: str, amount: float, term_months: int
    ) -> dict[str, Any]:
        model = self.model(product)
        decided = self._decide_online(product, [(enterprise_id, amount, term_months)])
        if decided is None:
            raise EnterpriseNotFound(enterprise_id)
        d, [(_, feats)] = decided
        if d.error[0] is not None:
            raise core.DecisionInputError(cannot_decide(enterprise_id, d.error[0]))
        contrib, values = d.contribution(0), d.values(0)
        assert contrib is not None
        base = float(contrib[-1])
        margin = float(model.margin(model.row(values))[0])  # an independent prediction
        total = base + float(contrib[:-1].sum())
        if abs(total - margin) > 1e-6:
            raise ArithmeticError(
                f"SHAP additivity failed: base {base} + contributions = {total} != margin {margin}"
            )
        rows = []
        for name, i in model.index.items():
            value = json_value(values.get(name))
            rows.append({"feature": name, "value": value, "missing": value is None,
                         "shap_log_odds": float(contrib[i])})  # fmt: skip
        return {
            "model": model,
            "features": feats,
            "contributions": rows,
            "base_value": base,
            "margin": margin,
            "pd": float(model.scorer.calibrator(np.array([margin]))[0]),
            "additivity_error": abs(total - margin),
        }


def _timestamps(row: Mapping[str, Any]) -> dict[str, str]:
    """family -> ISO time of the snapshot used, for the families the store had."""
    return {
        fam.name: row[ts_column(fam.name)].isoformat()
        for fam in FAMILIES
        if row.get(ts_column(fam.name)) is not None
    }


def outcome(
    d: core.Decisions, r: int, feats: EnterpriseFeatures, values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Row r of the core's decisions as the service answers and logs it."""
    if d.error[r] is not None:
        raise core.DecisionInputError(cannot_decide(feats.enterprise_id, d.error[r]))
    values = values if values is not None else d.values(r)
    return {
        "model": d.model,
        "features": feats,
        "values": values,
        "pd": float(d.pd[r]),
        "margin": float(d.margin[r]),
        "score": float(d.score[r]),
        "grade": str(d.grade[r]),
        "decision": d.decision_row(r, values),
        "price": d.price_row(r),
        "knockouts": d.knockout_list(r, values),
        "reasons": d.reasons(r, values),
        "limit": d.limit(r, values) if d.limits is not None else None,
    }


def cannot_decide(enterprise_id: str, error: str) -> str:
    return (
        f"the online feature store holds data for {enterprise_id} that cannot be decided on: "
        f"{error}; nothing decided"
    )

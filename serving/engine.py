"""The lending engine behind the API: online features, champion models, reasons, policy.

No web framework here: the BentoML service validates input and calls these methods; batch jobs
and tests call them directly. Features change monthly while requests come every second, so the
online features of an enterprise are cached for a short while; a model is loaded once per start.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from features import store as feature_store
from features.request import request_features
from features.schema import BY_NAME, FAMILIES, FEATURES, PRODUCTS
from kapok.settings import Paths
from serving import policy as pol
from training.pyfunc import load_scorer
from training.scorer import Scorer
from training.tracking import CHAMPION, alias_version, configure
from training.tracking import model_name as registered_name

MAX_REASONS = 4
FEATURE_CACHE_SECONDS = 300.0


class EnterpriseNotFound(LookupError):
    def __init__(self, enterprise_id: str):
        super().__init__(f"enterprise_not_found: the feature store has no data for {enterprise_id}")
        self.enterprise_id = enterprise_id


class ModelUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class EnterpriseFeatures:
    enterprise_id: str
    values: dict[str, Any]  # stored features (no request-time ones)
    timestamps: dict[str, str]  # family -> ISO time of the snapshot used

    @property
    def as_of(self) -> str | None:
        return max(self.timestamps.values()) if self.timestamps else None


@dataclass
class ProductModel:
    product: str
    name: str
    version: str
    scorer: Scorer
    index: dict[str, int] = field(default_factory=dict)
    codes: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {f: i for i, f in enumerate(self.scorer.features)}
        self.codes = {
            f: {v: float(i) for i, v in enumerate(values)}
            for f, values in self.scorer.categories.items()
        }

    def row(self, values: Mapping[str, Any]) -> np.ndarray:
        """One model-ordered float row; categoricals as codes; missing and unknown as NaN."""
        x = np.full((1, len(self.index)), np.nan)
        for name, i in self.index.items():
            value = values.get(name)
            if value is None:
                continue
            if name in self.codes:
                x[0, i] = self.codes[name].get(str(value), np.nan)
            else:
                x[0, i] = float(value)
        return x

    def margin(self, x: np.ndarray) -> np.ndarray:
        return self.scorer.booster.predict(x, raw_score=True, num_threads=1)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Exact TreeSHAP in log-odds: one column per feature, then the base value."""
        return self.scorer.booster.predict(x, pred_contrib=True, num_threads=1)


@dataclass(frozen=True)
class Reason:
    code: str
    feature: str
    value: Any
    impact: float
    text_en: str
    text_zh: str


def reason_code(feature: str) -> str:
    return "R_" + feature.upper()


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def reasons_from(
    contrib: np.ndarray, model: ProductModel, values: Mapping[str, Any]
) -> list[Reason]:
    """The features that pushed this risk up the most (positive SHAP only), ties by name."""
    ranked = sorted(
        ((float(contrib[i]), name) for name, i in model.index.items() if contrib[i] > 0),
        key=lambda t: (-round(t[0], 12), t[1]),
    )
    out = []
    for impact, name in ranked[:MAX_REASONS]:
        feature = BY_NAME.get(name)
        value = _json_value(values.get(name))
        shown = (
            "missing" if value is None else f"{value:,.4g}" if isinstance(value, float) else value
        )
        en = feature.description if feature else name
        zh = feature.description_zh if feature else name
        out.append(
            Reason(reason_code(name), name, value, impact, f"{en}: {shown}", f"{zh}：{shown}")
        )
    return out


def knockout_reasons(knockouts: list[pol.Knockout]) -> list[Reason]:
    return [
        Reason(k.code, k.feature, _json_value(k.value), math.inf, k.text_en, k.text_zh)
        for k in knockouts
    ]


def loan_request(eid: str, product: str, amount: float, term: int) -> dict[str, Any]:
    """The request as logged in the decision log."""
    return {
        "enterprise_id": eid,
        "product": product,
        "requested_amount": amount,
        "term_months": term,
    }


def reasons_json(reasons: list[Reason]) -> list[dict[str, Any]]:
    """Reasons as the API answers them and the decision log keeps them."""
    return [
        {
            "code": r.code,
            "feature": r.feature,
            "value": r.value,
            "impact": None if r.impact == math.inf else round(r.impact, 6),
            "knockout": r.impact == math.inf,
            "text_en": r.text_en,
            "text_zh": r.text_zh,
        }
        for r in reasons
    ]


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
        self.refs = [f"{f.family}:{f.name}" for f in FEATURES]
        self._cache: dict[str, tuple[float, EnterpriseFeatures]] = {}
        self._lock = threading.Lock()
        client = configure(paths)
        self.models: dict[str, ProductModel] = {}
        for product in products:
            name = registered_name(product)
            version = alias_version(client, name, CHAMPION)
            if version is None:
                raise ModelUnavailable(
                    f"{name} has no champion: run `kapok train --product {product}`"
                )
            self.models[product] = ProductModel(
                product, name, version, load_scorer(f"models:/{name}@{CHAMPION}")
            )

    # -- features --------------------------------------------------------------------------------
    def features(self, enterprise_id: str) -> EnterpriseFeatures:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(enterprise_id)
        if hit and now - hit[0] < FEATURE_CACHE_SECONDS:
            return hit[1]
        found = self.lookup(enterprise_id)
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[enterprise_id] = (now, found)
        return found

    def lookup(self, enterprise_id: str) -> EnterpriseFeatures:
        """The reference path: Feast's online store, no cache."""
        response = self.store.get_online_features(
            features=self.refs, entity_rows=[{"enterprise_id": enterprise_id}]
        ).to_dict(include_event_timestamps=True)
        values = {f.name: response[f.name][0] for f in FEATURES}
        if all(v is None for v in values.values()):
            raise EnterpriseNotFound(enterprise_id)
        timestamps = {}
        for fam in FAMILIES:
            first = next(f.name for f in FEATURES if f.family == fam.name)
            seconds = response.get(first + "__ts", [0])[0]
            if seconds:
                timestamps[fam.name] = datetime.fromtimestamp(seconds, UTC).isoformat()
        return EnterpriseFeatures(enterprise_id, values, timestamps)

    def model(self, product: str) -> ProductModel:
        if product not in self.models:
            raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, got {product!r}")
        return self.models[product]

    def _contributions(
        self, enterprise_id: str, product: str, amount: float, term_months: int
    ) -> tuple[ProductModel, EnterpriseFeatures, dict[str, Any], np.ndarray]:
        """Model, features, feature values with the request's, and exact TreeSHAP of one row."""
        model = self.model(product)
        feats = self.features(enterprise_id)
        values = self.values(feats, amount, term_months)
        return model, feats, values, model.contributions(model.row(values))[0]

    # -- decisions -------------------------------------------------------------------------------
    def assess(
        self, enterprise_id: str, product: str, amount: float, term_months: int
    ) -> dict[str, Any]:
        """PD, score, grade, decision and reasons for one request (the heart of /score)."""
        model, feats, values, contrib = self._contributions(
            enterprise_id, product, amount, term_months
        )
        margin = float(contrib.sum())
        pd_ = float(model.scorer.calibrator(np.array([margin]))[0])
        return {
            "model": model,
            "features": feats,
            "values": values,
            "pd": pd_,
            "margin": margin,
            **policy_outcome(model, values, contrib, pd_, amount, term_months, self.policy),
        }

    @staticmethod
    def values(feats: EnterpriseFeatures, amount: float, term_months: int) -> dict[str, Any]:
        values = dict(feats.values)
        values.update(
            request_features(
                amount, term_months, values.get("tax_sales_12m"), values.get("pay_inflow_3m")
            )
        )
        return values

    def pd_at(
        self, model: ProductModel, feats: EnterpriseFeatures, amount: float, term: int
    ) -> float:
        x = model.row(self.values(feats, amount, term))
        return float(model.scorer.calibrator(model.margin(x))[0])

    def limit(
        self, enterprise_id: str, product: str, amount: float, term_months: int
    ) -> dict[str, Any]:
        model = self.model(product)
        feats = self.features(enterprise_id)
        values = self.values(feats, amount, term_months)
        result = pol.limit(
            lambda a: self.pd_at(model, feats, a, term_months),
            amount,
            term_months,
            self.policy.product(product),
            values,
            self.policy,
        )
        return {"model": model, "features": feats, "values": values, "limit": result}

    def explain(
        self, enterprise_id: str, product: str, amount: float, term_months: int
    ) -> dict[str, Any]:
        model, feats, values, contrib = self._contributions(
            enterprise_id, product, amount, term_months
        )
        base = float(contrib[-1])
        margin = float(model.margin(model.row(values))[0])
        total = base + float(contrib[:-1].sum())
        if abs(total - margin) > 1e-6:
            raise ArithmeticError(
                f"SHAP additivity failed: base {base} + contributions = {total} != margin {margin}"
            )
        rows = []
        for name, i in model.index.items():
            value = _json_value(values.get(name))
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

"""The naive lending stack that bench/serving.py measures Kapok against. Not part of Kapok.

What a first version of a scoring API usually looks like: a BentoML service that, per request,
asks Feast for the product's FeatureService online (`get_online_features`, as
`features.store.online_features` does), scores the LightGBM champion (`training.pyfunc.load_scorer`
of `models:/kapok-<product>@champion`: booster margin, then the shipped calibrator) and explains it
with `shap.TreeExplainer(booster)`, whose four largest positive contributions are the reasons. No
feature cache, no decision log, no policy (no score, grade, decision or price), no API keys.

`/score` takes the same JSON body as Kapok's /score:

    {"enterprise_id": "...", "product": "microloan", "requested_amount": 300000, "term_months": 12}

The TreeExplainer of each product is built once at start-up, like the models (the stronger
baseline); KAPOK_NAIVE_EXPLAINER=request builds it again on every request, as many first versions
do. Run it the way bench/serving.py does:

    KAPOK_HOME=... python -m bentoml serve bench.naive_service:Naive --port 3001
"""

from __future__ import annotations

import math
import os
from http import HTTPStatus
from typing import Any

import bentoml
import numpy as np
import polars as pl
import shap
from bentoml.exceptions import BentoMLException

import kapok  # noqa: F401  (telemetry off)
from features.schema import FEATURE_SERVICE, PRODUCTS
from features.store import feature_store
from kapok.settings import paths
from training.pyfunc import load_scorer
from training.tracking import configure

MAX_REASONS = 4


class NaiveError(BentoMLException):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message, error_code=status)


def plain(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


@bentoml.service(name="kapok-naive", traffic={"timeout": 60})
class Naive:
    def __init__(self) -> None:
        self.ready = False
        home = paths()
        configure(home)
        self.store = feature_store(home)
        self.scorers = {p: load_scorer(f"models:/kapok-{p}@champion") for p in PRODUCTS}
        self.per_request = os.environ.get("KAPOK_NAIVE_EXPLAINER", "start") == "request"
        self.explainers = {
            p: shap.TreeExplainer(s.booster)
            for p, s in self.scorers.items()
            if not self.per_request
        }
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(route="/score")
    def score(
        self, enterprise_id: str, product: str, requested_amount: float, term_months: int
    ) -> dict[str, Any]:
        """PD and up to four reasons, computed from scratch on every request."""
        if product not in PRODUCTS:
            raise NaiveError(HTTPStatus.BAD_REQUEST, f"product must be one of {PRODUCTS}")
        row = {
            "enterprise_id": enterprise_id,
            "requested_amount": float(requested_amount),
            "term_months": int(term_months),
        }
        service = self.store.get_feature_service(FEATURE_SERVICE[product])
        response = self.store.get_online_features(features=service, entity_rows=[row])
        frame = pl.DataFrame(response.to_dict())
        scorer = self.scorers[product]
        stored = [f for f in scorer.features if not f.startswith("req_")]
        if all(frame[f][0] is None for f in stored):
            raise NaiveError(HTTPStatus.NOT_FOUND, f"enterprise_not_found: {enterprise_id}")
        x = scorer.matrix(frame)
        margin = scorer.booster.predict(x, raw_score=True)
        pd_ = float(scorer.calibrator(margin)[0])
        explainer = (
            shap.TreeExplainer(scorer.booster) if self.per_request else self.explainers[product]
        )
        contrib = np.asarray(explainer.shap_values(x)).reshape(-1)[: len(scorer.features)]
        ranked = sorted(
            ((float(c), f) for f, c in zip(scorer.features, contrib, strict=True) if c > 0),
            key=lambda t: (-t[0], t[1]),
        )
        return {
            "enterprise_id": enterprise_id,
            "product": product,
            "model_name": f"kapok-{product}",
            "pd": round(pd_, 6),
            "margin": float(margin[0]),
            "reasons": [
                {
                    "code": "R_" + f.upper(),
                    "feature": f,
                    "value": plain(frame[f][0]),
                    "impact": impact,
                }
                for impact, f in ranked[:MAX_REASONS]
            ],
        }

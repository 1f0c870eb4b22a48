"""`kapok replay`: re-score a logged decision from the logged model version and feature values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kapok.settings import Paths
from serving import policy as pol
from serving.decision_log import DecisionLog
from serving.engine import ProductModel
from training.pyfunc import load_scorer
from training.tracking import configure


@dataclass(frozen=True)
class ReplayResult:
    same: bool
    lines: list[str]


def replay(request_id: str, paths: Paths, policy: pol.Policy | None = None) -> ReplayResult:
    record = DecisionLog().get(request_id)
    if record is None:
        raise ValueError(f"no decision {request_id!r} in the decision log")
    configure(paths)
    policy = policy or pol.load_policy()
    scorer = load_scorer(f"models:/{record.model_name}/{record.model_version}")
    model = ProductModel(record.product, record.model_name, record.model_version, scorer)
    values = dict(record.features)
    margin = float(model.margin(model.row(values))[0])
    pd_ = float(scorer.calibrator(np.array([margin]))[0])
    product = policy.product(record.product)
    amount = float(record.request["requested_amount"])
    term = int(record.request["term_months"])
    kos = pol.knockouts(values, policy)
    price = pol.price(pd_, amount, term, product, values.get("tax_sales_12m"), policy)
    decision = pol.decide(pd_, product, kos, price_ok=price.within_cap).decision
    score, grade = pol.score_points(pd_, policy), pol.grade(pd_, policy)
    checks = {
        "pd": math.isclose(pd_, record.pd, rel_tol=1e-9, abs_tol=1e-12),
        "score": math.isclose(score, record.score, rel_tol=1e-9),
        "grade": grade == record.grade,
        "decision": decision == record.decision,
    }
    lines = [
        f"{request_id}: {record.endpoint} {record.product} {record.enterprise_id} "
        f"model {record.model_name} v{record.model_version}, decided {record.decided_at}",
        f"pd       logged {record.pd:.8f}  replayed {pd_:.8f}  {'ok' if checks['pd'] else 'DIFFERENT'}",  # noqa: E501
        f"score    logged {record.score:.2f}  replayed {score:.2f}  {'ok' if checks['score'] else 'DIFFERENT'}",  # noqa: E501
        f"grade    logged {record.grade}  replayed {grade}  {'ok' if checks['grade'] else 'DIFFERENT'}",  # noqa: E501
        f"decision logged {record.decision}  replayed {decision}  {'ok' if checks['decision'] else 'DIFFERENT'}",  # noqa: E501
    ]
    return ReplayResult(all(checks.values()), lines)

"""Reason codes: what a lender tells an applicant, from knock-outs and exact TreeSHAP.

Up to four per decision: knock-outs first, then the features that pushed this enterprise's risk
up the most (positive contribution in log-odds), ties broken by name. A feature that lowered the
risk is never a reason. `reasons_from` is the per-row reference the columnar core is tested
against; `reason` builds one reason from a feature's value, for both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from features.schema import BY_NAME
from serving import policy as pol

if TYPE_CHECKING:
    from serving.model import ProductModel

MAX_REASONS = 4


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


def json_value(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def reason(name: str, value: Any, impact: float) -> Reason:
    """The reason a feature gives, with its value in English and Chinese text."""
    feature = BY_NAME.get(name)
    value = json_value(value)
    shown = "missing" if value is None else f"{value:,.4g}" if isinstance(value, float) else value
    en = feature.description if feature else name
    zh = feature.description_zh if feature else name
    return Reason(reason_code(name), name, value, impact, f"{en}: {shown}", f"{zh}：{shown}")


def reasons_from(
    contrib: np.ndarray, model: ProductModel, values: Mapping[str, Any]
) -> list[Reason]:
    """The features that pushed this risk up the most (positive SHAP only), ties by name."""
    ranked = sorted(
        ((float(contrib[i]), name) for name, i in model.index.items() if contrib[i] > 0),
        key=lambda t: (-round(t[0], 12), t[1]),
    )
    return [reason(name, values.get(name), impact) for impact, name in ranked[:MAX_REASONS]]


def knockout_reasons(knockouts: list[pol.Knockout]) -> list[Reason]:
    return [
        Reason(k.code, k.feature, json_value(k.value), math.inf, k.text_en, k.text_zh)
        for k in knockouts
    ]


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

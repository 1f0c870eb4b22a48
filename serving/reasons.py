"""Reason codes: what a lender tells an applicant, from knock-outs and exact TreeSHAP.

Up to four per decision: knock-outs first, then the features that pushed this enterprise's risk
up the most (positive contribution in log-odds), ties broken by name. A feature that lowered the
risk is never a reason. `reasons_from` is the per-row reference the columnar core is tested
against; `reason` builds one reason from a feature's value, for both.

The favourable counterpart, for a pre-approved offer (`kapok prospect`): `favourable_from` names
the features that LOWERED the risk the most (negative contribution), ties by name, with codes
"F_<FEATURE>" and the same wording; a feature that raised the risk is never one.

Values are written as a person reads them, driven by the feature's `unit` in the schema: money as
"CNY 130,300" and "13.03万元", ratios and shares as percentages, months, days and people with
their unit, 0/1 flags as yes / no (是 / 否), categorical codes by their names (`features.labels`:
"番禺区", "制造业"), code tables such as the tax-credit rating by their letter, and a missing
value as "missing" / "缺失". The reason's `value` stays the raw number for machines. `shown` and
`change` are the same wording for everything else that shows a feature to a person (`kapok
watch`, `kapok explain`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from features import labels
from features.schema import BY_NAME
from serving import policy as pol

if TYPE_CHECKING:
    from serving.model import ProductModel

MAX_REASONS = 4
MAX_FAVOURABLE = 3  # reasons an enterprise qualifies for a pre-approved offer


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


def favourable_code(feature: str) -> str:
    return "F_" + feature.upper()


def json_value(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def reason(name: str, value: Any, impact: float) -> Reason:
    """The reason a feature gives, with its value in English and Chinese text."""
    value = json_value(value)
    en, zh, render = _feature(name)
    en_value, zh_value = render(value)
    return Reason(reason_code(name), name, value, impact, f"{en}: {en_value}", f"{zh}：{zh_value}")


# -- how a value reads -------------------------------------------------------------------------
MISSING = ("missing", "缺失")
Shown = tuple[str, str]  # (English, Chinese)


def descriptions(name: str) -> Shown:
    """The feature's description in English and Chinese (its name when the schema has none)."""
    en, zh, _ = _feature(name)
    return en, zh


def shown(name: str, value: Any) -> Shown:
    """A feature's value as a person reads it, in English and Chinese, from the schema's unit."""
    return _feature(name)[2](value)


def shown_in(unit: str, value: Any) -> Shown:
    """A value of the given unit in English and Chinese (see the module docstring)."""
    return _renderer(unit)(value)


def change(name: str, before: Any, after: Any) -> Shown:
    """How a feature's value moved between two dates, in words, in English and Chinese:
    "Court enforcement cases, last 12 months: rose from 0 to 2" / "…：由0升至2"."""
    en, zh, render = _feature(name)
    (a_en, a_zh), (b_en, b_zh) = render(before), render(after)
    feature = BY_NAME.get(name)
    unit = feature.unit if feature else ""
    a, b = _clean(before), _clean(after)
    quantity = (
        unit not in labels.BY_UNIT
        and unit != "0/1"
        and not labels.codes(unit)
        and isinstance(a, int | float)
        and isinstance(b, int | float)
    )
    if not quantity or a == b:
        if (a_en, a_zh) == (b_en, b_zh):
            return f"{en}: unchanged at {a_en}", f"{zh}：未变，仍为{a_zh}"
        return f"{en}: was {a_en}, now {b_en}", f"{zh}：由{a_zh}变为{b_zh}"
    up = b > a
    if (a_en, a_zh) == (b_en, b_zh):  # moved less than the precision shown
        if up:
            return f"{en}: up slightly, at {b_en}", f"{zh}：小幅上升，约为{b_zh}"
        return f"{en}: down slightly, at {b_en}", f"{zh}：小幅下降，约为{b_zh}"
    if up:
        return f"{en}: rose from {a_en} to {b_en}", f"{zh}：由{a_zh}升至{b_zh}"
    return f"{en}: fell from {a_en} to {b_en}", f"{zh}：由{a_zh}降至{b_zh}"


_FEATURES: dict[str, tuple[str, str, Callable[[Any], Shown]]] = {}


def _feature(name: str) -> tuple[str, str, Callable[[Any], Shown]]:
    """(English description, Chinese description, renderer of its values), made once a name."""
    known = _FEATURES.get(name)
    if known is None:
        feature = BY_NAME.get(name)
        if feature is None:
            known = (name, name, _renderer(""))
        else:
            known = (feature.description, feature.description_zh, _renderer(feature.unit))
        _FEATURES[name] = known
    return known


def _renderer(unit: str) -> Callable[[Any], Shown]:
    """The function that shows a value of `unit`: missing, a named code, or a number."""
    names = labels.BY_UNIT.get(unit, {})
    codes = labels.codes(unit)
    number = _UNITS.get(unit, _plain_pair)

    def render(value: Any) -> Shown:
        v = _clean(value)
        if v is None:
            return MISSING
        if type(v) is str:
            return names.get(v.strip()) or (v, v)
        if codes:
            code = codes.get(int(v)) if float(v).is_integer() else None
            return (code, code) if code else _plain_pair(v)
        return number(v)

    return render


def _clean(value: Any) -> int | float | str | None:
    """None for a missing value (None, NaN, ±inf); numpy scalars and bools as Python numbers."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int or kind is str or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int | str):
        return value
    return str(value)


def _fixed(f: float, places: int, strip: bool = False) -> str:
    """f with `places` decimals, grouped, rounded half away from zero as a person rounds the
    number they see (-0.5045 as a percentage is -50.5%, not the binary float's -50.4%); never
    "-0"; `strip` drops trailing zeros."""
    scale = 10**places
    k = int(round(abs(f) * scale, 6) + 0.5)  # round(…, 6): 504.49999999999994 is 504.5
    whole, frac = divmod(k, scale)
    text = f"{whole:,}"
    if places:
        digits = f"{frac:0{places}d}"
        digits = digits.rstrip("0") if strip else digits
        text = f"{text}.{digits}" if digits else text
    return f"-{text}" if f < 0 and k else text


def _plain(v: float, decimals: int | None = None) -> str:
    """A number without scientific notation: whole numbers grouped, else `decimals` places (by
    default four significant digits), trailing zeros dropped."""
    if type(v) is int:
        return f"{v:,}"
    f = float(v)
    if f.is_integer():
        return f"{int(f):,}"
    if decimals is None:
        decimals = min(max(3 - math.floor(math.log10(abs(f))), 0), 8)
    return _fixed(f, decimals, strip=True)


def _plain_pair(v: float) -> Shown:
    text = _plain(v)
    return text, text


def _percent(f: float) -> Shown:
    text = _fixed(f * 100, 1) + "%"
    return text, text


def _wan(f: float, unit: str) -> str:
    """Chinese amounts in 元 / 万 / 亿: 130,300 -> 13.03万; 8,500 -> 8,500; 2.5e8 -> 2.5亿."""
    yuan = int(round(abs(f), 6) + 0.5)
    sign = "-" if f < 0 and yuan else ""
    for size, word in ((10**8, "亿"), (10**4, "万")):
        hundredths = (yuan * 100 + size // 2) // size  # half up
        if hundredths >= 100:
            whole, frac = divmod(hundredths, 100)
            digits = f"{frac:02d}".rstrip("0")
            return f"{sign}{whole:,}{'.' + digits if digits else ''}{word}{unit}"
    return f"{sign}{yuan:,}{unit}"


def _money(f: float) -> Shown:
    return f"CNY {_fixed(f, 0)}", _wan(f, "元")


def _kwh(f: float) -> Shown:
    return f"{_fixed(f, 0)} kWh", _wan(f, "千瓦时")


def _counted(f: float, one: str, many: str, zh: str, decimals: int = 1) -> Shown:
    n = _plain(f, decimals)
    return f"{n} {one if n == '1' else many}", f"{n}{zh}"


def _yes_no(f: float) -> Shown:
    if f == 1:
        return "yes", "是"
    if f == 0:
        return "no", "否"
    return _plain_pair(f)


def _count(f: float) -> Shown:
    text = _plain(f, 1)
    return text, text


_UNITS: dict[str, Callable[[float], Shown]] = {
    "CNY": _money,
    "kWh": _kwh,
    "ratio": _percent,
    "share": _percent,
    "months": lambda f: _counted(f, "month", "months", "个月"),
    "days": lambda f: _counted(f, "day", "days", "天", decimals=0),
    "persons": lambda f: _counted(f, "person", "people", "人"),
    "count": _count,
    "0/1": _yes_no,
}


def reasons_from(
    contrib: np.ndarray, model: ProductModel, values: Mapping[str, Any]
) -> list[Reason]:
    """The features that pushed this risk up the most (positive SHAP only), ties by name."""
    ranked = sorted(
        ((float(contrib[i]), name) for name, i in model.index.items() if contrib[i] > 0),
        key=lambda t: (-round(t[0], 12), t[1]),
    )
    return [reason(name, values.get(name), impact) for impact, name in ranked[:MAX_REASONS]]


def favourable(name: str, value: Any, impact: float) -> Reason:
    """A reason an enterprise qualifies: a feature that lowered its risk (impact < 0), worded as
    `reason` words an adverse one, with the code F_<FEATURE>."""
    r = reason(name, value, impact)
    return Reason(favourable_code(name), r.feature, r.value, r.impact, r.text_en, r.text_zh)


def favourable_from(
    contrib: np.ndarray,
    model: ProductModel,
    values: Mapping[str, Any],
    k: int = MAX_FAVOURABLE,
) -> list[Reason]:
    """The features that pushed this risk down the most (negative SHAP only), ties by name."""
    ranked = sorted(
        ((float(contrib[i]), name) for name, i in model.index.items() if contrib[i] < 0),
        key=lambda t: (round(t[0], 12), t[1]),
    )
    return [favourable(name, values.get(name), impact) for impact, name in ranked[:k]]


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

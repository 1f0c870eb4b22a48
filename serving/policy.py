"""The lending policy: score scale, grades, knock-outs, cut-offs, IRB capital, pricing, limits.

Pure functions over a validated, frozen `Policy` read from policy.toml. pydantic checks the file
as it loads (the models below); the decision functions are plain Python over their attributes.
"""

from __future__ import annotations

import math
import operator
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

__all__ = [
    "DEFAULT_PATH",
    "EARLY_WARNING_ACTIONS",
    "EARLY_WARNING_TRIGGERS",
    "PRODUCTS",
    "Caps",
    "Decision",
    "EarlyWarningAction",
    "Grade",
    "Knockout",
    "KnockoutRule",
    "Limit",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Price",
    "ProductPolicy",
    "Scale",
    "annuity_payment",
    "decide",
    "grade",
    "grade_band",
    "irb_capital",
    "is_missing",
    "knockouts",
    "limit",
    "load_policy",
    "max_principal",
    "policy_from_dict",
    "price",
    "score_points",
]

DEFAULT_PATH = Path(__file__).with_name("policy.toml")
PRODUCTS = ("microloan", "guarantee", "insurance")
# the product's headline rate, as named in Price
HEADLINE_RATE = {"microloan": "annual_rate", "guarantee": "fee_rate", "insurance": "premium_rate"}
IRB_PD_FLOOR = 0.0003  # Basel II corporate PD floor
IRB_CONFIDENCE = 0.999
SME_SALES_EUR_M = (5.0, 50.0)  # Basel SME firm-size adjustment: sales clamped to this range

Action = Literal["decline", "refer"]
Outcome = Literal["approve", "refer", "decline"]
SEVERITY: dict[str, int] = {"approve": 0, "refer": 1, "decline": 2}
_OPS: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_N = NormalDist()
_EPS = 1e-12

# Features the limit rules read.
SALES_FEATURE = "tax_sales_12m"
INFLOW_FEATURE = "pay_inflow_3m"

# Ties between constraints: a limit equal to the request is reported as the request; a zero
# limit is explained by the risk constraint first.
_BINDING_ORDER = (
    "requested_amount",
    "policy_cap",
    "revenue_capacity",
    "debt_service_capacity",
    "expected_loss_budget",
    "pd_cutoff",
)
_ZERO_ORDER = tuple(reversed(_BINDING_ORDER))


class PolicyError(ValueError):
    """The policy file is wrong, or a name does not exist in it; the message names the field."""


# -- the policy --------------------------------------------------------------------------------
# The parts of the policy are frozen pydantic models, checked once as policy.toml loads (every
# key present, unknown keys rejected, every value in range); `PolicyFile.model_json_schema()` is
# the file's schema. The decision functions below only read their attributes.
class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _number(**bounds: float) -> Any:
    """A finite TOML number within `bounds` (an integer reads as a float; no strings, booleans)."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]


_Number = _number()
_Positive = _number(gt=0)
_NonNegative = _number(ge=0)
_Zero = _number(ge=0, le=0)
_Share = _number(gt=0, le=1)  # (0, 1]
_Open = _number(gt=0, lt=1)  # (0, 1)
_Rate = _number(ge=0, lt=1)  # [0, 1)
_Text = Annotated[str, Field(strict=True, pattern=r"\S")]  # not empty or blank
_Flag = Annotated[bool, Field(strict=True)]


class _Invalid(ValueError):
    """A rule across fields is broken: `loc` (below the model that checks it) and why."""

    def __init__(self, loc: tuple[str | int, ...], text: str) -> None:
        super().__init__(text)
        self.loc = loc


class Scale(_Frozen):
    base_points: _Number
    base_odds: _Positive
    pdo: _Positive
    min_score: _Number
    max_score: _Number

    @model_validator(mode="after")
    def _ordered(self) -> Scale:
        lo, hi = self.min_score, self.max_score
        if not lo < hi:
            raise _Invalid(("max_score",), f"must be > min_score ({lo:g}), got {hi:g}")
        if not lo <= self.base_points <= hi:
            raise _Invalid(
                ("base_points",), f"must be in [{lo:g}, {hi:g}], got {self.base_points:g}"
            )
        return self

    @property
    def factor(self) -> float:
        return self.pdo / math.log(2.0)

    @property
    def offset(self) -> float:
        return self.base_points - self.factor * math.log(self.base_odds)


class Grade(_Frozen):
    name: _Text = Field(alias="grade")
    upper_pd: _Share  # inclusive; the lower bound (exclusive) is the previous grade's upper_pd


class _ProductTable(_Frozen):
    """The keys every [products.<name>] table has."""

    approve_max_pd: _Open
    refer_max_pd: _Open  # >= approve_max_pd
    term_months_min: Annotated[int, Field(strict=True, ge=1)]
    term_months_max: Annotated[int, Field(strict=True, ge=1)]  # >= term_months_min
    amount_min: _Positive
    amount_max: _Positive  # >= amount_min
    lgd: _Share
    cost_of_funds: _Rate
    operating_cost: _Rate
    capital_hurdle_rate: _Rate
    margin: _Rate
    policy_cap: _Positive  # in [amount_min, amount_max]
    sales_multiple: _Positive
    debt_service_ratio: _Share
    expected_loss_budget: _Positive

    @model_validator(mode="after")
    def _ordered(self) -> _ProductTable:
        approve, t_min = self.approve_max_pd, self.term_months_min
        a_min, a_max = self.amount_min, self.amount_max
        for key, ok, bound in (
            ("refer_max_pd", approve <= self.refer_max_pd, f">= approve_max_pd ({approve:g})"),
            ("term_months_max", t_min <= self.term_months_max, f">= term_months_min ({t_min})"),
            ("amount_max", a_min <= a_max, f">= amount_min ({a_min:g})"),
            ("policy_cap", a_min <= self.policy_cap <= a_max, f"in [{a_min:g}, {a_max:g}]"),
        ):
            if not ok:
                raise _Invalid((key,), f"must be {bound}, got {getattr(self, key)!r}")
        return self


class _Guarantee(_ProductTable):
    cost_of_funds: _Zero  # the guarantor (or insurer) does not fund the loan: the lender does
    assumed_loan_rate: _Rate


class _Insurance(_Guarantee):
    premium_loading: _NonNegative


class ProductPolicy(_ProductTable):
    """A product as the decision functions read it: its table, name and whether a cap applies."""

    name: str
    premium_loading: float = 0.0  # insurance only
    assumed_loan_rate: float | None = None  # guarantee and insurance: the lender's loan rate
    # whether a legal cap applies to the price (from [caps]: microloans always, guarantees when
    # the guarantor is government-backed, insurance never); the policy path says which
    price_capped: bool = True


class Caps(_Frozen):
    mode: Literal["fixed", "lpr_multiple"]
    fixed: _Share
    lpr_one_year: _Open
    lpr_multiple: _Positive
    guarantee_government_backed: _Flag
    guarantee_fee_cap: _Share
    guarantee_fee_cap_large: _Share
    guarantee_large_amount: _Positive
    eur_per_cny: _Positive

    @property
    def microloan_all_in(self) -> float:
        """The cap on a microloan's all-in annual cost."""
        if self.mode == "fixed":
            return self.fixed
        return self.lpr_multiple * self.lpr_one_year

    def guarantee_fee(self, amount: float) -> float | None:
        """The cap on the guarantee fee rate (None when the guarantor is not government-backed)."""
        if not self.guarantee_government_backed:
            return None
        if amount > self.guarantee_large_amount:
            return self.guarantee_fee_cap_large
        return self.guarantee_fee_cap


class KnockoutRule(_Frozen):
    code: _Text
    feature: _Text
    op: Literal["==", "!=", "<", "<=", ">", ">="]  # the keys of _OPS
    threshold: _Number
    action: Action
    text_en: _Text
    text_zh: _Text
    if_missing: Literal["decline", "refer", "ignore"]
    missing_code: _Text
    missing_text_en: _Text
    missing_text_zh: _Text


class _Products(_Frozen):
    microloan: _ProductTable
    guarantee: _Guarantee
    insurance: _Insurance


class _Knockouts(_Frozen):
    rules: tuple[KnockoutRule, ...]

    @field_validator("rules")
    @classmethod
    def _codes_once(cls, rules: tuple[KnockoutRule, ...]) -> tuple[KnockoutRule, ...]:
        owner: dict[str, int] = {}  # code -> rule index (a rule may use one code for both)
        for i, rule in enumerate(rules):
            for key in ("code", "missing_code"):
                code = getattr(rule, key)
                if owner.setdefault(code, i) != i:
                    raise _Invalid(
                        (i, key), f"{code!r} is already used by knockouts.rules[{owner[code]}]"
                    )
        return rules


# What `kapok watch` flags (review/watch.py FLAGS, the same names) and what a lender can do about
# it; [[early_warning.actions]] maps the one to the other (review/actions.py applies it).
Trigger = Literal[
    "grade_drop", "pd_doubled", "new_enforcement", "dishonest_debtor", "tax_collapse",
    "power_collapse",
]  # fmt: skip
EarlyAction = Literal[
    "review", "call_borrower", "request_documents", "site_visit", "freeze_undrawn_limit",
    "reduce_limit", "demand_repayment",
]  # fmt: skip
EARLY_WARNING_TRIGGERS: tuple[str, ...] = get_args(Trigger)
EARLY_WARNING_ACTIONS: tuple[str, ...] = get_args(EarlyAction)
# the triggers that carry a size (grades down, PD now / PD previous) an action may require
_MEASURED_TRIGGERS = ("grade_drop", "pd_doubled")


class EarlyWarningAction(_Frozen):
    """One row of the action table: when a flagged borrower has `trigger` (and, for grade_drop
    and pd_doubled, grades down / PD ratio >= at_least), open `action`, due `due_days` after the
    watch's as-of date."""

    trigger: Trigger
    at_least: _Number | None = None
    action: EarlyAction
    due_days: Annotated[int, Field(strict=True, gt=0)]
    description: _Text
    description_zh: _Text

    @model_validator(mode="after")
    def _measured(self) -> EarlyWarningAction:
        if self.at_least is None:
            return self
        if self.trigger not in _MEASURED_TRIGGERS:
            measured = " and ".join(_MEASURED_TRIGGERS)
            raise _Invalid(
                ("at_least",), f"is only for {measured}, not for trigger {self.trigger!r}"
            )
        if self.trigger == "grade_drop" and not (
            self.at_least >= 1 and float(self.at_least).is_integer()
        ):
            raise _Invalid(
                ("at_least",), f"must be a whole number of grades >= 1, got {self.at_least:g}"
            )
        if self.trigger == "pd_doubled" and not self.at_least > 1:
            raise _Invalid(("at_least",), f"must be a PD ratio > 1, got {self.at_least:g}")
        return self


class _EarlyWarning(_Frozen):
    actions: tuple[EarlyWarningAction, ...] = ()

    @field_validator("actions")
    @classmethod
    def _once(cls, actions: tuple[EarlyWarningAction, ...]) -> tuple[EarlyWarningAction, ...]:
        seen: dict[tuple[str, str], int] = {}
        for i, a in enumerate(actions):
            first = seen.setdefault((a.trigger, a.action), i)
            if first != i:
                raise _Invalid(
                    (i, "action"),
                    f"{a.action!r} for trigger {a.trigger!r} is already "
                    f"early_warning.actions[{first}] (one action per trigger)",
                )
        return actions


class PolicyFile(_Frozen):
    """policy.toml as written (its JSON schema: `PolicyFile.model_json_schema()`)."""

    scale: Scale
    master_scale: tuple[Grade, ...] = Field(min_length=1)
    products: _Products
    caps: Caps
    knockouts: _Knockouts
    # optional: a policy file without it opens no early-warning action
    early_warning: _EarlyWarning = _EarlyWarning()

    @field_validator("master_scale")
    @classmethod
    def _increasing(cls, grades: tuple[Grade, ...]) -> tuple[Grade, ...]:
        for i, g in enumerate(grades):
            if any(h.name == g.name for h in grades[:i]):
                raise _Invalid((i, "grade"), f"{g.name!r} appears twice")
            if i and not g.upper_pd > grades[i - 1].upper_pd:
                raise _Invalid(
                    (i, "upper_pd"),
                    f"must be > {grades[i - 1].upper_pd:g} (bounds strictly increasing), "
                    f"got {g.upper_pd:g}",
                )
        if grades[-1].upper_pd != 1.0:
            raise _Invalid(
                (len(grades) - 1, "upper_pd"),
                f"must be 1.0 (the last grade takes every PD), got {grades[-1].upper_pd:g}",
            )
        return grades


@dataclass(frozen=True)
class Policy:
    scale: Scale
    master_scale: tuple[Grade, ...]
    products: dict[str, ProductPolicy]
    caps: Caps
    knockout_rules: tuple[KnockoutRule, ...]
    source: str = "<dict>"
    early_warning_actions: tuple[EarlyWarningAction, ...] = ()

    def product(self, name: str) -> ProductPolicy:
        try:
            return self.products[name]
        except (KeyError, TypeError):
            allowed = ", ".join(self.products)
            raise PolicyError(f"unknown product {name!r}; allowed: {allowed}") from None

    @property
    def grades(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.master_scale)


# -- loading -----------------------------------------------------------------------------------
def load_policy(path: Path | None = None) -> Policy:
    """Read and validate the policy: `path`, else $KAPOK_POLICY, else the shipped policy.toml."""
    if path is None:
        path = Path(os.environ["KAPOK_POLICY"]) if os.environ.get("KAPOK_POLICY") else DEFAULT_PATH
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise PolicyError(f"policy file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{path}: not valid TOML: {e}") from None
    return policy_from_dict(data, source=str(path))


def policy_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Policy:
    """Validate a parsed policy document; an error names `source` and the offending field."""
    try:
        f = PolicyFile.model_validate(data)
    except ValidationError as e:
        raise PolicyError(f"{source}: {_problem(e)}") from None
    products = {
        name: ProductPolicy(
            name=name, price_capped=price_capped(name, f.caps), **dict(getattr(f.products, name))
        )
        for name in PRODUCTS
    }
    return Policy(
        f.scale, f.master_scale, products, f.caps, f.knockouts.rules, source,
        f.early_warning.actions,
    )  # fmt: skip


def price_capped(product: str, caps: Caps) -> bool:
    """Whether a legal cap applies to the product's price, as `price` applies one."""
    return product == "microloan" or (product == "guarantee" and caps.guarantee_government_backed)


def _problem(error: ValidationError) -> str:
    """The first problem as one line: the field's path and what it must be (no pydantic URL).

    A misspelt key is reported as the unknown key rather than as the key it leaves missing."""
    e = min(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
    loc, kind = e["loc"], e["type"]
    cause = e.get("ctx", {}).get("error")
    if isinstance(cause, _Invalid):
        return f"{_path(loc + cause.loc)} {cause}"
    path = _path(loc) or "the policy"
    owner, field = _schema_at(loc)
    if kind == "missing":
        return f"{path} is missing"
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(f.alias or n for n, f in owner.model_fields.items()))
        return f"{path}: unknown key (allowed in {_path(loc[:-1]) or 'the top level'}: {allowed})"
    if kind == "too_short":
        return f"{path} must not be empty"
    if field is None:  # the document, or an item of a [[...]] list
        return f"{path} must be a table, got {e['input']!r}"
    return f"{path} must be {_expected(field, kind)}, got {e['input']!r}"


def _path(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".")


def _schema_at(loc: tuple[str | int, ...]) -> tuple[type[BaseModel], FieldInfo | None]:
    """The model holding the last key of `loc` in PolicyFile, and that key's field if known."""
    owner: type[BaseModel] = PolicyFile
    field: FieldInfo | None = None
    tp: Any = PolicyFile
    for key in loc:
        if isinstance(key, int):  # an item of a tuple[Model, ...]
            tp, field = get_args(tp)[0], None
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            owner = tp
            field = next((f for n, f in tp.model_fields.items() if (f.alias or n) == key), None)
            tp = field.annotation if field else None
    return owner, field


def _expected(field: FieldInfo, kind: str) -> str:
    """What a field must be, in the policy file's words."""
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        b = {
            k: getattr(m, k)
            for m in field.metadata
            for k in ("gt", "ge", "lt", "le")
            if hasattr(m, k)
        }
        lo, hi = b.get("gt", b.get("ge")), b.get("lt", b.get("le"))
        return _interval(lo, hi, "gt" in b, "lt" in b)
    if kind == "finite_number":
        return "finite"
    tp = field.annotation
    if type(None) in get_args(tp):  # an optional key: what it must be when given
        tp = next(a for a in get_args(tp) if a is not type(None))
        tp = get_args(tp)[0] if get_origin(tp) is Annotated else tp
    if get_origin(tp) is Literal:
        return f"one of {', '.join(map(str, get_args(tp)))}"
    if get_origin(tp) is tuple:
        return "a list of tables"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a table"
    names = {bool: "true or false", int: "a whole number", float: "a number"}
    return names.get(tp, "a non-empty string")


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and lo == hi:
        return f"{lo:g}"
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


# -- small helpers -----------------------------------------------------------------------------
def is_missing(value: object) -> bool:
    """None, NaN (float or numpy) and pandas NA count as missing."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN is the only value unequal to itself
    except (TypeError, ValueError):  # pandas.NA: its truth value is ambiguous
        return True


def _plain(value: object) -> object:
    """A JSON-friendly copy of a feature value: None for missing, int for whole numbers."""
    if is_missing(value):
        return None
    if isinstance(value, bool):
        return int(value)
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return int(x) if x.is_integer() else x


def _number_feature(features: Mapping[str, object], name: str) -> float | None:
    value = features.get(name)
    if is_missing(value):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"feature {name} must be a number, got {value!r}") from None


def _check_pd(pd: float) -> float:
    x = float(pd)
    if not 0.0 <= x <= 1.0:  # also rejects NaN
        raise ValueError(f"pd must be in [0, 1], got {pd!r}")
    return x


def _resolve(product: ProductPolicy | str, policy: Policy) -> ProductPolicy:
    return product if isinstance(product, ProductPolicy) else policy.product(product)


# -- score and grades --------------------------------------------------------------------------
def score_points(pd: float, policy: Policy) -> float:
    """Points on the policy's scale, clamped to [min_score, max_score]."""
    p = _check_pd(pd)
    s = policy.scale
    if p <= 0.0:
        return s.max_score
    if p >= 1.0:
        return s.min_score
    points = s.offset + s.factor * math.log((1.0 - p) / p)
    return min(max(points, s.min_score), s.max_score)


def grade(pd: float, policy: Policy) -> str:
    """The master-scale grade: the first whose upper_pd is >= pd (PD 0 is in the first grade)."""
    p = _check_pd(pd)
    for g in policy.master_scale:
        if p <= g.upper_pd:
            return g.name
    return policy.master_scale[-1].name  # unreachable: the last bound is 1.0


def grade_band(grade: str, policy: Policy) -> tuple[float, float]:
    """(lower exclusive, upper inclusive) PD bounds of a grade."""
    lower = 0.0
    for g in policy.master_scale:
        if g.name == grade:
            return lower, g.upper_pd
        lower = g.upper_pd
    raise PolicyError(f"unknown grade {grade!r}; allowed: {', '.join(policy.grades)}")


# -- knock-outs and decisions ------------------------------------------------------------------
@dataclass(frozen=True)
class Knockout:
    code: str
    action: Action
    feature: str
    value: object  # the feature value that fired the rule (None when missing)
    text_en: str
    text_zh: str


@dataclass(frozen=True)
class Decision:
    decision: Outcome
    path: list[str]  # every step, in order, readable by a reviewer
    reasons: list[str] = field(default_factory=list)  # codes of the steps that were not approve


def knockouts(features: Mapping[str, object], policy: Policy) -> list[Knockout]:
    """The knock-out rules that fire for these features, in the policy's order.

    A missing feature (absent, None, NaN) is never read as clean: the rule's `if_missing` action
    applies with its `missing_code` (e.g. no tax history -> KO_NO_TAX_HISTORY, refer).
    """
    out: list[Knockout] = []
    for rule in policy.knockout_rules:
        value = _number_feature(features, rule.feature)
        if value is None:
            if rule.if_missing != "ignore":
                out.append(
                    Knockout(
                        rule.missing_code,
                        rule.if_missing,
                        rule.feature,
                        None,
                        rule.missing_text_en,
                        rule.missing_text_zh,
                    )
                )
        elif _OPS[rule.op](value, rule.threshold):
            out.append(
                Knockout(
                    rule.code,
                    rule.action,
                    rule.feature,
                    _plain(features.get(rule.feature)),
                    rule.text_en,
                    rule.text_zh,
                )
            )
    return out


_Step = tuple[str | None, Outcome, str]  # (reason code or None, outcome, text)


def term_outside(product: ProductPolicy, term: object) -> str | None:
    """Why `term` is not a term the product offers at all ("must be ..."), or None: a request
    the API refuses (400) rather than decides."""
    low, high = product.term_months_min, product.term_months_max
    if isinstance(term, bool) or not isinstance(term, int) or not low <= term <= high:
        return (
            f"must be a whole number of months between {low} and {high} for {product.name}, "
            f"got {term!r}"
        )
    return None


def amount_outside(product: ProductPolicy, amount: float) -> str | None:
    """Why `amount` is not an amount the product offers at all ("must be ..."), or None. The
    API refuses it (400) where it decides at that amount (/score, /price, /screen, /whatif); a
    limit search (/limit) may start above the range, since it offers at most `amount_max`."""
    low, high = product.amount_min, product.amount_max
    if not low <= amount <= high:
        return (
            f"must be between CNY {low:,.0f} and {high:,.0f} for {product.name} (the "
            f"product's range), got {amount:,.2f}"
        )
    return None


def decide(
    pd: float,
    product: ProductPolicy,
    knockouts: list[Knockout],
    price_ok: bool = True,
    *,
    term_months: int | None = None,
    amount: float | None = None,
) -> Decision:
    """Approve, refer or decline: knock-outs, the product range (when given), the PD cut-offs
    and the price cap; the most severe step wins (decline > refer > approve)."""
    return _finish(_steps(pd, product, knockouts, price_ok, term_months, amount))


def _steps(
    pd: float,
    product: ProductPolicy,
    kos: list[Knockout],
    price_ok: bool,
    term_months: int | None,
    amount: float | None,
) -> list[_Step]:
    p = _check_pd(pd)
    steps = _knockout_steps(kos)
    if term_months is not None:
        lo, hi = product.term_months_min, product.term_months_max
        if lo <= term_months <= hi:
            steps.append((None, "approve", f"term {term_months} months within {lo}-{hi}"))
        else:
            text = f"TERM_OUT_OF_RANGE: term {term_months} months outside {lo}-{hi} -> decline"
            steps.append(("TERM_OUT_OF_RANGE", "decline", text))
    if amount is not None:
        lo_a, hi_a = product.amount_min, product.amount_max
        if lo_a <= amount <= hi_a:
            steps.append((None, "approve", f"amount {amount:,.0f} within {lo_a:,.0f}-{hi_a:,.0f}"))
        else:
            text = (
                f"AMOUNT_OUT_OF_RANGE: amount {amount:,.0f} outside {lo_a:,.0f}-{hi_a:,.0f} "
                "-> decline"
            )
            steps.append(("AMOUNT_OUT_OF_RANGE", "decline", text))
    a, r = product.approve_max_pd, product.refer_max_pd
    if p <= a:
        steps.append((None, "approve", f"PD {p:.3%} <= approve cut-off {a:.2%} -> approve"))
    elif p <= r:
        text = f"PD {p:.3%} > approve cut-off {a:.2%} and <= refer cut-off {r:.2%} -> refer"
        steps.append(("PD_ABOVE_APPROVE_CUTOFF", "refer", text))
    else:
        text = f"PD {p:.3%} > refer cut-off {r:.2%} -> decline"
        steps.append(("PD_ABOVE_REFER_CUTOFF", "decline", text))
    if price_ok:
        capped = product.price_capped
        steps.append(
            (None, "approve", "price within the cap" if capped else "no legal cap applies")
        )
    else:
        text = "PRICE_ABOVE_CAP: the price this risk needs is above the cap -> decline"
        steps.append(("PRICE_ABOVE_CAP", "decline", text))
    return steps


def _knockout_steps(kos: list[Knockout]) -> list[_Step]:
    if not kos:
        return [(None, "approve", "knock-outs: none")]
    steps: list[_Step] = []
    for k in kos:
        value = "missing" if k.value is None else f"= {k.value!r}"
        steps.append(
            (k.code, k.action, f"{k.code}: {k.feature} {value} -> {k.action} ({k.text_en})")
        )
    return steps


def _finish(steps: list[_Step]) -> Decision:
    outcome: Outcome = max((s[1] for s in steps), key=SEVERITY.__getitem__)
    path = [s[2] for s in steps]
    path.append(f"decision: {outcome} (the most severe step wins: decline > refer > approve)")
    flagged = [s for s in steps if s[0] is not None and s[1] != "approve"]
    flagged.sort(key=lambda s: -SEVERITY[s[1]])  # stable: declines first, then in path order
    return Decision(outcome, path, list(dict.fromkeys(s[0] for s in flagged if s[0] is not None)))


# -- capital -----------------------------------------------------------------------------------
def irb_capital(
    pd: float, lgd: float, maturity_years: float, sales_cny: float | None, policy: Policy
) -> float:
    """Basel II/III IRB corporate capital requirement K per unit of exposure, with the SME
    firm-size adjustment when annual sales (CNY, converted with caps.eur_per_cny) are known and
    below EUR 50m. PD floored at 0.03%, maturity clamped to [1, 5] years; a defaulted exposure
    (PD = 1) carries no unexpected-loss capital here (it is provisioned)."""
    p = _check_pd(pd)
    if not 0.0 <= lgd <= 1.0:
        raise ValueError(f"lgd must be in [0, 1], got {lgd!r}")
    if not maturity_years > 0:
        raise ValueError(f"maturity_years must be > 0, got {maturity_years!r}")
    if p >= 1.0:
        return 0.0
    p = max(p, IRB_PD_FLOOR)
    w = (1.0 - math.exp(-50.0 * p)) / (1.0 - math.exp(-50.0))
    r = 0.12 * w + 0.24 * (1.0 - w)
    if not is_missing(sales_cny):
        sales = float(sales_cny)  # type: ignore[arg-type]
        if sales < 0:
            raise ValueError(f"sales_cny must be >= 0, got {sales_cny!r}")
        s = sales * policy.caps.eur_per_cny / 1e6
        lo, hi = SME_SALES_EUR_M
        if s < hi:
            s = min(max(s, lo), hi)
            r -= 0.04 * (1.0 - (s - lo) / (hi - lo))
    b = (0.11852 - 0.05478 * math.log(p)) ** 2
    m = min(max(float(maturity_years), 1.0), 5.0)
    z = math.sqrt(1.0 / (1.0 - r)) * _N.inv_cdf(p) + math.sqrt(r / (1.0 - r)) * _N.inv_cdf(
        IRB_CONFIDENCE
    )
    k = (lgd * _N.cdf(z) - p * lgd) * (1.0 + (m - 2.5) * b) / (1.0 - 1.5 * b)
    return max(k, 0.0)


# -- pricing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Price:
    """Every part of a price, as annual rates on the exposure (amounts in CNY).

    The PD is a 12-month PD and every rate part is per year of exposure: the 12-month PD is read
    as the yearly default rate (constant hazard), so the expected-loss rate PD x LGD is charged per
    year whatever the term, and no part is scaled by term/12 (a 6-month loan pays half a year of
    it, a 36-month loan three years). The term enters through the IRB maturity (term/12, clamped
    to [1, 5] years). `expected_loss` is the one-year loss PD x LGD x amount (what the
    expected-loss budget limits); `expected_loss_lifetime` is (1 - (1 - PD)^(term/12)) x LGD x
    amount, for information.
    """

    product: str
    pd: float
    amount: float
    term_months: int
    lgd: float
    expected_loss: float
    expected_loss_lifetime: float
    expected_loss_rate: float  # PD x LGD
    expected_loss_loading: float  # insurance: PD x LGD x premium_loading; else 0
    cost_of_funds: float
    operating_cost: float
    capital_k: float  # IRB capital per unit of exposure
    capital_charge: float  # capital_k x capital_hurdle_rate
    margin: float
    rate_name: str  # annual_rate | fee_rate | premium_rate
    rate: float  # the headline rate: the sum of the parts
    annual_rate: float | None  # microloan interest rate
    fee_rate: float | None  # guarantee fee rate
    premium_rate: float | None  # insurance premium rate
    extra_annual_cost: float  # other annual costs of the same loan (guarantee fee, premium)
    all_in_rate: float  # microloan: annual_rate + extra_annual_cost; else the headline rate
    cap: float | None  # the cap that applies to all_in_rate (None: no cap)
    within_cap: bool

    def as_dict(self) -> dict[str, Any]:
        """Every field, as the API answers and the decision log keeps it (flat: no deep copy)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def parts(self) -> dict[str, float]:
        """The parts that add up to the headline rate."""
        return {
            "expected_loss_rate": self.expected_loss_rate,
            "expected_loss_loading": self.expected_loss_loading,
            "cost_of_funds": self.cost_of_funds,
            "operating_cost": self.operating_cost,
            "capital_charge": self.capital_charge,
            "margin": self.margin,
        }


def legal_cap(product: str, amount: float, policy: Policy) -> float | None:
    """The legal cap on the product's all-in rate at `amount`: the microloan all-in rate cap,
    the government-backed guarantee fee cap (None when guarantees are not government-backed),
    none for insurance."""
    if product == "microloan":
        return policy.caps.microloan_all_in
    if product == "guarantee":
        return policy.caps.guarantee_fee(amount)
    return None


def price(
    pd: float,
    amount: float,
    term_months: int,
    product: ProductPolicy | str,
    sales_12m: float | None,
    policy: Policy,
    extra_annual_cost: float = 0.0,
) -> Price:
    """The risk-based price of one exposure and whether it fits under the applicable cap.

    microloan annual_rate = EL rate + cost of funds + operating cost + capital charge + margin,
    capped (with extra_annual_cost) by caps.microloan_all_in; guarantee fee_rate = the same
    without funding cost, capped only for a government-backed guarantor; insurance premium_rate =
    EL rate x (1 + premium_loading) + costs + capital charge + margin, not capped.
    The product's term and amount ranges are not checked here: decide() checks them when given.
    """
    prod = _resolve(product, policy)
    p = _check_pd(pd)
    amount = float(amount)
    if not (math.isfinite(amount) and amount >= 0):
        raise ValueError(f"amount must be a finite number >= 0, got {amount!r}")
    if int(term_months) != term_months or term_months < 1:
        raise ValueError(f"term_months must be a whole number >= 1, got {term_months!r}")
    term_months = int(term_months)
    if not (math.isfinite(extra_annual_cost) and extra_annual_cost >= 0):
        raise ValueError(f"extra_annual_cost must be >= 0, got {extra_annual_cost!r}")
    k = irb_capital(p, prod.lgd, term_months / 12.0, sales_12m, policy)
    el_rate = p * prod.lgd
    loading = el_rate * prod.premium_loading
    capital_charge = k * prod.capital_hurdle_rate
    rate = el_rate + loading + prod.cost_of_funds + prod.operating_cost + capital_charge
    rate += prod.margin
    cap = legal_cap(prod.name, amount, policy)
    all_in = rate + extra_annual_cost if prod.name == "microloan" else rate
    rate_name = HEADLINE_RATE[prod.name]
    return Price(
        product=prod.name,
        pd=p,
        amount=amount,
        term_months=term_months,
        lgd=prod.lgd,
        expected_loss=el_rate * amount,
        expected_loss_lifetime=(1.0 - (1.0 - p) ** (term_months / 12.0)) * prod.lgd * amount,
        expected_loss_rate=el_rate,
        expected_loss_loading=loading,
        cost_of_funds=prod.cost_of_funds,
        operating_cost=prod.operating_cost,
        capital_k=k,
        capital_charge=capital_charge,
        margin=prod.margin,
        rate_name=rate_name,
        rate=rate,
        annual_rate=rate if rate_name == "annual_rate" else None,
        fee_rate=rate if rate_name == "fee_rate" else None,
        premium_rate=rate if rate_name == "premium_rate" else None,
        extra_annual_cost=float(extra_annual_cost),
        all_in_rate=all_in,
        cap=cap,
        within_cap=cap is None or all_in <= cap + _EPS,
    )


def annuity_payment(amount: float, annual_rate: float, term_months: int) -> float:
    """Level monthly installment (等额本息) at the monthly rate annual_rate / 12."""
    _check_annuity(annual_rate, term_months)
    r, n = annual_rate / 12.0, int(term_months)
    if r == 0:
        return amount / n
    return amount * r / (1.0 - (1.0 + r) ** -n)


def max_principal(payment: float, annual_rate: float, term_months: int) -> float:
    """The principal a level monthly installment repays over the term (annuity_payment inverse)."""
    _check_annuity(annual_rate, term_months)
    r, n = annual_rate / 12.0, int(term_months)
    if r == 0:
        return payment * n
    return payment * (1.0 - (1.0 + r) ** -n) / r


def _check_annuity(annual_rate: float, term_months: int) -> None:
    if not (math.isfinite(annual_rate) and annual_rate >= 0):
        raise ValueError(f"annual_rate must be a finite number >= 0, got {annual_rate!r}")
    if int(term_months) != term_months or term_months < 1:
        raise ValueError(f"term_months must be a whole number >= 1, got {term_months!r}")


# -- limits ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limit:
    """The recommended limit, the constraint that binds it, and the price at the limit.

    constraints: each constraint's own value in CNY; math.inf when it cannot be computed because
    its feature is missing (see notes). pd_at_limit, annual_rate (the product's headline annual
    rate: interest, guarantee fee or premium), parts and price are None/empty when limit is 0.
    decision is decide() at the limit with all knock-outs: "refer" when a refer knock-out fired
    (the limit then applies once a credit officer clears it), "decline" when limit is 0.
    """

    limit: float
    binding: str
    constraints: dict[str, float]
    pd_at_limit: float | None
    annual_rate: float | None
    parts: dict[str, float]
    price: Price | None
    decision: Decision
    knockouts: list[Knockout]
    notes: list[str]
    product: str
    term_months: int
    requested_amount: float
    step: float


def limit(
    pd_of_amount: Callable[[float], float],
    requested_amount: float,
    term_months: int,
    product: ProductPolicy | str,
    features: Mapping[str, object],
    policy: Policy,
    step: float = 1000.0,
    extra_annual_cost: float = 0.0,
) -> Limit:
    """The recommended credit limit: the smallest of the policy cap, the revenue capacity
    (sales_multiple x tax_sales_12m), the debt-service capacity (largest principal whose
    installment at the borrower's all-in rate fits debt_service_ratio x pay_inflow_3m / 3), the
    expected-loss budget (largest amount with PD x LGD x amount <= budget), the PD cut-off
    (largest amount decide() approves, price cap included) and the request; rounded down to a
    multiple of `step`.

    PD may rise with the amount (loan-burden features), so the PD-dependent constraints are found
    by bisection over the step grid calling pd_of_amount; this is exact when PD is non-decreasing
    in the amount (the models' monotone constraints). The grid is split where a cap changes (the
    government-backed guarantee cap rises above CNY 5m) and the result is verified; should a check
    fail at the returned amount, the search is repeated below it and a note says so.

    The borrower's all-in rate for debt service is the microloan rate + extra_annual_cost, or for
    guarantee/insurance the lender's assumed_loan_rate + our fee or premium + extra_annual_cost.
    Refer knock-outs do not reduce the limit (the officer decides); decline knock-outs give 0.
    A missing tax_sales_12m or pay_inflow_3m leaves that constraint out (math.inf, with a note).
    """
    prod = _resolve(product, policy)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a finite number > 0, got {step!r}")
    requested = float(requested_amount)
    if not (math.isfinite(requested) and requested >= 0):
        raise ValueError(f"requested_amount must be a finite number >= 0, got {requested_amount!r}")
    if int(term_months) != term_months or term_months < 1:
        raise ValueError(f"term_months must be a whole number >= 1, got {term_months!r}")
    term = int(term_months)
    kos = knockouts(features, policy)
    notes: list[str] = []
    sales = _number_feature(features, SALES_FEATURE)
    inflow = _number_feature(features, INFLOW_FEATURE)

    pds: dict[float, float] = {}
    quotes: dict[float, Price] = {}

    def pd_at(a: float) -> float:
        if a not in pds:
            p = float(pd_of_amount(a))
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"pd_of_amount({a:,.0f}) must be in [0, 1], got {p!r}")
            pds[a] = p
        return pds[a]

    def quote(a: float) -> Price:
        if a not in quotes:
            quotes[a] = price(pd_at(a), a, term, prod, sales, policy, extra_annual_cost)
        return quotes[a]

    def borrower_rate(q: Price) -> float:
        if prod.assumed_loan_rate is None:
            return q.all_in_rate
        return prod.assumed_loan_rate + q.rate + extra_annual_cost

    def approves(a: float) -> bool:
        q = quote(a)
        return decide(q.pd, prod, [], price_ok=q.within_cap).decision == "approve"

    def no_limit(binding: str, constraints: dict[str, float], text: str) -> Limit:
        if any(k.action == "decline" for k in kos):
            steps = _knockout_steps(kos)  # no need to ask the model
        else:  # the checks at the smallest amount the product offers
            q = quote(prod.amount_min)
            steps = _steps(q.pd, prod, kos, q.within_cap, term, prod.amount_min)
        if binding not in {s[0] for s in steps}:  # a knock-out or the term explains it already
            steps.append(("LIMIT_BELOW_MINIMUM", "decline", f"limit 0 ({binding}): {text}"))
        notes.append(text)
        return Limit(
            limit=0.0,
            binding=binding,
            constraints=constraints,
            pd_at_limit=None,
            annual_rate=None,
            parts={},
            price=None,
            decision=_finish(steps),
            knockouts=kos,
            notes=notes,
            product=prod.name,
            term_months=term,
            requested_amount=requested,
            step=step,
        )

    declines = [k for k in kos if k.action == "decline"]
    if declines:
        return no_limit(declines[0].code, {}, f"knock-out {declines[0].code}: no limit is offered")
    if not prod.term_months_min <= term <= prod.term_months_max:
        return no_limit(
            "TERM_OUT_OF_RANGE",
            {},
            f"term {term} months outside {prod.term_months_min}-{prod.term_months_max}",
        )

    k_lo = math.ceil(prod.amount_min / step - 1e-9)
    k_hi = math.floor(prod.amount_max / step + 1e-9)
    breaks: list[float] = []
    if prod.name == "guarantee" and policy.caps.guarantee_government_backed:
        breaks.append(policy.caps.guarantee_large_amount)
    lo_amount, hi_amount = k_lo * step, k_hi * step

    constraints: dict[str, float] = {
        "requested_amount": requested,
        "policy_cap": prod.policy_cap,
    }
    if sales is None:
        constraints["revenue_capacity"] = math.inf
        notes.append(f"{SALES_FEATURE} missing: revenue_capacity not applied")
    else:
        constraints["revenue_capacity"] = prod.sales_multiple * max(sales, 0.0)

    checks: dict[str, Callable[[float], bool]] = {"pd_cutoff": approves}

    budget = prod.expected_loss_budget

    def el_ok(a: float) -> bool:
        return pd_at(a) * prod.lgd * a <= budget * (1 + _EPS)

    def el_closed(a: float) -> float:
        p = pd_at(a)
        return budget / (p * prod.lgd) if p > 0 else a

    checks["expected_loss_budget"] = el_ok
    closed: dict[str, Callable[[float], float]] = {"expected_loss_budget": el_closed}

    if inflow is None:
        constraints["debt_service_capacity"] = math.inf
        notes.append(f"{INFLOW_FEATURE} missing: debt_service_capacity not applied")
    else:
        payment = prod.debt_service_ratio * max(inflow, 0.0) / 3.0

        def dsc_ok(a: float) -> bool:
            return annuity_payment(a, borrower_rate(quote(a)), term) <= payment * (1 + _EPS)

        def dsc_closed(a: float) -> float:
            return max_principal(payment, borrower_rate(quote(a)), term)

        checks["debt_service_capacity"] = dsc_ok
        closed["debt_service_capacity"] = dsc_closed

    if k_hi < k_lo:
        return no_limit(
            "pd_cutoff",
            constraints,
            f"no multiple of {step:,.0f} between {prod.amount_min:,.0f} and {prod.amount_max:,.0f}",
        )

    for name, ok in checks.items():
        k = _largest(ok, k_lo, k_hi, step, breaks)
        if name == "pd_cutoff":
            constraints[name] = 0.0 if k is None else k * step
            if k == k_hi:
                notes.append(f"pd_cutoff: approves up to the product maximum {hi_amount:,.0f}")
        elif k is None:
            constraints[name] = closed[name](lo_amount)  # below amount_min
        elif k == k_hi:
            constraints[name] = max(closed[name](hi_amount), hi_amount)
        else:
            constraints[name] = k * step

    ordered = {name: constraints[name] for name in _BINDING_ORDER}
    raw = min(ordered.values())
    amount = math.floor(raw / step + 1e-9) * step
    if amount < lo_amount:
        binding = next(n for n in _ZERO_ORDER if ordered[n] < lo_amount)
        if binding == "pd_cutoff":
            text = f"no amount from {lo_amount:,.0f} passes the cut-offs and the cap"
        else:
            text = (
                f"{binding} {ordered[binding]:,.0f} is below the product minimum {lo_amount:,.0f}"
            )
        return no_limit(binding, ordered, text)
    binding = next(n for n in _BINDING_ORDER if ordered[n] == raw)

    # verify: every PD-dependent check holds at the returned amount
    for _ in range(k_hi - k_lo + 1):
        failing = [name for name, ok in checks.items() if not ok(amount)]
        if not failing:
            break
        name = failing[0]
        notes.append(
            f"{name} fails at {amount:,.0f} although the search passed: PD or the cap is not "
            "monotone in the amount; searched again below"
        )
        below = math.floor(amount / step + 1e-9) - 1
        k = _largest(lambda a: all(ok(a) for ok in checks.values()), k_lo, below, step, breaks)
        if k is None:
            ordered[name] = 0.0
            return no_limit(name, ordered, f"{name}: no amount from {lo_amount:,.0f} passes")
        amount = k * step
        ordered[name] = amount
        binding = name

    p = pd_at(amount)
    q = quote(amount)
    decision = decide(p, prod, kos, price_ok=q.within_cap, term_months=term, amount=amount)
    refers = [k.code for k in kos if k.action == "refer"]
    if refers:
        notes.append(f"limit applies once a credit officer clears: {', '.join(refers)}")
    return Limit(
        limit=amount,
        binding=binding,
        constraints=ordered,
        pd_at_limit=p,
        annual_rate=q.rate,
        parts=q.parts(),
        price=q,
        decision=decision,
        knockouts=kos,
        notes=notes,
        product=prod.name,
        term_months=term,
        requested_amount=requested,
        step=step,
    )


def _largest(
    ok: Callable[[float], bool], k_lo: int, k_hi: int, step: float, breaks: list[float]
) -> int | None:
    """The largest k in [k_lo, k_hi] with ok(k * step), or None. Within each segment between
    `breaks` (amounts where a cap changes) ok must be true-then-false in k (bisection)."""
    for lo, hi in reversed(grid_segments(k_lo, k_hi, step, breaks)):
        if hi < lo or not ok(lo * step):
            continue
        if ok(hi * step):
            return hi
        while hi - lo > 1:  # ok(lo), not ok(hi)
            mid = (lo + hi) // 2
            if ok(mid * step):
                lo = mid
            else:
                hi = mid
        return lo
    return None


def grid_segments(k_lo: int, k_hi: int, step: float, breaks: list[float]) -> list[tuple[int, int]]:
    """The grid [k_lo, k_hi] of the limit search split after each amount where a cap changes."""
    cuts = sorted({math.floor(b / step + 1e-9) for b in breaks if k_lo <= b / step < k_hi})
    segments, start = [], k_lo
    for c in cuts:
        segments.append((start, c))
        start = c + 1
    segments.append((start, k_hi))
    return segments

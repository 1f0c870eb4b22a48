"""The lending policy over columns: score, grade, knock-outs, price and decision for N rows at once.

The same rules as `serving.policy` (the per-row reference, which a property test holds these to),
written as numpy array operations so that one call decides a /screen list or a million back-filled
applications. Missing values are NaN throughout. No framework imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from serving import policy as pol

APPROVE, REFER, DECLINE = 0, 1, 2
OUTCOMES = np.array(["approve", "refer", "decline"], dtype=object)
ACTION_SEVERITY = {"approve": APPROVE, "refer": REFER, "decline": DECLINE}
_Z_CONFIDENCE = pol._N.inv_cdf(pol.IRB_CONFIDENCE)
_OPS = {
    "==": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}


def score_points(pd: np.ndarray, policy: pol.Policy) -> np.ndarray:
    """Points on the policy's scale, clamped (score_points for every row)."""
    s = policy.scale
    p = np.asarray(pd, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        points = s.offset + s.factor * np.log((1.0 - p) / p)
    points = np.clip(points, s.min_score, s.max_score)
    return np.where(p <= 0.0, s.max_score, np.where(p >= 1.0, s.min_score, points))


def grade_index(pd: np.ndarray, policy: pol.Policy) -> np.ndarray:
    """Position on the master scale: the first grade whose upper_pd is >= pd."""
    bounds = np.array([g.upper_pd for g in policy.master_scale])
    return np.minimum(np.searchsorted(bounds, pd, side="left"), len(bounds) - 1)


def grades(pd: np.ndarray, policy: pol.Policy) -> np.ndarray:
    return np.array(policy.grades, dtype=object)[grade_index(pd, policy)]


@dataclass(frozen=True)
class Knockouts:
    """Which knock-out rule fired on which row: `fired[r, i]` for policy.knockout_rules[i],
    `missing[r, i]` when it fired because the feature is unknown (its if_missing action)."""

    fired: np.ndarray  # bool, N x rules
    missing: np.ndarray  # bool, N x rules
    severity: np.ndarray  # int8, N x rules: the action of each fired rule (0 where not fired)

    @property
    def worst(self) -> np.ndarray:
        """The most severe knock-out action per row (APPROVE when none fired)."""
        if self.severity.shape[1] == 0:
            return np.zeros(self.severity.shape[0], dtype=np.int8)
        return self.severity.max(axis=1)

    def rows(self, r: int, values: Mapping[str, object], policy: pol.Policy) -> list[pol.Knockout]:
        """The knock-outs of row r as the reference returns them, in the policy's order."""
        out: list[pol.Knockout] = []
        for i, rule in enumerate(policy.knockout_rules):
            if not self.fired[r, i]:
                continue
            if self.missing[r, i]:
                out.append(pol.Knockout(rule.missing_code, rule.if_missing, rule.feature, None,
                                        rule.missing_text_en, rule.missing_text_zh))  # fmt: skip
            else:
                out.append(pol.Knockout(rule.code, rule.action, rule.feature,
                                        pol._plain(values.get(rule.feature)),
                                        rule.text_en, rule.text_zh))  # fmt: skip
        return out


def knockouts(columns: Mapping[str, np.ndarray], n: int, policy: pol.Policy) -> Knockouts:
    """Every knock-out rule over every row; a missing feature (NaN) is never read as clean."""
    rules = policy.knockout_rules
    fired = np.zeros((n, len(rules)), dtype=bool)
    missing = np.zeros((n, len(rules)), dtype=bool)
    severity = np.zeros((n, len(rules)), dtype=np.int8)
    for i, rule in enumerate(rules):
        value = columns.get(rule.feature)
        x = np.full(n, np.nan) if value is None else np.asarray(value, dtype=np.float64)
        unknown = np.isnan(x)
        with np.errstate(invalid="ignore"):
            hit = ~unknown & _OPS[rule.op](x, rule.threshold)
        if rule.if_missing != "ignore":
            missing[:, i] = unknown
            severity[unknown, i] = ACTION_SEVERITY[rule.if_missing]
        severity[hit, i] = ACTION_SEVERITY[rule.action]
        fired[:, i] = hit | missing[:, i]
    return Knockouts(fired, missing, severity)


def irb_capital(
    pd: np.ndarray,
    lgd: float,
    maturity_years: np.ndarray,
    sales_cny: np.ndarray,
    policy: pol.Policy,
) -> np.ndarray:
    """`policy.irb_capital` per row (sales NaN = unknown: no SME adjustment)."""
    p = np.maximum(np.asarray(pd, dtype=np.float64), pol.IRB_PD_FLOOR)
    w = (1.0 - np.exp(-50.0 * p)) / (1.0 - math.exp(-50.0))
    r = 0.12 * w + 0.24 * (1.0 - w)
    s = np.asarray(sales_cny, dtype=np.float64) * policy.caps.eur_per_cny / 1e6
    lo, hi = pol.SME_SALES_EUR_M
    sme = ~np.isnan(s) & (s < hi)
    r = np.where(sme, r - 0.04 * (1.0 - (np.clip(s, lo, hi) - lo) / (hi - lo)), r)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = (0.11852 - 0.05478 * np.log(p)) ** 2
        m = np.clip(np.asarray(maturity_years, dtype=np.float64), 1.0, 5.0)
        z = np.sqrt(1.0 / (1.0 - r)) * ndtri(np.minimum(p, 1.0)) + np.sqrt(r / (1.0 - r)) * (
            _Z_CONFIDENCE
        )
        k = (lgd * ndtr(z) - p * lgd) * (1.0 + (m - 2.5) * b) / (1.0 - 1.5 * b)
    k = np.maximum(k, 0.0)
    return np.where(np.asarray(pd) >= 1.0, 0.0, k)


@dataclass(frozen=True)
class Prices:
    """`policy.price` per row: the parts that vary by row; the constant parts are the product's."""

    product: pol.ProductPolicy
    pd: np.ndarray
    amount: np.ndarray
    term_months: np.ndarray
    expected_loss_rate: np.ndarray
    expected_loss_loading: np.ndarray
    capital_k: np.ndarray
    capital_charge: np.ndarray
    rate: np.ndarray
    all_in_rate: np.ndarray
    cap: np.ndarray  # NaN: no cap
    within_cap: np.ndarray

    def row(self, r: int, extra_annual_cost: float = 0.0) -> pol.Price:
        """Row r as the reference's Price."""
        prod, p, amount = self.product, float(self.pd[r]), float(self.amount[r])
        term = int(self.term_months[r])
        rate, name = float(self.rate[r]), pol.HEADLINE_RATE[prod.name]
        cap = float(self.cap[r])
        return pol.Price(
            product=prod.name,
            pd=p,
            amount=amount,
            term_months=term,
            lgd=prod.lgd,
            expected_loss=float(self.expected_loss_rate[r]) * amount,
            expected_loss_lifetime=(1.0 - (1.0 - p) ** (term / 12.0)) * prod.lgd * amount,
            expected_loss_rate=float(self.expected_loss_rate[r]),
            expected_loss_loading=float(self.expected_loss_loading[r]),
            cost_of_funds=prod.cost_of_funds,
            operating_cost=prod.operating_cost,
            capital_k=float(self.capital_k[r]),
            capital_charge=float(self.capital_charge[r]),
            margin=prod.margin,
            rate_name=name,
            rate=rate,
            annual_rate=rate if name == "annual_rate" else None,
            fee_rate=rate if name == "fee_rate" else None,
            premium_rate=rate if name == "premium_rate" else None,
            extra_annual_cost=float(extra_annual_cost),
            all_in_rate=float(self.all_in_rate[r]),
            cap=None if math.isnan(cap) else cap,
            within_cap=bool(self.within_cap[r]),
        )


def prices(
    pd: np.ndarray,
    amount: np.ndarray,
    term_months: np.ndarray,
    product: pol.ProductPolicy,
    sales_12m: np.ndarray,
    policy: pol.Policy,
    extra_annual_cost: float = 0.0,
) -> Prices:
    """The risk-based price of every row and whether it fits under the cap (`policy.price`)."""
    p = np.asarray(pd, dtype=np.float64)
    amount = np.asarray(amount, dtype=np.float64)
    term = np.asarray(term_months)
    k = irb_capital(p, product.lgd, term / 12.0, sales_12m, policy)
    el_rate = p * product.lgd
    loading = el_rate * product.premium_loading
    capital_charge = k * product.capital_hurdle_rate
    rate = el_rate + loading + product.cost_of_funds + product.operating_cost + capital_charge
    rate = rate + product.margin
    all_in = rate
    cap = np.full(p.shape, np.nan)
    if product.name == "microloan":
        cap[:] = policy.caps.microloan_all_in
        all_in = rate + extra_annual_cost
    elif product.name == "guarantee" and policy.caps.guarantee_government_backed:
        c = policy.caps
        cap = np.where(amount > c.guarantee_large_amount, c.guarantee_fee_cap_large,
                       c.guarantee_fee_cap)  # fmt: skip
    within = np.isnan(cap) | (all_in <= cap + pol._EPS)
    return Prices(product, p, amount, np.broadcast_to(term, p.shape), el_rate,
                  np.broadcast_to(loading, p.shape), k, capital_charge, rate,
                  np.broadcast_to(all_in, p.shape), cap, within)  # fmt: skip


def pd_severity(pd: np.ndarray, product: pol.ProductPolicy) -> np.ndarray:
    """The PD cut-offs: approve up to approve_max_pd, refer up to refer_max_pd, else decline."""
    return np.where(
        pd <= product.approve_max_pd, APPROVE, np.where(pd <= product.refer_max_pd, REFER, DECLINE)
    ).astype(np.int8)


def decide(
    pd: np.ndarray, product: pol.ProductPolicy, knockout_worst: np.ndarray, within_cap: np.ndarray
) -> np.ndarray:
    """`policy.decide` per row as a severity code (the most severe step wins)."""
    price_step = np.where(within_cap, APPROVE, DECLINE).astype(np.int8)
    return np.maximum(np.maximum(knockout_worst, pd_severity(pd, product)), price_step)


def approves(pd: np.ndarray, product: pol.ProductPolicy, within_cap: np.ndarray) -> np.ndarray:
    """decide() without knock-outs approves (the limit's PD cut-off check)."""
    return (pd <= product.approve_max_pd) & within_cap


def annuity_payment(amount: np.ndarray, annual_rate: np.ndarray, term: np.ndarray) -> np.ndarray:
    r = np.asarray(annual_rate, dtype=np.float64) / 12.0
    n = np.asarray(term, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        level = amount * r / (1.0 - (1.0 + r) ** -n)
    return np.where(r == 0, amount / n, level)


def max_principal(payment: np.ndarray, annual_rate: np.ndarray, term: np.ndarray) -> np.ndarray:
    r = np.asarray(annual_rate, dtype=np.float64) / 12.0
    n = np.asarray(term, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        level = payment * (1.0 - (1.0 + r) ** -n) / r
    return np.where(r == 0, payment * n, level)

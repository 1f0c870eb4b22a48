"""Properties that must hold for every input, not just the examples the other tests pick
(hypothesis): the USCC validator, the score and master scales, pricing under the legal caps, the
limit search, and reasons that only ever name features that raised the risk."""

from __future__ import annotations

import math
import string
import tomllib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kapok import uscc
from serving import core
from serving import policy as P
from serving.reasons import MAX_REASONS

POLICY = P.load_policy()
PRODUCTS = tuple(POLICY.products)


def _variant(**caps: object) -> P.Policy:
    data = tomllib.loads(P.DEFAULT_PATH.read_text(encoding="utf-8"))
    data["caps"].update(caps)
    return P.policy_from_dict(data)


# the shipped policy, the courts' 4 x LPR microloan cap (12%) and a government-backed guarantor:
# under the last two the caps bind inside the approval range
POLICIES = (POLICY, _variant(mode="lpr_multiple"), _variant(guarantee_government_backed=True))
CLEAN: dict[str, object] = {
    "jud_dishonest_debtor_listed": 0,
    "jud_enforcements_12m": 0,
    "reg_abnormal_ops_listed": 0,
    "reg_firm_age_months": 60,
    "tax_months_filed_12m": 12,
    "cred_dpd90_months_24m": 0,
    "cred_dpd30_months_12m": 0,
}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pds = st.floats(min_value=1e-6, max_value=0.999, allow_nan=False)
amounts = st.floats(min_value=1_000, max_value=10_000_000, allow_nan=False)
money = st.one_of(st.none(), st.floats(min_value=0, max_value=1e9, allow_nan=False))


# -- USCC ------------------------------------------------------------------------------------
def _code(division: str, org: str, kind: str = "91") -> str:
    first17 = kind + division + org
    return first17 + uscc.check_character(first17)


divisions = st.text(alphabet=string.digits, min_size=6, max_size=6)
orgs = st.text(alphabet=uscc.ALPHABET, min_size=9, max_size=9)


@SETTINGS
@given(divisions, orgs, st.sampled_from(list(uscc.ALPHABET)))
def test_a_uscc_is_valid_exactly_with_its_own_check_character(division, org, last):
    code = _code(division, org)
    assert uscc.validate(code) == code and uscc.validate(f"  {code.lower()} ") == code
    assert uscc.is_valid(code[:17] + last) == (last == code[17])


@SETTINGS
@given(st.one_of(st.text(max_size=30), st.integers(), st.none(), st.binary(max_size=20)))
def test_the_validator_never_fails_with_anything_but_a_clear_error(value):
    try:
        uscc.validate(value)
    except uscc.USCCError as e:
        assert str(e) and "\n" not in str(e)


# -- score and master scale ----------------------------------------------------------------------
@SETTINGS
@given(pds, pds)
def test_score_falls_and_grade_worsens_as_pd_rises(a, b):
    assume(a < b)
    assert P.score_points(a, POLICY) > P.score_points(b, POLICY)
    grades = POLICY.grades
    assert grades.index(P.grade(a, POLICY)) <= grades.index(P.grade(b, POLICY))


# -- pricing -------------------------------------------------------------------------------------
@SETTINGS
@given(
    pds, amounts, st.integers(1, 60), st.sampled_from(PRODUCTS), money, st.sampled_from(POLICIES)
)
def test_an_approved_price_is_never_above_the_legal_cap(pd, amount, term, product, sales, policy):
    prod = policy.product(product)
    price = P.price(pd, amount, term, prod, sales, policy)
    made = P.decide(pd, prod, [], price_ok=price.within_cap)
    if made.decision == "approve" and price.cap is not None:
        assert price.all_in_rate <= price.cap + 1e-12
    assert 0 <= price.expected_loss_rate <= prod.lgd


# -- the limit search ----------------------------------------------------------------------------
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pds,
    pds,
    st.floats(min_value=0, max_value=1e-7),  # PD may rise with the amount (monotone models)
    amounts,
    st.sampled_from(PRODUCTS),
    money,
    money,
    st.sampled_from([None, "KO_DISHONEST_DEBTOR", "KO_ABNORMAL_OPERATIONS"]),
)
def test_the_limit_never_grows_with_pd_and_a_decline_has_none(
    a, b, slope, requested, product, sales, inflow, knockout
):
    assume(a < b)
    prod = POLICY.product(product)
    term = max(prod.term_months_min, min(12, prod.term_months_max))
    features = {**CLEAN, "tax_sales_12m": sales, "pay_inflow_3m": inflow}
    if knockout == "KO_DISHONEST_DEBTOR":
        features["jud_dishonest_debtor_listed"] = 1
    elif knockout == "KO_ABNORMAL_OPERATIONS":
        features["reg_abnormal_ops_listed"] = 1

    def search(base: float) -> P.Limit:
        return P.limit(
            lambda x: min(base + slope * x, 1.0), requested, term, prod, features, POLICY
        )

    low, high = search(a), search(b)
    assert low.limit >= high.limit >= 0
    for lim in (low, high):
        assert lim.limit <= requested + 1e-9 and lim.limit % 1000 == 0
        if lim.decision.decision == "decline":
            assert lim.limit == 0
        if lim.limit > 0 and lim.price is not None and lim.price.cap is not None:
            assert lim.price.all_in_rate <= lim.price.cap + 1e-12
    if knockout == "KO_DISHONEST_DEBTOR":
        assert (low.limit, low.binding) == (0, "KO_DISHONEST_DEBTOR")


# -- reasons -------------------------------------------------------------------------------------
@SETTINGS
@given(
    st.integers(1, 12).flatmap(
        lambda k: st.lists(
            st.lists(
                st.one_of(st.just(0.0), st.floats(-3, 3, allow_nan=False)), min_size=k, max_size=k
            ),
            min_size=1,
            max_size=20,
        )
    )
)
def test_reasons_only_name_features_that_raised_the_risk(rows):
    contrib = np.array(rows)
    names = [f"f{i:02d}" for i in range(contrib.shape[1])]
    picked = core.top_reasons(contrib, names)
    assert picked.shape == (len(rows), MAX_REASONS)
    for r, row in enumerate(contrib):
        chosen = [i for i in picked[r] if i >= 0]
        assert all(row[i] > 0 for i in chosen)
        assert len(chosen) == min(MAX_REASONS, int((row > 0).sum()))
        keys = [(-round(row[i], 12), names[i]) for i in chosen]  # largest first, ties by name
        assert keys == sorted(keys)
        rest = [(-round(row[i], 12), names[i]) for i in range(len(row)) if row[i] > 0]
        assert keys == sorted(rest)[: len(keys)]


@pytest.mark.parametrize("product", PRODUCTS)
def test_probabilities_from_any_margin_are_probabilities(product):
    """The policy refuses a PD outside [0, 1] with a clear error instead of deciding on it."""
    prod = POLICY.product(product)
    for bad in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="pd"):
            P.decide(bad, prod, [])

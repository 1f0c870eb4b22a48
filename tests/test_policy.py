"""The lending policy (serving/policy.py, serving/policy.toml): config, scale, grades, knock-outs,
decisions, IRB capital, pricing, caps and limits. Pure functions: no server, no model, fast."""

from __future__ import annotations

import ast
import itertools
import math
import re
from pathlib import Path

import pytest

from serving import policy as P

POLICY = P.load_policy()
TEXT = P.DEFAULT_PATH.read_text(encoding="utf-8")

# a clean borrower: no knock-out fires; large sales and inflow so that only the tested rule binds
CLEAN: dict[str, object] = {
    "jud_dishonest_debtor_listed": 0,
    "jud_enforcements_12m": 0,
    "reg_abnormal_ops_listed": 0,
    "reg_firm_age_months": 60,
    "tax_months_filed_12m": 12,
    "tax_sales_12m": 100_000_000.0,
    "pay_inflow_3m": 100_000_000.0,
}


def set_key(text: str, section: str, key: str, value: str) -> str:
    """`key = value` inside `[section]` of a policy text (the key must already be there)."""
    lines = text.splitlines()
    start = lines.index(f"[{section}]")
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("["):
            break
        if re.match(rf"{re.escape(key)}\s*=", lines[i]):
            lines[i] = f"{key} = {value}"
            return "\n".join(lines) + "\n"
    raise AssertionError(f"{key} not in [{section}]")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def variant(tmp_path: Path, *edits: tuple[str, str, str]) -> P.Policy:
    text = TEXT
    for section, key, value in edits:
        text = set_key(text, section, key, value)
    return P.load_policy(write(tmp_path, text))


# -- configuration -----------------------------------------------------------------------------
def test_shipped_policy_loads() -> None:
    assert POLICY.source == str(P.DEFAULT_PATH)
    assert set(POLICY.products) == {"microloan", "guarantee", "insurance"}
    assert POLICY.grades == ("A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3", "D")
    micro, guar, ins = (POLICY.product(n) for n in ("microloan", "guarantee", "insurance"))
    assert (micro.approve_max_pd, micro.refer_max_pd, micro.lgd) == (0.06, 0.12, 0.65)
    assert (guar.approve_max_pd, guar.refer_max_pd, guar.lgd) == (0.05, 0.10, 0.55)
    assert (ins.approve_max_pd, ins.refer_max_pd, ins.lgd) == (0.06, 0.12, 0.60)
    assert (micro.term_months_min, guar.term_months_min, ins.term_months_min) == (1, 3, 6)
    assert micro.cost_of_funds == 0.045 and guar.cost_of_funds == 0 and ins.cost_of_funds == 0
    assert ins.premium_loading == 0.15 and micro.premium_loading == 0
    assert micro.assumed_loan_rate is None and guar.assumed_loan_rate is not None
    assert POLICY.caps.mode == "fixed" and POLICY.caps.microloan_all_in == 0.24
    assert not POLICY.caps.guarantee_government_backed
    codes = {r.code for r in POLICY.knockout_rules}
    assert {
        "KO_DISHONEST_DEBTOR",
        "KO_ENFORCEMENT",
        "KO_ABNORMAL_OPERATIONS",
        "KO_YOUNG_FIRM",
        "KO_NO_TAX_HISTORY",
        "KO_SERIOUS_DELINQUENCY",
        "KO_REPEATED_DELINQUENCY",
    } <= codes


def test_policy_module_imports_no_framework() -> None:
    """The standard library, and pydantic to check the file as it loads: no server, no model."""
    tree = ast.parse(Path(P.__file__).read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    allowed = {"__future__", "math", "operator", "tomllib", "collections", "dataclasses"}
    assert roots <= allowed | {"os", "pathlib", "statistics", "typing", "pydantic"}


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("products.microloan", "lgd", "1.5", "products.microloan.lgd must be in (0, 1], got 1.5"),
        ("products.microloan", "lgd", '"high"', "products.microloan.lgd must be a number"),
        ("products.guarantee", "refer_max_pd", "0.01", "products.guarantee.refer_max_pd must be"),
        ("products.insurance", "term_months_min", "0", "products.insurance.term_months_min"),
        ("products.insurance", "term_months_max", "12.5", "products.insurance.term_months_max"),
        ("products.microloan", "policy_cap", "9_000_000", "products.microloan.policy_cap"),
        (
            "products.guarantee",
            "cost_of_funds",
            "0.03",
            "products.guarantee.cost_of_funds must be 0",
        ),
        ("products.microloan", "debt_service_ratio", "0", "products.microloan.debt_service_ratio"),
        ("caps", "mode", '"floating"', "caps.mode must be one of fixed, lpr_multiple"),
        ("caps", "guarantee_government_backed", '"yes"', "caps.guarantee_government_backed"),
        ("caps", "eur_per_cny", "-0.13", "caps.eur_per_cny must be > 0"),
        ("scale", "pdo", "0", "scale.pdo must be > 0"),
        ("scale", "max_score", "200", "scale.max_score must be >"),
    ],
)
def test_bad_value_names_the_field(
    tmp_path: Path, section: str, key: str, value: str, message: str
) -> None:
    with pytest.raises(P.PolicyError) as e:
        variant(tmp_path, (section, key, value))
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("upper_pd = 0.006", "upper_pd = 0.002", "master_scale[1].upper_pd must be > 0.003"),
        ("upper_pd = 1.0", "upper_pd = 0.99", "master_scale[9].upper_pd must be 1.0"),
        ('grade = "A2"', 'grade = "A1"', "master_scale[1].grade 'A1' appears twice"),
        ("margin = 0.02\n", "", "products.microloan.margin is missing"),
        ("margin = 0.02\n", "margn = 0.02\n", "products.microloan.margn: unknown key"),
        ("premium_loading = 0.15\n", "", "products.insurance.premium_loading is missing"),
        ("[products.insurance]", "[products.leasing]", "products.leasing: unknown key"),
        ('op = ">"', 'op = "=>"', "knockouts.rules[1].op must be one of"),
        (
            'threshold = 12\naction = "refer"',
            'threshold = 12\naction = "warn"',
            "knockouts.rules[3].action must be one of",
        ),
        ('code = "KO_ENFORCEMENT"', 'code = "KO_DISHONEST_DEBTOR"', "knockouts.rules[1].code"),
        ("[caps]", "[kaps]", "kaps: unknown key"),
    ],
)
def test_bad_structure_names_the_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert TEXT.count(old) == 1, old
    with pytest.raises(P.PolicyError) as e:
        P.load_policy(write(tmp_path, TEXT.replace(old, new)))
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (  # an unknown key
            'grade = "A1"\n',
            'grade = "A1"\ncolour = "green"\n',
            "master_scale[0].colour: unknown key (allowed in master_scale[0]: grade, upper_pd)",
        ),
        ("lgd = 0.65", "lgd = 1.5", "products.microloan.lgd must be in (0, 1], got 1.5"),
        ("pdo = 20", 'pdo = "20"', "scale.pdo must be a number, got '20'"),  # a wrong type
        ("pdo = 20", "pdo = true", "scale.pdo must be a number, got True"),
        ("pdo = 20", "pdo = nan", "scale.pdo must be finite, got nan"),
    ],
)
def test_error_is_one_line_naming_the_file_and_the_field(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    """The whole message: the file, the field's path, what it must be; no pydantic wording."""
    assert TEXT.count(old) == 1, old
    path = write(tmp_path, TEXT.replace(old, new))
    with pytest.raises(P.PolicyError) as e:
        P.load_policy(path)
    assert str(e.value) == f"{path}: {message}"


def test_json_schema_describes_the_file() -> None:
    schema = P.PolicyFile.model_json_schema()
    assert schema["required"] == ["scale", "master_scale", "products", "caps", "knockouts"]
    assert schema["additionalProperties"] is False  # unknown keys are refused
    insurance = schema["$defs"]["_Insurance"]
    assert {"premium_loading", "assumed_loan_rate"} <= set(insurance["required"])


def test_unreadable_files_raise_policy_error(tmp_path: Path) -> None:
    with pytest.raises(P.PolicyError, match="not found"):
        P.load_policy(tmp_path / "absent.toml")
    with pytest.raises(P.PolicyError, match="not valid TOML"):
        P.load_policy(write(tmp_path, "[scale\n"))
    assert issubclass(P.PolicyError, ValueError)


def test_unknown_product_names_the_allowed_ones() -> None:
    with pytest.raises(P.PolicyError, match="microloan, guarantee, insurance"):
        POLICY.product("leasing")


# -- score and grades --------------------------------------------------------------------------
def test_score_scale() -> None:
    def pd_at_odds(odds: float) -> float:
        return 1.0 / (1.0 + odds)

    assert P.score_points(pd_at_odds(30), POLICY) == pytest.approx(600.0)
    # doubling the good:bad odds (halving the odds of default) adds pdo = 20 points
    assert P.score_points(pd_at_odds(60), POLICY) == pytest.approx(620.0)
    assert P.score_points(pd_at_odds(15), POLICY) == pytest.approx(580.0)
    assert P.score_points(0.0, POLICY) == 900 and P.score_points(1e-12, POLICY) == 900
    assert P.score_points(1.0, POLICY) == 300 and P.score_points(0.9999, POLICY) == 300
    grid = [i / 1000 for i in range(1, 1000)]
    scores = [P.score_points(p, POLICY) for p in grid]
    assert all(a >= b for a, b in itertools.pairwise(scores))
    with pytest.raises(ValueError):
        P.score_points(math.nan, POLICY)


def test_grade_bands_are_consistent_and_monotone() -> None:
    order = {g: i for i, g in enumerate(POLICY.grades)}
    grid = sorted(
        {i / 10_000 for i in range(1, 10_001)} | {g.upper_pd for g in POLICY.master_scale}
    )
    previous = 0
    for p in grid:
        g = P.grade(p, POLICY)
        lo, hi = P.grade_band(g, POLICY)
        assert lo < p <= hi, (p, g, lo, hi)
        assert order[g] >= previous
        previous = order[g]
    assert P.grade(0.0, POLICY) == "A1" and P.grade(1.0, POLICY) == "D"
    assert P.grade(0.003, POLICY) == "A1" and P.grade(0.0031, POLICY) == "A2"
    assert P.grade_band("A1", POLICY) == (0.0, 0.003)
    assert P.grade_band("D", POLICY) == (0.16, 1.0)
    with pytest.raises(P.PolicyError, match="A1"):
        P.grade_band("Z9", POLICY)


# -- knock-outs and decisions ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("feature", "value", "code", "action"),
    [
        ("jud_dishonest_debtor_listed", 1, "KO_DISHONEST_DEBTOR", "decline"),
        ("jud_enforcements_12m", 2, "KO_ENFORCEMENT", "decline"),
        ("reg_abnormal_ops_listed", 1, "KO_ABNORMAL_OPERATIONS", "refer"),
        ("reg_firm_age_months", 11, "KO_YOUNG_FIRM", "refer"),
        ("tax_months_filed_12m", 0, "KO_NO_TAX_HISTORY", "refer"),
        ("tax_months_filed_12m", None, "KO_NO_TAX_HISTORY", "refer"),
        ("tax_months_filed_12m", math.nan, "KO_NO_TAX_HISTORY", "refer"),
        ("reg_firm_age_months", None, "KO_FIRM_AGE_UNKNOWN", "refer"),
        ("jud_dishonest_debtor_listed", math.nan, "KO_DISHONEST_DEBTOR_UNKNOWN", "refer"),
        ("cred_dpd90_months_24m", 2, "KO_SERIOUS_DELINQUENCY", "decline"),
        ("cred_dpd30_months_12m", 3, "KO_REPEATED_DELINQUENCY", "refer"),
    ],
)
def test_each_knockout_fires_with_its_action(
    feature: str, value: object, code: str, action: str
) -> None:
    kos = P.knockouts({**CLEAN, feature: value}, POLICY)
    assert [(k.code, k.action, k.feature) for k in kos] == [(code, action, feature)]
    k = kos[0]
    assert k.value == (None if P.is_missing(value) else value)
    assert k.text_en and k.text_zh


def test_serious_recent_delinquency_is_not_approved_whatever_the_pd() -> None:
    """Two months 90+ days past due in the last 24 and three 30+ in the last 12 used to be
    approved at B2 when the model's PD was low: a lender declines it."""
    late = {**CLEAN, "cred_dpd90_months_24m": 2, "cred_dpd30_months_12m": 3}
    micro = POLICY.product("microloan")
    kos = P.knockouts(late, POLICY)
    assert [k.code for k in kos] == ["KO_SERIOUS_DELINQUENCY", "KO_REPEATED_DELINQUENCY"]
    made = P.decide(0.02, micro, kos)
    assert made.decision == "decline" and "KO_SERIOUS_DELINQUENCY" in made.reasons
    once = {**CLEAN, "cred_dpd90_months_24m": 1, "cred_dpd30_months_12m": 2}
    assert P.knockouts(once, POLICY) == []  # one slip is the model's business
    assert P.decide(0.02, micro, P.knockouts(once, POLICY)).decision == "approve"
    no_report = {**CLEAN, "cred_dpd90_months_24m": None, "cred_dpd30_months_12m": math.nan}
    assert P.knockouts(no_report, POLICY) == []  # no credit report: a thin file, not a default


def test_clean_borrower_and_boundaries() -> None:
    assert P.knockouts(CLEAN, POLICY) == []
    assert P.knockouts({**CLEAN, "reg_firm_age_months": 12}, POLICY) == []
    assert P.knockouts({**CLEAN, "tax_months_filed_12m": 1}, POLICY) == []


def test_missing_everything_is_a_thin_file_refer() -> None:
    kos = P.knockouts({}, POLICY)
    assert kos and all(k.action == "refer" for k in kos)
    assert {"KO_NO_TAX_HISTORY", "KO_FIRM_AGE_UNKNOWN"} <= {k.code for k in kos}
    assert P.decide(0.01, POLICY.product("microloan"), kos).decision == "refer"


def test_decide_severity_order() -> None:
    micro = POLICY.product("microloan")
    refer_ko = P.knockouts({**CLEAN, "reg_abnormal_ops_listed": 1}, POLICY)
    decline_ko = P.knockouts({**CLEAN, "jud_dishonest_debtor_listed": 1}, POLICY)

    ok = P.decide(0.02, micro, [])
    assert ok.decision == "approve" and ok.reasons == []
    assert any("PD 2.000% <= approve cut-off 6.00%" in s for s in ok.path)
    assert P.decide(0.06, micro, []).decision == "approve"  # the cut-off is inclusive
    assert P.decide(0.08, micro, []).decision == "refer"
    assert P.decide(0.12, micro, []).decision == "refer"
    declined = P.decide(0.13, micro, [])
    assert declined.decision == "decline" and declined.reasons == ["PD_ABOVE_REFER_CUTOFF"]

    assert P.decide(0.02, micro, refer_ko).decision == "refer"
    assert P.decide(0.02, micro, decline_ko).decision == "decline"
    both = P.decide(0.08, micro, refer_ko + decline_ko)
    assert both.decision == "decline"
    assert both.reasons == [
        "KO_DISHONEST_DEBTOR",
        "KO_ABNORMAL_OPERATIONS",
        "PD_ABOVE_APPROVE_CUTOFF",
    ]
    # the path shows every step: both knock-outs, the cut-off comparison, the cap, the outcome
    assert len(both.path) == 5 and both.path[-1].startswith("decision: decline")
    priced_out = P.decide(0.02, micro, refer_ko, price_ok=False)
    assert priced_out.decision == "decline" and priced_out.reasons[0] == "PRICE_ABOVE_CAP"
    out_of_range = P.decide(0.02, micro, [], term_months=48, amount=5_000)
    assert out_of_range.decision == "decline"
    assert out_of_range.reasons == ["TERM_OUT_OF_RANGE", "AMOUNT_OUT_OF_RANGE"]


# -- IRB capital -------------------------------------------------------------------------------
def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _phi_inv(p: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _phi(mid) < p else (lo, mid)
    return (lo + hi) / 2


def _k_by_hand(pd: float, lgd: float, m: float, sales_eur_m: float | None) -> float:
    """Basel II para 272-273, written out independently of serving/policy.py."""
    pd = max(pd, 0.0003)
    share = (1 - math.exp(-50 * pd)) / (1 - math.exp(-50))
    r = 0.12 * share + 0.24 * (1 - share)
    if sales_eur_m is not None and sales_eur_m < 50:
        s = min(max(sales_eur_m, 5), 50)
        r = r - 0.04 * (1 - (s - 5) / 45)
    b = (0.11852 - 0.05478 * math.log(pd)) ** 2
    m = min(max(m, 1), 5)
    conditional = _phi((_phi_inv(pd) + math.sqrt(r) * _phi_inv(0.999)) / math.sqrt(1 - r))
    return (lgd * conditional - pd * lgd) * (1 + (m - 2.5) * b) / (1 - 1.5 * b)


def test_irb_matches_the_basel_table_and_a_hand_computation() -> None:
    # Basel II illustrative risk weights (corporate, LGD 45%, M 2.5): PD 1% -> 92.32%
    assert P.irb_capital(0.01, 0.45, 2.5, None, POLICY) * 12.5 == pytest.approx(0.9232, abs=1e-4)
    eur = POLICY.caps.eur_per_cny
    cases = [
        (0.02, 0.45, 2.5, None),
        (0.05, 0.65, 0.5, 20e6 / eur),  # maturity clamped up to 1, sales EUR 20m
        (0.0001, 0.55, 7.0, 1e6 / eur),  # PD floored, maturity clamped to 5, sales clamped to 5m
    ]
    for pd, lgd, m, sales_cny in cases:
        sales_eur_m = None if sales_cny is None else sales_cny * eur / 1e6
        expected = _k_by_hand(pd, lgd, m, sales_eur_m)
        assert P.irb_capital(pd, lgd, m, sales_cny, POLICY) == pytest.approx(expected, rel=1e-9)


def test_irb_is_monotone_in_pd_and_the_sme_adjustment_lowers_it() -> None:
    grid = [0.0003 + i * 0.002 for i in range(100)]  # up to 20% PD
    ks = [P.irb_capital(p, 0.65, 1.0, None, POLICY) for p in grid]
    assert all(b > a for a, b in itertools.pairwise(ks))
    eur = POLICY.caps.eur_per_cny

    def k_at(sales_eur_m: float | None) -> float:
        sales = None if sales_eur_m is None else sales_eur_m * 1e6 / eur
        return P.irb_capital(0.03, 0.65, 1.0, sales, POLICY)

    assert k_at(1) == pytest.approx(k_at(5))  # sales clamped at EUR 5m
    assert k_at(5) < k_at(20) < k_at(45) < k_at(None)
    assert k_at(50) == pytest.approx(k_at(None)) and k_at(80) == pytest.approx(k_at(None))
    assert k_at(math.nan) == k_at(None)
    assert P.irb_capital(1.0, 0.65, 1.0, None, POLICY) == 0.0


# -- pricing and caps --------------------------------------------------------------------------
@pytest.mark.parametrize("product", ["microloan", "guarantee", "insurance"])
def test_price_parts_sum_to_the_headline_rate(product: str) -> None:
    q = P.price(0.03, 400_000, 24, product, 8_000_000.0, POLICY)
    prod = POLICY.product(product)
    headline = {"microloan": "annual_rate", "guarantee": "fee_rate", "insurance": "premium_rate"}
    assert q.rate_name == headline[product]
    assert getattr(q, q.rate_name) == q.rate
    assert sum(getattr(q, n) is None for n in headline.values()) == 2
    assert sum(q.parts().values()) == pytest.approx(q.rate, rel=1e-12)
    assert q.expected_loss_rate == pytest.approx(0.03 * prod.lgd)
    assert q.expected_loss == pytest.approx(0.03 * prod.lgd * 400_000)
    assert q.expected_loss_lifetime == pytest.approx((1 - 0.97**2) * prod.lgd * 400_000)
    k = P.irb_capital(0.03, prod.lgd, 2.0, 8_000_000.0, POLICY)
    assert q.capital_k == k and q.capital_charge == pytest.approx(k * prod.capital_hurdle_rate)
    assert q.expected_loss_loading == pytest.approx(q.expected_loss_rate * prod.premium_loading)
    if product == "microloan":
        assert q.cost_of_funds == 0.045 and q.cap == 0.24 and q.within_cap
    else:
        assert q.cost_of_funds == 0 and q.cap is None and q.within_cap
    if product == "insurance":
        assert q.expected_loss_loading > 0


def test_microloan_cap_declines_when_the_price_is_above_24_percent() -> None:
    micro = POLICY.product("microloan")
    q = P.price(0.25, 200_000, 12, micro, None, POLICY)
    assert q.annual_rate > 0.24 and q.cap == 0.24 and not q.within_cap
    d = P.decide(0.25, micro, [], price_ok=q.within_cap)
    assert d.decision == "decline" and "PRICE_ABOVE_CAP" in d.reasons
    # approvable risk, but a guarantee fee and a premium on top push the all-in cost over the cap
    ok = P.price(0.03, 200_000, 12, micro, None, POLICY)
    assert ok.within_cap and ok.annual_rate < 0.24
    loaded = P.price(
        0.03, 200_000, 12, micro, None, POLICY, extra_annual_cost=0.24 - ok.rate + 0.01
    )
    assert loaded.annual_rate == ok.annual_rate and loaded.all_in_rate > 0.24
    assert not loaded.within_cap
    d = P.decide(0.03, micro, [], price_ok=loaded.within_cap)
    assert d.decision == "decline" and d.reasons == ["PRICE_ABOVE_CAP"]


def test_lpr_multiple_cap(tmp_path: Path) -> None:
    pol = variant(tmp_path, ("caps", "mode", '"lpr_multiple"'))
    assert pol.caps.microloan_all_in == pytest.approx(0.12)
    q = P.price(0.03, 200_000, 12, "microloan", None, pol)
    assert q.cap == pytest.approx(0.12) and q.annual_rate > 0.12 and not q.within_cap


def test_government_backed_guarantee_cap(tmp_path: Path) -> None:
    assert P.price(0.01, 1_000_000, 12, "guarantee", None, POLICY).cap is None
    pol = variant(tmp_path, ("caps", "guarantee_government_backed", "true"))
    for amount, cap in [(1_000_000, 0.01), (5_000_000, 0.01), (5_000_001, 0.015)]:
        q = P.price(0.004, amount, 12, "guarantee", None, pol)
        assert q.cap == cap
        assert q.within_cap == (q.fee_rate <= cap)
    assert P.price(0.01, 1_000_000, 12, "insurance", None, pol).cap is None


# -- annuities ---------------------------------------------------------------------------------
def test_annuity_and_max_principal_round_trip() -> None:
    assert P.annuity_payment(100_000, 0.12, 12) == pytest.approx(8_884.88, abs=0.01)
    assert P.annuity_payment(120_000, 0.0, 12) == 10_000
    for amount, rate, term in [(100_000, 0.12, 12), (2_500_000, 0.045, 36), (50_000, 0.0, 6)]:
        payment = P.annuity_payment(amount, rate, term)
        assert P.max_principal(payment, rate, term) == pytest.approx(amount, rel=1e-12)
    with pytest.raises(ValueError):
        P.annuity_payment(1_000, 0.1, 0)


# -- limits ------------------------------------------------------------------------------------
def rising(a: float) -> float:
    """A PD that rises with the amount (loan burden): 1% + 10% per million."""
    return 0.01 + 0.10 * a / 1e6


def test_limit_pd_cutoff_found_by_search() -> None:
    micro = POLICY.product("microloan")
    calls: list[float] = []

    def pd_of_amount(a: float) -> float:
        calls.append(a)
        return rising(a)

    lim = P.limit(pd_of_amount, 2_000_000, 12, micro, CLEAN, POLICY)
    assert lim.binding == "pd_cutoff" and lim.limit > 0
    assert lim.limit % 1000 == 0 and lim.limit == lim.constraints["pd_cutoff"]
    assert P.decide(rising(lim.limit), micro, []).decision == "approve"
    assert P.decide(rising(lim.limit + 1000), micro, []).decision != "approve"
    assert lim.decision.decision == "approve" and lim.pd_at_limit == rising(lim.limit)
    assert lim.price is not None and lim.annual_rate == lim.price.annual_rate
    assert sum(lim.parts.values()) == pytest.approx(lim.annual_rate)
    assert len(set(calls)) < 100  # bisection, not a scan of 3,000 amounts
    assert set(lim.constraints) == {
        "requested_amount",
        "policy_cap",
        "revenue_capacity",
        "debt_service_capacity",
        "expected_loss_budget",
        "pd_cutoff",
    }
    assert min(lim.constraints.values()) == lim.limit


def test_limit_policy_cap_binds() -> None:
    lim = P.limit(lambda a: 0.01, 5_000_000, 12, "microloan", CLEAN, POLICY)
    assert (lim.limit, lim.binding) == (1_000_000, "policy_cap")


def test_limit_revenue_capacity_binds() -> None:
    feats = {**CLEAN, "tax_sales_12m": 1_000_000.0}
    lim = P.limit(lambda a: 0.01, 900_000, 12, "microloan", feats, POLICY)
    assert (lim.limit, lim.binding) == (300_000, "revenue_capacity")


def test_limit_debt_service_capacity_binds() -> None:
    feats = {**CLEAN, "pay_inflow_3m": 150_000.0}  # 50,000 a month; 25% -> 12,500 installment
    lim = P.limit(lambda a: 0.01, 900_000, 12, "microloan", feats, POLICY)
    assert lim.binding == "debt_service_capacity" and lim.price is not None
    rate = lim.price.all_in_rate
    assert P.annuity_payment(lim.limit, rate, 12) <= 12_500
    assert P.annuity_payment(lim.limit + 1000, rate, 12) > 12_500
    # guarantee: the borrower pays the bank's assumed rate plus our fee
    lim_g = P.limit(lambda a: 0.01, 900_000, 12, "guarantee", feats, POLICY)
    assert lim_g.binding == "debt_service_capacity" and lim_g.price is not None
    guar = POLICY.product("guarantee")
    assert guar.assumed_loan_rate is not None
    rate_g = guar.assumed_loan_rate + lim_g.price.fee_rate
    assert P.annuity_payment(lim_g.limit, rate_g, 12) <= 12_500
    assert P.annuity_payment(lim_g.limit + 1000, rate_g, 12) > 12_500


def test_limit_expected_loss_budget_binds() -> None:
    lim = P.limit(lambda a: 0.05, 900_000 * 2, 12, "microloan", CLEAN, POLICY)
    assert (lim.limit, lim.binding) == (923_000, "expected_loss_budget")  # 30,000 / (5% x 65%)
    assert 0.05 * 0.65 * lim.limit <= 30_000 < 0.05 * 0.65 * (lim.limit + 1000)


def test_limit_requested_amount_binds_when_small() -> None:
    lim = P.limit(rising, 50_000, 12, "microloan", CLEAN, POLICY)
    assert (lim.limit, lim.binding) == (50_000, "requested_amount")
    small = P.limit(rising, 5_000, 12, "microloan", CLEAN, POLICY)  # below amount_min 10,000
    assert (small.limit, small.binding) == (0, "requested_amount")
    assert small.decision.decision == "decline"


def test_limit_zero_when_nothing_approves_or_a_knockout_declines() -> None:
    lim = P.limit(lambda a: 0.2, 500_000, 12, "microloan", CLEAN, POLICY)
    assert (lim.limit, lim.binding) == (0, "pd_cutoff")
    assert lim.decision.decision == "decline" and lim.pd_at_limit is None

    def never(a: float) -> float:
        raise AssertionError("the model is not needed after a decline knock-out")

    feats = {**CLEAN, "jud_dishonest_debtor_listed": 1}
    ko = P.limit(never, 500_000, 12, "microloan", feats, POLICY)
    assert (ko.limit, ko.binding) == (0, "KO_DISHONEST_DEBTOR")
    assert ko.decision.decision == "decline" and ko.decision.reasons == ["KO_DISHONEST_DEBTOR"]
    term = P.limit(lambda a: 0.01, 500_000, 48, "microloan", CLEAN, POLICY)
    assert (term.limit, term.binding) == (0, "TERM_OUT_OF_RANGE")


def test_limit_missing_features_drop_their_constraint_and_refer() -> None:
    feats = {**CLEAN, "tax_sales_12m": None, "pay_inflow_3m": math.nan, "tax_months_filed_12m": 0}
    lim = P.limit(lambda a: 0.01, 5_000_000, 12, "microloan", feats, POLICY)
    assert lim.constraints["revenue_capacity"] == math.inf
    assert lim.constraints["debt_service_capacity"] == math.inf
    assert any("tax_sales_12m" in n for n in lim.notes)
    assert any("pay_inflow_3m" in n for n in lim.notes)
    assert (lim.limit, lim.binding) == (1_000_000, "policy_cap")
    # a refer knock-out does not cut the limit: the officer decides
    assert lim.decision.decision == "refer" and "KO_NO_TAX_HISTORY" in lim.decision.reasons


def test_limit_handles_the_step_in_the_government_guarantee_cap(tmp_path: Path) -> None:
    # cheap government-backed guarantee: the fee fits under 1.5% (above CNY 5m) but not under 1%
    edits = [
        ("caps", "guarantee_government_backed", "true"),
        ("products.guarantee", "operating_cost", "0.001"),
        ("products.guarantee", "margin", "0"),
        ("products.guarantee", "capital_hurdle_rate", "0.05"),
        ("products.guarantee", "policy_cap", "8_000_000"),
    ]
    pol = variant(tmp_path, *edits)
    fee = P.price(0.012, 1_000_000, 12, "guarantee", None, pol).fee_rate
    assert fee is not None and 0.01 < fee <= 0.015
    lim = P.limit(lambda a: 0.012, 9_000_000, 12, "guarantee", CLEAN, pol)
    assert (lim.limit, lim.binding) == (8_000_000, "policy_cap")
    assert lim.decision.decision == "approve"
    # with a CNY 4m house cap nothing under CNY 5m is priceable: the verification catches it
    pol4 = variant(tmp_path, *edits[:-1], ("products.guarantee", "policy_cap", "4_000_000"))
    lim4 = P.limit(lambda a: 0.012, 9_000_000, 12, "guarantee", CLEAN, pol4)
    assert (lim4.limit, lim4.binding) == (0, "pd_cutoff")
    assert lim4.decision.decision == "decline"

"""Reasons a lender can read: money, ratios, codes and missing values written as a person would,
Chinese text in Chinese, the same wording in /score, /screen, `kapok explain`, `kapok watch` and
the report; the policy path says when no legal cap applies to a price."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from features import labels
from features.raw_tables import TAX_RATINGS
from features.schema import ALL_FEATURES, BY_NAME
from kapok.bigdata import world
from review import portfolio as pf
from review import watch
from review.report import segment_names
from serving import core
from serving import policy as pol
from serving.reasons import change, reason, reasons_json, shown

POLICY = pol.load_policy(pol.DEFAULT_PATH)
ASCII_LETTERS = re.compile(r"[A-Za-z]")


# -- money, ratios, missing ----------------------------------------------------------------------
def test_money_reads_as_an_amount_in_both_languages():
    r = reason("tax_sales_3m", 130_300.0, 0.2)
    assert r.text_en == "Declared sales, last 3 months: CNY 130,300"
    assert r.text_zh == "近3个月申报销售额：13.03万元"
    assert "e+" not in r.text_en + r.text_zh
    assert r.value == 130_300.0  # machines read the raw number
    assert reasons_json([r])[0]["value"] == 130_300.0
    assert shown("tax_overdue_12m", 8_500.0) == ("CNY 8,500", "8,500元")
    assert shown("jud_lawsuit_amount_12m", 250_000_000.0) == ("CNY 250,000,000", "2.5亿元")
    assert shown("pay_net_inflow_3m", -12_500.0) == ("CNY -12,500", "-1.25万元")
    assert shown("tax_sales_12m", 100_000.0) == ("CNY 100,000", "10万元")
    assert shown("power_kwh_3m", 123_456.0) == ("123,456 kWh", "12.35万千瓦时")


def test_ratios_and_shares_read_as_percentages():
    r = reason("tax_sales_growth_yoy", -0.5045, 0.1)
    assert r.text_en.endswith(": -50.5%") and r.text_zh.endswith("：-50.5%")
    assert r.value == -0.5045
    assert shown("arap_overdue_receivables_ratio_6m", 0.234) == ("23.4%", "23.4%")
    assert shown("req_loan_to_sales_12m", 12.5)[0] == "1,250.0%"
    assert shown("si_headcount_growth_12m", -0.00004)[0] == "0.0%"  # no "-0.0%"


def test_missing_is_missing_and_缺失():
    for value in (None, float("nan"), np.float64("nan")):
        r = reason("cred_balance_growth_6m", value, 0.1)
        assert r.text_en == "Change in the outstanding balance vs 6 months earlier: missing"
        assert r.text_zh == "贷款余额较6个月前增长率：缺失"
        assert r.value is None


def test_counts_months_people_and_flags_read_with_their_unit():
    assert shown("reg_firm_age_months", 18) == ("18 months", "18个月")
    assert shown("reg_firm_age_months", 1) == ("1 month", "1个月")
    assert shown("si_headcount", 12) == ("12 people", "12人")
    assert shown("arap_days_payable", 45.4) == ("45 days", "45天")
    assert shown("pay_counterparties_3m", 4.3333) == ("4.3", "4.3")
    assert shown("jud_dishonest_debtor_listed", 1) == ("yes", "是")
    assert shown("reg_abnormal_ops_listed", np.int64(0)) == ("no", "否")


# -- Chinese throughout --------------------------------------------------------------------------
def test_districts_industries_and_size_classes_are_named_in_chinese():
    assert reason("reg_district", "Panyu", 0.1).text_zh == "所在区：番禺区"
    assert reason("reg_industry", "C", 0.1).text_zh == "国民经济行业门类：制造业"
    assert reason("reg_industry", "C", 0.1).text_en.endswith(": Manufacturing")
    assert reason("reg_size_class", "micro", 0.1).text_zh == "企业规模：微型"
    assert reason("reg_district", "Panyu", 0.1).value == "Panyu"
    assert reason("reg_industry", "Z", 0.1).text_zh == "国民经济行业门类：Z"  # unknown: as it is


def test_tax_credit_rating_shows_its_letter():
    for rank, letter in ((1, "A"), (2, "B"), (3, "M"), (4, "C"), (5, "D")):
        r = reason("tax_credit_rating_rank", rank, 0.1)
        assert r.text_en.endswith(f"): {letter}") and r.text_zh.endswith(f"：{letter}")
        assert r.value == rank
    assert shown("tax_credit_rating_rank", 4.0) == ("C", "C")


def sample_value(feature) -> object:
    """A value of each feature as the simulated region has it."""
    if feature.name == "reg_industry":
        return "F"
    if feature.name == "reg_district":
        return "Tianhe"
    if feature.name == "reg_size_class":
        return "small"
    if feature.unit == "CNY":
        return 1_303_456.78
    return 3 if feature.dtype == "int" else 0.4321


@pytest.mark.parametrize("value", ["sample", None])
def test_chinese_text_has_no_english_or_pinyin(value):
    """Every feature's Chinese reason: no ASCII letter but the tax-credit rating's letter."""
    for f in ALL_FEATURES:
        r = reason(f.name, sample_value(f) if value == "sample" else None, 0.1)
        letters = ASCII_LETTERS.findall(r.text_zh)
        if f.name == "tax_credit_rating_rank" and value == "sample":
            assert letters == ["M"], r.text_zh  # rank 3: the letter is the value itself
        else:
            assert not letters, r.text_zh
        assert "e+" not in r.text_en and "e-0" not in r.text_en, r.text_en


def test_every_unit_of_the_schema_has_a_way_to_be_shown():
    """Formatting is driven by the unit: a new unit must be taught to serving.reasons."""
    from serving.reasons import _UNITS

    for f in ALL_FEATURES:
        assert f.unit in _UNITS or f.unit in labels.BY_UNIT or labels.codes(f.unit), f.unit


def test_the_labels_know_every_value_the_simulated_region_writes():
    """The names live with the raw tables' contract; every code the simulator writes has one."""
    for ind in world.INDUSTRIES:
        assert labels.INDUSTRY_SECTIONS[ind.code] == (ind.name, ind.name_zh)
    for d in world.DISTRICTS:
        assert labels.DISTRICTS[d.name] == (d.name, d.name_zh)
        assert labels.DISTRICTS[d.code] == (d.name, d.name_zh)
    assert set(world.SIZE_CLASSES) <= set(labels.SIZE_CLASSES)
    unit = BY_NAME["tax_credit_rating_rank"].unit
    assert unit == "1=A 2=B 3=M 4=C 5=D"
    assert [labels.codes(unit)[i + 1] for i in range(5)] == list(TAX_RATINGS)


# -- the columnar core (/score, /screen, kapok decide) -------------------------------------------
def test_the_core_words_reasons_and_the_price_cap_as_the_reference():
    """Reasons from the columnar core read like a person writes them; for a guarantee (no
    government-backed guarantor: cap null) the policy path says no legal cap applies."""
    from tests.test_core import random_requests, synthetic_model

    model = synthetic_model("guarantee", seed=4)
    requests = random_requests(np.random.default_rng(8), 200, "guarantee")
    d = core.decide(model, requests, POLICY)
    texts = [x for r in range(len(d)) if d.error[r] is None for x in d.reasons(r)]
    assert texts
    for x in texts:
        assert "e+" not in x.text_en and "missing" not in x.text_zh
        letter = x.feature == "tax_credit_rating_rank" or x.value == "Z"  # "Z": no such industry
        if not letter:
            assert not ASCII_LETTERS.search(x.text_zh), x.text_zh
    ok = [r for r in range(len(d)) if d.error[r] is None]
    for r in ok[:20]:
        assert d.price_row(r).cap is None
        path = d.decision_row(r).path
        assert "no legal cap applies" in path and "price within the cap" not in path, path


# -- the price cap -------------------------------------------------------------------------------
def _policy(backed: bool) -> pol.Policy:
    text = pol.DEFAULT_PATH.read_text().replace(
        "guarantee_government_backed = false",
        f"guarantee_government_backed = {str(backed).lower()}",
    )
    return pol.policy_from_dict(tomllib.loads(text))


@pytest.mark.parametrize("backed", [False, True])
def test_the_policy_path_says_when_no_legal_cap_applies(backed):
    policy = _policy(backed)
    for name in pol.PRODUCTS:
        prod = policy.product(name)
        q = pol.price(0.01, 500_000, 12, prod, 2_000_000.0, policy)
        assert (q.cap is None) == (not prod.price_capped), name  # one rule for both
        path = pol.decide(q.pd, prod, [], price_ok=q.within_cap).path
        if q.cap is None:
            assert "no legal cap applies" in path and "price within the cap" not in path, name
        else:
            assert "no legal cap applies" not in path, name
            assert ("price within the cap" in path) == q.within_cap, name
    assert policy.product("guarantee").price_capped == backed
    assert not policy.product("insurance").price_capped


# -- kapok watch ---------------------------------------------------------------------------------
class _Booster:
    """Stands in for LightGBM: TreeSHAP contributions are given per row and date."""

    def __init__(self, contributions: dict[int, np.ndarray]) -> None:
        self.contributions = contributions
        self.calls = 0

    def predict(self, x: np.ndarray, pred_contrib: bool = False) -> np.ndarray:
        out = self.contributions[self.calls]
        self.calls += 1
        return out


def _watch_frames():
    features = ["arap_overdue_receivables_ratio_6m", "cred_dpd30_months_12m", "tax_sales_3m"]
    common = {"enterprise_id": ["91440113X"], "requested_amount": [450_000.0], "term_months": [12]}
    prev = pl.DataFrame({**common, "arap_overdue_receivables_ratio_6m": [0.05],
                         "cred_dpd30_months_12m": [0], "jud_enforcements_12m": [0],
                         "jud_dishonest_debtor_listed": [0], "tax_sales_3m": [500_000.0],
                         "tax_sales_growth_yoy": [0.05], "power_kwh_3m": [40_000.0],
                         "power_kwh_growth_yoy": [0.0]})  # fmt: skip
    now = pl.DataFrame({**common, "arap_overdue_receivables_ratio_6m": [0.40],
                        "cred_dpd30_months_12m": [3], "jud_enforcements_12m": [2],
                        "jud_dishonest_debtor_listed": [1], "tax_sales_3m": [100_000.0],
                        "tax_sales_growth_yoy": [-0.7], "power_kwh_3m": [40_000.0],
                        "power_kwh_growth_yoy": [0.0]})  # fmt: skip
    scores = pl.DataFrame({"enterprise_id": ["91440113X"], "pd_previous": [0.02],
                           "pd_now": [0.09], "grade_previous": ["B2"], "grade_now": ["C2"],
                           "grades_down": [3], "pd_ratio": [4.5]})  # fmt: skip
    return features, prev, now, scores


def test_watch_reasons_use_descriptions_and_the_change_in_words():
    features, prev, now, scores = _watch_frames()
    t = watch.Thresholds()
    flags = watch._flags(prev, now, scores, t)
    assert flags.row(0) == (True, True, True, True, True, False)
    booster = _Booster({0: np.zeros((1, 4)), 1: np.array([[0.523, 0.31, 0.0, -0.1]])})
    scorer = type("Scorer", (), {"booster": booster, "features": features})()
    rows = np.array([0])
    drivers = watch._drivers(scorer, np.zeros((1, 3)), np.zeros((1, 3)), prev, now, rows, t)
    flagged = watch._flagged_frame(prev, now, scores, flags, rows, drivers, t)
    row = flagged.row(0, named=True)

    assert row["risk_drivers"] == [
        "Overdue receivables / receivables, last 6 months: rose from 5.0% to 40.0%",
        "Months with a 30+ days past due report, last 12 months: rose from 0 months to 3 months",
    ]
    assert row["risk_drivers_zh"] == [
        "近6个月逾期应收账款占比：由5.0%升至40.0%",
        "近12个月逾期30天以上月数：由0个月升至3个月",
    ]
    assert row["driver_features"] == features[:2]  # machines still get the names
    en, zh = " | ".join(row["reasons"]), " | ".join(row["reasons_zh"])
    assert "log-odds" not in en and "arap_" not in en and "jud_" not in en and "tax_" not in en
    assert "Court enforcement cases, last 12 months: rose from 0 to 2" in en
    assert "近12个月被执行次数：由0升至2" in zh
    assert "(失信被执行人) in the last 24 months: was no, now yes" in en
    assert "近24个月列入失信被执行人：由否变为是" in zh
    assert (
        "Declared sales, last 3 months: fell from CNY 500,000 to CNY 100,000 (down 80% vs the "
        "previous snapshot)" in en
    )
    assert "近3个月申报销售额：由50万元降至10万元（较上期下降80%）" in zh
    assert "grade fell from B2 to C2 (3 grades down; PD rose from 2.00% to 9.00%)" in en
    assert "评级由B2降至C2（下调3级；违约概率由2.00%升至9.00%）" in zh
    assert not ASCII_LETTERS.findall(zh.replace("B2", "").replace("C2", ""))  # but the grades
    assert row["exposure"] == 450_000.0
    csv = watch.csv_frame(flagged)
    assert csv["reasons_zh"][0] == zh and csv["driver_features"][0] == "; ".join(features[:2])


def test_change_in_words():
    assert change("jud_enforcements_12m", 0, 2) == (
        "Court enforcement cases, last 12 months: rose from 0 to 2",
        "近12个月被执行次数：由0升至2",
    )
    assert change("tax_credit_rating_rank", 2, 4)[1] == "最近一次纳税信用等级：由B变为C"
    assert (
        change("cred_balance_growth_6m", None, 0.3)[1] == "贷款余额较6个月前增长率：由缺失变为30.0%"
    )
    assert change("reg_district", "Panyu", "Panyu")[1] == "所在区：未变，仍为番禺区"
    assert change("si_headcount", 20, 12)[0] == (
        "Employees with social insurance, latest month: fell from 20 people to 12 people"
    )


def _record(eid: str, at: datetime, endpoint: str, amount: float, limit: float | None):
    from serving.decision_log import DecisionRecord, new_request_id

    return DecisionRecord(
        request_id=new_request_id(), decided_at=at, caller="test", endpoint=endpoint,
        enterprise_id=eid, product="microloan",
        request={"requested_amount": amount, "term_months": 12}, model_name="kapok-microloan",
        model_version="1", features={}, feature_timestamps={}, pd=0.02, score=650.0, grade="B2",
        decision="approve", limit_amount=limit, price=None, reasons=[], response={},
    )  # fmt: skip


def test_watch_exposure_is_the_approved_limit(tmp_path):
    from serving.decision_log import DecisionLog

    url = f"sqlite:///{tmp_path / 'decisions.db'}"
    day = datetime(2025, 6, 15, 10, 0, tzinfo=UTC)
    ago = day - timedelta(days=30)
    with DecisionLog(url) as log:
        log.write_many([
            _record("limited", ago, "limit", 2_000_000, 450_000),  # asked 2m, lent the limit
            _record("scored", ago, "score", 300_000, None),  # approved as asked
            _record("nothing", ago, "screen", 300_000, 0.0),  # a limit of 0 lent nothing
        ])  # fmt: skip
    book = pf.from_decision_log(url, "microloan", pf.end_of_day(day.date()))
    exposure = dict(zip(book["enterprise_id"], book["requested_amount"], strict=True))
    assert exposure == {"limited": 450_000.0, "scored": 300_000.0}


# -- the model report ----------------------------------------------------------------------------
def test_report_segments_name_their_codes_in_both_languages():
    table = pl.DataFrame({"segment": ["Panyu", "(missing)", "Atlantis"], "applications": [1, 2, 3]})
    named = segment_names(table, "reg_district")
    assert named.columns[:3] == ["segment", "name", "名称"]
    assert named["名称"].to_list() == ["番禺区", "缺失", "Atlantis"]
    assert segment_names(table, "purpose") is table  # not a schema feature: as it is

"""The feature schema: every feature Kapok knows, defined once.

Feast views, LightGBM monotone constraints, reason codes and reports are generated from this
module. A feature's `direction` is the risk a credit analyst expects as its value grows: +1 more
risk, -1 less risk, 0 none or unknown (no monotone constraint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from features.raw_tables import PUBLICATION_DAY, TAX_RATINGS

SCHEMA_VERSION = "1.0"

DType = Literal["float", "int", "string"]


@dataclass(frozen=True)
class Actionable:
    """How an enterprise can move a feature in the near term (paying overdue tax, collecting
    overdue receivables, paying down debt; never its history, age, court records or industry):
    which way (`direction` -1 down, +1 up) and how far (`bound`, the value the action reaches),
    with the action in English and Chinese. Used by the what-if search (serving/whatif.py)."""

    direction: int
    bound: float
    action: str
    action_zh: str


@dataclass(frozen=True)
class Family:
    """A source family: one feature table and one Feast feature view."""

    name: str
    description: str
    source: str  # which raw tables feed it
    publication_day: int  # snapshot for month m is cut on this day of month m+1
    ttl: timedelta


@dataclass(frozen=True)
class Feature:
    name: str
    family: str
    dtype: DType
    # How values are shown to people (serving.reasons.shown): CNY, kWh, ratio and share (as %),
    # months, days, persons, count, 0/1; a categorical unit names its table in features.labels;
    # "1=A 2=B ..." is a code table.
    unit: str
    direction: int
    description: str
    description_zh: str
    categorical: bool = False
    signed: bool = (
        False  # an amount or a number of days that can be negative (a net flow, a change)
    )
    # How many months before its snapshot's own month the feature's window reaches: the value
    # for month t reads raw months t - lookback .. t (a 12-month sum 11, a year-on-year change of
    # 3-month sums 14, a latest value within 3 months 2, a static field 0). Until the data holds
    # that many months before a snapshot, the window is cut short by the start of the data's
    # history, and the feature is missing or smaller only because of that (review.lookback
    # compares such features on whole windows only). None: the feature reads back to the first
    # month of data whatever its age (months since the last event, listed right now), so no
    # snapshot ever holds its whole window. Derived from features.pipelines, and checked against
    # it by tests/test_schema.py.
    lookback: int | None = 0
    # Whether the enterprise can act on it, which way and how far (None: it cannot, in the
    # near term); moving it that way must not be expected to raise the risk (`direction`).
    actionable: Actionable | None = None

    def __post_init__(self) -> None:
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"{self.name}: direction must be -1, 0 or 1")
        if self.categorical and self.direction != 0:
            raise ValueError(f"{self.name}: a categorical feature has no risk direction")
        if self.lookback is not None and self.lookback < 0:
            raise ValueError(f"{self.name}: lookback is a number of months, at least 0")
        if self.actionable is not None:
            move = self.actionable
            if move.direction not in (-1, 1) or move.direction != -self.direction:
                raise ValueError(
                    f"{self.name}: actionable direction {move.direction} must lower the risk "
                    f"(the feature's risk direction is {self.direction})"
                )
            low, high = self.bounds
            if not low <= move.bound <= high:
                raise ValueError(
                    f"{self.name}: actionable bound {move.bound} outside {low}..{high}"
                )

    @property
    def bounds(self) -> tuple[float, float]:
        """The values the feature can take at all, from its unit: a value outside (or an
        infinity) is a fault in the data, not a risk. Amounts, kWh, persons, counts, months and
        days are never negative (unless `signed`); shares and 0/1 flags lie in [0, 1]; a code
        table in its codes; a ratio (a growth rate, a coefficient of variation) is any finite
        number. Missing (NaN, null) is always possible."""
        if self.unit in ("share", "0/1"):
            return (0.0, 1.0)
        if self.unit.startswith("1="):
            return (1.0, float(self.unit.count("=")))
        if self.unit in _NON_NEGATIVE_UNITS and not self.signed:
            return (0.0, math.inf)
        return (-math.inf, math.inf)


_NON_NEGATIVE_UNITS = frozenset({"CNY", "kWh", "persons", "count", "months", "days"})


# the tax-credit rating's code table, 1 = best: "1=A 2=B 3=M 4=C 5=D"
TAX_RATING_CODES = " ".join(f"{rank}={rating}" for rank, rating in enumerate(TAX_RATINGS, 1))
_TTL = timedelta(days=92)  # monthly snapshots: a quarter without a new one means stale

FAMILIES: tuple[Family, ...] = (
    # registration and court records are events, not monthly tables: cut on the first of the month
    Family("registration", "Business registration (工商) and abnormal-operations listings",
           "registration, registration_events", 1, _TTL),
    Family("tax", "Monthly tax filings (税务) and the yearly tax-credit rating",
           "tax, tax_credit_rating", PUBLICATION_DAY["tax"], _TTL),
    Family("power", "Enterprise electricity use (企业用电)", "electricity",
           PUBLICATION_DAY["electricity"], _TTL),
    Family("social_insurance", "Social-insurance headcount (政务)", "social_insurance",
           PUBLICATION_DAY["social_insurance"], _TTL),
    Family("payments", "Payment flows (交易支付)", "payments", PUBLICATION_DAY["payments"], _TTL),
    Family("receivables_payables", "Receivables and payables (应收应付)",
           "receivables_payables", PUBLICATION_DAY["receivables_payables"], _TTL),
    Family("judicial", "Court, enforcement and administrative-penalty records (司法与处罚)",
           "judicial_events", 1, _TTL),
    Family("credit_history", "Credit reported by banks, microloan and guarantee companies (征信)",
           "credit_history", PUBLICATION_DAY["credit_history"], _TTL),
)  # fmt: skip

F, A = Feature, Actionable
FEATURES: tuple[Feature, ...] = (
    # registration
    F("reg_firm_age_months", "registration", "int", "months", -1,
      "Firm age at the snapshot", "企业成立月数"),
    F("reg_registered_capital", "registration", "float", "CNY", -1,
      "Registered capital", "注册资本"),
    F("reg_industry", "registration", "string", "GB/T 4754 section", 0,
      "Industry section (GB/T 4754-2017)", "国民经济行业门类", categorical=True),
    F("reg_district", "registration", "string", "district", 0,
      "District of Guangzhou", "所在区", categorical=True),
    F("reg_size_class", "registration", "string", "class", 0,
      "Enterprise size class (micro / small / medium)", "企业规模", categorical=True),
    F("reg_legal_rep_changes_24m", "registration", "int", "count", 1,
      "Legal-representative changes in the last 24 months", "近24个月法定代表人变更次数", lookback=23),
    F("reg_abnormal_ops_listed", "registration", "int", "0/1", 1,
      "Currently on the abnormal-operations list", "当前列入经营异常名录", lookback=None,
      actionable=A(-1, 0, "Correct the annual report or registered address and apply to be removed from the abnormal-operations list",
                   "补报年报或更正登记住所，申请移出经营异常名录")),
    F("reg_abnormal_ops_listings_24m", "registration", "int", "count", 1,
      "Abnormal-operations listings in the last 24 months", "近24个月列入经营异常名录次数", lookback=23),
    # tax
    F("tax_sales_3m", "tax", "float", "CNY", -1,
      "Declared sales, last 3 months", "近3个月申报销售额", lookback=2),
    F("tax_sales_12m", "tax", "float", "CNY", -1,
      "Declared sales, last 12 months", "近12个月申报销售额", lookback=11),
    F("tax_sales_growth_yoy", "tax", "float", "ratio", -1,
      "Change in declared sales of the last 3 months vs the same months a year earlier",
      "近3个月申报销售额同比增长率", lookback=14),
    F("tax_sales_growth_3m", "tax", "float", "ratio", -1,
      "Change in declared sales of the last 3 months vs the 3 months before",
      "近3个月申报销售额环比增长率", lookback=5),
    F("tax_sales_cv_12m", "tax", "float", "ratio", 1,
      "Coefficient of variation of monthly declared sales, last 12 months",
      "近12个月申报销售额变异系数", lookback=11),
    F("tax_paid_to_sales_12m", "tax", "float", "ratio", -1,
      "VAT and income tax paid / declared sales, last 12 months", "近12个月税负率", lookback=11),
    F("tax_overdue_12m", "tax", "float", "CNY", 1,
      "Overdue tax, last 12 months", "近12个月欠税金额", lookback=11,
      actionable=A(-1, 0, "Pay the overdue tax (the 12-month figure falls as months without arrears replace the overdue ones)",
                   "缴清欠税（此后无欠税的月份逐月替代欠税月份，近12个月欠税金额随之降低）")),
    F("tax_overdue_months_12m", "tax", "int", "months", 1,
      "Months with overdue tax, last 12 months", "近12个月欠税月数", lookback=11),
    F("tax_late_filings_12m", "tax", "int", "count", 1,
      "Late tax filings, last 12 months", "近12个月逾期申报次数", lookback=11),
    F("tax_months_filed_12m", "tax", "int", "months", -1,
      "Months with a tax filing, last 12 months", "近12个月纳税申报月数", lookback=11),
    F("tax_credit_rating_rank", "tax", "int", TAX_RATING_CODES, 1,
      "Latest published tax-credit rating (A best, D worst; M = newly established)",
      "最近一次纳税信用等级"),
    # power
    F("power_kwh_3m", "power", "float", "kWh", -1,
      "Electricity use, last 3 months", "近3个月用电量", lookback=2),
    F("power_kwh_growth_yoy", "power", "float", "ratio", -1,
      "Change in electricity use of the last 3 months vs the same months a year earlier",
      "近3个月用电量同比增长率", lookback=14),
    F("power_kwh_growth_3m", "power", "float", "ratio", -1,
      "Change in electricity use of the last 3 months vs the 3 months before",
      "近3个月用电量环比增长率", lookback=5),
    F("power_kwh_cv_12m", "power", "float", "ratio", 1,
      "Coefficient of variation of monthly electricity use, last 12 months",
      "近12个月用电量变异系数", lookback=11),
    F("power_months_metered_12m", "power", "int", "months", 0,
      "Months with a meter reading, last 12 months", "近12个月有用电记录月数", lookback=11),
    # social insurance
    F("si_headcount", "social_insurance", "int", "persons", -1,
      "Employees with social insurance, latest month", "最近一月社保缴纳人数", lookback=2),
    F("si_headcount_growth_12m", "social_insurance", "float", "ratio", -1,
      "Change in insured headcount vs 12 months earlier", "社保缴纳人数同比增长率", lookback=12),
    # payments
    F("pay_inflow_3m", "payments", "float", "CNY", -1,
      "Payment inflow, last 3 months", "近3个月资金流入", lookback=2),
    F("pay_net_inflow_3m", "payments", "float", "CNY", -1,
      "Payment inflow minus outflow, last 3 months", "近3个月资金净流入", signed=True, lookback=2),
    F("pay_inflow_outflow_ratio_6m", "payments", "float", "ratio", -1,
      "Payment inflow / outflow, last 6 months", "近6个月资金流入流出比", lookback=5),
    F("pay_inflow_growth_3m", "payments", "float", "ratio", -1,
      "Change in payment inflow of the last 3 months vs the 3 months before",
      "近3个月资金流入环比增长率", lookback=5),
    F("pay_inflow_cv_12m", "payments", "float", "ratio", 1,
      "Coefficient of variation of monthly inflow, last 12 months", "近12个月资金流入变异系数", lookback=11),
    F("pay_counterparties_3m", "payments", "float", "count", -1,
      "Average monthly counterparties, last 3 months", "近3个月月均交易对手数", lookback=2),
    F("pay_top_counterparty_share_6m", "payments", "float", "share", 1,
      "Average share of the largest counterparty, last 6 months", "近6个月最大交易对手占比", lookback=5),
    # receivables and payables
    F("arap_receivables", "receivables_payables", "float", "CNY", 0,
      "Receivables balance, latest month", "最近一月应收账款余额", lookback=2),
    F("arap_overdue_receivables_ratio", "receivables_payables", "float", "share", 1,
      "Overdue receivables / receivables, latest month", "最近一月逾期应收账款占比", lookback=2,
      actionable=A(-1, 0, "Collect the overdue receivables from customers", "向客户催收逾期应收账款")),
    F("arap_overdue_receivables_ratio_6m", "receivables_payables", "float", "share", 1,
      "Overdue receivables / receivables, last 6 months", "近6个月逾期应收账款占比", lookback=5),
    F("arap_days_payable", "receivables_payables", "float", "days", 1,
      "Days payable outstanding, latest month", "最近一月应付账款周转天数", lookback=2,
      actionable=A(-1, 30, "Pay suppliers within 30 days (settle the overdue payables)", "在30天内向供应商付款（结清逾期应付账款）")),
    F("arap_days_payable_change_6m", "receivables_payables", "float", "days", 1,
      "Change in days payable outstanding vs 6 months earlier", "应付账款周转天数较6个月前变化",
      signed=True, lookback=6),
    # judicial and penalties
    F("jud_lawsuits_12m", "judicial", "int", "count", 1,
      "Lawsuits as defendant, last 12 months", "近12个月作为被告涉诉次数", lookback=11),
    F("jud_lawsuit_amount_12m", "judicial", "float", "CNY", 1,
      "Amount claimed in lawsuits as defendant, last 12 months", "近12个月被诉金额", lookback=11),
    F("jud_enforcements_12m", "judicial", "int", "count", 1,
      "Court enforcement cases, last 12 months", "近12个月被执行次数", lookback=11),
    F("jud_dishonest_debtor_listed", "judicial", "int", "0/1", 1,
      "Listed as a dishonest debtor (失信被执行人) in the last 24 months", "近24个月列入失信被执行人", lookback=23),
    F("jud_penalties_12m", "judicial", "int", "count", 1,
      "Administrative penalties, last 12 months", "近12个月行政处罚次数", lookback=11),
    F("jud_months_since_lawsuit", "judicial", "int", "months", -1,
      "Months since the last lawsuit as defendant (empty: never)", "距最近一次被诉月数", lookback=None),
    # credit history
    F("cred_loans", "credit_history", "int", "count", 0,
      "Outstanding loans and guarantees reported, latest month", "最近一月在贷笔数", lookback=2),
    F("cred_balance", "credit_history", "float", "CNY", 0,
      "Outstanding balance reported, latest month", "最近一月贷款余额", lookback=2),
    F("cred_nonbank_share", "credit_history", "float", "share", 1,
      "Share of the balance owed to microloan companies", "小贷余额占比", lookback=2,
      actionable=A(-1, 0, "Repay the microloan-company debt (or refinance it with a bank loan)", "偿还小额贷款公司借款（或以银行贷款置换）")),
    F("cred_balance_growth_6m", "credit_history", "float", "ratio", 1,
      "Change in the outstanding balance vs 6 months earlier", "贷款余额较6个月前增长率", lookback=6,
      actionable=A(-1, 0, "Pay debt down to no more than its level of 6 months ago", "将贷款余额压降至不高于6个月前的水平")),
    F("cred_dpd30_months_12m", "credit_history", "int", "months", 1,
      "Months with a 30+ days past due report, last 12 months", "近12个月逾期30天以上月数", lookback=11),
    F("cred_dpd90_months_24m", "credit_history", "int", "months", 1,
      "Months with a 90+ days past due report, last 24 months", "近24个月逾期90天以上月数", lookback=23),
    F("cred_months_since_dpd30", "credit_history", "int", "months", -1,
      "Months since the last 30+ days past due report (empty: never)", "距最近一次逾期30天以上月数", lookback=None),
    F("cred_guarantee_compensations_24m", "credit_history", "int", "count", 1,
      "Guarantee compensations (代偿) paid for the firm, last 24 months", "近24个月担保代偿次数", lookback=23),
    F("cred_reporters", "credit_history", "int", "count", 0,
      "Kinds of lender reporting (bank, microloan, guarantee)", "报送机构类型数", lookback=2),
)  # fmt: skip

# Request-time features: computed per application by the Feast on-demand view `request_features`.
REQUEST_FIELDS = {"requested_amount": "float", "term_months": "int"}
REQUEST_FEATURES: tuple[Feature, ...] = (
    F("req_loan_to_sales_12m", "request", "float", "ratio", 1,
      "Requested amount / declared sales of the last 12 months", "申请金额与近12个月销售额之比", lookback=11),
    F("req_installment_to_inflow", "request", "float", "ratio", 1,
      "Monthly installment (amount / term) / average monthly inflow of the last 3 months",
      "月还款额与近3个月月均资金流入之比", lookback=2),
    F("req_term_months", "request", "int", "months", 0,
      "Requested term", "申请期限"),
)  # fmt: skip
del F, A

ALL_FEATURES: tuple[Feature, ...] = FEATURES + REQUEST_FEATURES
BY_NAME: dict[str, Feature] = {f.name: f for f in ALL_FEATURES}
# what the enterprise can act on in the near term (the what-if search's features)
ACTIONABLE: tuple[Feature, ...] = tuple(f for f in FEATURES if f.actionable is not None)

PRODUCTS = ("microloan", "guarantee", "insurance")
FEATURE_SERVICE = {product: f"{product}_v1" for product in PRODUCTS}


def family(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"unknown feature family {name!r}")


def features_of(family_name: str) -> tuple[Feature, ...]:
    return tuple(f for f in FEATURES if f.family == family_name)


def monotone_constraints(names: list[str]) -> list[int]:
    """LightGBM monotone constraints for the given feature columns, from the schema."""
    return [BY_NAME[n].direction if not BY_NAME[n].categorical else 0 for n in names]

"""The columnar decision core against the per-row reference (serving.policy, reasons_from).

A LightGBM model trained here on synthetic rows of Kapok's feature schema (monotone constraints
as in training) decides 10,000+ random requests of the three products both ways: one core call
per product versus one reference call per row. PDs must agree to 1e-9; decisions, grades, reasons,
prices, limits and binding constraints must be identical.
"""

from __future__ import annotations

import json
import math
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest

from features.request import request_features
from features.schema import ALL_FEATURES, FEATURES, PRODUCTS, monotone_constraints
from serving import core
from serving import policy as pol
from serving.engine import policy_outcome
from serving.model import ProductModel
from training.calibration import Calibrator
from training.scorer import Scorer

POLICY = pol.load_policy(pol.DEFAULT_PATH)
INDUSTRIES = ["C", "F", "G", "I", "M"]
DISTRICTS = ["Tianhe", "Yuexiu", "Haizhu", "Panyu"]
SIZES = ["micro", "small", "medium"]


def random_stored(rng: np.random.Generator, n: int) -> dict[str, list[Any]]:
    """Stored features of n enterprises: plausible ranges, knock-out flags, ~8% missing."""
    cols: dict[str, list[Any]] = {}
    for f in FEATURES:
        if f.categorical:
            pool = {
                "reg_industry": [*INDUSTRIES, "Z"],
                "reg_district": DISTRICTS,
                "reg_size_class": SIZES,
            }[f.name]  # fmt: skip  ("Z": unseen in training)
            values: list[Any] = [pool[i] for i in rng.integers(0, len(pool), n)]
        elif f.name in ("jud_dishonest_debtor_listed", "reg_abnormal_ops_listed",
                        "jud_enforcements_12m"):  # fmt: skip
            values = (rng.random(n) < 0.05).astype(int).tolist()
        elif f.name in ("cred_dpd30_months_12m", "cred_dpd90_months_24m"):  # knock-outs at 2, 3
            values = rng.choice([0, 1, 2, 3, 4], n, p=[0.8, 0.08, 0.05, 0.04, 0.03]).tolist()
        elif f.name == "reg_firm_age_months":
            values = rng.integers(1, 300, n).tolist()
        elif f.name == "tax_months_filed_12m":
            values = rng.choice([0, 6, 12], n, p=[0.05, 0.15, 0.8]).tolist()
        elif f.name in ("tax_sales_12m", "pay_inflow_3m"):
            x = np.exp(rng.normal(15, 1.5, n))
            x[rng.random(n) < 0.04] = 0.0
            values = x.tolist()
        elif f.dtype == "int":  # within the values the feature can take (features/schema.py)
            low, high = f.bounds
            values = rng.integers(int(low), 24 if math.isinf(high) else int(high) + 1, n).tolist()
        else:
            low, high = f.bounds
            x = rng.normal(0, 1, n)
            values = (x if low < 0 else np.clip(np.abs(x), low, high)).tolist()
        missing = rng.random(n) < 0.08
        cols[f.name] = [None if m else v for v, m in zip(values, missing, strict=True)]
    return cols


def random_requests(rng: np.random.Generator, n: int, product: str) -> pl.DataFrame:
    prod = POLICY.product(product)
    amount = np.round(np.exp(rng.uniform(np.log(2_000), np.log(prod.amount_max * 1.5), n)), 2)
    amount[rng.random(n) < 0.05] = prod.amount_min  # exactly on the edge
    term = rng.integers(prod.term_months_min, prod.term_months_max + 1, n)
    term[rng.random(n) < 0.02] = prod.term_months_max + 6  # out of range: TERM_OUT_OF_RANGE
    frame = pl.DataFrame(random_stored(rng, n), schema=core.STORED_SCHEMA)
    return frame.with_columns(
        pl.Series("requested_amount", amount), pl.Series("term_months", term, dtype=pl.Int64)
    )


def synthetic_model(product: str, seed: int, monotone: bool = True) -> ProductModel:
    """A small LightGBM model on the schema's features whose risk rises with the loan burden."""
    rng = np.random.default_rng(seed)
    frame = random_requests(rng, 4_000, product)
    sales = frame["tax_sales_12m"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    inflow = frame["pay_inflow_3m"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    req = core.request_features(
        frame["requested_amount"].to_numpy(), frame["term_months"].to_numpy(), sales, inflow
    )
    frame = frame.with_columns(pl.Series(k, v) for k, v in req.items())
    names = [f.name for f in ALL_FEATURES]
    categories = {f.name: sorted(set(INDUSTRIES) if f.name == "reg_industry" else
                                 DISTRICTS if f.name == "reg_district" else SIZES)
                  for f in ALL_FEATURES if f.categorical}  # fmt: skip
    from training.scorer import encode

    x = encode(frame, names, categories)
    lts = np.nan_to_num(req[core.LOAN_TO_SALES], nan=1.0)
    iti = np.nan_to_num(req[core.INSTALLMENT_TO_INFLOW], nan=1.0)
    logit = (
        -3 + 1.5 * np.log1p(lts) + 0.8 * np.log1p(iti) - 0.5 * x[:, 1] + rng.normal(0, 1, len(x))
    )
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(int)
    cat_idx = [names.index(c) for c in categories]
    params = {
        "objective": "binary", "num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 20,
        "verbose": -1, "seed": seed, "feature_pre_filter": False,
        "monotone_constraints": monotone_constraints(names) if monotone else [0] * len(names),
    }  # fmt: skip
    if not monotone:  # a deliberately non-monotone dependence on the loan burden
        y = (rng.random(len(x)) < np.where(np.sin(4 * np.log1p(lts)) > 0, 0.3, 0.02)).astype(int)
    booster = lgb.train(
        params, lgb.Dataset(x, y, categorical_feature=cat_idx, free_raw_data=False), 60
    )
    margin = booster.predict(x, raw_score=True)
    calibrator = Calibrator("platt", a=0.9, b=float(np.log(0.05 / 0.95) - 0.9 * margin.mean()))
    scorer = Scorer(booster, names, categories, calibrator)
    return ProductModel(product, f"kapok-{product}", "1", scorer)


def reference(model: ProductModel, row: dict[str, Any], policy: pol.Policy) -> dict[str, Any]:
    """One request the per-row way: dict features, request_features, one-row TreeSHAP, policy."""
    amount, term = float(row.pop("requested_amount")), int(row.pop("term_months"))
    values = dict(row)
    values.update(request_features(amount, term, row["tax_sales_12m"], row["pay_inflow_3m"]))
    contrib = model.contributions(model.row(values))[0]
    pd_ = float(model.scorer.calibrator(np.array([contrib.sum()]))[0])
    out = policy_outcome(model, values, contrib, pd_, amount, term, policy)

    def pd_of(a: float) -> float:
        v = dict(values)
        v.update(request_features(a, term, row["tax_sales_12m"], row["pay_inflow_3m"]))
        return float(model.scorer.calibrator(model.margin(model.row(v)))[0])

    out["limit"] = pol.limit(pd_of, amount, term, model.product, values, policy)
    out["pd"] = pd_
    return out


def same_price(a: pol.Price | None, b: pol.Price | None) -> None:
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    for name, want in vars(a).items():
        got = getattr(b, name)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), name
        else:
            assert got == want, name


def compare(model: ProductModel, requests: pl.DataFrame, policy: pol.Policy) -> int:
    d = core.decide(model, requests, policy, limits=True)
    rows = requests.to_dicts()
    values = d.rows()
    checked = 0
    for r, row in enumerate(rows):
        if d.error[r] is not None:
            continue
        want = reference(model, dict(row), policy)
        assert d.pd[r] == pytest.approx(want["pd"], abs=1e-9), r
        assert d.score[r] == pytest.approx(want["score"], rel=1e-12), r
        assert d.grade[r] == want["grade"], r
        made = d.decision_row(r, values[r])
        assert made == want["decision"], r
        assert d.knockout_list(r, values[r]) == want["knockouts"], r
        assert [(x.code, x.value, x.text_en, x.text_zh) for x in d.reasons(r, values[r])] == [
            (x.code, x.value, x.text_en, x.text_zh) for x in want["reasons"]
        ], r
        for got, exp in zip(d.reasons(r, values[r]), want["reasons"], strict=True):
            assert got.impact == pytest.approx(exp.impact, abs=1e-12)
        same_price(want["price"], d.price_row(r))
        lim, ref = d.limit(r, values[r]), want["limit"]
        assert (lim.limit, lim.binding) == (ref.limit, ref.binding), (r, lim, ref)
        assert lim.constraints.keys() == ref.constraints.keys(), r
        for name, value in ref.constraints.items():
            assert lim.constraints[name] == pytest.approx(value, rel=1e-9), (r, name)
        assert lim.decision == ref.decision, r
        assert lim.notes == ref.notes, r
        assert (lim.pd_at_limit is None) == (ref.pd_at_limit is None), r
        if ref.pd_at_limit is not None:
            assert lim.pd_at_limit == pytest.approx(ref.pd_at_limit, abs=1e-9), r
        same_price(ref.price, lim.price)
        assert d.limits is not None and d.limits.severity[r] == pol.SEVERITY[ref.decision.decision]
        checked += 1
    return checked


@pytest.mark.parametrize("product", PRODUCTS)
def test_core_equals_the_per_row_reference(product):
    """3,400 random requests per product (10,200 in all), one core call each."""
    model = synthetic_model(product, seed=PRODUCTS.index(product))
    requests = random_requests(np.random.default_rng(100 + PRODUCTS.index(product)), 3_400, product)
    assert compare(model, requests, POLICY) >= 3_300


def test_core_equals_the_reference_for_a_government_backed_guarantor():
    """The guarantee fee cap changes at CNY 5m: the limit search works segment by segment."""
    text = pol.DEFAULT_PATH.read_text().replace(
        "guarantee_government_backed = false", "guarantee_government_backed = true"
    )
    import tomllib

    policy = pol.policy_from_dict(tomllib.loads(text))
    model = synthetic_model("guarantee", seed=5)
    requests = random_requests(np.random.default_rng(7), 600, "guarantee")
    assert compare(model, requests, policy) >= 550


def test_a_model_not_monotone_in_the_amount_is_searched_by_the_reference():
    """Where PD falls as the amount grows, bisection is not exact: the core verifies every limit
    and lets the reference search the rows where a check fails, so results still agree."""
    model = synthetic_model("microloan", seed=3, monotone=False)
    requests = random_requests(np.random.default_rng(9), 400, "microloan")
    assert compare(model, requests, POLICY) >= 380


def test_top_reasons_breaks_ties_by_name():
    names = ["b", "a", "d", "c", "e", "f", "g", "h", "i", "j"]
    contrib = np.array([[0.5, 0.5, 0.5, 0.5, 0.5, 0.0, -1.0, 0.1, 0.5, 0.2]])
    got = core.top_reasons(contrib, names)[0]
    assert [names[i] for i in got] == ["a", "b", "c", "d"]
    only = np.array([[0.0, 0.3, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert core.top_reasons(only, names)[0].tolist() == [1, -1, -1, -1]


def test_negative_sales_is_an_error_row_not_a_crash():
    model = synthetic_model("microloan", seed=1)
    requests = random_requests(np.random.default_rng(2), 5, "microloan").with_columns(
        pl.Series("tax_sales_12m", [-5.0, 1e6, None, 0.0, 2e6])
    )
    d = core.decide(model, requests, POLICY, limits=True)
    assert d.error[0] == "feature tax_sales_12m is negative (-5.00)"
    assert [e is None for e in d.error[1:]] == [True] * 4


def test_impossible_feature_values_are_error_rows_and_the_other_rows_are_unchanged():
    """An infinity, a negative amount or count, a share above 1 or a code outside its table is
    an error naming the feature, not a crash of the whole call (batch jobs decide the other
    rows); NaN is missing, a valid row; every other row decides exactly as without them."""
    model = synthetic_model("microloan", seed=1)
    clean = random_requests(np.random.default_rng(3), 8, "microloan")
    faults = {
        0: ("power_kwh_3m", math.inf, "feature power_kwh_3m is +inf"),
        1: ("pay_inflow_3m", -math.inf, "feature pay_inflow_3m is -inf"),
        2: ("tax_sales_12m", math.inf, "feature tax_sales_12m is +inf"),
        3: ("cred_nonbank_share", 1.5, "feature cred_nonbank_share is 1.50, outside"),
        4: ("jud_lawsuits_12m", -2, "feature jud_lawsuits_12m is negative (-2.00)"),
        5: ("tax_credit_rating_rank", 7, "feature tax_credit_rating_rank is 7.00, outside"),
    }
    spoiled = clean
    for r, (name, value, _) in faults.items():
        column = spoiled[name].to_list()
        column[r] = value
        spoiled = spoiled.with_columns(pl.Series(name, column, dtype=spoiled[name].dtype))
    column = spoiled["tax_sales_growth_yoy"].to_list()
    column[6] = math.nan  # missing, as LightGBM reads it
    spoiled = spoiled.with_columns(pl.Series("tax_sales_growth_yoy", column))
    d = core.decide(model, spoiled, POLICY, limits=True)
    want = core.decide(model, clean, POLICY, limits=True)
    for r, (_, _, text) in faults.items():
        assert d.error[r] is not None and d.error[r].startswith(text), (r, d.error[r])
    assert d.error[6] is None and d.error[7] is None
    assert d.pd[7] == want.pd[7] and d.limit(7) == want.limit(7)
    assert 0 < d.pd[6] < 1


def test_a_snapshot_stamped_in_the_future_is_an_error_row():
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    stamps = pl.DataFrame(
        {
            "tax": [now - timedelta(days=20), now + timedelta(days=3), None, now],
            "power": [None, None, now + timedelta(seconds=30), now - timedelta(days=1)],
        },
        schema={"tax": pl.Datetime("us", "UTC"), "power": pl.Datetime("us", "UTC")},
    )
    error = np.array([None, None, None, "already wrong"], dtype=object)
    core.future_snapshots(error, stamps, ["tax", "power"], now=now)
    assert error[0] is None and error[2] is None  # 30 s ahead: within the clock skew allowed
    assert error[1] == (
        "the tax snapshot is stamped 2026-12-06T12:00:00Z, in the future (now 2026-12-03T12:00:00Z)"
    )
    assert error[3] == "already wrong"


def test_bad_requests_name_the_column():
    model = synthetic_model("microloan", seed=1)
    requests = random_requests(np.random.default_rng(2), 3, "microloan")
    with pytest.raises(core.DecisionInputError, match="term_months"):
        core.decide(model, requests.drop("term_months"), POLICY)
    with pytest.raises(core.DecisionInputError, match="requested_amount"):
        core.decide(model, requests.with_columns(requested_amount=pl.lit(math.nan)), POLICY)


def test_features_json_reads_back_as_the_rows_the_log_would_encode():
    """Batch jobs hand the decision log every row's features as JSON text encoded by polars;
    it must read back to exactly the dict a record would otherwise carry (missing as null,
    ints as ints, floats to the last bit)."""
    from serving.decision_log import _dumps

    model = synthetic_model("microloan", seed=3)
    requests = random_requests(np.random.default_rng(3), 500, "microloan").with_columns(
        pl.Series("tax_sales_12m", [0.0, None] + [1e6 / (i + 1) for i in range(498)])
    )
    d = core.decide(model, requests, POLICY)
    texts, rows = d.features_json(), d.rows()
    assert len(texts) == len(rows) == 500
    for text, row in zip(texts, rows, strict=True):
        assert json.loads(text) == json.loads(_dumps(row))
        assert list(json.loads(text)) == sorted(row)
    assert json.loads(texts[0])["req_loan_to_sales_12m"] is None  # no sales: null, not NaN
    assert isinstance(json.loads(texts[0])["req_term_months"], int)


def test_adverse_reasons_explain_exactly_the_refers_and_declines():
    """Batch jobs explain only the decisions a lender must give reasons for; those reasons are
    the ones a full explanation gives, and PDs do not change."""
    model = synthetic_model("insurance", seed=4)
    requests = random_requests(np.random.default_rng(4), 2_000, "insurance")
    full = core.decide(model, requests, POLICY, reasons="all")
    adverse = core.decide(model, requests, POLICY, reasons="adverse")
    assert adverse.pd == pytest.approx(full.pd, abs=1e-12)
    assert (adverse.severity == full.severity).all()
    explained = adverse.explained >= 0
    assert (explained == (full.severity > 0)).all() and 0 < explained.sum() < len(requests)
    for r in range(len(requests)):
        if explained[r]:
            assert adverse.reasons(r) == full.reasons(r)
            assert (adverse.contribution(r) == full.contribution(r)).all()
        else:
            assert adverse.reasons(r) == [] and adverse.contribution(r) is None


@pytest.mark.parametrize("product", ["microloan", "guarantee"])
def test_one_request_at_a_time_equals_the_reference(product):
    """The API decides one row: the limit search then probes several bisection levels per
    model call, which must land exactly where bisection does (monotone or not)."""
    for seed, monotone in ((11, True), (12, False)):
        model = synthetic_model(product, seed=seed, monotone=monotone)
        requests = random_requests(np.random.default_rng(seed), 150, product)
        checked = sum(compare(model, requests.slice(r, 1), POLICY) for r in range(150))
        assert checked >= 140

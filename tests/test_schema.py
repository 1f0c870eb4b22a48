"""One feature schema drives the feature tables, the Feast views and the model constraints."""

from __future__ import annotations

from datetime import date

import polars as pl
import pytest

from features.feast_defs import definitions
from features.schema import (
    ACTIONABLE,
    ALL_FEATURES,
    BY_NAME,
    FAMILIES,
    FEATURE_SERVICE,
    FEATURES,
    REQUEST_FEATURES,
    Actionable,
    Feature,
    features_of,
    monotone_constraints,
)


def test_every_feature_is_documented_in_english_and_chinese():
    names = [f.name for f in ALL_FEATURES]
    assert len(names) == len(set(names))
    for f in ALL_FEATURES:
        assert f.description and f.description_zh and f.unit, f.name
        assert f.direction in (-1, 0, 1)
        assert not (f.categorical and f.direction), f.name
    assert {f.family for f in FEATURES} == {fam.name for fam in FAMILIES}


def test_actionable_features_move_the_way_that_lowers_risk():
    """An actionable feature (what-if, serving/whatif.py) is one the enterprise can change in
    the near term, in the direction that does not raise the expected risk, to a bound it can
    take; described in English and Chinese. Its history, age and court records are not."""
    assert 4 <= len(ACTIONABLE) <= 8, [f.name for f in ACTIONABLE]
    for f in ACTIONABLE:
        move = f.actionable
        assert move is not None and move.action and move.action_zh, f.name
        assert f.direction != 0 and not f.categorical, f.name
        assert move.direction == -f.direction, f"{f.name}: moving it would raise the risk"
        low, high = f.bounds
        assert low <= move.bound <= high, f.name
    never = {
        "reg_firm_age_months",
        "reg_industry",
        "jud_enforcements_12m",
        "jud_dishonest_debtor_listed",
        "cred_dpd90_months_24m",
        "cred_dpd30_months_12m",
    }
    assert not never & {f.name for f in ACTIONABLE}
    with pytest.raises(ValueError, match="must lower the risk"):
        Feature("x", "tax", "float", "CNY", 1, "x", "x", actionable=Actionable(1, 1e9, "a", "a"))
    with pytest.raises(ValueError, match="must lower the risk"):
        Feature("x", "tax", "float", "CNY", 0, "x", "x", actionable=Actionable(-1, 0, "a", "a"))
    with pytest.raises(ValueError, match="outside"):
        Feature("x", "tax", "float", "share", 1, "x", "x", actionable=Actionable(-1, -1, "a", "a"))


def test_feature_tables_have_exactly_the_schema_columns(small_system):
    dtypes = {"float": pl.Float64, "int": pl.Int64, "string": pl.String}
    for fam in FAMILIES:
        table = pl.scan_parquet(small_system.paths.features / fam.name / "*.parquet")
        schema = table.collect_schema()
        expected = {"enterprise_id": pl.String, "event_timestamp": pl.Datetime("us", "UTC")}
        expected |= {f.name: dtypes[f.dtype] for f in features_of(fam.name)}
        assert dict(schema) == expected, fam.name


def test_feast_views_agree_with_the_schema(tmp_path):
    objects = {getattr(o, "name", None): o for o in definitions(tmp_path)}
    feast_type = {"float": "Float64", "int": "Int64", "string": "String"}
    for fam in FAMILIES:
        view = objects[fam.name]
        fields = {f.name: f for f in view.schema if f.name != "enterprise_id"}
        assert set(fields) == {f.name for f in features_of(fam.name)}, fam.name
        for feature in features_of(fam.name):
            field = fields[feature.name]
            assert str(field.dtype) == feast_type[feature.dtype]
            assert field.description == feature.description
            assert field.tags["description_zh"] == feature.description_zh
            assert field.tags["direction"] == str(feature.direction)
        assert view.ttl == fam.ttl
        assert view.batch_source.path == str(tmp_path / fam.name)
    odfv = objects["request_features"]
    assert {f.name for f in odfv.features} == {f.name for f in REQUEST_FEATURES}
    for product, service_name in FEATURE_SERVICE.items():
        service = objects[service_name]
        assert service.tags["product"] == product
        served = {p.name for p in service.feature_view_projections}
        assert served == {fam.name for fam in FAMILIES} | {"request_features"}


def test_monotone_constraints_follow_risk_directions():
    names = ["tax_sales_12m", "cred_dpd30_months_12m", "reg_industry", "power_months_metered_12m"]
    assert monotone_constraints(names) == [-1, 1, 0, 0]
    with pytest.raises(KeyError):
        monotone_constraints(["no_such_feature"])


def _from(tables: dict[str, pl.LazyFrame], first: date) -> dict[str, pl.LazyFrame]:
    """The raw tables as if the data's history started in month `first`."""
    out = {}
    for name, frame in tables.items():
        columns = frame.collect_schema().names()
        when = "month" if "month" in columns else "event_date" if "event_date" in columns else None
        out[name] = frame.filter(pl.col(when) >= first) if when else frame
    return out


# The latest value within the last 3 months (Monthly.latest): it reads months t-1 and t-2 only
# when month t is missing, which the simulated feeds never are at the start of the history, so
# no value changes with it; lookback 2 is the code's reach.
LATEST_VALUE = {"si_headcount", "arap_receivables", "arap_overdue_receivables_ratio",
                "arap_days_payable", "cred_loans", "cred_balance", "cred_nonbank_share",
                "cred_reporters"}  # fmt: skip


@pytest.mark.slow
def test_lookback_is_how_far_back_each_feature_reads(small_system):
    """Each feature's `lookback` is the reach of its pipeline: with the data's history starting
    `shift` months later, a snapshot `lookback` or more months after the new start has the same
    value as before (the window is whole), and some earlier snapshot's value changes (the
    window does reach before the start; LATEST_VALUE aside). None: the value reads back to the
    first month, so some snapshot changes however late it is."""
    from features.build import raw_chunk
    from features.pipelines import Panel, build_family, month_index
    from features.raw_tables import read_manifest

    raw = small_system.paths.raw
    manifest = read_manifest(raw)
    start = date.fromisoformat(manifest["start"] + "-01")
    months, shift = manifest["months"], 12
    later = date(
        start.year + (start.month - 1 + shift) // 12, (start.month - 1 + shift) % 12 + 1, 1
    )
    tables = raw_chunk(raw, 0)
    registration = tables["registration"].collect()
    full_panel = Panel.of(registration, months, start)
    late_panel = Panel.of(registration, months - shift, later)
    late_tables = _from(tables, later)
    checked, wrong = set(), []
    for fam in FAMILIES:
        full = build_family(fam.name, tables, full_panel)
        late = build_family(fam.name, late_tables, late_panel)
        both = late.join(full, on=["enterprise_id", "event_timestamp"], suffix="_full")
        # the snapshot month, counted from the later start: cut in the month after its own
        both = both.with_columns(t=month_index(pl.col("event_timestamp"), later) - 1)
        for feature in features_of(fam.name):
            same = pl.col(feature.name).eq_missing(pl.col(f"{feature.name}_full"))
            checked.add(feature.name)
            if feature.lookback is None:
                if both.select(same.all()).item():
                    wrong.append(f"{feature.name}: never reads before the start (lookback None)")
                continue
            whole = both.filter(pl.col("t") >= feature.lookback)
            if not (whole.height and whole.select(same.all()).item()):
                wrong.append(f"{feature.name}: lookback {feature.lookback} is too short")
            if feature.name in LATEST_VALUE:
                if feature.lookback != 2:
                    wrong.append(f"{feature.name}: a latest value within 3 months looks back 2")
                continue
            cut = both.filter(pl.col("t") < feature.lookback)
            if feature.lookback and cut.select(same.all()).item():
                wrong.append(f"{feature.name}: lookback {feature.lookback}, reads nothing before")
    assert not wrong, wrong
    assert checked == {f.name for f in FEATURES}
    # request-time features reach as far as the stored features they are computed from
    assert BY_NAME["req_loan_to_sales_12m"].lookback == BY_NAME["tax_sales_12m"].lookback
    assert BY_NAME["req_installment_to_inflow"].lookback == BY_NAME["pay_inflow_3m"].lookback
    assert BY_NAME["req_term_months"].lookback == 0

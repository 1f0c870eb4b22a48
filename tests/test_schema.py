"""One feature schema drives the feature tables, the Feast views and the model constraints."""

from __future__ import annotations

import polars as pl
import pytest

from features.feast_defs import definitions
from features.schema import (
    ALL_FEATURES,
    FAMILIES,
    FEATURE_SERVICE,
    FEATURES,
    REQUEST_FEATURES,
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

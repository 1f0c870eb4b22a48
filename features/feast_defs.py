"""Feast definitions generated from the feature schema: entity, sources, views, services.

Entity → FileSource → FeatureView per family (over the parquet tables `kapok features build`
writes), the on-demand view of request-time features, and one FeatureService per product.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feast import Entity, FeatureService, FeatureView, Field, FileSource, RequestSource
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, PrimitiveFeastType, String
from feast.value_type import ValueType

from features.schema import (
    FAMILIES,
    FEATURE_SERVICE,
    REQUEST_FEATURES,
    REQUEST_FIELDS,
    Feature,
    features_of,
)

FEAST_TYPE: dict[str, PrimitiveFeastType] = {"float": Float64, "int": Int64, "string": String}

# Why an entity: every feature describes one enterprise, keyed by its USCC.
enterprise = Entity(
    name="enterprise",
    join_keys=["enterprise_id"],
    value_type=ValueType.STRING,
    description="An enterprise, identified by its Unified Social Credit Code (统一社会信用代码)",
)


def _field(feature: Feature) -> Field:
    return Field(
        name=feature.name,
        dtype=FEAST_TYPE[feature.dtype],
        description=feature.description,
        tags={
            "description_zh": feature.description_zh,
            "unit": feature.unit,
            "direction": str(feature.direction),
            "categorical": str(feature.categorical).lower(),
        },
    )


def feature_views(features_dir: Path) -> list[FeatureView]:
    """One view per source family, reading <features_dir>/<family>/ (all chunk files)."""
    views = []
    for fam in FAMILIES:
        source = FileSource(
            name=f"{fam.name}_source",
            path=str(features_dir / fam.name),
            timestamp_field="event_timestamp",
            description=f"Monthly point-in-time snapshots: {fam.description}",
        )
        views.append(
            FeatureView(
                name=fam.name,
                entities=[enterprise],
                ttl=fam.ttl,
                schema=[_field(f) for f in features_of(fam.name)],
                source=source,
                online=True,
                description=f"{fam.description}; source tables: {fam.source}",
                tags={"publication_day": str(fam.publication_day)},
            )
        )
    return views


request = RequestSource(
    name="loan_request",
    schema=[Field(name=n, dtype=FEAST_TYPE[t]) for n, t in REQUEST_FIELDS.items()],
    description="What the applicant asks for: amount (CNY) and term (months)",
)


def request_features(tax: FeatureView, payments: FeatureView) -> Any:
    """The on-demand view: loan burden relative to the firm's own sales and cash inflow."""

    @on_demand_feature_view(
        sources=[request, tax[["tax_sales_12m"]], payments[["pay_inflow_3m"]]],
        # plain fields: Feast compares them with the ones it infers by running the function
        schema=[Field(name=f.name, dtype=FEAST_TYPE[f.dtype]) for f in REQUEST_FEATURES],
        mode="python",
        description="Request-time features: loan burden relative to sales and inflow",
    )
    def request_features(inputs: dict[str, Any]) -> dict[str, Any]:
        # Feast stores this function's source and runs it elsewhere: it must be self-contained.
        def _ratio(num: Any, den: Any) -> float | None:
            if num is None or den is None or den <= 0:
                return None
            return float(num) / float(den)

        amounts, terms = inputs["requested_amount"], inputs["term_months"]
        sales, inflow = inputs["tax_sales_12m"], inputs["pay_inflow_3m"]
        out: dict[str, list[Any]] = {
            "req_loan_to_sales_12m": [],
            "req_installment_to_inflow": [],
            "req_term_months": [],
        }
        for amount, term, sale, flow in zip(amounts, terms, sales, inflow, strict=True):
            out["req_loan_to_sales_12m"].append(_ratio(amount, sale))
            installment = _ratio(amount, term)
            monthly_inflow = None if flow is None else float(flow) / 3
            out["req_installment_to_inflow"].append(_ratio(installment, monthly_inflow))
            out["req_term_months"].append(None if term is None else int(term))
        return out

    return request_features


def definitions(features_dir: Path) -> list[Any]:
    """Everything `feast apply` registers, in dependency order."""
    views = feature_views(features_dir)
    by_name = {v.name: v for v in views}
    odfv = request_features(by_name["tax"], by_name["payments"])
    services = [
        FeatureService(
            name=service,
            features=[*views, odfv],
            description=f"Features for the {product} model, version 1",
            tags={"product": product},
        )
        for product, service in FEATURE_SERVICE.items()
    ]
    return [enterprise, *views, request, odfv, *services]

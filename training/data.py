"""Training data: a product's matured applications with point-in-time features from Feast, or a
bring-your-own-data spec; and the out-of-time (or K-fold) split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import polars as pl

from features import store as feature_store
from features.raw_tables import read_manifest, scan
from features.schema import ALL_FEATURES, FEATURE_SERVICE, PRODUCTS, SCHEMA_VERSION
from features.spec import DatasetSpec, load_dataset
from kapok.settings import Paths

LABEL = "label"
TIME = "applied_at"
SEGMENTS = ("reg_industry", "reg_district", "reg_size_class")


class UnknownProductError(ValueError):
    pass


@dataclass
class TrainingData:
    """Everything training needs: rows, which columns are what, and where they came from."""

    name: str  # model name suffix: product or dataset name
    frame: pl.DataFrame  # features, LABEL, optional TIME, optional pd_true, segment columns
    features: list[str]
    categorical: list[str]
    directions: dict[str, int]
    segments: list[str]
    source: dict[str, str] = field(default_factory=dict)  # lineage tags for MLflow

    @property
    def has_time(self) -> bool:
        return TIME in self.frame.columns

    @property
    def has_oracle(self) -> bool:
        return "pd_true" in self.frame.columns

    def fingerprint(self) -> dict[str, str | float]:
        """Row counts, time range, label rate and a content hash of exactly what was trained on."""
        cols = [*self.features, LABEL] + ([TIME] if self.has_time else [])
        hashed = self.frame.select(cols).hash_rows(seed=0)
        digest = hashlib.sha256(hashed.sort().to_numpy().tobytes()).hexdigest()[:16]
        out: dict[str, str | float] = {
            "rows": float(self.frame.height),
            "label_rate": float(self.frame[LABEL].mean()),  # type: ignore[arg-type]
            "content_hash": digest,
        }
        if self.has_time:
            out["time_from"] = str(self.frame[TIME].min())
            out["time_to"] = str(self.frame[TIME].max())
        return out


def product_data(paths: Paths, product: str) -> TrainingData:
    """Matured applications of `product` joined point-in-time to its FeatureService via Feast."""
    if product not in PRODUCTS:
        raise UnknownProductError(
            f"unknown product {product!r}: choose one of {', '.join(PRODUCTS)}"
        )
    read_manifest(paths.raw)  # a clear "run kapok data generate first" when there is no data
    apps = (
        scan(paths.raw, "applications")
        .filter((pl.col("product") == product) & pl.col("matured"))
        .sort(TIME, "application_id")
        .collect()
    )
    if apps.height == 0:
        raise ValueError(f"no matured {product} applications in {paths.raw}")
    oracle = scan(paths.raw, "oracle").select("application_id", "pd_true").collect()
    entities = apps.select(
        "enterprise_id",
        pl.col(TIME).alias("event_timestamp"),
        "requested_amount",
        pl.col("term_months").cast(pl.Int64),
    )
    store = feature_store.feature_store(paths)
    features = feature_store.historical_features(store, entities, product)
    names = [f.name for f in ALL_FEATURES]
    frame = pl.concat(
        [
            apps.select("application_id", "enterprise_id", TIME, pl.col("outcome").alias(LABEL)),
            features.select(names),
        ],
        how="horizontal",
    ).join(oracle, on="application_id", how="left")
    return TrainingData(
        name=product,
        frame=frame,
        features=names,
        categorical=[f.name for f in ALL_FEATURES if f.categorical],
        directions={f.name: f.direction for f in ALL_FEATURES},
        segments=list(SEGMENTS),
        source={
            "data": "simulated regional big-data system",
            "feature_service": FEATURE_SERVICE[product],
            "feature_schema_version": SCHEMA_VERSION,
            "label": {
                "microloan": "90+ days past due within 12 months",
                "guarantee": "guarantee compensation (代偿) within the term",
                "insurance": "claim within the policy year",
            }[product],
        },
    )


def spec_data(spec: DatasetSpec) -> TrainingData:
    frame = load_dataset(spec)
    if spec.timestamp_column:
        frame = frame.rename({spec.timestamp_column: TIME}).sort(TIME)
    return TrainingData(
        name=spec.name,
        frame=frame,
        features=[f.name for f in spec.features],
        categorical=[f.name for f in spec.features if f.categorical],
        directions={f.name: f.direction for f in spec.features},
        segments=list(spec.segments),
        source={
            "data": f"dataset spec {spec.source.name}",
            "dataset": spec.name,
            "label": f"{spec.label_column} == {spec.bad_value!r}",
        },
    )


@dataclass(frozen=True)
class Split:
    """Row indices of each part; `windows` says which application months each part covers."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    windows: dict[str, str]


def out_of_time_split(times: pl.Series, valid_share: float = 0.2, test_share: float = 0.2) -> Split:
    """Oldest months train, then validation, the most recent months test: whole months only."""
    months = times.dt.strftime("%Y-%m")
    counts = months.value_counts().sort(months.name)
    labels, n = counts[months.name].to_list(), counts["count"].to_numpy()
    share = np.cumsum(n[::-1]) / n.sum()
    k_test = int(np.searchsorted(share, test_share) + 1)
    k_valid = int(np.searchsorted(share, test_share + valid_share) + 1) - k_test
    if len(labels) - k_test - k_valid < 1 or k_valid < 1:
        raise ValueError(
            f"need at least 3 months of matured data for an out-of-time split, got {len(labels)}"
        )
    test_months = labels[-k_test:]
    valid_months = labels[-k_test - k_valid : -k_test]
    train_months = labels[: -k_test - k_valid]
    m = months.to_numpy()
    return Split(
        train=np.flatnonzero(np.isin(m, train_months)),
        valid=np.flatnonzero(np.isin(m, valid_months)),
        test=np.flatnonzero(np.isin(m, test_months)),
        windows={
            "train": f"{train_months[0]}..{train_months[-1]}",
            "valid": f"{valid_months[0]}..{valid_months[-1]}",
            "test": f"{test_months[0]}..{test_months[-1]}",
        },
    )


def describe_windows(split: Split, frame: pl.DataFrame) -> dict[str, dict[str, float | str]]:
    out = {}
    for part in ("train", "valid", "test"):
        idx = getattr(split, part)
        out[part] = {
            "window": split.windows[part],
            "rows": float(len(idx)),
            "bad_rate": float(frame[LABEL].to_numpy()[idx].mean()),
        }
    return out


def now_utc() -> datetime:
    from datetime import UTC

    return datetime.now(UTC)

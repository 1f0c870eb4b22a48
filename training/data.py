"""Training data: a product's matured applications with point-in-time features from Feast, or a
bring-your-own-data spec; and the out-of-time (or K-fold) split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
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
    valid_months: int | None = None  # out-of-time windows asked for (None: chosen by row share)
    test_months: int | None = None

    @property
    def has_time(self) -> bool:
        return TIME in self.frame.columns

    def split(self) -> Split:
        """The out-of-time split training uses (see `out_of_time_split`)."""
        return out_of_time_split(
            self.frame[TIME],
            labels=self.frame[LABEL],
            valid_months=self.valid_months,
            test_months=self.test_months,
        )

    def with_windows(self, valid_months: int | None, test_months: int | None) -> TrainingData:
        """These data with the out-of-time windows set (`kapok train --valid-months ...`)."""
        if (valid_months is not None or test_months is not None) and not self.has_time:
            raise SplitError(
                f"--valid-months / --test-months set out-of-time windows, but {self.name} has no "
                "timestamp (it is validated by K-fold)"
            )
        return replace(self, valid_months=valid_months, test_months=test_months)

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
    manifest = read_manifest(paths.raw)  # a clear "run kapok data generate first" if no data
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
            # the first month of the data: look-back features are whole only from
            # start + lookback (review.lookback)
            "history_start": str(manifest["start"]),
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


class SplitError(ValueError):
    """No out-of-time split fits the data (or the windows asked for). The message lists the
    months found, with their rows (and bad rows), and says what a split needs."""


MIN_MONTHS = 3  # one each for train, validation and test
LISTED_MONTHS = 24  # an error lists every month up to this many, else the first and last ones


def month_table(times: pl.Series, labels: pl.Series | np.ndarray | None = None) -> pl.DataFrame:
    """Rows (and bad rows, given the 0/1 labels) per application month `YYYY-MM`, oldest first;
    rows without a date are left out (they belong to no window)."""
    frame = pl.DataFrame({"month": times.dt.strftime("%Y-%m")})
    if labels is not None:
        frame = frame.with_columns(pl.Series("bad", np.asarray(labels), dtype=pl.Int64))
    aggs = [pl.len().alias("rows")]
    if labels is not None:
        aggs.append(pl.col("bad").sum())
    return frame.drop_nulls("month").group_by("month").agg(aggs).sort("month")


def _listing(table: pl.DataFrame) -> str:
    def one(row: dict[str, object]) -> str:
        bad = f", {row['bad']:,} bad" if "bad" in row else ""
        return f"{row['month']} ({row['rows']:,} rows{bad})"

    rows = [one(r) for r in table.iter_rows(named=True)]
    if len(rows) > LISTED_MONTHS:
        half = LISTED_MONTHS // 2
        rows = [*rows[:half], f"... {len(rows) - 2 * half} more ...", *rows[-half:]]
    return "; ".join(rows)


def out_of_time_split(
    times: pl.Series,
    valid_share: float = 0.2,
    test_share: float = 0.2,
    *,
    labels: pl.Series | np.ndarray | None = None,
    valid_months: int | None = None,
    test_months: int | None = None,
) -> Split:
    """Oldest months train, then validation, the most recent months test: whole months only.

    By default the most recent months holding at least `test_share` of the rows test and the
    months before them up to `test_share + valid_share` validate. When that leaves a window
    without a month (a short or uneven history, e.g. a small last month), or, given `labels`,
    a window without both bad and good rows, the split is instead the one of whole months,
    at least one per window, whose row shares are closest to train / validation / test =
    (1 - valid_share - test_share) / valid_share / test_share. `valid_months` / `test_months`
    fix the number of months of those windows. Any three months or more split, as long as each
    window can get both classes; otherwise `SplitError` says what was found and what is needed.
    """
    for option, value in (("--valid-months", valid_months), ("--test-months", test_months)):
        if value is not None and value < 1:
            raise SplitError(f"{option} must be at least 1, got {value}")
    table = month_table(times, labels)
    names = table["month"].to_list()
    n = table["rows"].to_numpy().astype(float)
    k = len(names)
    asked = " and ".join(
        f"{option} {value}"
        for option, value in (("--valid-months", valid_months), ("--test-months", test_months))
        if value is not None
    )
    prefix = "cannot make an out-of-time split: "
    found = f"found {k} month{'s' if k != 1 else ''}: {_listing(table) or 'none'}"
    if k < MIN_MONTHS:
        raise SplitError(
            f"{prefix}it needs at least {MIN_MONTHS} months of dated rows (whole months, oldest "
            f"to newest: train, validation, test), {found}"
        )
    if (valid_months or 0) + (test_months or 0) > k - 1:
        raise SplitError(
            f"{prefix}{asked} leave no month to train on (at least 1 is needed), {found}"
        )

    share = np.cumsum(n[::-1]) / n.sum()  # rows share of the most recent 1, 2, ... months
    greedy_test = int(np.searchsorted(share, test_share) + 1)
    k_test = test_months or greedy_test
    if valid_months is not None:
        k_valid = valid_months
    elif test_months is None:  # the original rule: the test and validation windows together
        k_valid = int(np.searchsorted(share, test_share + valid_share) + 1) - k_test
    else:  # the months before a fixed test window that hold `valid_share` of the rows
        before = np.cumsum(n[: k - k_test][::-1]) / n.sum()
        k_valid = int(np.searchsorted(before, valid_share) + 1)

    bad = table["bad"].to_numpy().astype(float) if labels is not None else None

    def usable(kt: int, kv: int) -> bool:
        if kt < 1 or kv < 1 or k - kt - kv < 1:
            return False
        if bad is None:
            return True
        for part in (slice(0, k - kt - kv), slice(k - kt - kv, k - kt), slice(k - kt, k)):
            b, r = bad[part].sum(), n[part].sum()
            if b < 1 or b >= r:
                return False
        return True

    if not usable(k_test, k_valid):
        targets = np.array([1 - valid_share - test_share, valid_share, test_share])
        best: tuple[float, int, int] | None = None
        for kt in [test_months] if test_months else range(1, k - 1):
            for kv in [valid_months] if valid_months else range(1, k - kt):
                if usable(kt, kv):
                    train_rows, test_rows = n[: k - kt - kv].sum(), n[k - kt :].sum()
                    valid_rows = n.sum() - train_rows - test_rows
                    parts = np.array([train_rows, valid_rows, test_rows]) / n.sum()
                    distance = float(np.abs(parts - targets).sum())
                    if best is None or distance < best[0]:
                        best = (distance, kt, kv)
        if best is None:
            windows = f" with {asked}" if asked else ""
            raise SplitError(
                f"{prefix}no split of these months into train, validation and test windows"
                f"{windows} (whole months, at least 1 each) gives every window both bad and good "
                f"rows, {found}"
            )
        _, k_test, k_valid = best

    test_names = names[-k_test:]
    valid_names = names[-k_test - k_valid : -k_test]
    train_names = names[: -k_test - k_valid]
    m = times.dt.strftime("%Y-%m").to_numpy()
    return Split(
        train=np.flatnonzero(np.isin(m, train_names)),
        valid=np.flatnonzero(np.isin(m, valid_names)),
        test=np.flatnonzero(np.isin(m, test_names)),
        windows={
            "train": f"{train_names[0]}..{train_names[-1]}",
            "valid": f"{valid_names[0]}..{valid_names[-1]}",
            "test": f"{test_names[0]}..{test_names[-1]}",
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

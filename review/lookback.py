"""Stability of look-back features, compared like with like.

A feature whose window reaches `lookback` months back (`features.schema.Feature.lookback`) is cut
short in every snapshot taken less than `lookback` months after the data's history starts: a
year-on-year change is missing, a 12-month count is small, only because the data does not go back
far enough. A model trained soon after the history starts has a training reference full of such
rows, a later window has none, and the CSI between the two measures the start of the data, not a
change in the population (on the simulated products the year-on-year features are ~80% missing
in the training reference for that reason alone, and their CSI said "act").

So a look-back feature is compared on the rows whose point-in-time features come from a snapshot
that holds its whole window — snapshot month >= history start + lookback — on both sides, the
training reference and the current window. With fewer than MIN_ROWS such rows on either side the
verdict is "n/a", with the reason: too few rows to say anything, which is not "act". Features
without a look-back (or without a schema entry: a dataset spec's columns) are compared on
every row.

Used by the report's stability section and by `kapok monitor`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl

from features.schema import BY_NAME, FAMILIES, Feature, family
from review.stability import csi, verdict

MIN_ROWS = 200  # whole-window rows each side needs before a look-back feature is judged
NA = "n/a"
HISTORY_TAG = "kapok.history_start"  # the training run's tag: first month of the data, YYYY-MM
# request-time features are computed from stored features of several families: their snapshot
# is taken as the latest family's (a few days' difference, on the safe side)
_LATEST_PUBLICATION_DAY = max(f.publication_day for f in FAMILIES)


@dataclass(frozen=True)
class Sample:
    """Rows to compare, and the point in time each row's features were read at.

    `at` is the application or decision time (a point-in-time join reads, per family, the
    latest snapshot cut at or before it). `snapshots` holds, per family, the time of the
    snapshot a row's features actually came from where the row records it (a live decision's
    feature_timestamps; null where unknown): it replaces `at` for that family."""

    frame: pl.DataFrame
    at: pl.Series | None  # None: undated rows (never whole: a look-back feature is n/a)
    snapshots: Mapping[str, pl.Series] = field(default_factory=dict)

    def as_of(self, family_name: str) -> pl.Series:
        at = self.at
        if at is None:
            at = pl.Series("at", [None] * self.frame.height, dtype=pl.Datetime("us", "UTC"))
        at = at.cast(pl.Datetime("us", "UTC"))
        stamp = self.snapshots.get(family_name)
        if stamp is None:
            return at
        return pl.select(pl.coalesce(stamp.cast(pl.Datetime("us", "UTC")), at)).to_series()


def history_start(tags: Mapping[str, str], raw: Path | None = None) -> tuple[date | None, str]:
    """The first month of the data a model was trained on, and where that was read: the run's
    `kapok.history_start` tag, else, for a run on the feature store logged before the tag, the
    raw data's manifest, else unknown (a dataset spec, or no raw data): then every row is
    compared."""
    tag = tags.get(HISTORY_TAG)
    if tag:
        return _month(tag), f"training run tag {HISTORY_TAG}"
    if raw is not None and tags.get("kapok.feature_service"):
        from features.raw_tables import read_manifest

        try:
            start = read_manifest(raw).get("start")
        except (FileNotFoundError, ValueError):
            start = None
        if start:
            return _month(start), f"raw data manifest {raw}"
    return None, "unknown"


def lookback_note(start: date | None, source: str) -> str:
    """One sentence for a report: how look-back features were compared, and why."""
    if start is None:
        return (
            "The data's first month is unknown (a dataset spec, or a run without the "
            f"{HISTORY_TAG} tag and no raw data): every feature is compared on every row."
        )
    return (
        f"The data's history starts in {start:%Y-%m} ({source}). A feature that looks back L "
        "months is compared only on rows whose snapshot holds its whole window (snapshot "
        f"month >= {start:%Y-%m} + L), on both sides: before that it is missing or short "
        "only because the data does not go back far enough. With fewer than "
        f"{MIN_ROWS} such rows on either side its verdict is n/a."
    )


def _month(text: str) -> date:
    return date.fromisoformat(text[:7] + "-01")


def add_months(month: date, n: int) -> date:
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def _publication_day(feature: Feature) -> int:
    if feature.family in {f.name for f in FAMILIES}:
        return family(feature.family).publication_day
    return _LATEST_PUBLICATION_DAY


def whole_window_from(feature: Feature, start: date) -> datetime:
    """The first instant at which `feature`'s point-in-time value holds its whole window: the
    cut-off of the snapshot for month start + lookback (its family's publication day of the
    month after, midnight UTC). Every snapshot cut from then on is for a later month."""
    month = add_months(start, (feature.lookback or 0) + 1)
    return datetime(month.year, month.month, _publication_day(feature), tzinfo=UTC)


def _whole(sample: Sample, feature: Feature, start: date) -> pl.Series:
    return (sample.as_of(feature.family) >= whole_window_from(feature, start)).fill_null(False)


def feature_stability(
    reference: Sample,
    current: Sample,
    features: Sequence[str],
    categorical: Sequence[str] = (),
    *,
    start: date | None,
    min_rows: int = MIN_ROWS,
) -> pl.DataFrame:
    """One row per feature: CSI (null when n/a), verdict (stable / watch / act / n/a), the
    missing share of the rows compared on each side, the look-back, the rows compared on each
    side and a note saying which rows those were; judged features worst first, n/a last."""
    rows = []
    for name in features:
        feature = BY_NAME.get(name)
        lookback = feature.lookback if feature is not None else 0
        ref, cur = reference.frame[name], current.frame[name]
        note = "every row"
        if feature is not None and lookback is None:
            note = "every row (reads back to the data's first month: no whole window)"
        elif feature is not None and lookback and start is not None:
            since = add_months(start, lookback)
            ref = ref.filter(_whole(reference, feature, start))
            cur = cur.filter(_whole(current, feature, start))
            note = (
                f"whole {lookback + 1}-month window only: snapshots from {since:%Y-%m} "
                f"(history from {start:%Y-%m})"
            )
        index: float | None = None
        too_few = [
            f"{side} {n:,}" for side, n in (("reference", ref.len()), ("current", cur.len()))
            if n < min_rows
        ]  # fmt: skip
        if lookback and start is not None and too_few:
            note = f"too few whole-window rows ({', '.join(too_few)}; needs {min_rows}): {note}"
        else:
            index = csi(ref, cur, name in categorical)
        rows.append(
            {
                "feature": name,
                "csi": index,
                "verdict": NA if index is None else verdict(index),
                "missing_reference": _missing(ref),
                "missing_current": _missing(cur),
                "lookback": lookback,
                "rows_reference": ref.len(),
                "rows_current": cur.len(),
                "compared": note,
            }
        )
    schema = {"feature": pl.String, "csi": pl.Float64, "verdict": pl.String,
              "missing_reference": pl.Float64, "missing_current": pl.Float64,
              "lookback": pl.Int64, "rows_reference": pl.Int64, "rows_current": pl.Int64,
              "compared": pl.String}  # fmt: skip
    return pl.DataFrame(rows, schema=schema).sort("csi", descending=True, nulls_last=True)


def _missing(values: pl.Series) -> float | None:
    return float(values.is_null().mean() or 0.0) if values.len() else None

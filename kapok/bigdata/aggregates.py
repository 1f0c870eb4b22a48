"""The credit aggregates the simulated big-data system publishes: monthly 30+ and 90+ days past due
rates by city, district and industry, computed from the lenders' credit reports it holds.

They are counted from the simulated `credit_history` rows (one per enterprise, month and reporter
type), so they carry the same city-wide cycle, downturn and industry shocks that drive the firms'
health, with the sampling noise of the simulated population. No random number is drawn: adding
this table leaves every other table, and the generator's random streams, exactly as before.
Counting happens chunk by chunk (`chunk_counts`); the rates come from the sums over all chunks
(`published`), so the table does not depend on the chunk size.
"""

from __future__ import annotations

import polars as pl

from features.raw_tables import (
    AGGREGATE_DIMENSIONS,
    CITY_SEGMENT,
    PUBLICATION_DAY,
    UTC_US,
    check_frame,
)

TABLE = "credit_aggregates"
_KEYS = ("month", "dimension", "segment")


def chunk_counts(credit_history: pl.DataFrame, registration: pl.DataFrame) -> pl.DataFrame:
    """Credit reports and those 30+ / 90+ days past due, per month and segment, for one chunk."""
    reports = credit_history.select("enterprise_id", "month", "dpd30", "dpd90").join(
        registration.select("enterprise_id", "district", "industry"),
        on="enterprise_id",
        how="left",
    )
    parts = []
    for dimension, column in AGGREGATE_DIMENSIONS.items():
        segment = pl.lit(CITY_SEGMENT) if column is None else pl.col(column)
        parts.append(
            reports.group_by("month", segment.alias("segment"))
            .agg(
                reports=pl.len().cast(pl.Int64),
                dpd30_reports=pl.col("dpd30").sum().cast(pl.Int64),
                dpd90_reports=pl.col("dpd90").sum().cast(pl.Int64),
            )
            .with_columns(dimension=pl.lit(dimension))
        )
    return pl.concat(parts).select(*_KEYS, "reports", "dpd30_reports", "dpd90_reports")


def published(counts: list[pl.DataFrame]) -> pl.DataFrame:
    """The table as published: counts summed over chunks, rates, and `available_at` on the
    publication day of the month after (PUBLICATION_DAY), the day lenders can first see it."""
    day = PUBLICATION_DAY[TABLE]
    frame = (
        pl.concat(counts)
        .group_by(_KEYS)
        .agg(pl.col("reports", "dpd30_reports", "dpd90_reports").sum())
        .sort(_KEYS)
        .select(
            *_KEYS,
            pl.col("reports", "dpd30_reports", "dpd90_reports").cast(pl.Int32),
            dpd30_rate=pl.col("dpd30_reports") / pl.col("reports"),
            dpd90_rate=pl.col("dpd90_reports") / pl.col("reports"),
            available_at=pl.col("month")
            .dt.offset_by("1mo")
            .dt.offset_by(f"{day - 1}d")
            .cast(pl.Datetime("us"))
            .dt.replace_time_zone("UTC")
            .cast(UTC_US),
        )
    )
    check_frame(TABLE, frame, "published credit aggregates")
    return frame

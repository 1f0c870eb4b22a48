"""Raw tables → point-in-time feature tables, one per source family (polars, lazy, chunked).

Each family is cut once a month: the snapshot for month m is taken on the family's publication day
of month m+1 (its `event_timestamp`) and uses only raw rows whose `available_at` is at or before
that moment. A row filed late is therefore absent from the snapshots cut before it arrived and
present in every later one. One row per enterprise per month from the month it was founded.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

import polars as pl

from features.schema import FAMILIES, family, features_of

UTC = "UTC"
NEVER = -1_000_000  # placeholder for "no event yet" before a cumulative max


# -- calendar ------------------------------------------------------------------------------------
def month_index(col: pl.Expr, start: date) -> pl.Expr:
    """Months between `start` (a first of month) and the date / datetime in `col`."""
    return (
        (col.dt.year().cast(pl.Int32) - start.year) * 12
        + col.dt.month().cast(pl.Int32)
        - start.month
    )


def visible_snapshot(available_at: pl.Expr, start: date, day: int) -> pl.Expr:
    """Index of the first snapshot (cut on `day` of the month after) that can see a row."""
    idx = month_index(available_at, start)
    cut = pl.datetime(available_at.dt.year(), available_at.dt.month(), day, time_zone=UTC)
    return pl.when(available_at <= cut).then(idx - 1).otherwise(idx)


def snapshot_time(t: pl.Expr, start: date, day: int) -> pl.Expr:
    """The cut-off of snapshot t: `day` of month t+1, midnight UTC."""
    total = start.year * 12 + start.month - 1 + t + 1
    return pl.datetime(total // 12, total % 12 + 1, day, time_zone=UTC)


def grid(registration: pl.LazyFrame, months: int, start: date, day: int) -> pl.LazyFrame:
    """One row per enterprise per month t in 0..months-1, sorted; `alive` marks founded firms."""
    return (
        registration.select("enterprise_id", "founded_on")
        .join(pl.LazyFrame({"t": pl.int_range(0, months, eager=True).cast(pl.Int32)}), how="cross")
        .with_columns(
            event_timestamp=snapshot_time(pl.col("t"), start, day),
            alive=month_index(pl.col("founded_on"), start) <= pl.col("t"),
        )
        .sort("enterprise_id", "t")
    )


# -- windows over the month-by-month grid ---------------------------------------------------
def seen(col: str, d: int) -> pl.Expr:
    """Value of `col` for month t-d as it was visible at snapshot t (null if not yet available).

    The grid holds every month of every enterprise in order, so shift(d) stays inside one
    enterprise whenever t >= d. `lag` is how many snapshots after its own month a row appears.
    """
    value = pl.col(col).shift(d)
    ok = pl.col("lag").shift(d) <= d
    if d:
        ok = ok & (pl.col("t") >= d)
    return pl.when(ok).then(value)


def window(col: str, length: int, skip: int = 0) -> list[pl.Expr]:
    return [seen(col, d) for d in range(skip, skip + length)]


def count_seen(col: str, length: int, skip: int = 0) -> pl.Expr:
    return pl.sum_horizontal([e.is_not_null().cast(pl.Int32) for e in window(col, length, skip)])


def wsum(col: str, length: int, skip: int = 0, min_count: int = 1) -> pl.Expr:
    total = pl.sum_horizontal(window(col, length, skip))
    return pl.when(count_seen(col, length, skip) >= min_count).then(total)


def wmean(col: str, length: int, min_count: int = 1) -> pl.Expr:
    return pl.when(count_seen(col, length) >= min_count).then(
        pl.concat_list(window(col, length)).list.mean()
    )


def cv(col: str, length: int = 12, min_count: int = 6) -> pl.Expr:
    values = pl.concat_list(window(col, length))
    mean = values.list.mean()
    return pl.when((count_seen(col, length) >= min_count) & (mean > 0)).then(
        values.list.std(ddof=1) / mean
    )


def growth(now: pl.Expr, before: pl.Expr) -> pl.Expr:
    return pl.when(before > 0).then(now / before - 1)


def latest(col: str) -> pl.Expr:
    """The most recent visible value within the last 3 months."""
    return pl.coalesce(window(col, 3))


def with_lag(rows: pl.LazyFrame, start: date, day: int) -> pl.LazyFrame:
    """Monthly raw rows → t (their month) and lag (snapshots until visible, at least 0)."""
    t = month_index(pl.col("month"), start)
    return rows.with_columns(
        t=t, lag=pl.max_horizontal(visible_snapshot(pl.col("available_at"), start, day) - t, 0)
    ).drop("month", "available_at")


def on_grid(g: pl.LazyFrame, rows: pl.LazyFrame) -> pl.LazyFrame:
    return g.join(rows, on=["enterprise_id", "t"], how="left").sort("enterprise_id", "t")


# -- sparse events -------------------------------------------------------------------------------
def money_sum(col: str | pl.Expr) -> pl.Expr:
    """Sum of a money column in whole cents (分), as integers. A float sum depends on the order
    in which a parallel group-by meets the rows, and two builds of the same data must give the
    same features to the last bit (training's content hash, hence its model, depends on them)."""
    expr = pl.col(col) if isinstance(col, str) else col
    return (expr * 100).round().cast(pl.Int64).sum() / 100


def event_counts(
    events: pl.LazyFrame, start: date, day: int, windows: dict[str, tuple[str, int, str | None]]
) -> pl.LazyFrame:
    """Counts (or sums) of events per (enterprise, snapshot t) over trailing windows of months.

    `windows` maps output column → (event_type, months, column to sum or None to count). An event
    of month k seen from snapshot s counts at snapshots max(s, k) .. k + months - 1. Amounts are
    summed with `money_sum`.
    """
    ev = events.with_columns(
        k=month_index(pl.col("event_date"), start),
        s=visible_snapshot(pl.col("available_at"), start, day),
    )
    parts = []
    for name, (kind, months, amount) in windows.items():
        value = pl.col(amount) if amount else pl.lit(1)
        total = money_sum("value") if amount else pl.col("value").sum()
        parts.append(
            ev.filter(pl.col("event_type") == kind)
            .select(
                "enterprise_id",
                t=pl.int_ranges(pl.max_horizontal("s", "k"), pl.col("k") + months, dtype=pl.Int32),
                value=value,
            )
            .explode("t")
            .group_by("enterprise_id", "t")
            .agg(total.alias(name))
        )
    out = parts[0]
    for part in parts[1:]:
        out = out.join(part, on=["enterprise_id", "t"], how="full", coalesce=True)
    return out


def last_seen(events: pl.LazyFrame, start: date, day: int, kinds: dict[str, str]) -> pl.LazyFrame:
    """Per (enterprise, snapshot s): latest event month k of each kind that became visible at s.

    Joined to the grid and cumulated with `carry_max`, this gives the last event seen by t.
    """
    ev = events.with_columns(
        k=month_index(pl.col("event_date"), start),
        t=visible_snapshot(pl.col("available_at"), start, day),
    )
    aggs = [
        pl.col("k").filter(pl.col("event_type") == kind).max().alias(name)
        for name, kind in kinds.items()
    ]
    return ev.group_by("enterprise_id", "t").agg(aggs)


def carry_max(col: str) -> pl.Expr:
    """Cumulative maximum within an enterprise; null until the first value."""
    running = pl.col(col).fill_null(NEVER).cum_max().over("enterprise_id")
    return pl.when(running > NEVER).then(running)


# -- families ------------------------------------------------------------------------------------
FamilyBuilder = Callable[[dict[str, pl.LazyFrame], pl.LazyFrame, date], pl.LazyFrame]


def _registration(raw: dict[str, pl.LazyFrame], g: pl.LazyFrame, start: date) -> pl.LazyFrame:
    day = family("registration").publication_day
    reg = raw["registration"].select(
        "enterprise_id", "industry", "district", "size_class", "registered_capital"
    )
    events = raw["registration_events"]
    counts = event_counts(
        events,
        start,
        day,
        {
            "reg_legal_rep_changes_24m": ("legal_rep_change", 24, None),
            "reg_abnormal_ops_listings_24m": ("abnormal_ops_listed", 24, None),
        },
    )
    status = last_seen(
        events,
        start,
        day,
        {"listed_k": "abnormal_ops_listed", "removed_k": "abnormal_ops_removed"},
    )
    return (
        g.join(reg, on="enterprise_id", how="left")
        .join(counts, on=["enterprise_id", "t"], how="left")
        .join(status, on=["enterprise_id", "t"], how="left")
        .sort("enterprise_id", "t")
        .with_columns(
            carry_max("listed_k").alias("listed_k"), carry_max("removed_k").alias("removed_k")
        )
        .with_columns(
            reg_firm_age_months=pl.col("t") - month_index(pl.col("founded_on"), start),
            reg_registered_capital=pl.col("registered_capital"),
            reg_industry=pl.col("industry"),
            reg_district=pl.col("district"),
            reg_size_class=pl.col("size_class"),
            reg_legal_rep_changes_24m=pl.col("reg_legal_rep_changes_24m").fill_null(0),
            reg_abnormal_ops_listings_24m=pl.col("reg_abnormal_ops_listings_24m").fill_null(0),
            # a removal in the same month as a listing counts as still listed: conservative
            reg_abnormal_ops_listed=(
                pl.col("listed_k").is_not_null()
                & (pl.col("removed_k").is_null() | (pl.col("listed_k") >= pl.col("removed_k")))
            ).cast(pl.Int64),
        )
    )


def _tax(raw: dict[str, pl.LazyFrame], g: pl.LazyFrame, start: date) -> pl.LazyFrame:
    day = family("tax").publication_day
    rows = with_lag(
        raw["tax"].select(
            "enterprise_id",
            "month",
            "available_at",
            sales=pl.col("declared_sales"),
            paid=pl.col("vat_paid") + pl.col("income_tax_paid"),
            overdue=pl.col("overdue_tax"),
            overdue_flag=(pl.col("overdue_tax") > 0).cast(pl.Int32),
            late=pl.col("filed_late").cast(pl.Int32),
            filed=pl.lit(1, pl.Int32),
        ),
        start,
        day,
    )
    rank = {"A": 1, "B": 2, "M": 3, "C": 4, "D": 5}
    ratings = (
        raw["tax_credit_rating"]
        .select(
            "enterprise_id",
            "available_at",
            rating_rank=pl.col("rating").replace_strict(rank, return_dtype=pl.Int64),
        )
        .sort("available_at")
    )
    sales_12m = wsum("sales", 12)
    frame = on_grid(g, rows).with_columns(
        tax_sales_3m=wsum("sales", 3),
        tax_sales_12m=sales_12m,
        tax_sales_growth_yoy=growth(wsum("sales", 3, min_count=2), wsum("sales", 3, 12, 2)),
        tax_sales_growth_3m=growth(wsum("sales", 3, min_count=2), wsum("sales", 3, 3, 2)),
        tax_sales_cv_12m=cv("sales"),
        tax_paid_to_sales_12m=pl.when(sales_12m > 0).then(wsum("paid", 12) / sales_12m),
        tax_overdue_12m=wsum("overdue", 12),
        tax_overdue_months_12m=wsum("overdue_flag", 12).cast(pl.Int64),
        tax_late_filings_12m=wsum("late", 12).cast(pl.Int64),
        tax_months_filed_12m=count_seen("filed", 12).cast(pl.Int64),
    )
    return (
        frame.sort("event_timestamp")
        .join_asof(
            ratings,
            left_on="event_timestamp",
            right_on="available_at",
            by="enterprise_id",
            strategy="backward",
            check_sortedness=False,  # both sides are sorted by time; polars cannot check with `by`
        )
        .rename({"rating_rank": "tax_credit_rating_rank"})
    )


def _power(raw: dict[str, pl.LazyFrame], g: pl.LazyFrame, start: date) -> pl.LazyFrame:
    day = family("power").publication_day
    rows = with_lag(
        raw["electricity"].select("enterprise_id", "month", "available_at", "kwh"), start, day
    )
    return on_grid(g, rows).with_columns(
        power_kwh_3m=wsum("kwh", 3),
        power_kwh_growth_yoy=growth(wsum("kwh", 3, min_count=2), wsum("kwh", 3, 12, 2)),
        power_kwh_growth_3m=growth(wsum("kwh", 3, min_count=2), wsum("kwh", 3, 3, 2)),
        power_kwh_cv_12m=cv("kwh"),
        power_months_metered_12m=count_seen("kwh", 12).cast(pl.Int64),
    )


def _social_insurance(raw: dict[str, pl.LazyFrame], g: pl.LazyFrame, start: date) -> pl.LazyFrame:
    day = family("social_insurance").publication_day
    rows = with_lag(
        raw["social_insurance"].select(
            "enterprise_id", "month", "available_at", heads=pl.col("insured_headcount")
        ),
        start,
        day,
    )
    return on_grid(g, rows).with_columns(
        si_headcount=latest("heads").cast(pl.Int64),
        si_headcount_growth_12m=growth(seen("heads", 0), seen("heads", 12)),
    )


def _payments(raw: dict[str, pl.LazyFrame], g: pl.LazyFrame, start: date) -> pl.LazyFrame:
    day = family("payments").publication_day
    rows = with_lag(
        raw["payments"].select(
            "enterprise_id",
            "month",
            "available_at",
            "inflow",
            "outflow",
            cps=pl.col("counterparties"),
            top=pl.col("top_counterparty_share"),
        ),
        start,
        day,
    )
    inflow_6m, outflow_6m = wsum("inflow", 6), wsum("outflow", 6)
    return on_grid(g, rows).with_columns(
        pay_inflow_3m=wsum("inflow", 3),
        pay_net_inflow_3m=wsum("inflow", 3) - wsum("outflow", 3),
        pay_inflow_outflow_ratio_6m=pl.when(outflow_6m > 0).then(inflow_6m / outflow_6m),
        pay_inflow_growth_3m=growth(wsum("inflow", 3, min_count=2), wsum("inflow", 3, 3, 2)),
        pay_inflow_cv_12m=cv("inflow"),
        pay_counterparties_3m=wmean("cps", 3),
        pay_top_counterparty_share_6m=wmean("top", 6),
    )


def _receivables_payables(
    raw: dict[str, pl.LazyFrame], g: pl.LazyFrame, start: date
) -> pl.LazyFrame:
    day = family("receivables_payables").publication_day
    rows = with_lag(
        raw["receivables_payables"].select(
            "enterprise_id",
            "month",
            "available_at",
            ar=pl.col("receivables"),
            overdue=pl.col("overdue_receivables"),
            dpo=pl.col("days_payable"),
        ),
        start,
        day,
    )
    ar_6m = wsum("ar", 6)
    return on_grid(g, rows).with_columns(
        arap_receivables=latest("ar"),
        arap_overdue_receivables_ratio=pl.when(latest("ar") > 0).then(
            latest("overdue") / latest("ar")
        ),
        arap_overdue_receivables_ratio_6m=pl.when(ar_6m > 0).then(wsum("overdue", 6) / ar_6m),
        arap_days_payable=latest("dpo"),
        arap_days_payable_change_6m=seen("dpo", 0) - seen("dpo", 6),
    )


def _judicial(raw: dict[str, pl.LazyFrame], g: pl.LazyFrame, start: date) -> pl.LazyFrame:
    day = family("judicial").publication_day
    events = raw["judicial_events"]
    counts = event_counts(
        events,
        start,
        day,
        {
            "jud_lawsuits_12m": ("lawsuit", 12, None),
            "jud_lawsuit_amount_12m": ("lawsuit", 12, "amount"),
            "jud_enforcements_12m": ("enforcement", 12, None),
            "jud_dishonest_24m": ("dishonest_debtor", 24, None),
            "jud_penalties_12m": ("admin_penalty", 12, None),
        },
    )
    last = last_seen(events, start, day, {"lawsuit_k": "lawsuit"})
    return (
        g.join(counts, on=["enterprise_id", "t"], how="left")
        .join(last, on=["enterprise_id", "t"], how="left")
        .sort("enterprise_id", "t")
        .with_columns(
            jud_lawsuits_12m=pl.col("jud_lawsuits_12m").fill_null(0).cast(pl.Int64),
            jud_lawsuit_amount_12m=pl.col("jud_lawsuit_amount_12m").fill_null(0.0),
            jud_enforcements_12m=pl.col("jud_enforcements_12m").fill_null(0).cast(pl.Int64),
            jud_dishonest_debtor_listed=(pl.col("jud_dishonest_24m").fill_null(0) > 0).cast(
                pl.Int64
            ),
            jud_penalties_12m=pl.col("jud_penalties_12m").fill_null(0).cast(pl.Int64),
            jud_months_since_lawsuit=(pl.col("t") - carry_max("lawsuit_k")).cast(pl.Int64),
        )
    )


def _credit_history(raw: dict[str, pl.LazyFrame], g: pl.LazyFrame, start: date) -> pl.LazyFrame:
    day = family("credit_history").publication_day
    monthly = (
        raw["credit_history"]
        .group_by("enterprise_id", "month")
        .agg(
            loans=pl.col("loans").sum().cast(pl.Int64),
            balance=money_sum("balance"),
            nonbank=money_sum(pl.col("balance").filter(pl.col("reporter_type") == "microloan")),
            dpd30=pl.col("dpd30").any().cast(pl.Int32),
            dpd90=pl.col("dpd90").any().cast(pl.Int32),
            comp=pl.col("guarantee_compensations").sum().cast(pl.Int32),
            reporters=pl.len().cast(pl.Int64),
            available_at=pl.col("available_at").max(),
        )
    )
    rows = with_lag(monthly, start, day)
    # the last 30+ dpd month seen by each snapshot: visible from snapshot t + lag
    dpd_seen = (
        rows.filter(pl.col("dpd30") == 1)
        .group_by("enterprise_id", pl.col("t") + pl.col("lag"))
        .agg(dpd30_k=pl.col("t").max())
    )
    return (
        on_grid(g, rows)
        .join(dpd_seen, on=["enterprise_id", "t"], how="left")
        .sort("enterprise_id", "t")
        .with_columns(
            cred_loans=latest("loans"),
            cred_balance=latest("balance"),
            cred_nonbank_share=pl.when(latest("balance") > 0).then(
                latest("nonbank") / latest("balance")
            ),
            cred_balance_growth_6m=growth(seen("balance", 0), seen("balance", 6)),
            cred_dpd30_months_12m=wsum("dpd30", 12).cast(pl.Int64),
            cred_dpd90_months_24m=wsum("dpd90", 24).cast(pl.Int64),
            cred_months_since_dpd30=(pl.col("t") - carry_max("dpd30_k")).cast(pl.Int64),
            cred_guarantee_compensations_24m=wsum("comp", 24).cast(pl.Int64),
            cred_reporters=latest("reporters"),
        )
    )


BUILDERS: dict[str, FamilyBuilder] = {
    "registration": _registration,
    "tax": _tax,
    "power": _power,
    "social_insurance": _social_insurance,
    "payments": _payments,
    "receivables_payables": _receivables_payables,
    "judicial": _judicial,
    "credit_history": _credit_history,
}
assert set(BUILDERS) == {f.name for f in FAMILIES}, "every family needs a builder"


def build_family(name: str, raw: dict[str, pl.LazyFrame], months: int, start: date) -> pl.LazyFrame:
    """The feature table of one family: enterprise_id, event_timestamp and its schema features."""
    day = family(name).publication_day
    g = grid(raw["registration"], months, start, day)
    dtypes = {"float": pl.Float64, "int": pl.Int64, "string": pl.String}
    columns = [pl.col(f.name).cast(dtypes[f.dtype]) for f in features_of(name)]
    return (
        BUILDERS[name](raw, g, start)
        .filter(pl.col("alive"))
        .select("enterprise_id", "event_timestamp", *columns)
        .sort("enterprise_id", "event_timestamp")
    )

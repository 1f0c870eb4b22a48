"""Raw tables → point-in-time feature tables, one per source family (polars + numpy, chunked).

Each family is cut once a month: the snapshot for month m is taken on the family's publication day
of month m+1 (its `event_timestamp`) and uses only raw rows whose `available_at` is at or before
that moment. A row filed late is therefore absent from the snapshots cut before it arrived and
present in every later one. One row per enterprise per month from the month it was founded.

polars reads the raw rows and works out, for each, its month t and how many snapshots after its
own month it becomes visible (its lag). The rows are then placed on a dense panel, one numpy
array of enterprises × months per raw column (`Panel`, `Monthly`), and every window is a handful
of whole-array operations over shifted columns of that panel — the same arithmetic, in the same
order, as one pass over each enterprise's months, at array speed. Events (lawsuits, listings)
become counts over trailing windows by difference arrays in integers, so that sums of money are
exact in cents and do not depend on row order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

import numpy as np
import polars as pl

from features.raw_tables import TAX_RATINGS
from features.schema import FAMILIES, family, features_of

UTC = "UTC"
NEVER = np.iinfo(np.int32).min  # "no event yet" before a cumulative max
UNSEEN = np.iinfo(np.int32).max  # lag of a month with no raw row: never visible

Array = np.ndarray


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


def snapshot_times(months: int, start: date, day: int) -> pl.Series:
    """The cut-off of each snapshot t in 0..months-1: `day` of month t+1, midnight UTC."""
    first = start.year * 12 + start.month - 1 + 1
    times = [
        datetime((first + t) // 12, (first + t) % 12 + 1, day) for t in range(months)
    ]  # naive, then stamped UTC: the same instants as `pl.datetime(..., time_zone=UTC)`
    return pl.Series("event_timestamp", times, dtype=pl.Datetime("us")).dt.replace_time_zone(UTC)


# -- the panel -----------------------------------------------------------------------------------
@dataclass
class Panel:
    """One chunk's enterprises × snapshots. Cell (e, t) is enterprise e (in id order) at month t."""

    ids: pl.Series  # enterprise ids, sorted
    founded: Array  # month index of each enterprise's founding
    months: int
    start: date
    registration: pl.DataFrame  # the registration rows, in id order
    _lookup: pl.DataFrame = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._lookup = pl.DataFrame(
            {"enterprise_id": self.ids, "_e": np.arange(len(self.ids), dtype=np.int64)}
        )

    @classmethod
    def of(cls, registration: pl.DataFrame, months: int, start: date) -> Panel:
        reg = registration.sort("enterprise_id")
        if reg["enterprise_id"].is_duplicated().any():
            raise ValueError("the registration table lists an enterprise twice")
        founded = reg.select(month_index(pl.col("founded_on"), start))
        return cls(reg["enterprise_id"], founded.to_series().to_numpy(), months, start, reg)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), self.months

    @property
    def cells(self) -> int:
        return len(self.ids) * self.months

    @property
    def t(self) -> Array:
        """Each cell's month, broadcastable over the panel."""
        return np.arange(self.months, dtype=np.int64)[None, :]

    @property
    def alive(self) -> Array:
        return self.founded[:, None] <= self.t

    def locate(self, rows: pl.DataFrame, t: str = "t") -> tuple[Array, Array]:
        """(enterprise index, month) of each row that falls on the panel, and which rows do."""
        e = rows.select("enterprise_id").join(
            self._lookup, on="enterprise_id", how="left", maintain_order="left"
        )["_e"]
        tt = rows[t].cast(pl.Int64).to_numpy()
        on = e.is_not_null().to_numpy() & (tt >= 0) & (tt < self.months)
        return e.fill_null(0).to_numpy()[on] * self.months + tt[on], on

    def frame(self, day: int, columns: dict[str, Array | pl.Series]) -> pl.DataFrame:
        """The family's table: one row per enterprise per month it was alive, in (id, time) order.

        Float columns use NaN for "no value"; it becomes null. A Series is one value per
        enterprise, repeated over its months."""
        alive = self.alive.ravel()
        e = np.repeat(np.arange(len(self.ids)), self.months)[alive]
        t = np.tile(np.arange(self.months), len(self.ids))[alive]
        out: dict[str, pl.Series] = {
            "enterprise_id": self.ids.gather(e),
            "event_timestamp": snapshot_times(self.months, self.start, day).gather(t),
        }
        for name, values in columns.items():
            if isinstance(values, pl.Series):
                out[name] = values.gather(e).alias(name)
            else:
                flat = np.broadcast_to(values, self.shape).ravel()[alive]
                series = pl.Series(name, flat)
                out[name] = series.fill_nan(None) if flat.dtype.kind == "f" else series
        return pl.DataFrame(out)


# -- monthly rows on the panel, and windows over them --------------------------------------------
class Monthly:
    """A monthly raw table on the panel: each value, and the lag after which it is visible."""

    def __init__(self, panel: Panel, rows: pl.DataFrame, columns: Sequence[str], table: str):
        where, on = panel.locate(rows)
        if np.bincount(where, minlength=panel.cells).max(initial=0) > 1:
            raise ValueError(f"raw table {table} has two rows for one enterprise and month")
        lags = rows["lag"].cast(pl.Int64).to_numpy()[on]
        months = panel.months
        # every array has `months` columns of padding on the left, so that month t-d of snapshot
        # t is a view: column months + t - d
        lag = np.full((panel.shape[0], 2 * months), UNSEEN, dtype=np.int64)
        lag[:, months:] = _placed(panel, where, lags, UNSEEN)
        self.lag, self.months = lag, months
        self.max_lag = int(lags.max(initial=0))  # from this d on, every row is visible
        self.values: dict[str, tuple[Array, Array, Array]] = {}
        for col in columns:
            value = np.full((panel.shape[0], 2 * months), np.nan)
            value[:, months:] = _placed(panel, where, rows[col].cast(pl.Float64).to_numpy()[on])
            seen = ~np.isnan(value)
            self.values[col] = value, seen, np.where(seen, value, 0.0)
        self._late: dict[tuple[str, int], tuple[Array, Array, Array]] = {}
        self._windows: dict[tuple[str, str, int, int], Array] = {}

    def _cell(self, col: str, d: int) -> tuple[Array, Array, Array]:
        """(values, seen mask, values with 0 where unseen) of `col` for month t-d at snapshot
        t. Views into the padded arrays where no row is late; callers must not modify them."""
        if not 0 <= d <= self.months:
            raise ValueError(f"a window reaches {d} months back; the panel holds {self.months}")
        columns = slice(self.months - d, 2 * self.months - d)
        if d >= self.max_lag:
            value, seen, filled = self.values[col]
            return value[:, columns], seen[:, columns], filled[:, columns]
        key = (col, d)
        if key not in self._late:  # some row of month t-d is published after snapshot t
            late = self.lag[:, columns] > d
            value = self.values[col][0][:, columns].copy()
            value[late] = np.nan
            seen = ~np.isnan(value)
            self._late[key] = value, seen, np.where(seen, value, 0.0)
        return self._late[key]

    @property
    def shape(self) -> tuple[int, int]:
        return self.lag.shape[0], self.months

    def seen(self, col: str, d: int) -> Array:
        """Value of `col` for month t-d as it was visible at snapshot t (NaN if not yet, or
        never, available). `lag` is how many snapshots after its own month a row appears."""
        return self._cell(col, d)[0]

    def count(self, col: str, length: int, skip: int = 0) -> Array:
        """How many months of the window were seen (shared: callers must not modify it)."""
        key = ("count", col, length, skip)
        if key not in self._windows:
            n = np.zeros(self.shape, dtype=np.int64)
            for d in range(skip, skip + length):
                n += self._cell(col, d)[1]
            self._windows[key] = n
        return self._windows[key]

    def _total(self, col: str, length: int, skip: int) -> Array:
        key = ("total", col, length, skip)
        if key not in self._windows:
            total = np.zeros(self.shape)
            for d in range(skip, skip + length):
                total += self._cell(col, d)[2]
            self._windows[key] = total
        return self._windows[key]

    def sum(self, col: str, length: int, skip: int = 0, min_count: int = 1) -> Array:
        """Sum over the months seen in the window, month t-skip first; NaN if fewer than
        `min_count` were seen."""
        enough = self.count(col, length, skip) >= min_count
        return np.where(enough, self._total(col, length, skip), np.nan)

    def mean(self, col: str, length: int, min_count: int = 1) -> Array:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum(col, length, min_count=max(min_count, 1)) / self.count(col, length)

    def cv(self, col: str, length: int = 12, min_count: int = 6) -> Array:
        """Coefficient of variation (sample standard deviation / mean) of the months seen."""
        n = self.count(col, length)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sum(col, length) / n
            squares = np.zeros(self.shape)
            for d in range(length):
                value, seen, _ = self._cell(col, d)
                deviation = value - mean
                deviation *= deviation
                np.add(squares, deviation, out=squares, where=seen)
            std = np.sqrt(squares / (n - 1))
            return np.where((n >= min_count) & (mean > 0), std / mean, np.nan)

    def latest(self, col: str) -> Array:
        """The most recent visible value within the last 3 months."""
        out = self.seen(col, 0).copy()
        for d in (1, 2):
            gap = np.isnan(out)
            out[gap] = self.seen(col, d)[gap]
        return out


def _placed(panel: Panel, where: Array, values: Array, fill: float = np.nan) -> Array:
    """`values` at the flat cells `where` of an enterprises × months array filled with `fill`."""
    out = np.full(panel.cells, fill, dtype=values.dtype)
    out[where] = values
    return out.reshape(panel.shape)


def growth(now: Array, before: Array) -> Array:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(before > 0, now / before - 1, np.nan)


def ratio(num: Array, den: Array) -> Array:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def since(panel: Panel, last: Array) -> Array:
    """Months from the last event (a cumulative month index, NEVER if none) to each snapshot."""
    return np.where(last > NEVER, panel.t - last, np.nan)


def with_lag(rows: pl.LazyFrame, start: date, day: int) -> pl.LazyFrame:
    """Monthly raw rows → t (their month) and lag (snapshots until visible, at least 0)."""
    t = month_index(pl.col("month"), start)
    return rows.with_columns(
        t=t, lag=pl.max_horizontal(visible_snapshot(pl.col("available_at"), start, day) - t, 0)
    ).drop("month", "available_at")


def monthly(
    panel: Panel, table: str, rows: pl.LazyFrame, day: int, columns: Sequence[str]
) -> Monthly:
    frame = with_lag(rows, panel.start, day).collect()
    return Monthly(panel, frame, columns, table)


# -- sparse events -------------------------------------------------------------------------------
def event_counts(
    panel: Panel,
    events: pl.DataFrame,
    day: int,
    windows: dict[str, tuple[str, int, str | None]],
) -> dict[str, Array]:
    """Counts (or sums) of events per enterprise and snapshot over trailing windows of months.

    `windows` maps output column → (event_type, months, column to sum or None to count). An event
    of month k seen from snapshot s counts at snapshots max(s, k) .. k + months - 1: +1 at the
    first, -1 after the last, then a running sum along the months. Amounts are summed in whole
    cents (分) as integers, so the sum is exact whatever the order of the rows.
    """
    ev = events.with_columns(
        k=month_index(pl.col("event_date"), panel.start),
        s=visible_snapshot(pl.col("available_at"), panel.start, day),
    )
    n_e, n_t = panel.shape
    out = {}
    for name, (kind, months, amount) in windows.items():
        rows = ev.filter(pl.col("event_type") == kind)
        k, s = rows["k"].cast(pl.Int64).to_numpy(), rows["s"].cast(pl.Int64).to_numpy()
        first = np.maximum(np.maximum(s, k), 0)
        stop = np.minimum(k + months, n_t)
        e = rows.select("enterprise_id").join(
            panel._lookup, on="enterprise_id", how="left", maintain_order="left"
        )["_e"]
        on = e.is_not_null().to_numpy() & (first < stop)
        e = e.fill_null(0).to_numpy()
        if amount:
            cents = (rows[amount] * 100).round().fill_null(0).cast(pl.Int64).to_numpy()
        else:
            cents = np.ones(rows.height, dtype=np.int64)
        delta = np.zeros((n_e, n_t + 1), dtype=np.int64)
        np.add.at(delta, (e[on], first[on]), cents[on])
        np.add.at(delta, (e[on], stop[on]), -cents[on])
        total = np.cumsum(delta[:, :n_t], axis=1)
        out[name] = total / 100 if amount else total
    return out


def last_event(panel: Panel, e: Array, t: Array, k: Array) -> Array:
    """Per enterprise and snapshot: the latest month k among events visible by snapshot t
    (NEVER before the first). An event visible before the first snapshot is seen by it."""
    last = np.full(panel.shape, NEVER, dtype=np.int64)
    on = t < panel.months
    np.maximum.at(last, (e[on], np.maximum(t[on], 0)), k[on])
    return np.maximum.accumulate(last, axis=1)


def last_seen(panel: Panel, events: pl.DataFrame, day: int, kind: str) -> Array:
    rows = events.filter(pl.col("event_type") == kind).with_columns(
        k=month_index(pl.col("event_date"), panel.start),
        t=visible_snapshot(pl.col("available_at"), panel.start, day),
    )
    e = rows.select("enterprise_id").join(
        panel._lookup, on="enterprise_id", how="left", maintain_order="left"
    )["_e"]
    on = e.is_not_null().to_numpy()
    return last_event(
        panel,
        e.fill_null(0).to_numpy()[on],
        rows["t"].cast(pl.Int64).to_numpy()[on],
        rows["k"].cast(pl.Int64).to_numpy()[on],
    )


# -- families ------------------------------------------------------------------------------------
Columns = dict[str, Array | pl.Series]
FamilyBuilder = Callable[[dict[str, pl.LazyFrame], Panel, int], Columns]


def _registration(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Columns:
    reg = panel.registration
    events = raw["registration_events"].collect()
    counts = event_counts(
        panel,
        events,
        day,
        {
            "legal_rep_changes": ("legal_rep_change", 24, None),
            "listings": ("abnormal_ops_listed", 24, None),
        },
    )
    listed = last_seen(panel, events, day, "abnormal_ops_listed")
    removed = last_seen(panel, events, day, "abnormal_ops_removed")
    return {
        "reg_firm_age_months": panel.t - panel.founded[:, None],
        "reg_registered_capital": reg["registered_capital"],
        "reg_industry": reg["industry"],
        "reg_district": reg["district"],
        "reg_size_class": reg["size_class"],
        "reg_legal_rep_changes_24m": counts["legal_rep_changes"],
        "reg_abnormal_ops_listings_24m": counts["listings"],
        # a removal in the same month as a listing counts as still listed: conservative
        "reg_abnormal_ops_listed": ((listed > NEVER) & (listed >= removed)).astype(np.int64),
    }


def _tax(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Columns:
    m = monthly(
        panel,
        "tax",
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
        day,
        ["sales", "paid", "overdue", "overdue_flag", "late", "filed"],
    )
    sales_12m = m.sum("sales", 12)
    return {
        "tax_sales_3m": m.sum("sales", 3),
        "tax_sales_12m": sales_12m,
        "tax_sales_growth_yoy": growth(m.sum("sales", 3, min_count=2), m.sum("sales", 3, 12, 2)),
        "tax_sales_growth_3m": growth(m.sum("sales", 3, min_count=2), m.sum("sales", 3, 3, 2)),
        "tax_sales_cv_12m": m.cv("sales"),
        "tax_paid_to_sales_12m": ratio(m.sum("paid", 12), sales_12m),
        "tax_overdue_12m": m.sum("overdue", 12),
        "tax_overdue_months_12m": m.sum("overdue_flag", 12),
        "tax_late_filings_12m": m.sum("late", 12),
        "tax_months_filed_12m": m.count("filed", 12),
        "tax_credit_rating_rank": _tax_rating(raw, panel, day),
    }


def _tax_rating(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Array:
    """Rank of the latest tax-credit rating published by each snapshot's cut-off (NaN before the
    first): each rating is placed at the first snapshot that can see it and carried forward."""
    rank = {rating: rank for rank, rating in enumerate(TAX_RATINGS, 1)}
    ratings = (
        raw["tax_credit_rating"]
        .select(
            "enterprise_id",
            rank=pl.col("rating").replace_strict(rank, return_dtype=pl.Int64),
            t=pl.max_horizontal(visible_snapshot(pl.col("available_at"), panel.start, day), 0),
            at=pl.col("available_at"),
        )
        .sort("enterprise_id", "at", maintain_order=True)
        .unique(["enterprise_id", "t"], keep="last", maintain_order=True)
        .collect()
    )
    where, on = panel.locate(ratings)
    placed = _placed(panel, where, ratings["rank"].cast(pl.Float64).to_numpy()[on])
    last = np.where(np.isnan(placed), -1, panel.t)
    last = np.maximum.accumulate(last, axis=1)
    rows = np.arange(panel.shape[0])[:, None]
    return np.where(last >= 0, placed[rows, np.maximum(last, 0)], np.nan)


def _power(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Columns:
    m = monthly(
        panel,
        "electricity",
        raw["electricity"].select("enterprise_id", "month", "available_at", "kwh"),
        day,
        ["kwh"],
    )
    return {
        "power_kwh_3m": m.sum("kwh", 3),
        "power_kwh_growth_yoy": growth(m.sum("kwh", 3, min_count=2), m.sum("kwh", 3, 12, 2)),
        "power_kwh_growth_3m": growth(m.sum("kwh", 3, min_count=2), m.sum("kwh", 3, 3, 2)),
        "power_kwh_cv_12m": m.cv("kwh"),
        "power_months_metered_12m": m.count("kwh", 12),
    }


def _social_insurance(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Columns:
    m = monthly(
        panel,
        "social_insurance",
        raw["social_insurance"].select(
            "enterprise_id", "month", "available_at", heads=pl.col("insured_headcount")
        ),
        day,
        ["heads"],
    )
    return {
        "si_headcount": m.latest("heads"),
        "si_headcount_growth_12m": growth(m.seen("heads", 0), m.seen("heads", 12)),
    }


def _payments(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Columns:
    m = monthly(
        panel,
        "payments",
        raw["payments"].select(
            "enterprise_id",
            "month",
            "available_at",
            "inflow",
            "outflow",
            cps=pl.col("counterparties"),
            top=pl.col("top_counterparty_share"),
        ),
        day,
        ["inflow", "outflow", "cps", "top"],
    )
    return {
        "pay_inflow_3m": m.sum("inflow", 3),
        "pay_net_inflow_3m": m.sum("inflow", 3) - m.sum("outflow", 3),
        "pay_inflow_outflow_ratio_6m": ratio(m.sum("inflow", 6), m.sum("outflow", 6)),
        "pay_inflow_growth_3m": growth(m.sum("inflow", 3, min_count=2), m.sum("inflow", 3, 3, 2)),
        "pay_inflow_cv_12m": m.cv("inflow"),
        "pay_counterparties_3m": m.mean("cps", 3),
        "pay_top_counterparty_share_6m": m.mean("top", 6),
    }


def _receivables_payables(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Columns:
    m = monthly(
        panel,
        "receivables_payables",
        raw["receivables_payables"].select(
            "enterprise_id",
            "month",
            "available_at",
            ar=pl.col("receivables"),
            overdue=pl.col("overdue_receivables"),
            dpo=pl.col("days_payable"),
        ),
        day,
        ["ar", "overdue", "dpo"],
    )
    return {
        "arap_receivables": m.latest("ar"),
        "arap_overdue_receivables_ratio": ratio(m.latest("overdue"), m.latest("ar")),
        "arap_overdue_receivables_ratio_6m": ratio(m.sum("overdue", 6), m.sum("ar", 6)),
        "arap_days_payable": m.latest("dpo"),
        "arap_days_payable_change_6m": m.seen("dpo", 0) - m.seen("dpo", 6),
    }


def _judicial(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Columns:
    events = raw["judicial_events"].collect()
    counts = event_counts(
        panel,
        events,
        day,
        {
            "jud_lawsuits_12m": ("lawsuit", 12, None),
            "jud_lawsuit_amount_12m": ("lawsuit", 12, "amount"),
            "jud_enforcements_12m": ("enforcement", 12, None),
            "dishonest_24m": ("dishonest_debtor", 24, None),
            "jud_penalties_12m": ("admin_penalty", 12, None),
        },
    )
    dishonest = counts.pop("dishonest_24m")
    return {
        **counts,
        "jud_dishonest_debtor_listed": (dishonest > 0).astype(np.int64),
        "jud_months_since_lawsuit": since(panel, last_seen(panel, events, day, "lawsuit")),
    }


def _credit_history(raw: dict[str, pl.LazyFrame], panel: Panel, day: int) -> Columns:
    per_month = (
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
    rows = with_lag(per_month, panel.start, day).collect()
    m = Monthly(
        panel,
        rows,
        ["loans", "balance", "nonbank", "dpd30", "dpd90", "comp", "reporters"],
        "credit_history",
    )
    # the last 30+ dpd month seen by each snapshot: visible from snapshot t + lag
    dpd = rows.filter(pl.col("dpd30") == 1)
    where, on = panel.locate(dpd)
    t = dpd["t"].cast(pl.Int64).to_numpy()[on]
    last_dpd = last_event(
        panel, where // panel.months, t + dpd["lag"].cast(pl.Int64).to_numpy()[on], t
    )
    return {
        "cred_loans": m.latest("loans"),
        "cred_balance": m.latest("balance"),
        "cred_nonbank_share": ratio(m.latest("nonbank"), m.latest("balance")),
        "cred_balance_growth_6m": growth(m.seen("balance", 0), m.seen("balance", 6)),
        "cred_dpd30_months_12m": m.sum("dpd30", 12),
        "cred_dpd90_months_24m": m.sum("dpd90", 24),
        "cred_months_since_dpd30": since(panel, last_dpd),
        "cred_guarantee_compensations_24m": m.sum("comp", 24),
        "cred_reporters": m.latest("reporters"),
    }


def money_sum(col: str | pl.Expr) -> pl.Expr:
    """Sum of a money column in whole cents (分), as integers. A float sum depends on the order
    in which a parallel group-by meets the rows, and two builds of the same data must give the
    same features to the last bit (training's content hash, hence its model, depends on them)."""
    expr = pl.col(col) if isinstance(col, str) else col
    return (expr * 100).round().cast(pl.Int64).sum() / 100


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

_DTYPES = {"float": pl.Float64, "int": pl.Int64, "string": pl.String}


def build_family(name: str, raw: dict[str, pl.LazyFrame], panel: Panel) -> pl.DataFrame:
    """The feature table of one family: enterprise_id, event_timestamp and its schema features,
    one row per enterprise per month it was alive, sorted by enterprise and time."""
    day = family(name).publication_day
    table = panel.frame(day, BUILDERS[name](raw, panel, day))
    columns = [pl.col(f.name).cast(_DTYPES[f.dtype]) for f in features_of(name)]
    return table.select("enterprise_id", "event_timestamp", *columns)

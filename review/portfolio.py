"""The lender's current book and its point-in-time features, read straight from the offline store.

Two ways to know who the current borrowers are:

* the decision log (`serving.decision_log`): enterprises with an approved decision for the
  product, decided at or before the as-of time, whose loan is still running then
  (decided_at + term_months months > as-of); the latest such decision per enterprise gives the
  loan's term and its exposure: the approved limit when the decision set one (/limit, /screen,
  `kapok decide --limits`; a limit of 0 lent nothing), else the amount requested and approved.
  Read with one SQL query into polars, not record by record;
* a portfolio file (parquet or CSV) kept elsewhere: `enterprise_id`, and optionally
  `requested_amount` (the amount lent), `term_months`, `start_date`.

In the book, `requested_amount` is the exposure: the request-time features of a running loan
(loan to sales, installment to inflow) are computed on the amount actually lent.

Features are read from the Feast offline store files ($KAPOK_HOME/data/features/<family>/*.parquet)
exactly as Feast's point-in-time join does it: per family, the latest snapshot whose
event_timestamp is at or before the time and at or after the time minus the family's TTL
(Feast's `_filter_ttl` keeps both ends), else missing. Request-time features follow
`features.request.request_features`. Polars lazy scans, filtered to the portfolio and the TTL
window before anything is collected, so a book of 1,000,000 enterprises fits in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import polars as pl

from features.build import read_summary
from features.schema import FAMILIES, REQUEST_FEATURES, features_of

ID = "enterprise_id"
TS = "event_timestamp"
LOAN_COLUMNS = ("requested_amount", "term_months")
BOOK_SCHEMA = {
    ID: pl.String,
    "requested_amount": pl.Float64,
    "term_months": pl.Int64,
    "start": pl.Datetime("us", "UTC"),
    "request_id": pl.String,
}


class PortfolioError(ValueError):
    """The portfolio is empty, malformed, or the dates fall outside the data."""


# -- dates ---------------------------------------------------------------------------------------
def parse_date(text: str, option: str = "--as-of") -> date:
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise PortfolioError(f"{option} must be a date as YYYY-MM-DD, got {text!r}") from None


def end_of_day(day: date) -> datetime:
    """The as-of time of a date: its last microsecond in UTC (everything published that day)."""
    return datetime.combine(day, time.max, UTC)


def months_before(day: date, months: int = 1) -> date:
    """The same day `months` earlier, clamped to the end of a shorter month."""
    total = day.year * 12 + day.month - 1 - months
    year, month = divmod(total, 12)
    month += 1
    for d in (day.day, 30, 29, 28):
        try:
            return date(year, month, d)
        except ValueError:
            continue
    raise AssertionError("unreachable")


def data_range(features_dir: Path) -> tuple[datetime, datetime]:
    """(first, last) snapshot time of the feature tables, from the build manifest."""
    summary = read_summary(features_dir)
    first = date.fromisoformat(summary["first_snapshot"] + "-01")
    months = int(summary["months"])
    days = [f.publication_day for f in FAMILIES]
    # the snapshot of month m is cut on the family's publication day of month m + 1
    start = _add_months(first, 1)
    end = _add_months(first, months)
    return (
        datetime.combine(start.replace(day=min(days)), time.min, UTC),
        datetime.combine(end.replace(day=max(days)), time.min, UTC),
    )


def _add_months(day: date, months: int) -> date:
    total = day.year * 12 + day.month - 1 + months
    return date(total // 12, total % 12 + 1, day.day)


def check_dates(features_dir: Path, as_of: datetime, previous: datetime) -> None:
    if previous >= as_of:
        raise PortfolioError(
            f"--previous ({previous:%Y-%m-%d}) must be before --as-of ({as_of:%Y-%m-%d})"
        )
    first, last = data_range(features_dir)
    span = f"the feature tables cover {first:%Y-%m-%d} .. {last:%Y-%m-%d}"
    if as_of.date() > last.date():
        raise PortfolioError(f"--as-of {as_of:%Y-%m-%d} is after the data: {span}")
    if previous < first:
        raise PortfolioError(
            f"the previous snapshot {previous:%Y-%m-%d} is before the data: {span} "
            "(choose a later --as-of or --previous)"
        )


# -- the book ------------------------------------------------------------------------------------
def _running(start: str, as_of: datetime) -> pl.Expr:
    """Loan started at or before as-of and, when its term is known, not yet ended."""
    end = pl.col(start).dt.offset_by(pl.format("{}mo", pl.col("term_months")))
    return (pl.col(start) <= as_of) & (pl.col("term_months").is_null() | (end > as_of))


def from_decision_log(url: str | None, product: str, as_of: datetime) -> pl.DataFrame:
    """Running approved loans of `product` at `as_of` (approved applications and officers'
    approvals of referred ones): enterprise_id, requested_amount (the
    exposure: the approved limit when one was set, else the amount requested), term_months, start
    (decided_at), request_id; the latest approval per enterprise."""
    import sqlalchemy as sa

    from serving.decision_log import APPLICATION_ENDPOINTS, decisions, default_url

    parsed = sa.make_url(url or default_url())
    database = parsed.database or ""
    local = database not in ("", ":memory:") and not database.startswith("file:")
    if parsed.get_backend_name() == "sqlite" and local and not Path(database).exists():
        return pl.DataFrame(schema=BOOK_SCHEMA)  # no decision was ever logged there
    engine = sa.create_engine(parsed)
    query = sa.select(
        decisions.c.request_id,
        decisions.c.enterprise_id,
        decisions.c.decided_at,
        decisions.c.request,
        decisions.c.limit_amount,
    ).where(
        (decisions.c.product == product)
        & (decisions.c.decision == "approve")
        # a loan is an approved application or a referred one an officer approved, never a
        # prospect offer that no one has taken up
        & decisions.c.endpoint.in_([*APPLICATION_ENDPOINTS, "override"])
        & (decisions.c.decided_at <= as_of)
    )
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("decisions"):
                rows: list[sa.Row] = []
            else:
                rows = list(conn.execute(query))
    except sa.exc.SQLAlchemyError as e:
        cause = getattr(e, "orig", None) or e
        raise PortfolioError(f"cannot read the decision log: {str(cause).splitlines()[0]}") from e
    finally:
        engine.dispose()
    frame = pl.DataFrame(
        {
            "request_id": [r[0] for r in rows],
            ID: [r[1] for r in rows],
            "start": [r[2] for r in rows],
            "request": [r[3] for r in rows],
            "limit_amount": [r[4] for r in rows],
        },
        schema={
            "request_id": pl.String,
            ID: pl.String,
            "start": pl.Datetime("us", "UTC"),
            "request": pl.String,
            "limit_amount": pl.Float64,
        },
    )
    frame = frame.with_columns(
        pl.coalesce(
            pl.col("limit_amount"),
            pl.col("request")
            .str.json_path_match("$.requested_amount")
            .cast(pl.Float64, strict=False),
        ).alias("requested_amount"),
        pl.col("request")
        .str.json_path_match("$.term_months")
        .cast(pl.Float64, strict=False)
        .cast(pl.Int64, strict=False)
        .alias("term_months"),
    ).drop("request", "limit_amount")
    lent = pl.col("requested_amount").is_null() | (pl.col("requested_amount") > 0)
    return (
        frame.filter(_running("start", as_of) & lent)
        .sort("start", "request_id")
        .unique(ID, keep="last", maintain_order=True)
        .select(ID, *LOAN_COLUMNS, "start", "request_id")
    )


def from_file(path: Path, as_of: datetime) -> pl.DataFrame:
    """A book kept elsewhere: parquet or CSV with enterprise_id [, requested_amount, term_months,
    start_date]. Loans not started yet or ended by `as_of` (when start_date and term say so) are
    left out; for an enterprise listed twice the latest start (else the last row) is kept."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"portfolio file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pl.read_parquet(path)
        elif suffix in (".csv", ".txt"):
            frame = pl.read_csv(path, infer_schema_length=10_000, schema_overrides={ID: pl.String})
        else:
            raise PortfolioError(f"portfolio file {path.name}: use .parquet or .csv")
    except (pl.exceptions.PolarsError, OSError) as e:
        raise PortfolioError(f"cannot read portfolio file {path}: {str(e).splitlines()[0]}") from e
    if ID not in frame.columns:
        raise PortfolioError(
            f"portfolio file {path.name} has no {ID} column (columns: {', '.join(frame.columns)})"
        )
    try:
        frame = frame.select(
            pl.col(ID).cast(pl.String).str.strip_chars(),
            (pl.col("requested_amount") if "requested_amount" in frame.columns else pl.lit(None))
            .cast(pl.Float64)
            .alias("requested_amount"),
            (pl.col("term_months") if "term_months" in frame.columns else pl.lit(None))
            .cast(pl.Int64)
            .alias("term_months"),
            (
                pl.col("start_date").cast(pl.String).str.to_datetime(time_zone="UTC", strict=True)
                if "start_date" in frame.columns
                else pl.lit(None, pl.Datetime("us", "UTC"))
            )
            .cast(pl.Datetime("us", "UTC"))
            .alias("start"),
        )
    except pl.exceptions.PolarsError as e:
        raise PortfolioError(
            f"portfolio file {path.name}: requested_amount must be numeric, term_months an "
            f"integer, start_date a date ({str(e).splitlines()[0]})"
        ) from e
    frame = frame.filter(pl.col(ID).is_not_null() & (pl.col(ID) != ""))
    running = pl.col("start").is_null() | _running("start", as_of)
    return (
        frame.filter(running)
        .with_row_index("_row")
        .sort("start", "_row", nulls_last=False)
        .unique(ID, keep="last", maintain_order=True)
        .sort("_row")
        .drop("_row")
    )


# -- point-in-time features ----------------------------------------------------------------------
def family_files(features_dir: Path, family: str) -> str:
    folder = features_dir / family
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        raise FileNotFoundError(
            f"no {family} feature table at {folder}: run `kapok features build` first"
        )
    return str(folder / "*.parquet")


def read_window(
    features_dir: Path, family: str, ids: pl.Series, start: datetime, end: datetime
) -> pl.DataFrame:
    """Every snapshot of `family` for the given enterprises with start <= event_timestamp <= end."""
    names = [f.name for f in features_of(family)]
    lazy = pl.scan_parquet(family_files(features_dir, family)).select(ID, TS, *names)
    return (
        lazy.filter(pl.col(TS).is_between(start, end) & pl.col(ID).is_in(ids.implode()))
        .sort(ID, TS)
        .collect(engine="streaming")
    )


def as_of_rows(window: pl.DataFrame, at: datetime, ttl: timedelta, family: str) -> pl.DataFrame:
    """Feast's choice per enterprise: the latest snapshot in [at - ttl, at] (window sorted)."""
    return (
        window.filter(pl.col(TS).is_between(at - ttl, at))
        .unique(ID, keep="last", maintain_order=True)
        .rename({TS: f"{family}__{TS}"})
    )


def request_columns() -> list[pl.Expr]:
    """`features.request.request_features`, vectorised: a ratio is missing when the denominator
    is missing or not positive (and when the numerator is missing)."""

    def ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
        return pl.when(den.is_not_null() & den.is_not_nan() & (den > 0)).then(num / den)

    amount = pl.col("requested_amount").cast(pl.Float64)
    term = pl.col("term_months")
    installment = ratio(amount, term.cast(pl.Float64))
    monthly_inflow = pl.col("pay_inflow_3m").cast(pl.Float64) / 3
    names = [f.name for f in REQUEST_FEATURES]
    exprs = [
        ratio(amount, pl.col("tax_sales_12m").cast(pl.Float64)).alias("req_loan_to_sales_12m"),
        ratio(installment, monthly_inflow).alias("req_installment_to_inflow"),
        term.cast(pl.Int64).alias("req_term_months"),
    ]
    assert [e.meta.output_name() for e in exprs] == names
    return exprs


def point_in_time(
    features_dir: Path, book: pl.DataFrame, times: Sequence[datetime]
) -> dict[datetime, pl.DataFrame]:
    """For each time: the book (enterprise_id, requested_amount, term_months, ...) with every
    family's features as Feast's point-in-time join gives them, `<family>__event_timestamp`
    (which snapshot was used, null: none within TTL), and the request-time features."""
    ids = book[ID]
    out = {t: book for t in times}
    for fam in FAMILIES:
        window = read_window(features_dir, fam.name, ids, min(times) - fam.ttl, max(times))
        for t in times:
            rows = as_of_rows(window, t, fam.ttl, fam.name)
            out[t] = out[t].join(rows, on=ID, how="left", maintain_order="left")
        del window
    return {t: frame.with_columns(request_columns()) for t, frame in out.items()}


def snapshot_found(frame: pl.DataFrame) -> pl.Series:
    """True where any family had a snapshot within its TTL (Feast would return the row)."""
    cols = [f"{fam.name}__{TS}" for fam in FAMILIES]
    return frame.select(pl.any_horizontal(pl.col(c).is_not_null() for c in cols)).to_series()

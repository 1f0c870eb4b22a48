"""`kapok decide FILE`: a whole file of applications through the decision core.

The file (CSV or parquet) has enterprise_id, product, requested_amount (or amount), term_months
and optionally application_date. With a date, each row gets the features Feast's point-in-time
join would give it — per family the latest snapshot at or before the date and within the family's
TTL — read from the offline store's parquet files with polars `join_asof`; without one, the
latest features in the online store. Rows are decided in chunks by `serving.core.decide`, the same
core as the API, written to parquet or CSV, and logged to the decision log under a batch id
(caller `batch:<id>`, request ids `<id>_<row>`): a re-run with the same id adds nothing twice.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.schema import FAMILIES, PRODUCTS, features_of
from kapok import uscc
from kapok.settings import Paths
from serving import core
from serving import policy as pol
from serving.decision_log import DecisionLog, DecisionRecord, JSONText
from serving.model import ProductModel, load_champion
from serving.reasons import MAX_REASONS, reasons_json

ID = "enterprise_id"
TS = "event_timestamp"
CHUNK = 100_000  # rows per core call: memory stays flat, progress moves
LOG_BATCH = 5_000  # decisions per decision-log transaction


class BatchInputError(ValueError):
    """The applications file is unreadable or a row is invalid; the message names row and column."""


@dataclass(frozen=True)
class BatchResult:
    batch_id: str
    rows: int
    decided: int
    logged: int  # new records in the decision log (a re-run logs nothing twice)
    out: Path
    counts: dict[str, int]  # decision -> rows
    seconds: float
    feature_seconds: float  # reading features (point in time or online)


def read_applications(path: Path) -> pl.DataFrame:
    """The applications, validated: a clear error names the first bad row and column."""
    if not path.exists():
        raise FileNotFoundError(f"applications file not found: {path}")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
        elif path.suffix.lower() == ".csv":
            frame = pl.read_csv(path, infer_schema_length=10_000, try_parse_dates=True)
        else:
            raise BatchInputError(f"{path}: use a .csv or .parquet file")
    except (pl.exceptions.PolarsError, OSError) as e:
        raise BatchInputError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    return read_applications_frame(frame, str(path))


def read_applications_frame(frame: pl.DataFrame, where: str = "applications") -> pl.DataFrame:
    """Validate applications already in memory; `where` names them in errors."""
    path = where
    if "amount" in frame.columns and "requested_amount" not in frame.columns:
        frame = frame.rename({"amount": "requested_amount"})
    required = (ID, "product", "requested_amount", "term_months")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BatchInputError(
            f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(required)}, "
            "optional application_date)"
        )
    if frame.height == 0:
        raise BatchInputError(f"{path}: no rows")
    frame = frame.with_row_index("row")
    _check(frame, path)
    out = frame.select(
        "row",
        pl.col(ID).cast(pl.String),
        pl.col("product").cast(pl.String),
        pl.col("requested_amount").cast(pl.Float64),
        pl.col("term_months").cast(pl.Int64),
    )
    if "application_date" in frame.columns:
        out = out.with_columns(_application_time(frame["application_date"], path))
    return out


def _check(frame: pl.DataFrame, path: str) -> None:
    def first_bad(mask: pl.Series, column: str, what: str) -> None:
        bad = frame.filter(mask)
        if bad.height:
            row = bad.row(0, named=True)
            raise BatchInputError(
                f"{path}: row {row['row'] + 1}: {column} {what}, got {row[column]!r} "
                f"({bad.height:,} such rows)"
            )

    ids = frame[ID].cast(pl.String)
    valid = pl.Series([_valid_id(v) for v in ids.to_list()])
    first_bad(~valid, ID, "must be a Unified Social Credit Code (18 characters, check character)")
    first_bad(~frame["product"].cast(pl.String).is_in(PRODUCTS).fill_null(False), "product",
              f"must be one of {', '.join(PRODUCTS)}")  # fmt: skip
    try:
        amount = frame["requested_amount"].cast(pl.Float64)
        term = frame["term_months"].cast(pl.Int64)
    except pl.exceptions.PolarsError:
        raise BatchInputError(
            f"{path}: requested_amount must be numbers and term_months whole numbers"
        ) from None
    good = (amount > 0) & amount.is_finite()
    first_bad(~good.fill_null(False), "requested_amount", "must be a positive number of CNY")
    first_bad(~(term >= 1).fill_null(False), "term_months", "must be a whole number of months >= 1")


def _valid_id(value: str | None) -> bool:
    try:
        uscc.validate(value)
    except uscc.USCCError:
        return False
    return True


def _application_time(column: pl.Series, path: str) -> pl.Series:
    """application_date as a UTC time: a date means the end of that day (everything published
    by then), as `kapok watch` reads an as-of date."""
    dtype = column.dtype
    if dtype == pl.String:
        parsed = column.str.to_date(strict=False)
        if parsed.null_count() > column.null_count():
            bad = column.filter(parsed.is_null() & column.is_not_null())[0]
            raise BatchInputError(f"{path}: application_date must be YYYY-MM-DD, got {bad!r}")
        column, dtype = parsed, pl.Date
    if dtype == pl.Date:
        end_of_day = column.cast(pl.Datetime("us")) + dt.timedelta(days=1, microseconds=-1)
        return end_of_day.dt.replace_time_zone("UTC").alias(TS)
    if isinstance(dtype, pl.Datetime):
        stamp = column.dt.cast_time_unit("us")
        if dtype.time_zone is None:
            return stamp.dt.replace_time_zone("UTC").alias(TS)
        return stamp.dt.convert_time_zone("UTC").alias(TS)
    raise BatchInputError(f"{path}: application_date must be a date, got a {dtype} column")


# -- features ------------------------------------------------------------------------------------
def point_in_time(features_dir: Path, apps: pl.DataFrame) -> pl.DataFrame:
    """Feast's point-in-time join with polars: for each family the latest snapshot of the
    enterprise at or before event_timestamp and no older than the family's TTL; apps' row order
    is kept. Adds `<family>__event_timestamp` (null: no snapshot)."""
    from review.portfolio import family_files

    out = apps.sort(TS)
    ids = apps[ID].unique()
    start, end = apps[TS].min(), apps[TS].max()
    for fam in FAMILIES:
        names = [f.name for f in features_of(fam.name)]
        stamp = f"{fam.name}__{TS}"
        table = (
            pl.scan_parquet(family_files(features_dir, fam.name))
            .select(ID, TS, *names)
            .filter(pl.col(TS).is_between(start - fam.ttl, end) & pl.col(ID).is_in(ids.implode()))
            .rename({TS: stamp})
            .sort(stamp)
            .collect(engine="streaming")
        )
        out = out.join_asof(table, left_on=TS, right_on=stamp, by=ID, strategy="backward",
                            tolerance=fam.ttl, check_sortedness=False)  # fmt: skip
    return out.sort("row")


def latest(paths: Paths, apps: pl.DataFrame) -> pl.DataFrame:
    """The online store's features of each row's enterprise (what the API would use now), read
    in bulk as the API reads them (`features.online`, tested equal to Feast's online reads)."""
    from features.online import FOUND_COLUMN, OnlineFeatures, ts_column

    ids = apps[ID].unique(maintain_order=True).to_list()
    found = OnlineFeatures(paths, cache=False).read(ids).drop(FOUND_COLUMN)
    found = found.rename({ts_column(fam.name): f"{fam.name}__{TS}" for fam in FAMILIES})
    return apps.join(found, on=ID, how="left", maintain_order="left")


# -- the job -------------------------------------------------------------------------------------
def new_batch_id() -> str:
    return "batch_" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "_" + secrets.token_hex(3)


def decide_file(
    paths: Paths,
    source: Path,
    out: Path,
    *,
    batch_id: str | None = None,
    reasons: core.Explain = "adverse",
    limits: bool = False,
    log: DecisionLog | None = None,
    policy: pol.Policy | None = None,
    models: dict[str, ProductModel] | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> BatchResult:
    """Decide every application of `source`, write `out` (.parquet or .csv), log each decision."""
    from kapok.staging import staged_file

    t0 = time.perf_counter()
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise BatchInputError(f"--out must end in .parquet or .csv, got {out}")
    apps = read_applications(source)
    batch_id = batch_id or new_batch_id()
    policy = policy or pol.load_policy()
    log = log if log is not None else DecisionLog()
    if on_total:
        on_total(apps.height)
    t_features = time.perf_counter()
    if TS in apps.columns and apps[TS].null_count() == 0:
        feats = point_in_time(paths.features, apps)
    elif TS in apps.columns:
        raise BatchInputError(f"{source}: application_date is empty on some rows (all or none)")
    else:
        feats = latest(paths, apps)
    feature_seconds = time.perf_counter() - t_features
    models = models or _champions(paths, sorted(set(apps["product"].to_list())))
    request_ids = [f"{batch_id}_{r:07d}" for r in apps["row"].to_list()]
    done = log.known(request_ids)
    frames, logged = [], 0
    for product in PRODUCTS:
        part = feats.filter(pl.col("product") == product)
        for start in range(0, part.height, CHUNK):
            chunk = part.slice(start, CHUNK)
            decided, records = _decide_chunk(chunk, models[product], policy, batch_id,
                                             reasons, limits, done)  # fmt: skip
            for b in range(0, len(records), LOG_BATCH):
                log.write_many(records[b : b + LOG_BATCH])
            logged += len(records)
            frames.append(decided)
            if progress:
                progress(chunk.height)
    result = pl.concat(frames, how="diagonal_relaxed").sort("row")
    with staged_file(out) as tmp:
        if out.suffix.lower() == ".parquet":
            result.write_parquet(tmp)
        else:
            result.write_csv(tmp)
    counts = dict(result.group_by("decision").len().iter_rows())
    return BatchResult(batch_id, apps.height, result.height, logged, out, counts,
                       time.perf_counter() - t0, feature_seconds)  # fmt: skip


def _champions(paths: Paths, products: list[str]) -> dict[str, ProductModel]:
    return {product: load_champion(paths, product) for product in products}


def _decide_chunk(
    chunk: pl.DataFrame,
    model: ProductModel,
    policy: pol.Policy,
    batch_id: str,
    reasons: core.Explain,
    limits: bool,
    done: set[str],
) -> tuple[pl.DataFrame, list[DecisionRecord]]:
    stamps = [f"{fam.name}__{TS}" for fam in FAMILIES]
    found = chunk.select(pl.any_horizontal(pl.col(c).is_not_null() for c in stamps)).to_series()
    requests = chunk.select(*core.STORED_SCHEMA, "requested_amount", "term_months")
    d = core.decide(model, requests, policy, reasons=reasons, limits=limits)
    n = chunk.height
    rows = chunk["row"].to_list()
    request_ids = [f"{batch_id}_{r:07d}" for r in rows]
    as_of = chunk.select(pl.max_horizontal(stamps).alias("features_as_of"))["features_as_of"]
    reason_codes: list[list[str | None]] = [[None] * n for _ in range(MAX_REASONS)]
    decision = d.decision.astype(object)
    error = d.error.copy()
    core.future_snapshots(error, chunk.select(stamps), [fam.name for fam in FAMILIES])
    not_found = ~found.to_numpy()
    error[not_found] = "enterprise_not_found: no features for this enterprise at that date"
    decision[not_found | (error != None)] = None  # noqa: E711  (object array)
    values = d.rows()
    encoded = d.features_json()
    records = []
    decided_at = dt.datetime.now(dt.UTC)
    for r in range(n):
        if decision[r] is None:
            continue
        rs = d.reasons(r, values[r])
        for i, reason in enumerate(rs):
            reason_codes[i][r] = reason.code
        if request_ids[r] in done:
            continue
        features = JSONText(encoded[r])
        records.append(
            _record(d, r, values[r], rs, request_ids[r], batch_id, chunk, decided_at, as_of[r],
                    features)
        )  # fmt: skip
    headline = d.price.rate
    frame = pl.DataFrame(
        {
            "row": rows,
            "request_id": request_ids,
            ID: chunk[ID],
            "product": chunk["product"],
            "requested_amount": d.amount,
            "term_months": d.term,
            "features_as_of": as_of,
            "pd": d.pd,
            "score": np.round(d.score, 1),
            "grade": d.grade.astype(str),
            "decision": pl.Series(decision.tolist(), dtype=pl.String),
            **{
                f"reason_{i + 1}": pl.Series(codes, dtype=pl.String)
                for i, codes in enumerate(reason_codes)
            },
            pol.HEADLINE_RATE[model.product]: headline,
            "within_cap": d.price.within_cap,
            "expected_loss": d.price.expected_loss_rate * d.amount,
            "error": pl.Series(error.tolist(), dtype=pl.String),
            "model_version": [model.version] * n,
        }
    )
    if TS in chunk.columns:
        frame = frame.with_columns(chunk[TS].alias("application_time"))
    if d.limits is not None:
        lim = d.limits
        frame = frame.with_columns(
            pl.Series("limit", lim.limit), pl.Series("binding_constraint", lim.binding.astype(str)),
            pl.Series("pd_at_limit", lim.pd_at_limit),
        )  # fmt: skip
    return frame, records


def _record(
    d: core.Decisions,
    r: int,
    values: dict[str, Any],
    reasons: list,
    request_id: str,
    batch_id: str,
    chunk: pl.DataFrame,
    decided_at: dt.datetime,
    as_of: Any,
    features: JSONText,
) -> DecisionRecord:
    model = d.model
    eid = chunk[ID][r]
    amount, term = float(d.amount[r]), int(d.term[r])
    decision = d.decision_row(r, values)
    limit = d.limit(r, values) if d.limits is not None else None
    stamps = {fam.name: chunk[f"{fam.name}__{TS}"][r] for fam in FAMILIES}
    stamps = {k: v.isoformat() for k, v in stamps.items() if v is not None}
    price = d.price_row(r)
    body = {
        "request_id": request_id,
        "product": model.product,
        "model_name": model.name,
        "model_version": model.version,
        "features_as_of": as_of.isoformat() if as_of is not None else None,
        "decided_at": decided_at.isoformat(),
        "pd": round(float(d.pd[r]), 6),
        "score": round(float(d.score[r]), 1),
        "grade": str(d.grade[r]),
        "decision": decision.decision,
        "policy_path": decision.path,
        "reasons": reasons_json(reasons),
        "batch_id": batch_id,
    }
    if limit is not None:
        body.update(limit=limit.limit, binding_constraint=limit.binding)
    request = {ID: eid, "product": model.product, "requested_amount": amount,
               "term_months": term, "batch_id": batch_id}  # fmt: skip
    if TS in chunk.columns:
        request["application_time"] = chunk[TS][r].isoformat()
    return DecisionRecord(
        request_id=request_id,
        decided_at=decided_at,
        caller=f"batch:{batch_id}",
        endpoint="limit" if limit is not None else "score",
        enterprise_id=eid,
        product=model.product,
        request=request,
        model_name=model.name,
        model_version=model.version,
        features=features,
        feature_timestamps=stamps,
        pd=float(d.pd[r]),
        score=float(d.score[r]),
        grade=str(d.grade[r]),
        decision=decision.decision,
        limit_amount=None if limit is None else limit.limit,
        price=price.as_dict(),
        reasons=body["reasons"],
        response=body,
    )

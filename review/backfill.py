"""`kapok backfill`: a decision history for simulated data.

A simulated region has applications but no lender, so there is no decision log to monitor. This
replays the simulator's applications of one product through the current champion, in batch and
exactly as the lending engine would have decided them on the application date: point-in-time
features from the offline store's files (`serving.batch.point_in_time`, the join Feast's
historical retrieval does, tested equal to it), then the decision core — calibrated PD, score,
grade, knock-outs, price and decision — with reasons from exact TreeSHAP for the referred and
declined applications (approvals carry none in batch: TreeSHAP costs ~200 predictions). Each
application becomes one `DecisionRecord` (caller "backfill", endpoint "score", decided_at =
applied_at) with a request id derived from the application id, so a re-run skips what is
already logged. The outcomes a lender would later observe (matured applications only) go to
`$KAPOK_HOME/data/outcomes/<product>.parquet` for the back-test in `kapok monitor`.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.schema import FEATURES, PRODUCTS
from kapok.settings import Paths
from kapok.staging import staged_file
from serving import core
from serving import policy as pol
from serving.decision_log import DecisionLog, DecisionRecord, JSONText
from serving.engine import decision_answer, loan_request
from serving.model import ProductModel, load_champion
from serving.reasons import reasons_json

CALLER = "backfill"
ENDPOINT = "score"
ID_PREFIX = "bf_"
FEATURE_CHUNK = 100_000  # applications per point-in-time read and core call
WRITE_BATCH = 2_000  # decisions per decision-log transaction
OUTCOME_COLUMNS = ("request_id", "enterprise_id", "product", "decided_at", "outcome",
                   "outcome_known_at")  # fmt: skip


@dataclass(frozen=True)
class BackfillResult:
    product: str
    model_name: str
    model_version: str
    applications: int  # applications of the product in the window
    written: int  # new decisions logged
    skipped: int  # already logged by an earlier run
    outcomes: int  # matured outcomes in the outcomes file for this window
    outcomes_path: Path
    seconds: float  # wall time of the whole run, reading the applications included

    @property
    def rows_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else math.inf


LIVE, BACKFILL = "live", "backfill"  # where a logged decision came from (`source`)


def source() -> pl.Expr:
    """`live` or `backfill` for each decision-log row (needs its caller and request_id).

    A backfilled decision is dated by its application in the simulated history, a live one (the
    API, `kapok decide`) by the wall clock when it was made: two different windows that no
    monthly figure may mix. The log already tells them apart — every backfilled record has
    caller "backfill" and request id "bf_<application id>", since the first backfill — so no
    column is added (and no record's hash changes). Both are required: API request ids are made
    by the server ("req_<uuid>") and a batch's caller is "batch:<id>"."""
    backfilled = (pl.col("caller") == CALLER) & pl.col("request_id").str.starts_with(ID_PREFIX)
    return pl.when(backfilled).then(pl.lit(BACKFILL)).otherwise(pl.lit(LIVE)).alias("source")


def request_id_for(application_id: str) -> str:
    """The deterministic request id of a backfilled application."""
    return ID_PREFIX + application_id


def outcomes_path(paths: Paths, product: str) -> Path:
    return paths.data / "outcomes" / f"{product}.parquet"


def parse_day(text: str | None, option: str) -> dt.datetime | None:
    """YYYY-MM-DD → midnight UTC; None stays None; anything else is a clear ValueError."""
    if text is None:
        return None
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{option} must be a date as YYYY-MM-DD, got {text!r}") from None
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def window_bounds(
    since: str | None, until: str | None
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """[since, until] as whole days: since from its midnight, until up to the end of its day."""
    start = parse_day(since, "--since")
    end = parse_day(until, "--until")
    if end is not None:
        end = end + dt.timedelta(days=1)
    if start is not None and end is not None and end <= start:
        raise ValueError(f"--until ({until}) is before --since ({since})")
    return start, end


def applications(
    paths: Paths, product: str, since: dt.datetime | None, until: dt.datetime | None
) -> pl.DataFrame:
    """The simulator's applications of `product` with since <= applied_at < until."""
    from features.raw_tables import read_manifest, scan

    if product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    read_manifest(paths.raw)
    query = scan(paths.raw, "applications").filter(pl.col("product") == product)
    if since is not None:
        query = query.filter(pl.col("applied_at") >= since)
    if until is not None:
        query = query.filter(pl.col("applied_at") < until)
    return query.sort("applied_at", "application_id").collect()


def decide_batch(
    apps: pl.DataFrame,
    features: pl.DataFrame,
    model: ProductModel,
    policy: pol.Policy,
) -> list[DecisionRecord]:
    """One DecisionRecord per application row; `features` is row-aligned with `apps`. The rows
    are decided together by the columnar core, as the API decides one."""
    stored = [f.name for f in FEATURES if f.name in features.columns]
    frame = features.select(*stored).with_columns(
        apps["requested_amount"].cast(pl.Float64), apps["term_months"].cast(pl.Int64)
    )
    d = core.decide(model, frame, policy, reasons="adverse")
    rows = d.rows()
    encoded = d.features_json()
    records = []
    meta = apps.select("application_id", "enterprise_id", "applied_at", "requested_amount",
                       "term_months").iter_rows()  # fmt: skip
    for i, (values, (app_id, eid, applied_at, amount, term)) in enumerate(
        zip(rows, meta, strict=True)
    ):
        if d.error[i] is not None:
            raise ValueError(f"application {app_id}: {d.error[i]}")
        pd_ = float(d.pd[i])
        amount, term = float(amount), int(term)
        decision, price = d.decision_row(i, values), d.price_row(i)
        score, grade = float(d.score[i]), str(d.grade[i])
        request_id = request_id_for(app_id)
        decided_at = applied_at.isoformat()
        shown = reasons_json(d.reasons(i, values))
        body = decision_answer(request_id, model.product, model, decided_at, decided_at, pd_,
                               score, grade, decision, shown)  # fmt: skip
        records.append(
            DecisionRecord(
                request_id=request_id,
                decided_at=applied_at,
                caller=CALLER,
                endpoint=ENDPOINT,
                enterprise_id=eid,
                product=model.product,
                request={
                    **loan_request(eid, model.product, amount, term),
                    "application_id": app_id,
                },
                model_name=model.name,
                model_version=model.version,
                features=JSONText(encoded[i]),
                # Feast's offline join returns no per-view timestamps: the point in time it
                # joined at is what the log can say (each view's latest snapshot at or before it)
                feature_timestamps={"point_in_time": decided_at},
                pd=pd_,
                score=score,
                grade=grade,
                decision=decision.decision,
                limit_amount=None,
                price=price.as_dict(),
                reasons=body["reasons"],
                response=body,
            )
        )
    return records


def write_outcomes(target: Path, new: pl.DataFrame) -> pl.DataFrame:
    """Merge matured outcomes into the product's outcomes file (one row per request_id);
    written atomically. Returns the whole file's content."""
    if target.exists():
        old = pl.read_parquet(target)
        merged = pl.concat([old.select(new.columns), new], how="vertical_relaxed")
    else:
        merged = new
    merged = merged.unique("request_id", keep="last").sort("decided_at", "request_id")
    with staged_file(target) as tmp:
        merged.write_parquet(tmp)
    return merged


def matured_outcomes(apps: pl.DataFrame) -> pl.DataFrame:
    return apps.filter(pl.col("matured") & pl.col("outcome").is_not_null()).select(
        (pl.lit(ID_PREFIX) + pl.col("application_id")).alias("request_id"),
        "enterprise_id",
        "product",
        pl.col("applied_at").alias("decided_at"),
        pl.col("outcome").cast(pl.Int8),
        "outcome_known_at",
    )


def backfill(
    paths: Paths,
    product: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    *,
    log: DecisionLog | None = None,
    policy: pol.Policy | None = None,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> BackfillResult:
    """Replay `product`'s applications in [since, until) through the champion into the log."""
    from serving.batch import point_in_time

    t0 = time.perf_counter()
    apps = applications(paths, product, since, until)
    if apps.height == 0:
        raise ValueError(
            f"no {product} applications in the window: the simulated data covers "
            "other dates (see data/raw/applications)"
        )
    model = load_champion(paths, product)
    policy = policy or pol.load_policy()
    log = log or DecisionLog()
    ids = [request_id_for(a) for a in apps["application_id"].to_list()]
    done = log.known(ids)
    todo = apps.filter(~pl.col("application_id").is_in([i[len(ID_PREFIX) :] for i in done]))
    if on_total:
        on_total(todo.height)
    written = 0
    if todo.height:
        for start in range(0, todo.height, FEATURE_CHUNK):
            chunk = todo.slice(start, FEATURE_CHUNK)
            entities = chunk.select(
                "enterprise_id",
                pl.col("applied_at").alias("event_timestamp"),
                "requested_amount",
                pl.col("term_months").cast(pl.Int64),
            )
            feats = point_in_time(paths.features, entities.with_row_index("row"))
            records = decide_batch(chunk, feats, model, policy)
            for b in range(0, len(records), WRITE_BATCH):
                batch = records[b : b + WRITE_BATCH]
                log.write_many(batch)
                written += len(batch)
                if progress:
                    progress(len(batch))
    outcomes = matured_outcomes(apps)
    target = outcomes_path(paths, product)
    write_outcomes(target, outcomes)
    return BackfillResult(
        product=product,
        model_name=model.name,
        model_version=model.version,
        applications=apps.height,
        written=written,
        skipped=apps.height - todo.height,
        outcomes=outcomes.height,
        outcomes_path=target,
        seconds=time.perf_counter() - t0,
    )


__all__ = [
    "BACKFILL",
    "LIVE",
    "BackfillResult",
    "applications",
    "backfill",
    "decide_batch",
    "matured_outcomes",
    "outcomes_path",
    "request_id_for",
    "source",
    "window_bounds",
]

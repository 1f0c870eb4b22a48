"""`kapok prospect`: pre-approved offers (精准营销) for the enterprises of the region that are not
yet borrowers.

The region is every enterprise with a registration snapshot in the Feast offline store within its
TTL at the close of the as-of date (one without cannot be approved anyway: its firm age and
abnormal-operations status are unknown, knock-outs that refer), optionally only some districts
and industry sections. The book — the product's current borrowers at the as-of date, from the
decision log (`review.portfolio.from_decision_log`) or a portfolio file — is left out.

Each remaining enterprise is decided by the decision core (`serving.core.decide`, the API's)
on its point-in-time features (`serving.batch.point_in_time`, the join Feast's historical
retrieval does), in chunks, at a product-typical request: the amount is the product's house
limit (`policy_cap`, the most the limit search can offer, so the request never binds) and the
term `--term` (default 12 months); `limits=True` finds the largest amount the policy approves.
Only approvals at a positive limit become offers: knock-outs (refer or decline), referrals,
declines and zero limits are never listed. Offers are sorted by PD, lowest first (ties by
enterprise id), and `--top N` keeps the first N.

Each offer is then decided again at its limit (the amount offered), with exact TreeSHAP — for the
offers only — which gives its PD, score, grade and price at that amount and the three features
that lowered its risk the most (`serving.reasons.favourable_from`'s rule, "F_<FEATURE>" codes).
Per offer: expected loss = PD x LGD x limit and expected revenue = the headline rate (annual
rate, guarantee fee or premium rate, all annual) x limit, both for one year.

Offers are decisions: each is logged (endpoint "prospect", caller "prospect", decided_at = now;
the request holds the as-of date, the amount offered, the term and the amount searched up to)
with its full feature vector, in batches. Every run logs a new set with fresh request ids
("<run id>_<rank>"). `kapok replay` re-decides one from the log. Outputs, written atomically:
prospect-<product>-<as_of>.parquet and .csv (one row per offer) and .html (counts, limit,
expected loss and revenue by grade, district and industry, the top offers).
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import labels
from features.raw_tables import DISTRICTS, INDUSTRY_SECTIONS, SIZE_CLASSES
from features.schema import FAMILIES, PRODUCTS
from kapok.settings import Paths
from kapok.staging import staged_file
from review import portfolio as pf
from serving import columnar_policy as cp
from serving import core
from serving import policy as pol
from serving.decision_log import DecisionLog, DecisionRecord, JSONText
from serving.engine import decision_answer
from serving.model import ProductModel
from serving.reasons import MAX_FAVOURABLE, Reason, favourable, reasons_json

ID = "enterprise_id"
TS = "event_timestamp"
CALLER = ENDPOINT = "prospect"
DEFAULT_TERM = 12
CHUNK = 100_000  # enterprises per point-in-time read and core call (as `kapok decide`)
OFFER_CHUNK = 20_000  # offers per TreeSHAP call
LOG_BATCH = 5_000  # offers per decision-log transaction
TOP_IN_HTML = 50
STAMPS = [f"{fam.name}__{TS}" for fam in FAMILIES]
SEGMENTS = {"reg_district": "district", "reg_industry": "industry", "reg_size_class": "size_class"}

Bar = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


class ProspectError(ValueError):
    """Bad input (product, date, term, district, industry); the message says what is allowed."""


@dataclass(frozen=True)
class Request:
    """What to prospect, validated."""

    product: str
    as_of: dt.date
    term: int
    amount: float  # requested amount: the most the limit search can offer (policy_cap)
    top: int | None = None
    districts: tuple[str, ...] = ()  # as the registration table stores them (English names)
    industries: tuple[str, ...] = ()  # GB/T 4754 section letters

    @property
    def at(self) -> dt.datetime:
        return pf.end_of_day(self.as_of)


def district_name(code: str) -> str:
    """A district given by its division code, English or Chinese name -> the stored name."""
    found = labels.DISTRICTS.get(code.strip()) or labels.DISTRICTS.get(code.strip().title())
    if found is None:
        known = ", ".join(f"{c} {en} {zh}" for c, en, zh in DISTRICTS)
        raise ProspectError(f"unknown --district {code!r}: use one of {known}")
    return found[0]


def industry_section(code: str) -> str:
    section = code.strip().upper()
    if section not in INDUSTRY_SECTIONS:
        known = ", ".join(f"{k} {en}" for k, (en, _) in INDUSTRY_SECTIONS.items())
        raise ProspectError(
            f"unknown --industry {code!r}: use a GB/T 4754 section letter, one of {known}"
        )
    return section


def parse_request(
    paths: Paths,
    product: str,
    as_of: str | dt.date,
    *,
    term: int = DEFAULT_TERM,
    top: int | None = None,
    districts: Sequence[str] = (),
    industries: Sequence[str] = (),
    policy: pol.Policy | None = None,
) -> Request:
    """Every option checked before anything is read or written; ProspectError says why."""
    if product not in PRODUCTS:
        raise ProspectError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    day = as_of if isinstance(as_of, dt.date) else pf.parse_date(as_of)
    first, last = pf.data_range(paths.features)
    span = f"the feature tables cover {first:%Y-%m-%d} .. {last:%Y-%m-%d}"
    if day > last.date():
        raise ProspectError(f"--as-of {day} is after the data: {span}")
    if pf.end_of_day(day) < first:
        raise ProspectError(f"--as-of {day} is before the data: {span}")
    prod = (policy or pol.load_policy()).product(product)
    if not prod.term_months_min <= term <= prod.term_months_max:
        raise ProspectError(
            f"--term must be {prod.term_months_min} to {prod.term_months_max} months for "
            f"{product}, got {term}"
        )
    if top is not None and top < 1:
        raise ProspectError(f"--top must be 1 or more, got {top}")
    return Request(
        product=product,
        as_of=day,
        term=term,
        amount=float(min(prod.policy_cap, prod.amount_max)),
        top=top,
        districts=tuple(dict.fromkeys(district_name(d) for d in districts)),
        industries=tuple(dict.fromkeys(industry_section(i) for i in industries)),
    )


# -- the region and the book ---------------------------------------------------------------------
def region(features_dir: Path, req: Request) -> pl.DataFrame:
    """enterprise_id of every enterprise with a registration snapshot within its TTL at the
    as-of time, in the districts and industries asked for (all when none), sorted."""
    ttl = next(fam.ttl for fam in FAMILIES if fam.name == "registration")
    at = req.at
    latest = (
        pl.scan_parquet(pf.family_files(features_dir, "registration"))
        .select(ID, TS, *SEGMENTS)
        .filter(pl.col(TS).is_between(at - ttl, at))
        .sort(ID, TS)
        .unique(ID, keep="last", maintain_order=True)
    )
    if req.districts:
        latest = latest.filter(pl.col("reg_district").is_in(req.districts))
    if req.industries:
        latest = latest.filter(pl.col("reg_industry").is_in(req.industries))
    return latest.select(ID).collect(engine="streaming")


def book(
    req: Request, portfolio: Path | None = None, log_url: str | None = None
) -> tuple[pl.DataFrame, str]:
    """The current borrowers of the product at the as-of time and where they came from."""
    if portfolio is not None:
        frame = pf.from_file(portfolio, req.at)
        return frame, f"file {Path(portfolio).name} ({frame.height:,} running loans)"
    from serving.decision_log import default_url

    url = log_url or default_url()
    frame = pf.from_decision_log(url, req.product, req.at)
    where = DecisionLog(url).url
    return frame, f"decision log {where}: {frame.height:,} running approved {req.product} loans"


# -- deciding the region -------------------------------------------------------------------------
@dataclass
class Screened:
    """The region decided at the product-typical request: the approvals, and why the rest
    were not offered anything."""

    approvals: pl.DataFrame  # stored features, stamps, limit, pd_at_limit, binding_constraint
    decided: int = 0
    not_offered: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


NOT_OFFERED = {
    "no_features": "no point-in-time features, or features no source can report",
    "knocked_out": "a knock-out fired (decline, or refer to an officer)",
    "not_approved": "declined or referred on PD or price at every amount",
}


def _no_bar(_description: str, _total: int) -> AbstractContextManager[Callable[[int], None]]:
    @contextmanager
    def bar() -> Iterator[Callable[[int], None]]:
        yield lambda _n=1: None

    return bar()


def screen_region(
    paths: Paths,
    req: Request,
    model: ProductModel,
    policy: pol.Policy,
    ids: pl.Series,
    advance: Callable[[int], None] | None = None,
) -> Screened:
    """Decide `ids` in chunks; keep the approvals at a positive limit."""
    from serving.batch import point_in_time

    out = Screened(pl.DataFrame(), not_offered=dict.fromkeys(NOT_OFFERED, 0))
    out.seconds = {"read": 0.0, "decide": 0.0}
    kept: list[pl.DataFrame] = []
    families = [fam.name for fam in FAMILIES]
    for start in range(0, len(ids), CHUNK):
        chunk = ids.slice(start, CHUNK)
        t0 = time.perf_counter()
        apps = pl.DataFrame({ID: chunk}).with_row_index("row")
        apps = apps.with_columns(pl.lit(req.at).cast(pl.Datetime("us", "UTC")).alias(TS))
        feats = point_in_time(paths.features, apps)
        t1 = time.perf_counter()
        requests = feats.select(*core.STORED_SCHEMA).with_columns(
            pl.lit(req.amount).alias("requested_amount"), pl.lit(req.term).alias("term_months")
        )
        d = core.decide(model, requests, policy, reasons="none", limits=True)
        assert d.limits is not None
        error = d.error.copy()
        core.future_snapshots(error, feats.select(STAMPS), families)
        found = feats.select(pl.any_horizontal(pl.col(c).is_not_null() for c in STAMPS))
        bad = (error != None) | ~found.to_series().to_numpy()  # noqa: E711  (object array)
        knocked = ~bad & (d.knockouts.worst > cp.APPROVE)
        offer = ~bad & ~knocked & (d.limits.limit > 0) & (d.limits.severity == cp.APPROVE)
        out.not_offered["no_features"] += int(bad.sum())
        out.not_offered["knocked_out"] += int(knocked.sum())
        out.not_offered["not_approved"] += int((~bad & ~knocked & ~offer).sum())
        out.decided += len(chunk)
        rows = np.flatnonzero(offer)
        kept.append(
            feats[rows]
            .select(ID, *core.STORED_SCHEMA, *STAMPS)
            .with_columns(
                pl.Series("limit", d.limits.limit[rows]),
                pl.Series("pd_at_limit", d.limits.pd_at_limit[rows]),
                pl.Series("binding_constraint", d.limits.binding[rows].astype(str)),
            )
        )
        out.seconds["read"] += t1 - t0
        out.seconds["decide"] += time.perf_counter() - t1
        if advance:
            advance(len(chunk))
    if kept:
        out.approvals = pl.concat(kept, how="vertical_relaxed")
    return out


# -- offers --------------------------------------------------------------------------------------
@dataclass
class Offers:
    """One row per offer (`frame`), how many were logged, and the run's figures."""

    request: Request
    run_id: str
    model: str  # "kapok-microloan v3"
    frame: pl.DataFrame
    logged: int
    region: int  # enterprises in the (filtered) region
    borrowers: int  # of them current borrowers, left out
    book_source: str
    decided: int
    not_offered: dict[str, int]
    seconds: dict[str, float]
    grades: tuple[str, ...]  # the master scale, best first
    files: dict[str, Path] = field(default_factory=dict)


def new_run_id() -> str:
    return (
        "prospect_" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "_" + secrets.token_hex(3)
    )


def make_offers(
    req: Request,
    model: ProductModel,
    policy: pol.Policy,
    approvals: pl.DataFrame,
    log: DecisionLog,
    run_id: str,
    advance: Callable[[int], None] | None = None,
) -> tuple[pl.DataFrame, int, dict[str, float]]:
    """Sort the approvals by PD, keep the top N, decide each again at its limit with TreeSHAP,
    log them; the offers frame, how many were logged and the seconds spent."""
    seconds = {"explain": 0.0, "log": 0.0}
    if approvals.height == 0:  # nobody qualifies (or the filters left no enterprise)
        return _empty_offers(req.product), 0, seconds
    ranked = approvals.sort("pd_at_limit", ID)
    if req.top is not None:
        ranked = ranked.head(req.top)
    frames: list[pl.DataFrame] = []
    logged, rank = 0, 0
    decided_at = dt.datetime.now(dt.UTC)
    for start in range(0, ranked.height, OFFER_CHUNK):
        chunk = ranked.slice(start, OFFER_CHUNK)
        t0 = time.perf_counter()
        frame, records = _offer_chunk(req, model, policy, chunk, run_id, rank, decided_at)
        rank += frame.height
        t1 = time.perf_counter()
        for b in range(0, len(records), LOG_BATCH):
            log.write_many(records[b : b + LOG_BATCH])
        logged += len(records)
        seconds["explain"] += t1 - t0
        seconds["log"] += time.perf_counter() - t1
        frames.append(frame)
        if advance:
            advance(chunk.height)
    frame = pl.concat(frames, how="vertical_relaxed") if frames else _empty_offers(req.product)
    return frame, logged, seconds


def favourable_reasons(d: core.Decisions, values: list[dict[str, Any]]) -> list[list[Reason]]:
    """Every explained row's features that lowered its risk the most: `favourable_from`'s rule
    (negative contributions only, the most negative first, ties by name), in columns — the
    core's adverse ranking applied to the negated contributions."""
    assert d.contributions is not None
    names = d.model.scorer.features
    contrib = d.contributions[:, :-1]
    picked = core.top_reasons(-contrib, names)[:, :MAX_FAVOURABLE]
    out = []
    for r, row in enumerate(picked):
        out.append(
            [favourable(names[i], values[r].get(names[i]), float(contrib[r, i]))
             for i in row if i >= 0]
        )  # fmt: skip
    return out


def _offer_chunk(
    req: Request,
    model: ProductModel,
    policy: pol.Policy,
    chunk: pl.DataFrame,
    run_id: str,
    rank: int,
    decided_at: dt.datetime,
) -> tuple[pl.DataFrame, list[DecisionRecord]]:
    requests = chunk.select(*core.STORED_SCHEMA).with_columns(
        chunk["limit"].alias("requested_amount"), pl.lit(req.term).alias("term_months")
    )
    d = core.decide(model, requests, policy, reasons="all")
    # the limit search approved each at its limit; the same decision at that amount must agree
    # (it does: the same features and PD), and an offer is only ever an approval
    keep = np.flatnonzero((d.severity == cp.APPROVE) & (d.error == None))  # noqa: E711
    values = d.rows()
    encoded = d.features_json()
    reasons = favourable_reasons(d, values)
    product = policy.product(req.product)
    rate_name = pol.HEADLINE_RATE[req.product]
    as_of = chunk.select(pl.max_horizontal(STAMPS).alias("as_of"))["as_of"].to_list()
    stamps = chunk.select(STAMPS).to_dicts()
    ids = chunk[ID].to_list()
    binding = chunk["binding_constraint"].to_list()
    records, rows = [], []
    for r in keep.tolist():
        rank += 1
        request_id = f"{run_id}_{rank:07d}"
        limit = float(d.amount[r])
        price = d.price_row(r)
        decision = d.decision_row(r, values[r])
        pd_, score, grade = float(d.pd[r]), float(d.score[r]), str(d.grade[r])
        shown = reasons_json(reasons[r])
        published = as_of[r].isoformat() if as_of[r] is not None else None
        body = {
            **decision_answer(request_id, model.product, model, published,
                              decided_at.isoformat(), pd_, score, grade, decision, shown),
            "limit": limit,
            "binding_constraint": binding[r],
            "run_id": run_id,
        }  # fmt: skip
        request = {
            ID: ids[r],
            "product": model.product,
            "requested_amount": limit,
            "term_months": req.term,
            "as_of": req.as_of.isoformat(),
            "searched_up_to": req.amount,
            "run_id": run_id,
        }
        records.append(
            DecisionRecord(
                request_id=request_id,
                decided_at=decided_at,
                caller=CALLER,
                endpoint=ENDPOINT,
                enterprise_id=ids[r],
                product=model.product,
                request=request,
                model_name=model.name,
                model_version=model.version,
                features=JSONText(encoded[r]),
                feature_timestamps={
                    fam.name: stamps[r][s].isoformat()
                    for fam, s in zip(FAMILIES, STAMPS, strict=True)
                    if stamps[r][s] is not None
                },
                pd=pd_,
                score=score,
                grade=grade,
                decision=decision.decision,
                limit_amount=limit,
                price=price.as_dict(),
                reasons=shown,
                response=body,
            )
        )
        rows.append(
            {
                "rank": rank,
                "request_id": request_id,
                ID: ids[r],
                "district": values[r].get("reg_district"),
                "industry": values[r].get("reg_industry"),
                "size_class": values[r].get("reg_size_class"),
                "pd": pd_,
                "score": round(score, 1),
                "grade": grade,
                "limit": limit,
                "term_months": req.term,
                rate_name: price.rate,
                "expected_loss": pd_ * product.lgd * limit,
                "expected_revenue": price.rate * limit,
                "binding_constraint": binding[r],
                "reasons": [x.text_en for x in reasons[r]],
                "reasons_zh": [x.text_zh for x in reasons[r]],
                "reason_codes": [x.code for x in reasons[r]],
                "features_as_of": as_of[r],
                "run_id": run_id,
            }
        )
    frame = pl.DataFrame(rows, schema=_offer_schema(req.product)) if rows else None
    return (frame if frame is not None else _empty_offers(req.product)), records


def _offer_schema(product: str) -> dict[str, pl.DataType]:
    text, texts = pl.String(), pl.List(pl.String())
    return {
        "rank": pl.Int64(), "request_id": text, ID: text, "district": text, "industry": text,
        "size_class": text, "pd": pl.Float64(), "score": pl.Float64(), "grade": text,
        "limit": pl.Float64(), "term_months": pl.Int64(),
        pol.HEADLINE_RATE[product]: pl.Float64(), "expected_loss": pl.Float64(),
        "expected_revenue": pl.Float64(), "binding_constraint": text, "reasons": texts,
        "reasons_zh": texts, "reason_codes": texts,
        "features_as_of": pl.Datetime("us", "UTC"), "run_id": text,
    }  # fmt: skip


def _empty_offers(product: str) -> pl.DataFrame:
    return pl.DataFrame(schema=_offer_schema(product))


# -- the job -------------------------------------------------------------------------------------
def run(
    paths: Paths,
    req: Request,
    *,
    portfolio: Path | None = None,
    out: Path | None = None,
    log_url: str | None = None,
    policy: pol.Policy | None = None,
    bar: Bar | None = None,
    step: Callable[[str], None] | None = None,
) -> Offers:
    """`kapok prospect`: the book, the region, the decisions, the offers logged, the files."""
    from serving.model import load_champion

    t_start = time.perf_counter()
    bar = bar or _no_bar
    step = step or (lambda _s: None)
    policy = policy or pol.load_policy()
    log = DecisionLog(log_url)
    step(f"loading the {req.product} champion")
    model = load_champion(paths, req.product)
    champion_seconds = time.perf_counter() - t_start
    step("reading the book and the region")
    t0 = time.perf_counter()
    borrowers, source = book(req, portfolio, log_url)
    everyone = region(paths.features, req)[ID]
    in_book = everyone.is_in(borrowers[ID].implode())
    todo = everyone.filter(~in_book)
    region_seconds = time.perf_counter() - t0
    with bar(f"deciding {req.product} for {len(todo):,} enterprises", len(todo)) as advance:
        screened = screen_region(paths, req, model, policy, todo, advance)
    run_id = new_run_id()
    kept = screened.approvals.height if req.top is None else min(req.top, screened.approvals.height)
    with log, bar(f"explaining and logging {kept:,} offers", kept) as advance:
        frame, logged, seconds = make_offers(
            req, model, policy, screened.approvals, log, run_id, advance
        )
    # an approval the limit search found that the decision at its limit does not confirm (PD on
    # the cut-off to the last bit) is not offered: counted, so that the figures add up
    screened.not_offered["not_approved"] += kept - frame.height
    result = Offers(
        request=req,
        run_id=run_id,
        model=f"{model.name} v{model.version}",
        frame=frame,
        logged=logged,
        region=len(everyone),
        borrowers=int(in_book.sum()),
        book_source=source,
        decided=screened.decided,
        not_offered=screened.not_offered,
        seconds={
            "champion": champion_seconds,
            "book and region": region_seconds,
            **screened.seconds,
            **seconds,
        },
        grades=tuple(policy.grades),
    )
    step("writing the offers")
    t0 = time.perf_counter()
    write_outputs(result, out or paths.home / "reports")
    result.seconds["write"] = time.perf_counter() - t0
    result.seconds["total"] = time.perf_counter() - t_start
    return result


# -- outputs -------------------------------------------------------------------------------------
def file_stem(product: str, as_of: dt.date) -> str:
    return f"prospect-{product}-{as_of.isoformat()}"


def csv_frame(offers: pl.DataFrame) -> pl.DataFrame:
    """Lists joined: reason codes with "; ", texts with " | "."""
    return offers.with_columns(
        pl.col("reasons").list.join(" | "),
        pl.col("reasons_zh").list.join(" | "),
        pl.col("reason_codes").list.join("; "),
    )


def by_segment(offers: pl.DataFrame, column: str) -> pl.DataFrame:
    """Offers, total limit, expected loss and revenue, mean PD per value of `column`."""
    return (
        offers.group_by(column)
        .agg(
            pl.len().alias("offers"),
            # whole CNY: every amount of the table in one format, with thousands separators
            pl.col("limit").sum().round(0).cast(pl.Int64).alias("total limit"),
            pl.col("expected_loss").sum().round(0).cast(pl.Int64).alias("expected loss"),
            pl.col("expected_revenue").sum().round(0).cast(pl.Int64).alias("expected revenue"),
            pl.col("pd").mean().alias("mean PD"),
        )
        .sort(column)
    )


def _named(frame: pl.DataFrame, column: str, names: dict[str, tuple[str, str]]) -> pl.DataFrame:
    en = {k: v[0] for k, v in names.items()}
    zh = {k: v[1] for k, v in names.items()}
    return frame.with_columns(
        pl.col(column).replace_strict(en, default=pl.col(column)).alias("name"),
        pl.col(column).replace_strict(zh, default=pl.col(column)).alias("名称"),
    ).select(column, "name", "名称", pl.exclude(column, "name", "名称"))


def render_html(result: Offers) -> str:
    from review.html import Document

    req, offers = result.request, result.frame
    rate_name = pol.HEADLINE_RATE[req.product]
    where = []
    if req.districts:
        where.append("districts " + ", ".join(req.districts))
    if req.industries:
        where.append("industry sections " + ", ".join(req.industries))
    doc = Document(
        f"Pre-approved offers · {req.product} · {req.as_of}",
        subtitle=f"{result.model} @champion; region: {'; '.join(where) or 'every enterprise'}; "
        f"run {result.run_id}",
    )
    with doc.section("Summary", "概要"):
        doc.key_values(
            [
                ("product", req.product),
                ("as of (close of day, UTC)", str(req.as_of)),
                ("request", f"up to CNY {req.amount:,.0f} for {req.term} months"),
                ("enterprises in the region", result.region),
                ("current borrowers left out", result.borrowers),
                ("decided", result.decided),
                *((f"not offered: {NOT_OFFERED[k]}", n) for k, n in result.not_offered.items()),
                ("offers" + (f" (top {req.top} by PD)" if req.top else ""), offers.height),
                ("total pre-approved limit (CNY)", round(float(offers["limit"].sum()))),
                ("expected loss, one year (CNY)", round(float(offers["expected_loss"].sum()))),
                (
                    "expected revenue, one year (CNY)",
                    round(float(offers["expected_revenue"].sum())),
                ),
                ("logged to the decision log", result.logged),
                ("book", result.book_source),
            ]
        )
    with doc.section("By grade", "按评级"):
        order = {g: i for i, g in enumerate(result.grades)}
        grades = by_segment(offers, "grade")
        doc.table(grades.sort(pl.col("grade").replace_strict(order, default=len(order))))
    with doc.section("By district", "按区"):
        doc.table(_named(by_segment(offers, "district"), "district", labels.DISTRICTS))
    with doc.section("By industry", "按行业"):
        doc.table(_named(by_segment(offers, "industry"), "industry", INDUSTRY_SECTIONS))
    with doc.section("By size class", "按企业规模"):
        doc.table(_named(by_segment(offers, "size_class"), "size_class", SIZE_CLASSES))
    with doc.section("Top offers", "优选名单"):
        top = offers.head(TOP_IN_HTML)
        if top.height == 0:
            doc.paragraph("No enterprise qualifies for an offer.")
        else:
            doc.paragraph(
                f"The {top.height} offers with the lowest PD of {offers.height:,}; every offer is "
                "in the parquet and CSV files."
            )
            doc.table(
                top.select(
                    "rank", ID, "district", "industry", "size_class", "pd", "grade", "limit",
                    rate_name, "expected_loss", "expected_revenue",
                    pl.col("reasons").list.join(" | "),
                    pl.col("reasons_zh").list.join(" | ").alias("理由"),
                )
            )  # fmt: skip
    with doc.section("Method", "方法说明"):
        doc.bullets(
            [
                "Region: every enterprise with a registration snapshot within its TTL at the "
                "close of the as-of date, minus the product's current borrowers ("
                + result.book_source
                + ").",
                "Features: the Feast offline store, point in time, as Feast's "
                "get_historical_features (serving.batch.point_in_time).",
                f"Decision: the API's decision core at a request of CNY {req.amount:,.0f} (the "
                f"product's house limit) for {req.term} months with the limit search; only "
                "approvals with a positive limit are offers (no knock-out, no referral, no "
                "decline). PD, score, grade and price are those at the offered limit.",
                "Order: PD, lowest first (ties by enterprise id).",
                "Expected loss = PD x LGD x limit; expected revenue = the annual "
                f"{rate_name.replace('_', ' ')} x limit; both for one year.",
                "Reasons it qualifies: the three features that lowered its risk the most "
                "(exact TreeSHAP, log-odds, most negative first).",
                f"Each offer is logged as a decision (endpoint prospect), run {result.run_id}.",
            ]
        )
    return doc.render()


def write_outputs(result: Offers, out_dir: Path) -> dict[str, Path]:
    """Parquet, CSV and HTML, each to a temporary file first; all three renamed at the end."""
    stem = file_stem(result.request.product, result.request.as_of)
    targets = {ext: out_dir / f"{stem}.{ext}" for ext in ("parquet", "csv", "html")}
    html = render_html(result)
    with ExitStack() as stack:
        temps = {ext: stack.enter_context(staged_file(p)) for ext, p in targets.items()}
        result.frame.write_parquet(temps["parquet"])
        csv_frame(result.frame).write_csv(temps["csv"])
        temps["html"].write_text(html, encoding="utf-8")
    result.files = targets
    return targets

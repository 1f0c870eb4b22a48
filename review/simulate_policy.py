"""`kapok simulate-policy`: the logged applications re-decided under the current and a candidate
policy, side by side — how a lender moves a cut-off or a price with evidence.

Every application decision of a product in the window (the API's, `kapok decide`'s and the
backfilled history; never prospect offers or officers' overrides) is rebuilt from the decision
log: the logged feature vector and the request's amount and term. Both policies decide the same
rows with the same model (the version the record names while it is in the registry, else the
current champion) through the columnar decision core, with the limit search: an approval lends
the requested amount capped at the policy's limit. Per policy: approvals, volume, expected loss
(PD x LGD x exposure, one year, LGD of that policy), expected income (the policy's headline
rate — interest, guarantee fee or premium — x exposure, one year) and, where outcomes have
matured (`review.backfill.outcomes_path`, read as `kapok monitor` reads it), the observed bad
rate among approvals; by grade, district, industry and size class; and the applications whose
decision changes (swap-in: approved only under the candidate; swap-out: only under the current
policy) with the rule that made the difference.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kapok.settings import Paths
from serving import columnar_policy as cp
from serving import core
from serving import policy as pol
from serving.decision_log import DecisionLog
from serving.model import ProductModel

CHUNK = 100_000  # applications per core call (as `kapok decide` and `kapok backfill`)
SIDES = ("current", "candidate")
NOT_MATURED = "not matured"
# the segments of the breakdown: (title, Chinese title, categorical feature); grade is the
# current policy's, so that both policies are compared on the same rows
SEGMENTS = (
    ("grade", "评级", None),
    ("district", "所在区", "reg_district"),
    ("industry", "行业", "reg_industry"),
    ("size class", "企业规模", "reg_size_class"),
)
LOG_COLUMNS = ["request_id", "decided_at", "endpoint", "enterprise_id", "model_name",
               "model_version", "request", "features", "decision"]  # fmt: skip
REQUEST = pl.Struct({"requested_amount": pl.Float64, "term_months": pl.Int64})
INCOME = {"annual_rate": "interest", "fee_rate": "guarantee fee", "premium_rate": "premium"}


@dataclass
class Simulation:
    """The two policies' decisions on the same logged applications, and what they add up to."""

    product: str
    since: dt.datetime | None
    until: dt.datetime | None
    current: pol.Policy
    candidate: pol.Policy
    rows: pl.DataFrame  # one row per application: both sides' decision, exposure, EL, income
    models: list[str]  # which model decided which records, one line per logged version
    outcomes_source: str | None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def income_name(self) -> str:
        return INCOME[pol.HEADLINE_RATE[self.product]]

    @property
    def swaps(self) -> pl.DataFrame:
        """Swap-in and swap-out applications (column `swap`), the PD's riskiest first."""
        return (
            self.rows.filter(pl.col("swap").is_not_null())
            .select(SWAP_COLUMNS)
            .sort("swap", "pd", descending=[False, True])
        )

    def swap_count(self, kind: str) -> int:
        return int((self.rows["swap"] == kind).sum())

    def summary(self) -> list[dict[str, Any]]:
        """The side-by-side figures: metric, current, candidate, change (text)."""
        figures = {side: _figures(self.rows, side) for side in SIDES}
        rows = []
        for key, label, kind in _METRICS:
            a, b = figures["current"][key], figures["candidate"][key]
            shown = [_show(f[key], kind) if f["approved"] or key != "bad_rate" else "–"
                     for f in (figures["current"], figures["candidate"])]  # fmt: skip
            rows.append({"metric": label.format(income=self.income_name),
                         "current": shown[0], "candidate": shown[1],
                         "change": _change(a, b, kind)})  # fmt: skip
        return rows

    def breakdown(self, segment: str) -> pl.DataFrame:
        """Per value of a segment: applications and each side's approvals, approval rate,
        volume, expected loss, income and observed bad rate among matured approvals."""
        aggs: list[pl.Expr] = [pl.len().alias("applications")]
        per_side: dict[str, list[pl.Expr]] = {}
        for side in SIDES:
            s = "cur" if side == "current" else "cand"
            approved = pl.col(f"decision_{side}") == "approve"
            matured = approved & pl.col("outcome").is_not_null()
            per_side[side] = [
                approved.sum().alias(f"approved {s}"),
                approved.mean().alias(f"approval rate {s}"),
                pl.col(f"exposure_{side}").sum().alias(f"volume {s}"),
                pl.col(f"el_{side}").sum().alias(f"EL {s}"),
                pl.col(f"income_{side}").sum().alias(f"income {s}"),
                matured.sum().alias(f"matured {s}"),
                pl.col("outcome").filter(matured).mean().alias(f"bad rate {s}"),
            ]
        for pair in zip(*per_side.values(), strict=True):  # each figure, current then candidate
            aggs += pair
        out = self.rows.group_by(segment).agg(aggs)
        if segment == "grade":
            rank = {g: i for i, g in enumerate(self.current.grades)}
            out = out.sort(pl.col("grade").replace_strict(rank, default=len(rank)))
        else:
            out = out.sort("applications", segment, descending=[True, False])
        return out


def shown(frame: pl.DataFrame) -> pl.DataFrame:
    """A breakdown as the report shows it: rates as percentages (a bad rate without a matured
    approval as "not matured"), money in whole CNY."""

    def rate(name: str) -> pl.Expr:
        text = pl.col(name).map_elements(lambda x: f"{x:.2%}", return_dtype=pl.String)
        if not name.startswith("bad rate"):
            return text.fill_null("–").alias(name)
        approvals = pl.col(name.replace("bad rate", "approved"))
        return text.fill_null(pl.when(approvals > 0).then(pl.lit(NOT_MATURED)).otherwise(
            pl.lit("–"))).alias(name)  # fmt: skip

    return frame.with_columns(
        rate(c) if "rate" in c else pl.col(c).round(0).cast(pl.Int64)
        for c in frame.columns
        if "rate" in c or c.split(" ")[0] in ("volume", "EL", "income")
    )


SWAP_COLUMNS = ["swap", "request_id", "enterprise_id", "decided_at", "pd", "grade_current",
                "grade_candidate", "requested_amount", "term_months", "decision_current",
                "decision_candidate", "limit_current", "limit_candidate", "rule", "detail",
                "outcome", "district", "industry", "size class"]  # fmt: skip

# (key in _figures, label, kind: n count, r rate, m money)
_METRICS = (
    ("applications", "applications", "n"),
    ("approved", "approved", "n"),
    ("approval_rate", "approval rate", "r"),
    ("referred", "referred", "n"),
    ("declined", "declined", "n"),
    ("requested", "approved volume: amount requested, CNY", "m"),
    ("volume", "approved volume: requested amount capped at the limit, CNY", "m"),
    ("el", "expected loss a year (PD x LGD x volume), CNY", "m"),
    ("el_rate", "expected loss rate (EL / volume)", "r"),
    ("income", "expected {income} income a year (rate x volume), CNY", "m"),
    ("net", "{income} income less expected loss, CNY", "m"),
    ("matured", "approvals with a matured outcome", "n"),
    ("bad_rate", "observed bad rate among matured approvals", "r"),
)


def _figures(rows: pl.DataFrame, side: str) -> dict[str, float | int | None]:
    decision = rows[f"decision_{side}"]
    approved = decision == "approve"
    volume = float(rows[f"exposure_{side}"].sum())
    el, income = float(rows[f"el_{side}"].sum()), float(rows[f"income_{side}"].sum())
    outcomes = rows["outcome"].filter(approved).drop_nulls()
    return {
        "applications": rows.height,
        "approved": int(approved.sum()),
        "approval_rate": float(approved.mean()) if rows.height else None,  # type: ignore[arg-type]
        "referred": int((decision == "refer").sum()),
        "declined": int((decision == "decline").sum()),
        "requested": float(rows["requested_amount"].filter(approved).sum()),
        "volume": volume,
        "el": el,
        "el_rate": el / volume if volume > 0 else None,
        "income": income,
        "net": income - el,
        "matured": outcomes.len(),
        "bad_rate": float(outcomes.mean()) if outcomes.len() else None,  # type: ignore[arg-type]
    }


def _show(value: float | int | None, kind: str) -> str:
    if value is None:
        return NOT_MATURED if kind == "r" else "–"
    if kind == "r":
        return f"{value:.2%}"
    return f"{value:,.0f}"


def _change(a: float | int | None, b: float | int | None, kind: str) -> str:
    if a is None or b is None:
        return "–"
    if kind == "r":
        return f"{(b - a) * 100:+.2f} pts"
    return f"{b - a:+,.0f}"


# -- reading the log -----------------------------------------------------------------------------
def logged_index(
    log: DecisionLog, product: str, since: dt.datetime | None, until: dt.datetime | None
) -> pl.DataFrame:
    """decided_at and model of the product's application decisions in [since, until) (the
    narrow read that plans the work); a clear error saying what the log does hold when the
    window has none."""
    index = log.frame(since, until, product, columns=["decided_at", "model_name", "model_version"])
    if index.height:
        return index
    held = log.frame(product=product, columns=["decided_at"])["decided_at"]
    window = f"{_day(since, 'the start')} .. {_day(until, 'now', end=True)}"
    if held.len() == 0:
        raise ValueError(
            f"no {product} application decisions in {log.describe()}: nothing to "
            f"simulate (on simulated data, `kapok backfill --product {product}` writes a history)"
        )
    raise ValueError(
        f"no {product} application decisions in the window {window}: {log.describe()} "
        f"holds {held.len():,}, decided {held.min():%Y-%m-%d} .. {held.max():%Y-%m-%d}"
    )


def months(
    index: pl.DataFrame, since: dt.datetime | None, until: dt.datetime | None
) -> list[tuple[dt.datetime, dt.datetime]]:
    """[start, end) of each calendar month (UTC) the decisions fall in, within the window: the
    log is read a month at a time, so memory follows a month's decisions, not the window's."""
    first, last = index["decided_at"].min(), index["decided_at"].max()
    start = dt.datetime(first.year, first.month, 1, tzinfo=dt.UTC)  # type: ignore[union-attr]
    out = []
    while start <= last:  # type: ignore[operator]
        end = dt.datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=dt.UTC)
        lo = max(start, since) if since is not None else start
        hi = min(end, until) if until is not None else end
        out.append((lo, hi))
        start = end
    return out


def logged_applications(
    log: DecisionLog, product: str, since: dt.datetime | None, until: dt.datetime | None
) -> pl.DataFrame:
    """The product's application decisions in [since, until), with amount and term."""
    frame = log.frame(since, until, product, columns=LOG_COLUMNS)
    return frame.with_columns(pl.col("request").str.json_decode(REQUEST)).unnest("request")


def _day(at: dt.datetime | None, default: str, end: bool = False) -> str:
    if at is None:
        return default
    return f"{(at - dt.timedelta(days=1)) if end else at:%Y-%m-%d}"


def requests_frame(logged: pl.DataFrame) -> pl.DataFrame:
    """The core's input for logged rows: every stored feature as logged (numbers as Float64,
    codes as text; a feature the record lacks is unknown) plus requested_amount, term_months.
    The request-time features are computed again by the core from amount and term."""
    schema = {n: pl.String if t == pl.String else pl.Float64 for n, t in core.STORED_SCHEMA.items()}
    features = logged.select(pl.col("features").str.json_decode(pl.Struct(schema))).unnest(
        "features"
    )
    return features.with_columns(logged["requested_amount"], logged["term_months"])


# -- models --------------------------------------------------------------------------------------
def models_for(
    paths: Paths, product: str, versions: list[tuple[str, str]]
) -> dict[tuple[str, str], tuple[ProductModel, str]]:
    """Per logged (model_name, version): the model that re-decides its records, and what it is
    (the logged version while it is in the registry, else the current champion)."""
    from serving.model import load_champion
    from training.pyfunc import load_scorer
    from training.tracking import configure, version_exists

    client = configure(paths)
    champion: ProductModel | None = None
    out = {}
    for name, version in versions:
        if not version_exists(client, name, version):  # a failing store raises instead
            champion = champion or load_champion(paths, product)
            out[(name, version)] = (
                champion,
                f"{name} v{version} is no longer in the registry: the current champion "
                f"v{champion.version} re-decides its records",
            )
            continue
        scorer = load_scorer(f"models:/{name}/{version}")
        model = ProductModel(product, name, version, scorer)
        out[(name, version)] = (model, f"{name} v{version}, as logged")
    return out


# -- deciding ------------------------------------------------------------------------------------
def _side(model: ProductModel, frame: pl.DataFrame, d: core.Decisions, side: str) -> dict:
    """One policy's columns: decision, grade and, for approvals, the limit, the exposure lent
    (the request capped at the limit), its expected loss and income a year at the limit's PD
    and price.

    The decision is the core's at the requested amount, as the API and the backfill decided
    it, plus the product's term range, which the API checks before deciding (a request outside
    it is refused): a candidate that narrows it declines those rows (TERM_OUT_OF_RANGE). The
    amount range is not a decision step in the core: it caps the limit, hence the volume. The
    limit search (most of the time) runs on the approved rows only: nothing is lent to others."""
    prod, n = d.product, len(d)
    outside = (d.term < prod.term_months_min) | (d.term > prod.term_months_max)
    severity = np.where(outside, cp.DECLINE, d.severity)
    approved = np.flatnonzero(severity == cp.APPROVE)
    limit, pd_at, rate = np.full(n, np.nan), np.zeros(n), np.zeros(n)
    if len(approved):
        lim = core.decide(model, frame[approved], d.policy, reasons="none", limits=True).limits
        assert lim is not None
        limit[approved] = lim.limit
        pd_at[approved] = np.nan_to_num(lim.pd_at_limit)
        rates = lim.price.rate.copy()
        for r, ref in lim.reference.items():  # rows the reference searched (PD not monotone)
            rates[r] = ref.price.rate if ref.price is not None else 0.0
        rate[approved] = rates
    lent = np.nan_to_num(limit)  # NaN: not approved
    exposure = np.where(lent > 0, lent, 0.0)
    return {
        f"grade_{side}": d.grade.astype(str),
        f"decision_{side}": cp.OUTCOMES[severity].astype(str),
        f"limit_{side}": limit,
        f"exposure_{side}": exposure,
        f"el_{side}": pd_at * prod.lgd * exposure,
        f"income_{side}": rate * exposure,
        "_severity": severity,
    }


def _why(d: core.Decisions, r: int) -> tuple[str, str]:
    """The codes of the steps that kept row r from approval under d's policy, and their text."""
    values = d.values(r)
    made = pol.decide(
        float(d.pd[r]), d.product, d.knockout_list(r, values),
        price_ok=bool(d.price.within_cap[r]), term_months=int(d.term[r]),
    )  # fmt: skip
    steps = [s for s in made.path[:-1] if "-> refer" in s or "-> decline" in s]
    return ", ".join(made.reasons), " | ".join(steps)


def decide_chunk(
    logged: pl.DataFrame, model: ProductModel, current: pol.Policy, candidate: pol.Policy
) -> pl.DataFrame:
    """Both policies' decisions on logged rows (one core call per policy, and one for the
    limits of its approvals)."""
    frame = requests_frame(logged)
    decided = {
        side: core.decide(model, frame, policy, reasons="none")
        for side, policy in (("current", current), ("candidate", candidate))
    }
    d = decided["current"]
    columns: dict[str, Any] = {"pd": d.pd, "model_used": np.full(len(d), model.version)}
    severity = {}
    for side, dec in decided.items():
        part = _side(model, frame, dec, side)
        severity[side] = part.pop("_severity")
        columns.update(part)
    swap = np.full(len(d), None, dtype=object)
    swap[(severity["candidate"] == cp.APPROVE) & (severity["current"] != cp.APPROVE)] = "in"
    swap[(severity["current"] == cp.APPROVE) & (severity["candidate"] != cp.APPROVE)] = "out"
    rule = np.full(len(d), None, dtype=object)
    detail = np.full(len(d), None, dtype=object)
    for r in np.flatnonzero(swap != None).tolist():  # noqa: E711  (the few rows that change)
        stricter = decided["current" if swap[r] == "in" else "candidate"]
        rule[r], detail[r] = _why(stricter, r)
    columns.update(swap=swap, rule=rule, detail=detail, error=d.error)
    out = pl.DataFrame([
        pl.Series(k, v.tolist(), dtype=pl.String) if v.dtype == object else pl.Series(k, v)
        for k, v in columns.items()
    ])  # fmt: skip
    keep = logged.select("request_id", "enterprise_id", "decided_at", "endpoint",
                         pl.col("decision").alias("logged_decision"), "requested_amount",
                         "term_months")  # fmt: skip
    segments = frame.select(
        *(_segment(c).alias(title) for title, _, c in SEGMENTS if c is not None)
    )
    return pl.concat([keep, out, segments], how="horizontal")


def _segment(feature: str) -> pl.Expr:
    """A categorical feature's code as a person reads it ("Tianhe 天河区"), "unknown" if missing."""
    from features import labels
    from features.schema import FEATURES

    unit = next(f.unit for f in FEATURES if f.name == feature)
    table = labels.BY_UNIT.get(unit, {})
    names = {code: f"{en} {zh}" for code, (en, zh) in table.items()}
    return pl.col(feature).replace(names).fill_null("unknown")


def simulate(
    paths: Paths,
    product: str,
    candidate_path: Path,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    *,
    log: DecisionLog | None = None,
    current: pol.Policy | None = None,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Simulation:
    """Re-decide `product`'s logged applications in [since, until) under both policies."""
    from features.schema import PRODUCTS
    from review.backfill import outcomes_path
    from review.monitor import read_outcomes

    t0 = time.perf_counter()
    if product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    candidate = pol.load_policy(Path(candidate_path))  # first: a bad file writes nothing
    current = current or pol.load_policy()
    log = log or DecisionLog()
    index = logged_index(log, product, since, until)
    if on_total:
        on_total(index.height)
    counts = index.group_by("model_name", "model_version").len().sort("model_name", "model_version")
    used = {(n, v): c for n, v, c in counts.iter_rows()}
    models = models_for(paths, product, list(used))
    parts = []
    for start, end in months(index, since, until):
        logged = logged_applications(log, product, start, end)
        for (name, version), (model, _) in models.items():
            mine = logged.filter(
                (pl.col("model_name") == name) & (pl.col("model_version") == version)
            )
            for chunk in mine.iter_slices(CHUNK):
                parts.append(decide_chunk(chunk, model, current, candidate))
                if progress:
                    progress(chunk.height)
    rows = pl.concat(parts).sort("decided_at", "request_id")
    notes = []
    bad = rows.filter(pl.col("error").is_not_null())
    if bad.height:
        first = f"{bad['request_id'][0]}: {bad['error'][0]}"
        notes.append(
            f"{bad.height:,} logged applications hold a feature value no policy can use and "
            f"are left out (first: {first})"
        )
        rows = rows.filter(pl.col("error").is_null())
    rows = rows.drop("error")

    source = outcomes_path(paths, product)
    outcomes_source = None
    if source.exists():
        matured = read_outcomes(source)
        rows = rows.join(matured, on="request_id", how="left")
        outcomes_source = str(source)
    else:
        rows = rows.with_columns(pl.lit(None, dtype=pl.Int64).alias("outcome"))
        notes.append(f"no outcomes at {source}: the bad rate is {NOT_MATURED} everywhere")
    n_matured = int(rows["outcome"].is_not_null().sum())
    if outcomes_source and n_matured < rows.height:
        notes.append(
            f"{rows.height - n_matured:,} of {rows.height:,} applications have no matured outcome "
            f"(API decisions, or too recent): their bad rate is {NOT_MATURED}"
        )
    differ = int((rows["logged_decision"] != rows["decision_current"]).sum())
    if differ:
        notes.append(
            f"{differ:,} applications decide differently under the current policy than the log "
            "says they were (the policy or the model changed since, or a /limit decision was "
            "logged at its limit): every figure here is the re-decision, never the log's"
        )
    return Simulation(
        product=product, since=since, until=until, current=current, candidate=candidate,
        rows=rows.with_columns(pl.col("grade_current").alias("grade")),
        models=[f"{text} ({used[key]:,} records)" for key, (_, text) in models.items()],
        outcomes_source=outcomes_source, notes=notes, seconds=time.perf_counter() - t0,
    )  # fmt: skip


# -- what differs between the two policies -------------------------------------------------------
def _flat(policy: pol.Policy, product: str) -> dict[str, Any]:
    """The parts of a policy that decide `product`, flattened to dotted keys."""
    out: dict[str, Any] = {}
    for name, value in policy.product(product).model_dump().items():
        if name != "name":
            out[f"products.{product}.{name}"] = value
    for name, value in policy.caps.model_dump().items():
        out[f"caps.{name}"] = value
    for name, value in policy.scale.model_dump().items():
        out[f"scale.{name}"] = value
    out["master_scale"] = ", ".join(f"{g.name} <= {g.upper_pd:g}" for g in policy.master_scale)
    for rule in policy.knockout_rules:
        out[f"knockouts.{rule.code}"] = (
            f"{rule.feature} {rule.op} {rule.threshold:g} -> {rule.action}; "
            f"missing -> {rule.if_missing}"
        )
    return out


def policy_changes(current: pol.Policy, candidate: pol.Policy, product: str) -> pl.DataFrame:
    """Every value of the product's policy that the candidate changes: key, current, candidate."""
    a, b = _flat(current, product), _flat(candidate, product)
    rows = [{"key": k, "current": _text(a.get(k)), "candidate": _text(b.get(k))}
            for k in list(dict.fromkeys([*a, *b])) if a.get(k) != b.get(k)]  # fmt: skip
    return pl.DataFrame(rows, schema={"key": pl.String, "current": pl.String,
                                      "candidate": pl.String})  # fmt: skip


def _text(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# -- the report ----------------------------------------------------------------------------------
def window_text(s: Simulation) -> str:
    first, last = s.rows["decided_at"].min(), s.rows["decided_at"].max()
    return f"{first:%Y-%m-%d} .. {last:%Y-%m-%d}"


def render(s: Simulation) -> str:
    from review.html import Document

    doc = Document(
        f"Policy simulation · {s.product} · {s.current.source} vs {s.candidate.source}",
        subtitle=(
            f"{s.rows.height:,} logged {s.product} applications decided "
            f"{window_text(s)}, re-decided under both policies by {'; '.join(s.models)}"
        ),
    )
    swaps_in, swaps_out = s.swap_count("in"), s.swap_count("out")
    with doc.section("Summary", "概要"):
        doc.key_values([
            ("product", s.product),
            ("current policy", s.current.source),
            ("candidate policy", s.candidate.source),
            ("applications (decided in the window)", s.rows.height),
            ("window", window_text(s)),
            ("models", "; ".join(s.models)),
            ("outcomes", s.outcomes_source or "none"),
            ("swap-in (approved only under the candidate)", swaps_in),
            ("swap-out (approved only under the current policy)", swaps_out),
        ])  # fmt: skip
        doc.table(s.summary())
        for note in s.notes:
            doc.note(note)
    with doc.section("What the candidate changes", "候选政策的改动"):
        changes = policy_changes(s.current, s.candidate, s.product)
        if changes.height:
            doc.table(changes)
        else:
            doc.paragraph(f"The candidate decides {s.product} exactly as the current policy.")
    for title, zh, _ in SEGMENTS:
        with doc.section(f"By {title}", f"按{zh}"):
            if title == "grade":
                doc.paragraph("Grades of the current policy's master scale, for both policies.")
            doc.table(shown(s.breakdown(title)))
    for kind, title, zh, text in (
        ("in", "Swap-in", "换入", "declined or referred now, approved under the candidate; rule: "
         "what the current policy held against them"),
        ("out", "Swap-out", "换出", "approved now, not under the candidate; rule: what the "
         "candidate holds against them"),
    ):  # fmt: skip
        with doc.section(title, zh):
            rows = s.swaps.filter(pl.col("swap") == kind)
            top = rows.head(100)
            more = rows.height > top.height
            doc.paragraph(
                f"{rows.height:,} applications {text}. "
                + (
                    f"The {top.height} riskiest by PD here; all in the CSV and parquet."
                    if more
                    else ""
                )
            )
            if rows.height:
                doc.paragraph("The policy step behind each rule is in the swap list's detail "
                              "column (CSV, parquet).")  # fmt: skip
                lent = "limit_candidate" if kind == "in" else "limit_current"
                doc.table(top.select(
                    "request_id", "enterprise_id",
                    pl.col("decided_at").dt.date().cast(pl.String).alias("decided"),
                    pl.col("pd").map_elements(lambda x: f"{x:.2%}", return_dtype=pl.String),
                    pl.col("grade_current").alias("grade"),
                    pl.col("requested_amount").round(0).cast(pl.Int64).alias("amount"),
                    pl.col("term_months").alias("term"),
                    pl.col("decision_current").alias("now"),
                    pl.col("decision_candidate").alias("candidate"),
                    pl.col(lent).round(0).cast(pl.Int64).alias("limit (approving policy)"),
                    "rule",
                    pl.col("outcome").cast(pl.String).fill_null(NOT_MATURED),
                ))  # fmt: skip
    with doc.section("Method", "方法说明"):
        doc.bullets([
            "Rows: every application decision of the product in the decision log in the window "
            "(/score, /limit, /price, /screen, `kapok decide`, `kapok backfill`); never prospect "
            "offers or officers' overrides.",
            "Input: the logged feature vector and the request's amount and term; the request-time "
            "features are computed again from them. One model per record: the version it names "
            "while it is in the registry, else the current champion (see models).",
            "Decisions: the columnar decision core (serving/core.py) with each policy: knock-outs, "
            "PD cut-offs, the price cap and the product's term range, at the requested amount, "
            "as the API decides; the limit search of each policy (its caps, capacities, budget "
            "and amount range) gives the amount an approval lends.",
            "Volume: approvals' requested amount capped at the policy's limit. Expected loss: "
            "PD at that amount x the policy's LGD x the amount, one year. Income: the policy's "
            f"headline rate ({s.income_name}) at that amount x the amount, one year.",
            "Observed bad rate: matured outcomes joined on request_id, as `kapok monitor` joins "
            f"them; a segment or policy with no matured approval shows '{NOT_MATURED}'. Outcomes "
            "of declined applications exist only on simulated data.",
            f"Run time: {s.seconds:.1f} s.",
        ])  # fmt: skip
    return doc.render()


def file_stem(product: str, day: dt.date | None = None) -> str:
    return f"simulate-policy-{product}-{(day or dt.datetime.now(dt.UTC).date()).isoformat()}"


def write_outputs(s: Simulation, out_dir: Path) -> dict[str, Path]:
    """The HTML report and the swap lists (parquet, CSV), all or none (kapok/staging.py)."""
    from kapok.staging import staged_file

    stem = file_stem(s.product)
    targets = {
        "html": out_dir / f"{stem}.html",
        "parquet": out_dir / f"{stem}-swaps.parquet",
        "csv": out_dir / f"{stem}-swaps.csv",
    }
    html = render(s)
    swaps = s.swaps
    with (
        staged_file(targets["html"]) as html_tmp,
        staged_file(targets["parquet"]) as parquet_tmp,
        staged_file(targets["csv"]) as csv_tmp,
    ):
        html_tmp.write_text(html, encoding="utf-8")
        swaps.write_parquet(parquet_tmp)
        swaps.write_csv(csv_tmp)
    s.files = targets
    return targets


__all__ = ["Simulation", "policy_changes", "render", "simulate", "write_outputs"]

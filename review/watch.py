"""`kapok watch`: the portfolio early-warning watchlist (风险预警名单).

Every current borrower is scored with the product's champion at the as-of date and at the
previous snapshot (default: one month earlier), from the Feast offline store read point in time
(review/portfolio.py); borrowers that deteriorated are listed with their flags and reasons:

    grade_drop        the master-scale grade fell by `Thresholds.grade_drop` grades or more
    pd_doubled        PD now >= `Thresholds.pd_ratio` x PD at the previous snapshot
    new_enforcement   more court enforcement cases in the last 12 months than before
                      (jud_enforcements_12m increased)
    dishonest_debtor  newly listed as a dishonest debtor (jud_dishonest_debtor_listed 0 -> 1)
    tax_collapse      declared sales of the last 3 months (tax_sales_3m) down by
                      `Thresholds.sales_drop` or more vs the previous snapshot, or newly down by
                      that much vs the same months a year earlier (tax_sales_growth_yoy)
    power_collapse    the same for electricity use (power_kwh_3m, power_kwh_growth_yoy)

Model-driven flags (grade_drop, pd_doubled) also name the features that moved the risk: exact
TreeSHAP (LightGBM pred_contrib, log-odds) at the as-of date minus at the previous snapshot,
computed for the flagged rows only, the largest increases first.

Reasons are written for a lender, in English and Chinese: each feature by its description in the
schema and the change in its value in words ("Court enforcement cases, last 12 months: rose from
0 to 2" / "近12个月被执行次数：由0升至2"), values as `serving.reasons.shown` words them. A
borrower's `exposure` is the amount lent: the approved limit when the decision set one.

Outputs, written atomically (temporary file, then rename) to the output folder:
`watch-<product>-<DATE>.parquet` (flags, reasons, reasons_zh, reason_flags (the flag each reason
explains, or "risk_drivers"), risk_drivers, risk_drivers_zh and driver_features, the drivers'
feature names, as lists), `.csv` (the same rows, lists joined with
"; " and " | "), `.html` (counts per flag, grade migration matrix of the whole portfolio, top
deteriorations with their actions, the action counts, PD-ratio histogram; headings in English and
Chinese).

Actions (处置): `run` opens, per flagged borrower, the actions the policy's early-warning action
table (`[[early_warning.actions]]` in serving/policy.toml) gives its flags, due on the as-of date +
the action's days, in the append-only actions store (review/actions.py, in the decision log's
database); a re-run for the same date opens nothing twice. `kapok actions` lists and closes them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.schema import PRODUCTS
from kapok.settings import Paths
from review import portfolio as pf
from review.portfolio import ID, PortfolioError
from serving.reasons import change

FLAGS: dict[str, tuple[str, str]] = {
    "grade_drop": ("Grade dropped by 2 or more grades", "评级下调两级及以上"),
    "pd_doubled": ("PD at least doubled", "违约概率翻倍及以上"),
    "new_enforcement": ("New court enforcement case", "新增被执行记录"),
    "dishonest_debtor": ("Newly listed as a dishonest debtor", "新列入失信被执行人"),
    "tax_collapse": ("Declared sales collapsed", "纳税申报销售额骤降"),
    "power_collapse": ("Electricity use collapsed", "用电量骤降"),
}
MODEL_FLAGS = ("grade_drop", "pd_doubled")
NAME_LISTS = ("flags", "driver_features", "reason_flags")  # lists of names, not texts
RISK_DRIVERS = "risk_drivers"  # reason_flags of the reason naming the drivers of a model flag


@dataclass(frozen=True)
class Thresholds:
    """Every number the watchlist uses, in one place (the defaults are the house rules).

    grade_drop   flag when the grade falls by at least this many grades of the master scale
                 (serving/policy.toml, best to worst).
    pd_ratio     flag when PD now / PD previous is at least this.
    sales_drop   flag a tax collapse when tax_sales_3m fell by at least this share vs the
                 previous snapshot (previous > 0), or when tax_sales_growth_yoy is at or below
                 -sales_drop now and was not at the previous snapshot (a new collapse, not one
                 already on last month's list).
    power_drop   the same for power_kwh_3m and power_kwh_growth_yoy.
    drivers      how many risk drivers (largest TreeSHAP increases) to name per model flag.
    top          rows in the HTML's top-deteriorations table.
    """

    grade_drop: int = 2
    pd_ratio: float = 2.0
    sales_drop: float = 0.5
    power_drop: float = 0.5
    drivers: int = 3
    top: int = 50

    def __post_init__(self) -> None:
        if self.grade_drop < 1 or self.pd_ratio <= 1 or self.drivers < 0 or self.top < 1:
            raise ValueError(f"invalid watch thresholds: {self}")
        for name in ("sales_drop", "power_drop"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"Thresholds.{name} must be in (0, 1)")


@dataclass
class WatchResult:
    product: str
    model: str  # e.g. kapok-microloan v3 @champion
    as_of: date
    previous: date
    source: str  # where the book came from
    book_size: int  # borrowers in the portfolio
    no_data: int  # borrowers with no feature snapshot at either date (not scored)
    scores: pl.DataFrame  # every scored borrower: id, pd and grade at both dates
    flagged: pl.DataFrame  # one row per flagged borrower
    thresholds: Thresholds
    grades: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)
    # the early-warning actions (review/actions.py), set by record_actions: one row per flagged
    # borrower and action of this watch, the count per action, how many were new in the store
    actions: pl.DataFrame | None = None
    action_summary: pl.DataFrame | None = None
    new_actions: int = 0
    actions_store: str = ""

    def flag_counts(self) -> dict[str, int]:
        return {f: int(self.flagged[f"flag_{f}"].sum()) for f in FLAGS}


# -- model ---------------------------------------------------------------------------------------
def champion(paths: Paths, product: str) -> tuple[Any, str]:
    """The champion Scorer of `product` and a label saying which version it is."""
    from serving.model import ModelUnavailable, load_champion

    try:
        model = load_champion(paths, product)
    except ModelUnavailable as e:
        raise PortfolioError(str(e)) from None
    return model.scorer, f"{model.name} v{model.version} @champion"


# -- the job -------------------------------------------------------------------------------------
def watch(
    features_dir: Path,
    scorer: Any,
    book: pl.DataFrame,
    as_of: date,
    previous: date,
    *,
    product: str,
    model: str = "",
    source: str = "",
    thresholds: Thresholds | None = None,
    policy: Any = None,
    step: Callable[[str], None] | None = None,
) -> WatchResult:
    """Score `book` at both dates and flag deteriorations (no files written)."""
    from serving import columnar_policy as cp
    from serving.policy import load_policy

    t = thresholds or Thresholds()
    policy = policy or load_policy()
    step = step or (lambda _s: None)
    now_at, prev_at = pf.end_of_day(as_of), pf.end_of_day(previous)
    pf.check_dates(features_dir, now_at, prev_at)
    if book.height == 0:
        raise PortfolioError(f"the portfolio is empty ({source or 'no borrowers'})")
    book = book.with_columns(  # a loan's amount and term may be unknown: request features missing
        pl.lit(None, dtype).alias(name)
        for name, dtype in (("requested_amount", pl.Float64), ("term_months", pl.Int64))
        if name not in book.columns
    )

    step(f"reading point-in-time features of {book.height:,} borrowers at two dates")
    frames = pf.point_in_time(features_dir, book, [prev_at, now_at])
    prev, now = frames[prev_at], frames[now_at]
    found = (pf.snapshot_found(prev) | pf.snapshot_found(now)).to_numpy()
    prev, now = prev.filter(found), now.filter(found)
    if now.height == 0:
        raise PortfolioError(
            f"none of the {book.height:,} borrowers has a feature snapshot at "
            f"{previous} or {as_of}: are these enterprise ids of this data?"
        )

    step(f"scoring {now.height:,} borrowers with {model or 'the model'} at both dates")
    x_prev, x_now = scorer.matrix(prev), scorer.matrix(now)
    pd_prev, pd_now = scorer.pd(prev), scorer.pd(now)
    g_prev, g_now = cp.grade_index(pd_prev, policy), cp.grade_index(pd_now, policy)
    names = policy.grades
    scores = pl.DataFrame(
        {
            ID: now[ID],
            "pd_previous": pd_prev,
            "pd_now": pd_now,
            "grade_previous": [names[i] for i in g_prev],
            "grade_now": [names[i] for i in g_now],
            "grades_down": (g_now - g_prev).astype(np.int64),
        }
    ).with_columns(pd_ratio=pl.col("pd_now") / pl.col("pd_previous"))

    step("flagging deteriorations")
    flags = _flags(prev, now, scores, t)
    mask = flags.select(pl.any_horizontal(pl.all())).to_series().to_numpy()
    rows = np.flatnonzero(mask)

    step(f"explaining {len(rows):,} flagged borrowers (TreeSHAP at both dates)")
    model_rows = rows[flags.select(pl.any_horizontal(MODEL_FLAGS)).to_series().to_numpy()[rows]]
    drivers = _drivers(scorer, x_prev[model_rows], x_now[model_rows], prev, now, model_rows, t)
    flagged = _flagged_frame(prev, now, scores, flags, rows, drivers, t)
    return WatchResult(
        product=product,
        model=model,
        as_of=as_of,
        previous=previous,
        source=source,
        book_size=book.height,
        no_data=int((~found).sum()),
        scores=scores,
        flagged=flagged,
        thresholds=t,
        grades=tuple(names),
    )


def _flags(prev: pl.DataFrame, now: pl.DataFrame, scores: pl.DataFrame, t: Thresholds):
    def pair(name: str) -> tuple[pl.Series, pl.Series]:
        return prev[name].cast(pl.Float64), now[name].cast(pl.Float64)

    def collapse(level: str, yoy: str, drop: float) -> pl.Series:
        (lp, ln), (yp, yn) = pair(level), pair(yoy)
        vs_previous = (lp > 0) & (ln <= (1 - drop) * lp)
        new_yoy = (yn <= -drop) & (yp.is_null() | yp.is_nan() | (yp > -drop))
        return vs_previous.fill_null(False) | new_yoy.fill_null(False)

    enf_p, enf_n = pair("jud_enforcements_12m")
    dd_p, dd_n = pair("jud_dishonest_debtor_listed")
    return pl.DataFrame(
        {
            "grade_drop": scores["grades_down"] >= t.grade_drop,
            "pd_doubled": scores["pd_ratio"] >= t.pd_ratio,
            "new_enforcement": (enf_n > enf_p.fill_null(0)).fill_null(False),
            "dishonest_debtor": ((dd_n >= 1) & (dd_p.fill_null(0) < 1)).fill_null(False),
            "tax_collapse": collapse("tax_sales_3m", "tax_sales_growth_yoy", t.sales_drop),
            "power_collapse": collapse("power_kwh_3m", "power_kwh_growth_yoy", t.power_drop),
        }
    )


Driver = tuple[str, str, str]  # feature, how its value changed in English, in Chinese


def _drivers(
    scorer: Any,
    x_prev: np.ndarray,
    x_now: np.ndarray,
    prev: pl.DataFrame,
    now: pl.DataFrame,
    rows: np.ndarray,
    t: Thresholds,
) -> dict[int, list[Driver]]:
    """Row index -> the features whose TreeSHAP contribution rose the most, each with the change
    in its value in words."""
    if len(rows) == 0 or t.drivers == 0:
        return {}
    c_prev = scorer.booster.predict(x_prev, pred_contrib=True)[:, :-1]
    c_now = scorer.booster.predict(x_now, pred_contrib=True)[:, :-1]
    delta = c_now - c_prev
    order = np.argsort(-delta, axis=1)[:, : t.drivers]
    features = scorer.features
    used = sorted({int(j) for j in np.unique(order)})
    cols = [features[j] for j in used]
    before = prev[rows.tolist()].select(cols).to_dict(as_series=False)
    after = now[rows.tolist()].select(cols).to_dict(as_series=False)
    out: dict[int, list[Driver]] = {}
    for k, row in enumerate(rows):
        items = []
        for j in order[k]:
            if float(delta[k, j]) <= 0:
                break
            name = features[j]
            items.append((name, *change(name, before[name][k], after[name][k])))
        out[int(row)] = items
    return out


def _pct(p: float) -> str:
    return f"{p:.2%}"


def _times(now: float, before: float) -> str:
    return f"{now / before:.2f}" if before > 0 else "∞"


def _flagged_frame(
    prev: pl.DataFrame,
    now: pl.DataFrame,
    scores: pl.DataFrame,
    flags: pl.DataFrame,
    rows: np.ndarray,
    drivers: dict[int, list[Driver]],
    t: Thresholds,
) -> pl.DataFrame:
    watched = [
        "jud_enforcements_12m",
        "jud_dishonest_debtor_listed",
        "tax_sales_3m",
        "tax_sales_growth_yoy",
        "power_kwh_3m",
        "power_kwh_growth_yoy",
    ]
    idx = rows.tolist()
    p = prev[idx].select(watched).to_dict(as_series=False)
    n = now[idx].select(watched).to_dict(as_series=False)
    s = scores[idx]
    f = flags[idx]
    s_dict = s.to_dict(as_series=False)
    f_dict = f.to_dict(as_series=False)
    all_flags: list[list[str]] = []
    all_reasons: list[list[tuple[str, str, str]]] = []
    all_drivers: list[list[Driver]] = []
    for k, row in enumerate(idx):
        names = [name for name in FLAGS if f_dict[name][k]]
        reasons: list[tuple[str, str, str]] = []  # (English, Chinese, the flag it explains)
        pd0, pd1 = s_dict["pd_previous"][k], s_dict["pd_now"][k]
        if "grade_drop" in names:
            g0, g1, down = (s_dict[c][k] for c in ("grade_previous", "grade_now", "grades_down"))
            reasons.append(
                (
                    f"grade fell from {g0} to {g1} ({down} grades down; PD rose from "
                    f"{_pct(pd0)} to {_pct(pd1)})",
                    f"评级由{g0}降至{g1}（下调{down}级；违约概率由{_pct(pd0)}升至{_pct(pd1)}）",
                    "grade_drop",
                )
            )
        if "pd_doubled" in names:
            times = _times(pd1, pd0)
            reasons.append(
                (
                    f"PD rose from {_pct(pd0)} to {_pct(pd1)}, {times} times the previous",
                    f"违约概率由{_pct(pd0)}升至{_pct(pd1)}，为上期的{times}倍",
                    "pd_doubled",
                )
            )
        if names and set(names) & set(MODEL_FLAGS) and drivers.get(row):
            moved = drivers[row]
            reasons.append(
                (
                    "risk raised most by: " + "; ".join(d[1] for d in moved),
                    "风险上升的主要因素：" + "；".join(d[2] for d in moved),
                    RISK_DRIVERS,
                )
            )
        for flag, feature in (
            ("new_enforcement", "jud_enforcements_12m"),
            ("dishonest_debtor", "jud_dishonest_debtor_listed"),
        ):
            if flag in names:
                reasons.append((*change(feature, p[feature][k], n[feature][k]), flag))
        for flag, level, yoy in (
            ("tax_collapse", "tax_sales_3m", "tax_sales_growth_yoy"),
            ("power_collapse", "power_kwh_3m", "power_kwh_growth_yoy"),
        ):
            if flag not in names:
                continue
            drop = t.sales_drop if flag == "tax_collapse" else t.power_drop
            a, b = p[level][k], n[level][k]
            if a is not None and b is not None and a > 0 and b <= (1 - drop) * a:
                en, zh = change(level, a, b)
                down = f"{1 - b / a:.0%}"
                reasons.append(
                    (f"{en} (down {down} vs the previous snapshot)", f"{zh}（较上期下降{down}）",
                     flag)
                )  # fmt: skip
            ya, yb = p[yoy][k], n[yoy][k]
            if yb is not None and yb <= -drop and (ya is None or math.isnan(ya) or ya > -drop):
                reasons.append((*change(yoy, ya, yb), flag))
        all_flags.append(names)
        all_reasons.append(reasons)
        all_drivers.append(drivers.get(row, []))

    def texts(rows: list[list[Any]], i: int) -> pl.Series:
        return pl.Series([[x[i] for x in r] for r in rows], dtype=pl.List(pl.String))

    loan = now[idx].select(ID, pl.col("requested_amount").alias("exposure"), "term_months")
    out = pl.concat(
        [
            loan,
            s.drop(ID),
            pl.DataFrame(
                {
                    "flags": pl.Series(all_flags, dtype=pl.List(pl.String)),
                    "reasons": texts(all_reasons, 0),
                    "reasons_zh": texts(all_reasons, 1),
                    "reason_flags": texts(all_reasons, 2),
                    "risk_drivers": texts(all_drivers, 1),
                    "risk_drivers_zh": texts(all_drivers, 2),
                    "driver_features": texts(all_drivers, 0),
                }
            ),
            f.rename({c: f"flag_{c}" for c in f.columns}),
        ],
        how="horizontal",
    )
    return out.sort(["grades_down", "pd_ratio"], descending=True)


# -- actions -------------------------------------------------------------------------------------
def record_actions(result: WatchResult, policy: Any = None, url: str | None = None) -> None:
    """Open the policy's early-warning actions for the flagged borrowers in the actions store
    (the decision log's database unless `url`); re-running for the same date opens nothing
    twice. Sets result.actions, .action_summary, .new_actions and .actions_store."""
    from review import actions as act
    from serving.policy import load_policy

    entries = (policy or load_policy()).early_warning_actions
    plan = act.planned(result.flagged, entries, result.as_of)
    with act.ActionStore(url) as store:
        result.new_actions = store.open(plan, result.product, result.as_of)
        counts = store.counts(result.product, result.as_of)
        result.actions_store = store.url
    result.actions = plan
    result.action_summary = act.summary(plan, counts, entries)


def _actions_html(doc: Any, result: WatchResult) -> None:
    summary, plan = result.action_summary, result.actions
    if summary is None or plan is None:
        doc.paragraph(
            "No actions were recorded with this watchlist (kapok watch opens the policy's "
            "early-warning actions in the actions store)."
        )
        return
    already = plan.height - result.new_actions
    doc.paragraph(
        f"{plan.height:,} actions for {plan['enterprise_id'].n_unique():,} flagged borrowers "
        f"under the policy's early-warning action table, due {result.as_of} + the action's "
        f"days; {result.new_actions:,} new in the actions store {result.actions_store}"
        + (f", {already:,} already there from an earlier run for this date" if already else "")
        + f". Open, overdue (due before {result.as_of}) and closed count every "
        f"{result.product} action in the store: kapok actions list shows them, "
        "kapok actions record records what came of one."
    )
    overdue = int(summary["overdue"].sum())
    if overdue:
        doc.flag(f"{overdue:,} open actions are overdue.")
    doc.table(
        summary.select(
            "action",
            "description",
            pl.col("this_watch").alias("this watch (borrowers)"),
            "open",
            "overdue",
            "closed",
        )
    )


def _with_actions(top: pl.DataFrame, plan: pl.DataFrame | None) -> pl.DataFrame:
    """The top table with each borrower's actions of this watch and their due dates."""
    if plan is None or plan.height == 0:
        return top
    per = plan.group_by(ID).agg(
        pl.format("{} (due {})", "action", "due_date").str.join(", ").alias("actions")
    )
    return top.join(per, on=ID, how="left", maintain_order="left")


# -- outputs -------------------------------------------------------------------------------------
def file_stem(product: str, as_of: date) -> str:
    return f"watch-{product}-{as_of.isoformat()}"


def csv_frame(flagged: pl.DataFrame) -> pl.DataFrame:
    """Lists joined: flag and feature names with "; ", texts with " | "."""
    lists = [c for c, dtype in flagged.schema.items() if dtype == pl.List(pl.String)]
    return flagged.with_columns(
        pl.col(c).list.join("; " if c in NAME_LISTS else " | ") for c in lists
    )


def migration(result: WatchResult) -> pl.DataFrame:
    """Borrowers by grade at the previous snapshot (rows) and now (columns)."""
    grades = list(result.grades)
    counts = result.scores.group_by("grade_previous", "grade_now").len()
    lookup = {(a, b): c for a, b, c in counts.iter_rows()}
    rows = []
    for g0 in grades:
        row: dict[str, Any] = {"previous \\ now": g0}
        for g1 in grades:
            row[g1] = lookup.get((g0, g1), 0)
        row["total"] = sum(row[g1] for g1 in grades)
        rows.append(row)
    return pl.DataFrame(rows)


def render_html(result: WatchResult) -> str:
    import matplotlib.pyplot as plt

    from review.html import Document

    t = result.thresholds
    scored = result.scores.height
    doc = Document(
        f"Portfolio early warning · {result.product} · {result.as_of}",
        subtitle=(
            f"{result.model}; {result.as_of} vs {result.previous}; portfolio: {result.source}"
        ),
    )
    counts = result.flag_counts()
    with doc.section("Summary", "概要"):
        doc.key_values(
            [
                ("product", result.product),
                ("model", result.model),
                ("as of (close of day, UTC)", str(result.as_of)),
                ("previous snapshot", str(result.previous)),
                ("portfolio", result.source),
                ("borrowers in the portfolio", result.book_size),
                ("scored", scored),
                ("no feature snapshot at either date (not scored)", result.no_data),
                ("flagged", result.flagged.height),
                ("flagged share of scored", f"{result.flagged.height / max(scored, 1):.2%}"),
            ]
        )
        if result.flagged.height:
            doc.flag(f"{result.flagged.height:,} borrowers deteriorated: review them first.")
    with doc.section("Flags", "预警信号"):
        doc.table(
            [
                {"flag": k, "meaning": en, "含义": zh, "borrowers": counts[k]}
                for k, (en, zh) in FLAGS.items()
            ]
        )
        doc.note(
            f"Thresholds: grade drop >= {t.grade_drop} grades; PD ratio >= {t.pd_ratio:g}; "
            f"tax collapse: 3-month declared sales down >= {t.sales_drop:.0%} vs the previous "
            f"snapshot or newly >= {t.sales_drop:.0%} below a year earlier; power collapse: the "
            f"same for electricity (>= {t.power_drop:.0%}); new enforcement: "
            "jud_enforcements_12m increased; dishonest debtor: jud_dishonest_debtor_listed 0 → 1."
        )
    with doc.section("Actions", "处置措施"):
        _actions_html(doc, result)
    with doc.section("Grade migration, whole portfolio", "评级迁移矩阵（全部借款人）"):
        down = int((result.scores["grades_down"] > 0).sum())
        up = int((result.scores["grades_down"] < 0).sum())
        doc.paragraph(
            f"Rows: grade at {result.previous}; columns: grade at {result.as_of}. "
            f"{down:,} borrowers moved down, {up:,} up, {scored - down - up:,} stayed."
        )
        doc.table(migration(result))
    with doc.section("Top deteriorations", "恶化最严重的借款人"):
        top = result.flagged.head(t.top)
        if top.height == 0:
            doc.paragraph("No borrower is flagged.", "ok")
        else:
            doc.paragraph(
                f"The {top.height} worst of {result.flagged.height:,} flagged borrowers, by grades "
                "down then PD ratio. Every flagged borrower is in the parquet and CSV files."
            )
            doc.table(
                _with_actions(top, result.actions).select(
                    ID,
                    "grade_previous",
                    "grade_now",
                    "pd_previous",
                    "pd_now",
                    "pd_ratio",
                    pl.col("flags").list.join(", "),
                    pl.col("reasons").list.join(" | "),
                    pl.col("reasons_zh").list.join(" | ").alias("理由"),
                    *(["actions"] if result.actions is not None and result.actions.height else []),
                )
            )
    with doc.section("PD ratio, whole portfolio", "违约概率变化分布"):
        ratio = result.scores["pd_ratio"].to_numpy()
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(np.log2(ratio[np.isfinite(ratio) & (ratio > 0)]), bins=60, color="#2f6b4f")
        ax.axvline(math.log2(t.pd_ratio), color="#a40000", linestyle="--", label="flag threshold")
        ax.set_yscale("log")
        ax.set_xlabel("log2(PD now / PD previous)")
        ax.set_ylabel("borrowers")
        ax.legend()
        doc.figure(
            fig,
            f"PD now / PD at {result.previous}, log2 scale; right of the dashed line: PD at least "
            f"x{t.pd_ratio:g}",
            "pd_ratio_histogram",
        )
    with doc.section("Method", "方法说明"):
        doc.bullets(
            [
                "Current borrowers: " + result.source,
                "Features: the Feast offline store, point in time: per source family the latest "
                "snapshot at or before the close of each date and within the family's TTL, as "
                "Feast's get_historical_features; request-time features from each loan's amount "
                "and term.",
                "PD: the product's champion model; grades: the master scale of the lending "
                "policy (best to worst: " + ", ".join(result.grades) + ").",
                "Risk drivers: exact TreeSHAP (log-odds) at the as-of date minus at the previous "
                "snapshot, for borrowers with a model-driven flag; the largest increases.",
                f"Thresholds: {asdict(t)}",
            ]
        )
    return doc.render()


def write_outputs(result: WatchResult, out_dir: Path) -> dict[str, Path]:
    """Parquet, CSV and HTML; each written to a temporary file first, then all renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(result.product, result.as_of)
    targets = {ext: out_dir / f"{stem}.{ext}" for ext in ("parquet", "csv", "html")}
    temps = {ext: p.with_name(f".{p.name}.{os.getpid()}.tmp") for ext, p in targets.items()}
    try:
        result.flagged.write_parquet(temps["parquet"])
        csv_frame(result.flagged).write_csv(temps["csv"])
        temps["html"].write_text(render_html(result), encoding="utf-8")
        for ext, tmp in temps.items():
            os.replace(tmp, targets[ext])
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    result.files = targets
    return targets


def run(
    paths: Paths,
    product: str,
    as_of: str | date,
    previous: str | date | None = None,
    portfolio: Path | None = None,
    out: Path | None = None,
    thresholds: Thresholds | None = None,
    step: Callable[[str], None] | None = None,
) -> WatchResult:
    """`kapok watch`: the book, both scores, the flags, the files."""
    if product not in PRODUCTS:
        raise PortfolioError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    step = step or (lambda _s: None)
    day = as_of if isinstance(as_of, date) else pf.parse_date(as_of)
    before = (
        pf.months_before(day)
        if previous is None
        else previous
        if isinstance(previous, date)
        else pf.parse_date(previous, "--previous")
    )
    now_at = pf.end_of_day(day)
    pf.check_dates(paths.features, now_at, pf.end_of_day(before))
    step("reading the portfolio")
    if portfolio is not None:
        book = pf.from_file(portfolio, now_at)
        source = f"file {Path(portfolio).name} ({book.height:,} running loans at {day})"
    else:
        from serving.decision_log import DecisionLog, default_url

        url = default_url()
        book = pf.from_decision_log(url, product, now_at)
        where = DecisionLog(url).url
        source = f"decision log {where}: approved {product} loans still running at {day}"
        if book.height == 0:
            raise PortfolioError(
                f"empty portfolio: no approved {product} loan in the decision log {where} is "
                f"still running at {day} (use --portfolio FILE for a book kept elsewhere)"
            )
    if book.height == 0:
        raise PortfolioError(f"empty portfolio: {source}")
    step(f"loading the {product} champion")
    scorer, model = champion(paths, product)
    from serving.policy import load_policy

    policy = load_policy()
    result = watch(paths.features, scorer, book, day, before, product=product, model=model,
                   source=source, thresholds=thresholds, policy=policy, step=step)  # fmt: skip
    step("opening the early-warning actions")
    record_actions(result, policy)
    step("writing the watchlist")
    write_outputs(result, out or paths.home / "reports")
    return result

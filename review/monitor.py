"""`kapok monitor`: drift of live decisions against the champion's training reference, and a
back-test wherever outcomes have matured.

Checks (each stable / watch / act; the command exits 1 when any reaches act):
  score PSI          the logged PDs against the reference's calibrated PDs (deciles + missing)
  feature CSI        every model feature, logged values against the reference (worst shown)
  missing-rate drift the rise in a feature's missing share, reference -> current
  approval rate      per source, the latest month's cut-off approval rate against the reference's
  decision volume    per source, by month (information only: volume depends on the business)
  back-test          per grade, observed default rate vs mean PD (exact binomial test)
  AUC over time      per month (or quarter when months are small); pooled against test AUC

Like with like: a look-back feature is compared only on rows whose snapshot holds its whole
window (review.lookback), so the start of the data's history is not reported as drift; the
back-test leaves out the model's own development months (its training and validation windows),
whose outcomes it was fitted on; and live decisions (the API, `kapok decide`: dated by the wall
clock) and backfilled ones (`kapok backfill`: dated by their application in the simulated
history) are never mixed in one month's volume or approval rate. `--source` picks one of them;
the default, all, pools them for the score, feature and back-test checks.

Thresholds live in THRESHOLDS below (PSI/CSI in review/stability.py, back-test in
review/backtest.py), so a reviewer reads them in one place.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kapok.settings import Paths
from review import backtest as bt
from review.html import Document
from review.lookback import NA, Sample, feature_stability, lookback_note
from review.stability import ACT, STABLE, WATCH, psi, verdict
from serving import policy as pol
from serving.decision_log import DecisionLog


@dataclass(frozen=True)
class Thresholds:
    """Monitoring thresholds (absolute shares: 0.10 = 10 percentage points)."""

    missing_watch: float = 0.10  # a feature's missing share rose by >= 10 pp: watch
    missing_act: float = 0.25  # ... by >= 25 pp: act
    # Approval-rate drift compares the latest month (with at least min_month_decisions) against
    # the reference: the share of training-window applications whose PD is within the approve
    # cut-off. Both sides are cut-off approval rates (PD <= approve_max_pd) so that knock-outs and
    # price caps, which the reference rows cannot replay, do not masquerade as drift.
    approval_watch: float = 0.10  # |latest - reference| >= 10 pp: watch
    approval_act: float = 0.20  # ... >= 20 pp: act
    min_month_decisions: int = 30  # months with fewer decisions are too noisy to judge


THRESHOLDS = Thresholds()
INFO = "info"
SOURCES = ("all", "live", "backfill")  # --source: every decision, or one source's
SNAPSHOT = "snapshot_"  # current_frame's per-family snapshot-time columns


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    verdict: str  # stable | watch | act | info
    detail: str


@dataclass
class MonitorResult:
    product: str
    since: dt.datetime | None
    until: dt.datetime | None
    decisions: int
    first_decision: dt.datetime
    last_decision: dt.datetime
    model_versions: list[str]
    reference: str  # e.g. kapok-microloan v1 (training window 2023-07..2024-05)
    reference_rows: int
    reference_pd: np.ndarray
    current_pd: np.ndarray
    score_psi: float
    stability: pl.DataFrame
    monthly: pl.DataFrame
    reference_approval: float
    approve_max_pd: float
    checks: list[Check]
    source: str = "all"  # the --source monitored
    by_source: dict[str, int] = field(default_factory=dict)  # decisions per source
    backtest_months: list[str] = field(default_factory=list)  # decision months back-tested
    excluded_months: list[str] = field(default_factory=list)  # development months left out
    excluded_outcomes: int = 0  # matured outcomes in those months
    history_start: dt.date | None = None  # the data's first month (review.lookback)
    history_source: str = "unknown"
    outcomes_source: str | None = None
    matched_outcomes: int = 0
    backtest: pl.DataFrame | None = None
    auc_periods: pl.DataFrame | None = None
    pooled_auc: float | None = None
    expected_auc: float | None = None
    notes: list[str] = field(default_factory=list)
    # credit officers' overrides of the window's referred decisions (serving/queue.py)
    overrides_by_grade: pl.DataFrame | None = None
    overrides_by_officer: pl.DataFrame | None = None

    @property
    def verdict(self) -> str:
        return bt.worst([c.verdict for c in self.checks])

    @property
    def alert(self) -> bool:
        return self.verdict == ACT


def missing_verdict(rise: float, t: Thresholds = THRESHOLDS) -> str:
    if rise >= t.missing_act:
        return ACT
    return WATCH if rise >= t.missing_watch else STABLE


def approval_verdict(change: float, t: Thresholds = THRESHOLDS) -> str:
    if abs(change) >= t.approval_act:
        return ACT
    return WATCH if abs(change) >= t.approval_watch else STABLE


def current_frame(
    log: DecisionLog,
    product: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
    features: list[str],
    categorical: list[str],
) -> pl.DataFrame:
    """Logged decisions in the window, one column per model feature (decoded from the log),
    their `source` (live / backfill) and, per feature family, the time of the snapshot the
    features came from where the log records it (`snapshot_<family>`, else null)."""
    from features.schema import FAMILIES
    from review.backfill import source

    raw = log.frame(
        since,
        until,
        product,
        columns=[
            "request_id",
            "decided_at",
            "caller",
            "feature_timestamps",
            "endpoint",
            "model_version",
            "pd",
            "grade",
            "decision",
            "features",
        ],
    )
    dtype = pl.Struct({f: pl.String if f in categorical else pl.Float64 for f in features})
    # live decisions record each family's snapshot time; a backfill records its point in time
    stamps = pl.Struct({fam.name: pl.String for fam in FAMILIES})
    return (
        raw.with_columns(
            source(),
            pl.col("features").str.json_decode(dtype),
            pl.col("feature_timestamps")
            .str.json_decode(stamps)
            .struct.rename_fields([f"{SNAPSHOT}{fam.name}" for fam in FAMILIES]),
        )
        .unnest("features", "feature_timestamps")
        .with_columns(
            pl.col(f"{SNAPSHOT}{fam.name}").str.to_datetime(time_zone="UTC", strict=False)
            for fam in FAMILIES
        )
        .drop("caller")
    )


def officer_overrides(log: DecisionLog, product: str, since: dt.datetime | None) -> pl.DataFrame:
    """The officers' override records of `product` decided since `since` (an override comes
    after its referral): the referral it decides (`overrides`), the officer, the decision."""
    frame = log.frame(since, None, product, columns=["request", "decision"], endpoints=["override"])
    return frame.select(
        pl.col("request").str.json_path_match("$.overrides").alias("overrides"),
        pl.col("request").str.json_path_match("$.officer").alias("officer"),
        pl.col("decision").alias("override"),
    )


def override_rates(
    current: pl.DataFrame, overrides: pl.DataFrame, by: str
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Of the window's referred decisions (`current`: request_id, grade, decision), how many an
    officer decided, approved and declined, by `by` ("grade" or "officer"): `override_rate` is
    the share of the referrals (of the grade; for an officer, of all of them) that were
    overridden, `approve_share` the share of those overrides that approve. Also the totals."""
    referred = current.filter(pl.col("decision") == "refer").select("request_id", "grade")
    joined = referred.join(overrides, left_on="request_id", right_on="overrides", how="left")
    done = pl.col("override").is_not_null()
    counts = [
        done.sum().alias("overridden"),
        (pl.col("override") == "approve").sum().alias("approved"),
        (pl.col("override") == "decline").sum().alias("declined"),
    ]
    totals = joined.select(pl.len().alias("referred"), *counts).row(0, named=True)
    if by == "grade":
        table = joined.group_by("grade").agg(pl.len().alias("referred"), *counts).sort("grade")
        table = table.with_columns(
            (pl.col("overridden") / pl.col("referred")).alias("override_rate")
        )
    else:
        share = pl.col("overridden") / max(totals["referred"], 1)
        table = joined.filter(done).group_by("officer").agg(*counts).sort("officer")
        table = table.with_columns(share.alias("override_rate"))
    table = table.with_columns(
        pl.when(pl.col("overridden") > 0)
        .then(pl.col("approved") / pl.col("overridden"))
        .otherwise(None)
        .alias("approve_share")
    )
    return table, totals


def snapshots(current: pl.DataFrame) -> dict[str, pl.Series]:
    """Per family, the snapshot time each decision recorded (null where it did not)."""
    return {c.removeprefix(SNAPSHOT): current[c] for c in current.columns if c.startswith(SNAPSHOT)}


def read_outcomes(path: Path) -> pl.DataFrame:
    """request_id, outcome (0/1) from parquet or CSV; rows without an outcome are dropped."""
    if not path.exists():
        raise FileNotFoundError(f"--outcomes: no such file {path}")
    frame = pl.read_csv(path) if path.suffix.lower() == ".csv" else pl.read_parquet(path)
    missing = [c for c in ("request_id", "outcome") if c not in frame.columns]
    if missing:
        raise ValueError(f"outcomes file {path} lacks column(s) {', '.join(missing)}")
    frame = frame.select(pl.col("request_id").cast(pl.String), pl.col("outcome").cast(pl.Int64))
    frame = frame.drop_nulls()
    bad = frame.filter(~pl.col("outcome").is_in([0, 1])).height
    if bad:
        raise ValueError(f"outcomes file {path}: outcome must be 0 or 1 ({bad} rows are not)")
    return frame.unique("request_id", keep="last")


def monthly(current: pl.DataFrame, approve_max_pd: float) -> pl.DataFrame:
    """Decisions, approval rate, cut-off approval rate and mean PD per source and month: a
    month of live decisions and a month of the backfilled history are never one row."""
    return (
        current.group_by("source", pl.col("decided_at").dt.strftime("%Y-%m").alias("month"))
        .agg(
            pl.len().alias("decisions"),
            (pl.col("decision") == "approve").mean().alias("approval_rate"),
            (pl.col("pd") <= approve_max_pd).mean().alias("cutoff_approval_rate"),
            pl.col("pd").mean().alias("mean_pd"),
        )
        .sort("source", "month")
    )


def monitor(
    paths: Paths,
    product: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    *,
    source: str = "all",
    outcomes: Path | None = None,
    log: DecisionLog | None = None,
    policy: pol.Policy | None = None,
    thresholds: Thresholds = THRESHOLDS,
) -> MonitorResult:
    from features.schema import PRODUCTS
    from review.backfill import outcomes_path
    from review.evidence import PD_COLUMN, TIME, load_evidence

    if product not in PRODUCTS:
        raise ValueError(f"--product must be one of {', '.join(PRODUCTS)}, got {product!r}")
    if source not in SOURCES:
        raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    log = log or DecisionLog()
    policy = policy or pol.load_policy()
    evidence = load_evidence(paths, product)
    features, categorical = evidence.features, evidence.categorical
    current = current_frame(log, product, since, until, features, categorical)
    if source != "all":
        current = current.filter(pl.col("source") == source)
    if current.height == 0:
        window = f"{since:%Y-%m-%d}" if since else "the beginning"
        window += f" .. {until - dt.timedelta(days=1):%Y-%m-%d}" if until else " .. now"
        which = "" if source == "all" else f" ({source} only)"
        raise ValueError(
            f"no {product} decisions{which} in the decision log {log.url} from {window}: nothing "
            f"to monitor (for simulated data, `kapok backfill --product {product}` first)"
        )
    reference = evidence.train
    t = thresholds
    checks: list[Check] = []
    notes: list[str] = []
    counts = current.group_by("source").len().sort("source")
    by_source = dict(zip(counts["source"].to_list(), counts["len"].to_list(), strict=True))
    if len(by_source) > 1:
        notes.append(
            f"{by_source.get('live', 0):,} live decisions (the API, `kapok decide`: dated when "
            f"they were made) and {by_source.get('backfill', 0):,} backfilled ones (dated by "
            "their application): the score, feature and back-test checks pool them, volume and "
            "approval rate are per source; --source live or --source backfill monitors one"
        )

    # score PSI
    score_psi = psi(reference[PD_COLUMN].to_numpy(), current["pd"].to_numpy())
    checks.append(
        Check(
            "score PSI",
            f"{score_psi:.4f}",
            verdict(score_psi),
            "logged PD vs the training reference's PD (deciles + missing)",
        )
    )

    # feature CSI and missing-rate drift, look-back features on whole windows only
    stability = feature_stability(
        Sample(reference, reference[TIME] if TIME in reference.columns else None),
        Sample(current, current["decided_at"], snapshots(current)),
        features,
        categorical,
        start=evidence.history_start,
    ).with_columns((pl.col("missing_current") - pl.col("missing_reference")).alias("missing_rise"))
    stability = stability.with_columns(
        pl.Series(
            "missing_verdict",
            [NA if r is None else missing_verdict(r, t) for r in stability["missing_rise"]],
            dtype=pl.String,
        )
    )
    judged = stability.filter(pl.col("csi").is_not_null())
    n_act = stability.filter(pl.col("verdict") == ACT).height
    n_watch = stability.filter(pl.col("verdict") == WATCH).height
    n_na = stability.filter(pl.col("verdict") == NA).height
    detail = f"{n_act} act, {n_watch} watch of {len(features)} features"
    if n_na:
        detail += f"; {n_na} n/a (too few rows with the whole look-back window)"
    if evidence.history_start is not None:
        detail += (
            f"; look-back features on whole windows (data from {evidence.history_start:%Y-%m})"
        )
    if judged.height:
        top = judged.row(0, named=True)
        checks.append(
            Check("feature CSI", f"{top['csi']:.4f} ({top['feature']})", top["verdict"], detail)
        )
    else:
        checks.append(Check("feature CSI", "–", NA, detail))
    worst_missing = stability.sort("missing_rise", descending=True, nulls_last=True).row(
        0, named=True
    )
    checks.append(
        Check(
            "missing-rate drift",
            "–"
            if worst_missing["missing_rise"] is None
            else f"{worst_missing['missing_rise']:+.1%} ({worst_missing['feature']})",
            worst_missing["missing_verdict"],
            f"rise of the missing share; watch >= {t.missing_watch:.0%}, "
            f"act >= {t.missing_act:.0%}",
        )
    )

    # approval rate and volume by month, each source on its own
    approve_max = policy.product(product).approve_max_pd
    reference_approval = float((reference[PD_COLUMN] <= approve_max).mean() or 0.0)
    months = monthly(current, approve_max)
    for name in sorted(by_source):
        own = months.filter(pl.col("source") == name)
        judged_months = own.filter(pl.col("decisions") >= t.min_month_decisions)
        if judged_months.height:
            last = judged_months.row(-1, named=True)
            change = last["cutoff_approval_rate"] - reference_approval
            checks.append(
                Check(
                    f"approval-rate drift ({name})",
                    f"{last['cutoff_approval_rate']:.1%} in {last['month']}",
                    approval_verdict(change, t),
                    f"PD <= {approve_max:.0%} share of the latest {name} month with "
                    f"{t.min_month_decisions}+ decisions vs reference {reference_approval:.1%} "
                    f"({change:+.1%}); watch >= {t.approval_watch:.0%}, "
                    f"act >= {t.approval_act:.0%}",
                )
            )
        else:
            checks.append(
                Check(
                    f"approval-rate drift ({name})",
                    "–",
                    INFO,
                    f"no {name} month with {t.min_month_decisions}+ decisions to judge",
                )
            )
        checks.append(
            Check(
                f"decision volume ({name})",
                f"{by_source[name]:,} in {own.height} months",
                INFO,
                f"latest {name} month {own['month'][-1]}: {own['decisions'][-1]:,}",
            )
        )

    # the officers' decisions on the window's referrals
    overrides = officer_overrides(log, product, since)
    by_grade, totals = override_rates(current, overrides, "grade")
    by_officer, _ = override_rates(current, overrides, "officer")
    referred = totals["referred"]
    checks.append(
        Check(
            "officer overrides",
            f"{totals['overridden']:,} of {referred:,} referred"
            + (f" ({totals['overridden'] / referred:.0%})" if referred else ""),
            INFO,
            f"{totals['approved']:,} approved, {totals['declined']:,} declined by "
            f"{by_officer.height} officer(s); {referred - totals['overridden']:,} still open"
            if referred
            else "no referred decision in the window",
        )
    )

    result = MonitorResult(
        product=product,
        since=since,
        until=until,
        decisions=current.height,
        first_decision=current["decided_at"].min(),
        last_decision=current["decided_at"].max(),  # type: ignore[arg-type]
        model_versions=sorted(current["model_version"].unique().to_list()),
        reference=f"{evidence.name} v{evidence.version} "
        f"(training window {evidence.windows.get('train', {}).get('window', '?')})",
        reference_rows=reference.height,
        reference_pd=reference[PD_COLUMN].to_numpy(),
        current_pd=current["pd"].to_numpy(),
        score_psi=score_psi,
        stability=stability,
        monthly=months,
        reference_approval=reference_approval,
        approve_max_pd=approve_max,
        checks=checks,
        source=source,
        by_source=by_source,
        history_start=evidence.history_start,
        history_source=evidence.history_source,
        notes=notes,
        overrides_by_grade=by_grade,
        overrides_by_officer=by_officer,
    )

    # back-test where outcomes have matured, outside the model's own development months
    outcomes_file = outcomes or outcomes_path(paths, product)
    if outcomes is None and not outcomes_file.exists():
        notes.append(f"no outcomes at {outcomes_file}: no back-test (give --outcomes FILE)")
        return result
    matured = read_outcomes(outcomes_file)
    joined = current.join(matured, on="request_id", how="inner").with_columns(
        pl.col("decided_at").dt.strftime("%Y-%m").alias("month")
    )
    result.outcomes_source = str(outcomes_file)
    if joined.height == 0:
        notes.append(
            f"no decision in the window has a matured outcome in {outcomes_file}: an outcome is "
            "known only a performance window after its decision; back-test an earlier window "
            "(--since and --until)"
        )
        return result
    development = bt.development_months(evidence.windows)
    left_out = joined.filter(pl.col("month").is_in(development))
    joined = joined.filter(~pl.col("month").is_in(development))
    result.matched_outcomes = joined.height
    result.excluded_months = sorted(left_out["month"].unique().to_list())
    result.excluded_outcomes = left_out.height
    result.backtest_months = sorted(joined["month"].unique().to_list())
    windows = evidence.windows
    developed = (
        f"training {windows.get('train', {}).get('window', '?')}, "
        f"validation {windows.get('valid', {}).get('window', '?')}"
    )
    if left_out.height:
        notes.append(
            f"back-test leaves out {left_out.height:,} matured outcomes of the model's own "
            f"development months {bt.month_spans(result.excluded_months)} ({developed}): the "
            "model was fitted, tuned and calibrated on them"
        )
    if joined.height == 0:
        notes.append(
            "every matured outcome in the window falls in the model's development months: no "
            "back-test (decisions after the validation window are needed)"
        )
        return result
    months_used = bt.month_spans(result.backtest_months)
    notes.append(f"back-test on {joined.height:,} matured outcomes decided in {months_used}")
    result.backtest = bt.grade_backtest(joined, policy.grades)
    b = result.backtest
    worst_grade = b.sort(
        pl.col("verdict").replace_strict(bt.SEVERITY, default=0),
        "p_value",
        descending=[True, False],
    ).row(0, named=True)
    checks.append(
        Check(
            "back-test by grade",
            f"{worst_grade['grade']}: observed {worst_grade['observed_rate']:.2%} "
            f"vs PD {worst_grade['predicted_pd']:.2%}",
            bt.worst(b["verdict"].to_list()),
            f"{joined.height:,} matured outcomes decided in {months_used} (development months "
            f"left out); exact binomial p = {worst_grade['p_value']:.3g}",
        )
    )
    result.auc_periods = bt.auc_by_period(joined)
    result.pooled_auc = bt.auc(joined["outcome"].to_numpy(), joined["pd"].to_numpy())
    result.expected_auc = evidence.metrics.get("test_auc")
    expected = result.expected_auc
    checks.append(
        Check(
            "AUC",
            f"{result.pooled_auc:.3f}",
            bt.auc_verdict(result.pooled_auc, expected),
            f"pooled back-test AUC ({months_used}) vs the model's test AUC "
            f"{'–' if expected is None else f'{expected:.3f}'}; watch at a drop of "
            f"{bt.AUC_WATCH_DROP}, act at {bt.AUC_ACT_DROP}",
        )
    )
    return result


# -- report --------------------------------------------------------------------------------------
def _score_figure(r: MonitorResult):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(7, 3.6))
    both = np.concatenate([r.reference_pd, r.current_pd])
    both = both[np.isfinite(both) & (both > 0)]
    bins = np.logspace(np.log10(max(both.min(), 1e-4)), np.log10(min(both.max(), 1)), 30)
    ax.hist(r.reference_pd, bins=bins, density=True, alpha=0.5, label="reference (training)")
    ax.hist(r.current_pd, bins=bins, density=True, alpha=0.5, label="current (decision log)")
    ax.axvline(r.approve_max_pd, color="k", linestyle="--", linewidth=1, label="approve cut-off")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("PD (log scale)")
    ax.set_ylabel("density")
    ax.set_title(f"Score distribution, PSI {r.score_psi:.3f}")
    ax.legend(fontsize=8)
    return fig


def _csi_figure(r: MonitorResult, rows: int = 15):
    import matplotlib.pyplot as plt

    top = r.stability.filter(pl.col("csi").is_not_null()).head(rows).reverse()
    fig, ax = plt.subplots(figsize=(7, 0.3 * top.height + 1.2))
    colors = [
        "#c0392b" if v == ACT else "#e0a030" if v == WATCH else "#2f6b4f" for v in top["verdict"]
    ]
    ax.barh(top["feature"].to_list(), top["csi"].to_list(), color=colors)
    for x in (0.1, 0.25):
        ax.axvline(x, color="#555", linestyle=":", linewidth=1)
    ax.set_xlabel("CSI (0.1 watch, 0.25 act)")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(f"Feature stability, top {top.height}")
    return fig


def _approval_figure(r: MonitorResult):
    import matplotlib.pyplot as plt

    m = r.monthly  # by source, then month: each source's months are a run of their own
    sources = m["source"].unique(maintain_order=True).to_list()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = np.arange(m.height)
    ax.bar(x, m["decisions"].to_list(), color="#c8d8cf", label="decisions")
    ax.set_ylabel("decisions per month")
    ticks = m["month"] if len(sources) == 1 else m["source"] + " " + m["month"]
    ax.set_xticks(x, ticks.to_list(), rotation=60, fontsize=7)
    ax2 = ax.twinx()
    for i, name in enumerate(sources):  # one line per source: no line joins two sources
        at = np.flatnonzero((m["source"] == name).to_numpy())
        part = m.filter(pl.col("source") == name)
        ax2.plot(at, part["approval_rate"].to_list(), "o-", color="#2f6b4f",
                 label="approval rate" if i == 0 else None)  # fmt: skip
        ax2.plot(at, part["cutoff_approval_rate"].to_list(), "s--", color="#b36b00",
                 label=f"PD <= {r.approve_max_pd:.0%}" if i == 0 else None)  # fmt: skip
    ax2.axhline(r.reference_approval, color="#b36b00", linestyle=":", label="reference at cut-off")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    ax.set_title(
        "Decision volume and approval rate by month" + (", per source" if len(sources) > 1 else "")
    )
    return fig


def _backtest_figure(b: pl.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(b.height)
    obs = b["observed_rate"].to_numpy()
    err = np.vstack([obs - b["ci_low"].to_numpy(), b["ci_high"].to_numpy() - obs])
    ax.errorbar(
        x,
        obs,
        yerr=err,
        fmt="o",
        color="#c0392b",
        capsize=3,
        label="observed default rate (95% exact CI)",
    )
    ax.plot(x, b["predicted_pd"].to_list(), "s", color="#2e6da4", label="mean predicted PD")
    ax.set_xticks(
        x, [f"{g}\n(n={n})" for g, n in zip(b["grade"], b["decisions"], strict=True)], fontsize=7
    )
    ax.set_ylabel("default rate")
    ax.set_title("Back-test by grade: predicted vs observed")
    ax.legend(fontsize=8)
    return fig


def _auc_figure(a: pl.DataFrame, expected: float | None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(a["period"].to_list(), a["auc"].to_list(), "o-", color="#2f6b4f", label="AUC")
    if expected is not None:
        ax.axhline(expected, color="#777", linestyle="--", label=f"test AUC {expected:.3f}")
    ax.set_ylim(0.4, 1.0)
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.set_ylabel("AUC")
    ax.set_title("Discrimination over time")
    ax.legend(fontsize=8)
    return fig


def _window_text(r: MonitorResult) -> str:
    return f"{r.first_decision:%Y-%m-%d} .. {r.last_decision:%Y-%m-%d}"


def render(r: MonitorResult) -> str:
    doc = Document(
        f"Monitoring: {r.product}",
        subtitle=f"{r.decisions:,} decisions {_window_text(r)} · reference {r.reference} · "
        f"overall verdict: {r.verdict}",
    )
    with doc.section("Summary", "概要"):
        rows = [
            {
                "check": c.name,
                "value": c.value,
                "verdict": c.verdict,
                "detail": c.detail,
                "act": c.verdict == ACT,
            }
            for c in r.checks
        ]
        doc.table(rows, highlight="act")
        doc.key_values(
            [
                ("decisions", r.decisions),
                ("window", _window_text(r)),
                ("model versions in the log", ", ".join(r.model_versions)),
                (
                    "source",
                    r.source
                    + " ("
                    + ", ".join(f"{n:,} {name}" for name, n in sorted(r.by_source.items()))
                    + ")",
                ),
                ("reference", f"{r.reference}, {r.reference_rows:,} rows"),
            ]
        )
        for note in r.notes:
            doc.note(note)
        doc.note(
            "Verdicts: PSI/CSI < 0.1 stable, 0.1-0.25 watch, >= 0.25 act; missing share rise "
            f">= {THRESHOLDS.missing_watch:.0%} watch, >= {THRESHOLDS.missing_act:.0%} act; "
            f"cut-off approval rate change >= {THRESHOLDS.approval_watch:.0%} watch, >= "
            f"{THRESHOLDS.approval_act:.0%} act; back-test p < {bt.P_WATCH} watch, p < "
            f"{bt.P_ACT} with more defaults than predicted act. The command exits 1 on any act."
        )
    with doc.section("Score stability", "评分稳定性"):
        doc.figure(
            _score_figure(r),
            "PD distribution, training reference vs logged decisions",
            name="score_distribution",
        )
    with doc.section("Feature stability and missing values", "特征稳定性与缺失率"):
        doc.figure(_csi_figure(r), "CSI of the least stable features", name="csi")
        doc.paragraph(lookback_note(r.history_start, r.history_source))
        flagged = r.stability.with_columns(
            ((pl.col("verdict") == ACT) | (pl.col("missing_verdict") == ACT)).alias("act")
        )
        doc.table(flagged, highlight="act")
    with doc.section("Approval rate and volume", "通过率与决策量"):
        doc.figure(
            _approval_figure(r),
            "Decisions per month, approval rate and cut-off approval rate against the reference",
            name="approval_volume",
        )
        doc.table(r.monthly)
    with doc.section("Officers' overrides of referred decisions", "信贷员对转人工决策的改判"):
        if r.overrides_by_grade is None or r.overrides_by_grade.height == 0:
            doc.paragraph("No decision in this window was referred to a credit officer.")
        else:
            doc.paragraph(
                "Of the window's referred decisions, the share an officer decided "
                "(override_rate) and, of those, the share approved (approve_share); by the "
                "model's grade, then by officer (override_rate: the officer's share of all the "
                "window's referrals)."
            )
            doc.table(r.overrides_by_grade)
            if r.overrides_by_officer is not None and r.overrides_by_officer.height:
                doc.table(r.overrides_by_officer)
    with doc.section("Back-test", "回溯测试"):
        if r.backtest is None:
            doc.paragraph(
                f"Every matured outcome in this window ({r.excluded_outcomes:,}) falls in the "
                f"model's development months ({bt.month_spans(r.excluded_months)}), which a "
                "back-test leaves out."
                if r.excluded_outcomes
                else "No matured outcomes were available for the decisions in this window."
            )
        else:
            doc.paragraph(
                f"{r.matched_outcomes:,} decisions with a matured outcome "
                f"(from {r.outcomes_source}), decided in {bt.month_spans(r.backtest_months)}."
            )
            if r.excluded_outcomes:
                doc.paragraph(
                    f"Left out: {r.excluded_outcomes:,} matured outcomes of the model's own "
                    f"development months ({bt.month_spans(r.excluded_months)}: its training and "
                    "validation windows). The model was fitted, tuned and calibrated on them, so "
                    "they would flatter it."
                )
            doc.figure(
                _backtest_figure(r.backtest),
                "Observed default rate with its 95% exact interval against the grade's mean PD",
                name="backtest",
            )
            doc.table(
                r.backtest.with_columns((pl.col("verdict") == ACT).alias("act")), highlight="act"
            )
            doc.note(
                "Two-sided exact binomial test of the grade's defaults against its mean PD "
                "(treats the grade as homogeneous; decisions inside a grade have different PDs, "
                "which makes the test slightly conservative)."
            )
            if r.auc_periods is not None:
                doc.heading("AUC over time", "区分度随时间变化")
                doc.figure(
                    _auc_figure(r.auc_periods, r.expected_auc),
                    "AUC of the logged PD against matured outcomes",
                    name="auc",
                )
                doc.table(r.auc_periods)
    return doc.render()


def default_out(paths: Paths, r: MonitorResult) -> Path:
    """reports/monitor-<product>-<date of the latest decision monitored>.html"""
    return paths.home / "reports" / f"monitor-{r.product}-{r.last_decision:%Y-%m-%d}.html"


def summary_rows(r: MonitorResult) -> list[dict[str, Any]]:
    return [
        {"check": c.name, "value": c.value, "verdict": c.verdict, "detail": c.detail}
        for c in r.checks
    ]

"""Back-test arithmetic: predicted PD against observed defaults, per grade and over time.

Pure functions over polars frames — no MLflow, no files — so that the numbers a reviewer signs
can be checked by hand. The binomial test treats a grade's decisions as draws with the grade's
mean PD (a conservative simplification of the Poisson-binomial with each decision's own PD).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import binomtest

STABLE, WATCH, ACT = "stable", "watch", "act"
P_WATCH = 0.05  # two-sided p below this: watch
P_ACT = 0.01  # ... below this, with more defaults than predicted: act
CI_LEVEL = 0.95  # exact (Clopper-Pearson) interval drawn around each observed rate
MIN_PERIOD_ROWS = 200  # AUC by month needs this many outcomes per month, else by quarter
AUC_WATCH_DROP = 0.05  # back-test AUC this far below the model's test AUC: watch
AUC_ACT_DROP = 0.10  # ... this far: act

SEVERITY = {STABLE: 0, WATCH: 1, ACT: 2}


def worst(verdicts: Sequence[str]) -> str:
    """The most severe of stable / watch / act (stable when there are none)."""
    known = [v for v in verdicts if v in SEVERITY]
    return max(known, key=SEVERITY.__getitem__) if known else STABLE


def binomial_verdict(p_value: float, observed_rate: float, predicted_rate: float) -> str:
    """p < 0.01 and observed above predicted -> act; p < 0.05 -> watch; else stable."""
    if p_value < P_ACT and observed_rate > predicted_rate:
        return ACT
    return WATCH if p_value < P_WATCH else STABLE


def grade_backtest(
    frame: pl.DataFrame, grades: Sequence[str] | None = None, pd: str = "pd", grade: str = "grade",
    outcome: str = "outcome",
) -> pl.DataFrame:  # fmt: skip
    """Per grade (in `grades` order, best first): decisions, defaults, mean predicted PD,
    observed default rate with its exact interval, two-sided exact binomial p-value, verdict."""
    stats = frame.group_by(grade).agg(
        pl.len().alias("decisions"),
        pl.col(outcome).cast(pl.Int64).sum().alias("defaults"),
        pl.col(pd).mean().alias("predicted_pd"),
    )
    order = list(grades) if grades is not None else sorted(stats[grade].to_list())
    rank = {g: i for i, g in enumerate(order)}
    rows = []
    for g, n, k, p in stats.iter_rows():
        result = binomtest(int(k), int(n), float(min(max(p, 1e-12), 1 - 1e-12)))
        ci = result.proportion_ci(confidence_level=CI_LEVEL, method="exact")
        observed = k / n
        rows.append({
            "grade": g, "decisions": int(n), "defaults": int(k), "predicted_pd": float(p),
            "observed_rate": observed, "ci_low": float(ci.low), "ci_high": float(ci.high),
            "p_value": float(result.pvalue),
            "verdict": binomial_verdict(result.pvalue, observed, p),
        })  # fmt: skip
    rows.sort(key=lambda r: (rank.get(r["grade"], len(rank)), r["grade"]))
    schema = {"grade": pl.String, "decisions": pl.Int64, "defaults": pl.Int64,
              "predicted_pd": pl.Float64, "observed_rate": pl.Float64, "ci_low": pl.Float64,
              "ci_high": pl.Float64, "p_value": pl.Float64, "verdict": pl.String}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula with ties averaged; NaN with one class."""
    from scipy.stats import rankdata

    y = np.asarray(labels, dtype=float)
    s = np.asarray(scores, dtype=float)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def period_of(frame: pl.DataFrame, time: str = "decided_at") -> str:
    """ "month" when the typical month has MIN_PERIOD_ROWS outcomes, else "quarter"."""
    if frame.height == 0:
        return "month"
    per_month = frame.group_by(pl.col(time).dt.strftime("%Y-%m")).len()["len"]
    return "month" if float(per_month.median() or 0) >= MIN_PERIOD_ROWS else "quarter"


def period_label(time: str, period: str) -> pl.Expr:
    col = pl.col(time)
    if period == "month":
        return col.dt.strftime("%Y-%m").alias("period")
    return (col.dt.year().cast(pl.String) + "-Q" + col.dt.quarter().cast(pl.String)).alias("period")


def auc_by_period(
    frame: pl.DataFrame, period: str | None = None, time: str = "decided_at", pd: str = "pd",
    outcome: str = "outcome",
) -> pl.DataFrame:  # fmt: skip
    """AUC of `pd` against `outcome` per month or quarter (chosen by period_of when None)."""
    period = period or period_of(frame, time)
    rows = []
    labelled = frame.with_columns(period_label(time, period))
    for (label,), part in labelled.group_by("period", maintain_order=True):
        y = part[outcome].cast(pl.Float64).to_numpy()
        rows.append({"period": label, "decisions": part.height, "defaults": int(y.sum()),
                     "auc": auc(y, part[pd].to_numpy())})  # fmt: skip
    schema = {"period": pl.String, "decisions": pl.Int64, "defaults": pl.Int64,
              "auc": pl.Float64}  # fmt: skip
    return pl.DataFrame(rows, schema=schema).sort("period")


DEVELOPMENT_PARTS = ("train", "valid")  # windows.json parts the model learned or was tuned on


def _months(first: str, last: str) -> list[str]:
    y, m = int(first[:4]), int(first[5:7])
    out = []
    while f"{y:04d}-{m:02d}" <= last:
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def development_months(windows: Mapping[str, Any]) -> list[str]:
    """The months (YYYY-MM) a model was developed on: its training and validation windows as
    training logged them in windows.json ("2023-07..2024-05"). Their outcomes are no test of
    the model — it was fitted, tuned, early-stopped and calibrated on them — so a back-test
    leaves them out. [] for a model validated by K-fold (no dated windows)."""
    months: list[str] = []
    for part in DEVELOPMENT_PARTS:
        window = str((windows.get(part) or {}).get("window", ""))
        found = re.fullmatch(r"(\d{4}-\d{2})\.\.(\d{4}-\d{2})", window)
        if found:
            months += _months(found[1], found[2])
    return sorted(set(months))


def month_spans(months: Sequence[str]) -> str:
    """Months as runs of consecutive ones: "2024-10..2024-12, 2025-02"; "none" when empty."""
    spans: list[list[str]] = []
    for month in sorted(set(months)):
        if spans and _months(spans[-1][-1], month)[1:] == [month]:
            spans[-1].append(month)
        else:
            spans.append([month])
    text = [s[0] if len(s) == 1 else f"{s[0]}..{s[-1]}" for s in spans]
    return ", ".join(text) or "none"


def auc_verdict(observed: float, expected: float | None) -> str:
    """Back-test AUC against the model's own test AUC: a drop of 0.05 watch, 0.10 act."""
    if expected is None or observed != observed:
        return STABLE
    drop = expected - observed
    if drop >= AUC_ACT_DROP:
        return ACT
    return WATCH if drop >= AUC_WATCH_DROP else STABLE

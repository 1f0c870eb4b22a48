"""The matplotlib figures of the model-risk report. Plot text is English only (no CJK fonts are
assumed); every function returns a Figure for `Document.figure`, which closes it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

GOOD_COLOUR, BAD_COLOUR, FLAG_COLOUR = "#2f6b4f", "#a40000", "#a40000"


def ks_curve(y: np.ndarray, score: np.ndarray, title: str) -> Figure:
    """Cumulative share of bads and of goods at or below each score (riskiest first), with the
    largest gap (KS) marked."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=float)
    order = np.argsort(score, kind="stable")
    s, yy = score[order], y[order]
    bad = np.cumsum(yy) / max(yy.sum(), 1)
    good = np.cumsum(1 - yy) / max((1 - yy).sum(), 1)
    gap = np.abs(bad - good)
    at = int(np.argmax(gap))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(s, bad, color=BAD_COLOUR, label="bads (cumulative share)")
    ax.plot(s, good, color=GOOD_COLOUR, label="goods (cumulative share)")
    ax.vlines(s[at], good[at], bad[at], colors="black", linestyles="--")
    ax.annotate(
        f"KS = {gap[at]:.3f} at score {s[at]:.0f}",
        (s[at], (bad[at] + good[at]) / 2),
        xytext=(8, 0),
        textcoords="offset points",
        fontsize=9,
    )
    ax.set(xlabel="score (points; low = risky)", ylabel="cumulative share", title=title)
    ax.legend(loc="lower right")
    return fig


def calibration_bars(table: pl.DataFrame, title: str) -> Figure:
    """Observed bad rate against mean predicted PD per decile, with Wilson 95% intervals; a
    decile whose mean PD falls outside its interval is drawn in red."""
    mean_pd = table["mean_pd"].to_numpy()
    rate = table["bad_rate"].to_numpy()
    lo, hi = table["wilson_low"].to_numpy(), table["wilson_high"].to_numpy()
    outside = ~table["within_interval"].to_numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = float(np.nanmax(np.concatenate([mean_pd, hi]))) * 1.1 or 1.0
    ax.plot([0, top], [0, top], "--", color="grey", label="perfect calibration")
    ax.errorbar(
        mean_pd,
        rate,
        yerr=[rate - lo, hi - rate],
        fmt="o",
        color=GOOD_COLOUR,
        capsize=3,
        label="decile: observed bad rate, 95% Wilson interval",
    )
    if outside.any():
        ax.plot(
            mean_pd[outside],
            rate[outside],
            "o",
            color=FLAG_COLOUR,
            label="mean PD outside the interval",
        )
    ax.set(
        xlim=(0, top),
        ylim=(0, top),
        xlabel="mean predicted PD",
        ylabel="observed bad rate",
        title=title,
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


def score_distribution(
    y: np.ndarray, score: np.ndarray, title: str, cutoffs: Mapping[str, float] | None = None
) -> Figure:
    """Histograms (density) of the score of goods and of bads, with the policy cut-offs."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=float)
    bins = np.linspace(np.nanmin(score), np.nanmax(score), 31)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.hist(
        score[y == 0],
        bins=bins,
        density=True,
        alpha=0.55,
        color=GOOD_COLOUR,
        label=f"goods (n={int((y == 0).sum()):,})",
    )
    ax.hist(
        score[y == 1],
        bins=bins,
        density=True,
        alpha=0.55,
        color=BAD_COLOUR,
        label=f"bads (n={int((y == 1).sum()):,})",
    )
    for label, value in (cutoffs or {}).items():
        ax.axvline(value, color="black", ls="--", lw=1)
        ax.annotate(
            label, (value, ax.get_ylim()[1] * 0.92), rotation=90, ha="right", va="top", fontsize=8
        )
    ax.set(xlabel="score (points)", ylabel="density", title=title)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def overlaid_distributions(samples: Mapping[str, np.ndarray], xlabel: str, title: str) -> Figure:
    """Histograms (density) of one variable in several samples, on common bins."""
    present = [np.asarray(v, dtype=float) for v in samples.values()]
    pooled = np.concatenate([v[~np.isnan(v)] for v in present])
    bins = np.linspace(pooled.min(), pooled.max(), 31) if pooled.size else 10
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, values in samples.items():
        v = np.asarray(values, dtype=float)
        ax.hist(
            v[~np.isnan(v)], bins=bins, density=True, alpha=0.5, label=f"{label} (n={len(v):,})"
        )
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=8)
    return fig


def roc_curves(y: np.ndarray, scores: Mapping[str, np.ndarray], title: str) -> Figure:
    """ROC curves of several models' PDs on the same rows."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, p in scores.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="random")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def calibration_curves(tables: Mapping[str, pl.DataFrame], title: str) -> Figure:
    """Observed bad rate against mean PD per decile, several models on the same rows."""
    fig, ax = plt.subplots(figsize=(5, 5))
    top = max(float(max(t["mean_pd"].max(), t["bad_rate"].max())) for t in tables.values()) * 1.1
    ax.plot([0, top], [0, top], "--", color="grey", label="perfect calibration")
    for label, t in tables.items():
        ax.plot(t["mean_pd"].to_numpy(), t["bad_rate"].to_numpy(), "o-", label=label)
    ax.set(
        xlim=(0, top),
        ylim=(0, top),
        xlabel="mean predicted PD",
        ylabel="observed bad rate",
        title=title,
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


# -- SHAP ----------------------------------------------------------------------------------------
def _explanation(values: np.ndarray, base: np.ndarray, data: np.ndarray, names: Sequence[str]):
    import shap  # imported here: it is only needed for these two plots

    return shap.Explanation(values=values, base_values=base, data=data, feature_names=list(names))


def shap_bar(
    values: np.ndarray, base: np.ndarray, data: np.ndarray, names: Sequence[str], top: int = 15
) -> Figure:
    """Mean |SHAP| per feature (shap.plots.bar)."""
    import shap

    fig = plt.figure(figsize=(8, 0.35 * top + 1.5))
    shap.plots.bar(_explanation(values, base, data, names), max_display=top, show=False)
    fig = plt.gcf()
    fig.suptitle("Mean |SHAP| (log-odds), top features", fontsize=11)
    return fig


def shap_beeswarm(
    values: np.ndarray, base: np.ndarray, data: np.ndarray, names: Sequence[str], top: int = 15
) -> Figure:
    """One dot per sampled application and feature: SHAP value, coloured by the feature's value
    (grey: missing or categorical)."""
    import shap

    plt.figure()
    shap.plots.beeswarm(
        _explanation(values, base, data, names),
        max_display=top,
        show=False,
        plot_size=(8, 0.35 * top + 1.5),
    )
    fig = plt.gcf()
    fig.suptitle("SHAP beeswarm (log-odds; right = riskier)", fontsize=11)
    return fig


@dataclass(frozen=True)
class Dependence:
    feature: str
    x: np.ndarray
    shap: np.ndarray
    expected: int  # the schema's risk direction: +1 higher value = riskier, -1 safer, 0 none
    learned: int  # sign of the Spearman correlation of value and SHAP (0 when weak)
    rho: float
    disagrees: bool


def _direction_text(sign: int) -> str:
    return {1: "+ (higher = riskier)", -1: "- (higher = safer)"}.get(sign, "none")


def dependence_grid(items: Sequence[Dependence], columns: int = 3) -> Figure:
    """SHAP against value for each feature; the title says the expected and the learned risk
    direction and turns red where they disagree."""
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, item in zip(axes.ravel(), items, strict=False):
        present = ~np.isnan(item.x)
        ax.scatter(item.x[present], item.shap[present], s=8, alpha=0.5, color=GOOD_COLOUR)
        ax.axhline(0, color="grey", lw=0.8)
        colour = FLAG_COLOUR if item.disagrees else "black"
        ax.set_title(
            f"{item.feature}\nexpected {_direction_text(item.expected)}; "
            f"learned {_direction_text(item.learned)} (rho {item.rho:+.2f})",
            fontsize=8,
            color=colour,
        )
        ax.set_xlabel(f"value ({int((~present).sum())} missing not shown)", fontsize=8)
        ax.set_ylabel("SHAP (log-odds)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(items) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig

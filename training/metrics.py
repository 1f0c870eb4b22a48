"""Discrimination, calibration and stability metrics a model-risk reviewer reads."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

EPS = 1e-6


def ks(y: np.ndarray, p: np.ndarray) -> float:
    """Kolmogorov-Smirnov: the largest gap between the cumulative score curves of bads and goods.

    The curves are compared at each distinct score only: rows with equal scores cannot be told
    apart, so a gap inside a run of ties (which depends on the rows' order) does not count.
    """
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    scores, y = p[order], np.asarray(y)[order]
    bad = np.cumsum(y) / max(y.sum(), 1)
    good = np.cumsum(1 - y) / max((1 - y).sum(), 1)
    last_of_run = np.append(scores[1:] != scores[:-1], True)
    return float(np.max(np.abs(bad - good)[last_of_run]))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-count bins of predicted PD, weighted by bin size.

    Rows with equal PDs stay in one bin (the bin of the first of them): split across two bins,
    the result would depend on the order of the rows.
    """
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    scores = p[order]
    ends = np.cumsum([len(c) for c in np.array_split(scores, bins)])  # equal-count bin ends
    first_of_run = np.searchsorted(scores, scores, side="left")
    which = np.searchsorted(ends, first_of_run, side="right")
    pd_sum = np.bincount(which, weights=scores, minlength=bins)
    bad_sum = np.bincount(which, weights=y[order], minlength=bins)
    return float(np.abs(pd_sum - bad_sum).sum() / len(p))


def calibration_line(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the logistic recalibration of y on logit(p): ideal 1 and 0."""
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    logit = np.log(p / (1 - p)).reshape(-1, 1)
    model = LogisticRegression(C=1e6, max_iter=1000).fit(logit, y)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `actual` against `expected`, deciles of `expected`."""
    expected, actual = np.asarray(expected, dtype=float), np.asarray(actual, dtype=float)
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1)
    e = np.maximum(e / e.sum(), 1e-4)
    a = np.maximum(a / a.sum(), 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    out: dict[str, float] = {
        "n": float(len(y)),
        "bad_rate": float(y.mean()),
        "mean_pd": float(p.mean()),
    }
    if 0 < y.sum() < len(y):
        auc = roc_auc_score(y, p)
        slope, intercept = calibration_line(y, p)
        out |= {
            "auc": float(auc),
            "gini": float(2 * auc - 1),
            "ks": ks(y, p),
            "brier": float(brier_score_loss(y, p)),
            "log_loss": float(log_loss(y, p, labels=[0, 1])),
            "ece": ece(y, p),
            "calibration_slope": slope,
            "calibration_intercept": intercept,
        }
    return out

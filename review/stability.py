"""Population stability: PSI of a score and CSI of each feature, with the usual verdicts.

Bins come from the reference (expected) sample: deciles for numbers, one bin per level for
categories, and missing values in a bin of their own, so that a feed going silent shows up.
The table of every feature, with look-back features compared on whole windows only, is
`review.lookback.feature_stability`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

STABLE, WATCH, ACT = "stable", "watch", "act"
WATCH_AT, ACT_AT = 0.1, 0.25
FLOOR = 1e-4  # share given to an empty bin so the log stays finite


def verdict(index: float) -> str:
    """< 0.1 stable, 0.1-0.25 watch, >= 0.25 act."""
    if index >= ACT_AT:
        return ACT
    return WATCH if index >= WATCH_AT else STABLE


def _index(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(expected / max(expected.sum(), 1), FLOOR)
    a = np.maximum(actual / max(actual.sum(), 1), FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def numeric_bins(
    expected: np.ndarray, actual: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of expected and actual per bin (decile edges of expected, then one missing bin)."""
    expected = np.asarray(expected, dtype=float)
    actual = np.asarray(actual, dtype=float)
    present = expected[~np.isnan(expected)]
    edges = (
        np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1]))
        if len(present)
        else np.array([])
    )

    def counts(values: np.ndarray) -> np.ndarray:
        missing = np.isnan(values)
        idx = np.searchsorted(edges, values[~missing], side="right")
        return np.append(np.bincount(idx, minlength=len(edges) + 1), missing.sum())

    return counts(expected), counts(actual), edges


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """PSI of a numeric variable of `actual` against `expected` (deciles of expected + missing)."""
    e, a, _ = numeric_bins(expected, actual, bins)
    return _index(e, a)


def categorical_psi(expected: list, actual: list) -> float:
    """PSI over the levels of a categorical variable (missing and unseen levels are levels too)."""
    exp = pl.Series("v", expected, dtype=pl.String).fill_null("(missing)")
    act = pl.Series("v", actual, dtype=pl.String).fill_null("(missing)")
    levels = sorted(set(exp.unique().to_list()) | set(act.unique().to_list()))
    ec = exp.value_counts().to_dict(as_series=False)
    ac = act.value_counts().to_dict(as_series=False)
    e_map = dict(zip(ec["v"], ec["count"], strict=True))
    a_map = dict(zip(ac["v"], ac["count"], strict=True))
    return _index(
        np.array([e_map.get(v, 0) for v in levels], dtype=float),
        np.array([a_map.get(v, 0) for v in levels], dtype=float),
    )


def csi(expected: pl.Series, actual: pl.Series, categorical: bool = False) -> float:
    """CSI of one feature: PSI over its levels when categorical, else over the expected
    sample's deciles (NaN counts as missing); missing values in a bin of their own."""
    if categorical:
        return categorical_psi(expected.cast(pl.String).to_list(), actual.cast(pl.String).to_list())
    return psi(
        expected.cast(pl.Float64).fill_nan(None).to_numpy(),
        actual.cast(pl.Float64).fill_nan(None).to_numpy(),
    )

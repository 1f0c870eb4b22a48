"""Traditional WOE + logistic-regression scorecard baselines (toad, optbinning) for the benchmark.
Both take a polars frame and return a `Fitted` whose `predict` maps rows to PD (P(bad)).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl
from sklearn.linear_model import LogisticRegression

from training.scorecard import quiet_libraries

__all__ = ["Fitted", "fit_optbinning", "fit_toad"]

NUMERIC_MISSING = -999999
"""toad sentinel for a missing numeric value; below every real value, so it bins on its own side."""
CATEGORICAL_MISSING = "MISSING"
"""toad category for a missing categorical value."""
MIN_IV = 0.02
"""Information-value floor used by both pipelines (the textbook 'useless predictor' cut-off)."""
_TARGET = "__target__"


@dataclass
class Fitted:
    name: str
    predict: Callable[[pl.DataFrame], np.ndarray]
    """PD (probability of bad) for rows with the same feature columns as the training frame."""
    fit_seconds: float
    selected: list[str]
    """Features kept in the final model."""


def _to_pandas(frame: pl.DataFrame, features: list[str], categorical: list[str]) -> pd.DataFrame:
    """Features as pandas: categoricals as object, numerics as float64; nulls become NaN."""
    cats = set(categorical)
    out = frame.select(
        [pl.col(f).cast(pl.String) if f in cats else pl.col(f).cast(pl.Float64) for f in features]
    ).to_pandas()
    for f in categorical:
        if f in out:
            out[f] = out[f].astype(object).where(out[f].notna(), np.nan)
    return out


def _label(frame: pl.DataFrame, label: str) -> np.ndarray:
    y = frame[label].cast(pl.Int64).to_numpy()
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"label column {label!r} must be 0/1 (1 = bad)")
    return y


def _toad_fill(x: pd.DataFrame, categorical: list[str]) -> pd.DataFrame:
    """toad's missing-value convention: a sentinel number / a 'MISSING' category."""
    x = x.copy()
    cats = [c for c in x.columns if c in set(categorical)]
    nums = [c for c in x.columns if c not in set(categorical)]
    if cats:
        x[cats] = x[cats].fillna(CATEGORICAL_MISSING)
    if nums:
        x[nums] = x[nums].fillna(NUMERIC_MISSING)
    return x


def fit_toad(
    train: pl.DataFrame, label: str, features: list[str], categorical: list[str], seed: int = 0
) -> Fitted:
    """The standard toad pipeline.

    1. `toad.selection.select`: drop features >90% empty, IV < 0.02, or |corr| > 0.7 (lower IV).
       Numerics are still NaN here so emptiness and (pairwise) correlation are measured honestly.
    2. `Combiner(method='chi', min_samples=0.05)` on sentinel-filled data (missing is its own value,
       merged with a neighbour only if chi-square says they behave alike or it is under 5%).
    3. `WOETransformer`, then drop features whose binned IV fell below 0.02 (e.g. one bin left).
    4. `toad.selection.stepwise(estimator='ols', direction='both', criterion='aic')`, with an
       intercept in the OLS (toad's default regresses the 0/1 target through the origin).
    5. `toad.ScoreCard` (combiner + WOE + lbfgs logistic regression); PD from its `predict_proba`.
    """
    import toad

    start = time.perf_counter()
    y = _label(train, label)
    x = _to_pandas(train, features, categorical)
    cats = [c for c in features if c in set(categorical)]
    with quiet_libraries():
        # 1. pre-selection; numerics keep NaN (a sentinel would hide them from the emptiness check
        # and distort the Pearson correlations), categoricals get the MISSING category they bin with
        pre = x.copy()
        if cats:
            pre[cats] = pre[cats].fillna(CATEGORICAL_MISSING)
        pre[_TARGET] = y
        pre = toad.selection.select(pre, target=_TARGET, empty=0.9, iv=MIN_IV, corr=0.7)
        kept = [c for c in features if c in pre.columns]

        # 2. chi-merge binning
        filled = _toad_fill(x[kept], categorical)
        combiner = toad.transform.Combiner()
        combiner.fit(filled.assign(**{_TARGET: y}), y=_TARGET, method="chi", min_samples=0.05)
        bins = combiner.transform(filled)

        # 3. WOE, and the post-binning IV check
        transer = toad.transform.WOETransformer()
        woe = transer.fit_transform(bins, y)
        kept = [c for c in kept if toad.stats.IV(bins[c].astype(str), y) >= MIN_IV]
        if not kept:
            raise ValueError("toad scorecard: no feature has a binned IV >= 0.02")

        # 4. stepwise selection on the WOE values
        step_in = woe[kept].assign(**{_TARGET: y})
        try:
            step_out = toad.selection.stepwise(
                step_in,
                target=_TARGET,
                estimator="ols",
                direction="both",
                criterion="aic",
                intercept=True,
            )
        except ValueError:
            # toad 0.1.7 raises if the intercept's own p-value is > 0.2 (it tries to remove the
            # 'intercept' term from the selected list); fall back to its default, no intercept
            step_out = toad.selection.stepwise(
                step_in, target=_TARGET, estimator="ols", direction="both", criterion="aic"
            )
        selected = [c for c in kept if c in step_out.columns] or kept

        # 5. the scorecard: logistic regression on the WOE values
        card = toad.ScoreCard(
            combiner=combiner,
            transer=transer,
            solver="lbfgs",
            max_iter=1000,
            random_state=seed,
        )
        card.fit(woe[selected], y)
    fit_seconds = time.perf_counter() - start

    def predict(frame: pl.DataFrame) -> np.ndarray:
        rows = _toad_fill(_to_pandas(frame, selected, categorical), categorical)
        with quiet_libraries():
            return np.asarray(card.predict_proba(rows)[:, 1], dtype=float)

    return Fitted("toad scorecard", predict, fit_seconds, selected)


def fit_optbinning(
    train: pl.DataFrame, label: str, features: list[str], categorical: list[str], seed: int = 0
) -> Fitted:
    """optbinning's `BinningProcess` (optimal binning per feature, monotonic trend chosen
    automatically, IV >= 0.02 selection) + `Scorecard` with lbfgs logistic regression.

    Missing and special values get their own bin and their *empirical* WOE (optbinning's default
    would score them as WOE 0, i.e. as an average applicant).
    """
    from optbinning import BinningProcess, Scorecard

    start = time.perf_counter()
    y = _label(train, label)
    x = _to_pandas(train, features, categorical)
    cats = [c for c in features if c in set(categorical)]
    with quiet_libraries():
        process = BinningProcess(
            variable_names=list(features),
            categorical_variables=cats,
            selection_criteria={"iv": {"min": MIN_IV}},
        )
        scorecard = Scorecard(
            binning_process=process,
            estimator=LogisticRegression(solver="lbfgs", max_iter=1000, random_state=seed),
            scaling_method="min_max",
            scaling_method_params={"min": 300, "max": 850},
        )
        scorecard.fit(x, y, metric_special="empirical", metric_missing="empirical")
        selected = [str(c) for c in scorecard.binning_process_.get_support(names=True)]
    fit_seconds = time.perf_counter() - start

    def predict(frame: pl.DataFrame) -> np.ndarray:
        rows = _to_pandas(frame, features, categorical)
        with quiet_libraries():
            return np.asarray(scorecard.predict_proba(rows)[:, 1], dtype=float)

    return Fitted("optbinning scorecard", predict, fit_seconds, selected)

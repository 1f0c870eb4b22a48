"""The WOE scorecard candidate: optbinning bins, logistic regression on weights of evidence,
points on the policy's score scale, and the same scorecard as a LightGBM Booster.

Fitting: optbinning's `BinningProcess` on the training rows, each numeric characteristic binned
monotone in the schema's risk direction (+1: the event rate ascends with the value; -1: it
descends; 0 and categoricals: optbinning's "auto"), characteristics with an information value
below MIN_IV left out; then a logistic regression of the bad flag on the WOE values. By
optbinning's convention a higher WOE means a safer bin, so every coefficient must be negative; a
characteristic whose coefficient is positive (it would score a safer bin as riskier, usually
because a correlated characteristic already carries its signal) is dropped, the most positive
first, and the regression refit until none is left. A scorecard a reviewer can read bin by bin
has to point every bin the way its WOE does.

Scoring: the log-odds of bad = intercept + sum of coefficient x WOE(bin). Bins are optbinning's
(bin i = [split i-1, split i), a value on a split in the bin above), missing values in the
missing bin with its empirical WOE; categoricals are binned on Kapok's category codes
(training.scorer.encode), so a category unseen at training is scored as missing, as the tuned
LightGBM model treats it too.

Serving: `booster()` compiles the scorecard into a LightGBM Booster (training.trees), one tree
per characteristic, whose TreeSHAP reference is the characteristic's best bin: a reason's
contribution is the log-odds the characteristic loses against its best bin.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import tomllib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import polars as pl
from sklearn.linear_model import LogisticRegression

from training.trees import Step, compile_steps

MIN_IV = 0.02  # the textbook "useless predictor" cut-off, as bench/scorecards.py uses
MAX_ITER = 1000


POLICY_FILE = Path(__file__).parents[1] / "serving" / "policy.toml"


def score_scale() -> tuple[float, float]:
    """(factor, offset) of the policy's score scale: score = offset + factor x ln(good:bad odds),
    factor = pdo / ln 2, offset = base_points - factor x ln(base_odds), as serving.policy.Scale
    computes them from the same [scale] table ($KAPOK_POLICY, else serving/policy.toml). Read
    here rather than imported: bench/ scripts run with bench/ first on sys.path, where
    bench/serving.py hides the serving package."""
    path = Path(os.environ.get("KAPOK_POLICY") or POLICY_FILE)
    scale = tomllib.loads(path.read_text())["scale"]
    factor = float(scale["pdo"]) / math.log(2.0)
    return factor, float(scale["base_points"]) - factor * math.log(float(scale["base_odds"]))


class ScorecardError(ValueError):
    """No characteristic survives binning and the sign check: there is no scorecard."""


@dataclass(frozen=True)
class Characteristic:
    feature: str
    index: int  # column in the model's feature order
    splits: list[float]  # bin i = [splits[i-1], splits[i]) on the encoded value
    woe: list[float]  # per bin; optbinning's sign: higher = safer
    missing_woe: float
    labels: list[str]  # per bin, as a reviewer reads it
    coefficient: float = 0.0

    def contributions(self) -> tuple[list[float], float]:
        """Log-odds of bad this characteristic adds, per bin and when missing."""
        return [self.coefficient * w for w in self.woe], self.coefficient * self.missing_woe

    def step(self) -> Step:
        """The characteristic's log-odds as a step function, referenced at its best bin."""
        values, missing = self.contributions()
        leaves = [*values, missing]
        best = int(np.argmin(leaves))
        return Step(self.index, self.splits, values, missing, -1 if best == len(values) else best)

    def woe_of(self, x: np.ndarray) -> np.ndarray:
        return Step(self.index, self.splits, self.woe, self.missing_woe, 0)(x)


@dataclass
class Scorecard:
    features: list[str]  # the model's feature order (every feature, used or not)
    characteristics: list[Characteristic]
    intercept: float
    dropped: dict[str, str] = field(default_factory=dict)  # feature -> why it is not in the card

    def log_odds(self, x: np.ndarray) -> np.ndarray:
        """The scorecard's own log-odds of bad for an encoded matrix (training.scorer.encode)."""
        out = np.full(len(x), self.intercept, dtype=float)
        for c in self.characteristics:
            out += c.coefficient * c.woe_of(x[:, c.index])
        return out

    def booster(self) -> lgb.Booster:
        """The same log-odds as a LightGBM Booster (training.trees)."""
        return compile_steps(
            [c.step() for c in self.characteristics], self.features, self.intercept
        )

    def steps(self) -> list[Step]:
        return [c.step() for c in self.characteristics]

    def points(self, factor: float, offset: float, weight: float = 1.0) -> pl.DataFrame:
        """The points table on a score scale (score = offset + factor x ln(good:bad odds)).

        One row per characteristic and bin, plus the base points: a bin's points are
        -factor x weight x coefficient x WOE, the base -factor x weight x intercept + offset,
        so an applicant's points add up to the scale's score of weight x the scorecard's
        log-odds (weight < 1 in a blend, whose other part adds its own log-odds). points_lost
        is what the bin costs against the characteristic's best bin: the reason's size."""
        rows = [
            {
                "characteristic": "(base points)",
                "bin": "",
                "woe": None,
                "coefficient": self.intercept,
                "log_odds": weight * self.intercept,
                "points": offset - factor * weight * self.intercept,
                "points_lost": 0.0,
            }
        ]
        for c in self.characteristics:
            values, missing = c.contributions()
            best = min([*values, missing])
            bins = [*zip(c.labels, c.woe, values, strict=True), ("missing", c.missing_woe, missing)]
            for label, woe, value in bins:
                rows.append(
                    {
                        "characteristic": c.feature,
                        "bin": label,
                        "woe": woe,
                        "coefficient": c.coefficient,
                        "log_odds": weight * value,
                        "points": -factor * weight * value,
                        "points_lost": factor * weight * (value - best),
                    }
                )
        return pl.DataFrame(rows, schema_overrides={"woe": pl.Float64})


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """optbinning, ortools, toad and sklearn print and warn; output stays readable (also used by
    bench/scorecards.py)."""
    sink = io.StringIO()
    with (
        warnings.catch_warnings(),
        np.errstate(all="ignore"),
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("ignore")
        yield


def _trend(direction: int) -> str:
    return {1: "ascending", -1: "descending"}.get(direction, "auto")


def _pandas(frame: pl.DataFrame, features: list[str], categorical: set[str]) -> pd.DataFrame:
    out = frame.select(
        [pl.col(f).cast(pl.String if f in categorical else pl.Float64) for f in features]
    ).to_pandas()
    for f in features:
        if f in categorical:
            out[f] = out[f].astype(object).where(out[f].notna(), np.nan)
    return out


def _numeric(name: str, index: int, binning: object) -> Characteristic:
    splits = [float(s) for s in binning.splits]  # type: ignore[attr-defined]
    probes = np.array([-np.inf, *splits, np.nan], dtype=float)  # one per bin, then missing
    woe = binning.transform(  # type: ignore[attr-defined]
        probes, metric="woe", metric_missing="empirical", metric_special="empirical"
    )
    edges = ["-inf", *(f"{s:g}" for s in splits), "inf"]
    labels = [f"[{a}, {b})" for a, b in itertools.pairwise(edges)]
    return Characteristic(name, index, splits, [float(w) for w in woe[:-1]], float(woe[-1]), labels)


def _categorical(name: str, index: int, binning: object, levels: list[str]) -> Characteristic:
    """Bins over the category codes 0..K-1 (sorted levels): runs of codes with the same WOE
    share a bin."""
    probes = np.array([*levels, np.nan], dtype=object)
    woe = binning.transform(  # type: ignore[attr-defined]
        probes, metric="woe", metric_missing="empirical", metric_special="empirical"
    )
    per_level, missing = [float(w) for w in woe[:-1]], float(woe[-1])
    if not per_level:
        return Characteristic(name, index, [], [missing], missing, ["(no category)"])
    splits, values, labels = [], [per_level[0]], [[levels[0]]]
    for code in range(1, len(levels)):
        if per_level[code] == values[-1]:
            labels[-1].append(levels[code])
        else:
            splits.append(float(code))
            values.append(per_level[code])
            labels.append([levels[code]])
    return Characteristic(name, index, splits, values, missing, [", ".join(g) for g in labels])


def fit_scorecard(
    frame: pl.DataFrame,
    y: np.ndarray,
    x: np.ndarray,
    features: list[str],
    categories: dict[str, list[str]],
    directions: dict[str, int],
    seed: int = 7,
) -> Scorecard:
    """Fit a scorecard on these rows; `x` is their encoded matrix (training.scorer.encode)."""
    from optbinning import BinningProcess

    y = np.asarray(y).astype(int)
    categorical = set(categories)
    usable = [f for f in features if frame[f].null_count() < frame.height]
    dropped = {f: "no value in the training rows" for f in features if f not in usable}
    with quiet_libraries():
        process = BinningProcess(
            variable_names=usable,
            categorical_variables=[f for f in usable if f in categorical],
            selection_criteria={"iv": {"min": MIN_IV}},
            binning_fit_params={
                f: {"monotonic_trend": _trend(directions.get(f, 0))}
                for f in usable
                if f not in categorical
            },
        )
        process.fit(_pandas(frame, usable, categorical), y)
        selected = {str(n) for n in process.get_support(names=True)}
        chars = []
        for f in usable:
            if f not in selected:
                dropped[f] = f"information value below {MIN_IV}"
                continue
            binning = process.get_binned_variable(f)
            i = features.index(f)
            if f in categorical:
                chars.append(_categorical(f, i, binning, categories[f]))
            else:
                chars.append(_numeric(f, i, binning))
    for c in chars:
        if len({*c.woe, c.missing_woe}) == 1:
            dropped[c.feature] = "a single bin: it cannot tell applicants apart"
    chars = [c for c in chars if c.feature not in dropped]
    woe = np.column_stack([c.woe_of(x[:, c.index]) for c in chars]) if chars else None
    keep = list(range(len(chars)))
    while keep:
        model = LogisticRegression(max_iter=MAX_ITER, random_state=seed)
        model.fit(woe[:, keep], y)  # type: ignore[index]
        coef = model.coef_[0]
        worst = int(np.argmax(coef))
        if coef[worst] <= 0:
            break
        dropped[chars[keep[worst]].feature] = (
            f"wrong sign: coefficient {coef[worst]:+.4f} would score safer bins as riskier"
        )
        del keep[worst]
    if not keep:
        raise ScorecardError("no characteristic survives binning and the coefficient-sign check")
    fitted = [replace(chars[k], coefficient=float(coef[j])) for j, k in enumerate(keep)]
    return Scorecard(list(features), fitted, float(model.intercept_[0]), dropped)

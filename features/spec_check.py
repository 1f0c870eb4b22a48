"""What `kapok data check-spec` warns about in a bring-your-own-data frame: feature columns that
load fine but would hurt or fool a model.

* nearly empty: at least 99% of the rows missing (null, or NaN);
* constant: one value in every row that has one;
* id-like: unique per row (a text or integer column), or named like an id: a model can only
  memorise it, and it says nothing about a new applicant;
* dates as text: a CSV date column read as a category cannot generalise to new dates;
* a leak: the column alone separates bad from good almost perfectly (AUC >= 0.98, either
  direction), which real predictors never do; usually it was recorded after the outcome.

Warnings only: the spec still loads and trains. The AUC of a text column is that of its
categories' bad rates, each row scored with rates from the other half of the rows (so a column
with a new value per row scores 0.5, not 1); missing values count as one more value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl

from features.spec import LABEL, DatasetSpec

__all__ = ["ColumnWarning", "column_warnings", "single_column_auc"]

NEARLY_EMPTY = 0.99
LEAK_AUC = 0.98
MIN_ROWS_UNIQUE = 20  # fewer rows than this: "unique per row" says nothing
ID_WORDS = {"id", "ids", "uuid", "guid"}


@dataclass(frozen=True)
class ColumnWarning:
    column: str
    kind: str  # "nearly empty", "constant", "id-like", "dates as text", "leak"
    detail: str

    def __str__(self) -> str:
        return f"{self.column}: {self.kind}: {self.detail}"


def _words(name: str) -> set[str]:
    """The words of a column name: `customerID`, `loan_Id`, `ID-2` -> {customer, id}, ..."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", spaced)
    return {w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[A-Za-z])(?=[0-9])", spaced) if w}


def _missing(col: pl.Series) -> pl.Series:
    missing = col.is_null()
    if col.dtype.is_float():
        missing = missing | col.is_nan().fill_null(True)
    return missing


def _dates(text: pl.Series) -> bool:
    """Every value parses as a date or datetime (the format polars infers from the values)."""
    try:
        return text.str.to_datetime(strict=False).null_count() == 0
    except pl.exceptions.PolarsError:  # no date format fits the first values
        return False


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC of `score` for y = 1 (ties count half)."""
    ranks = pl.Series(score).rank("average").to_numpy()
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return 0.5
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def single_column_auc(col: pl.Series, y: np.ndarray, categorical: bool, seed: int = 0) -> float:
    """How well the column alone separates the classes: max(AUC, 1 - AUC), in [0.5, 1]."""
    if categorical or col.dtype in (pl.String, pl.Categorical, pl.Boolean):
        values = col.cast(pl.String).fill_null("\0missing").to_numpy()
        half = np.random.default_rng(seed).random(len(values)) < 0.5
        score = np.empty(len(values))
        for part in (half, ~half):
            other = pl.DataFrame({"v": values[~part], "y": y[~part]})
            rates = dict(other.group_by("v").agg(pl.col("y").mean()).iter_rows())
            prior = float(y[~part].mean()) if (~part).any() else 0.5
            score[part] = [rates.get(v, prior) for v in values[part]]
        auc = _auc(score, y)
        return max(auc, 1 - auc)
    x = col.cast(pl.Float64)
    missing = _missing(x).to_numpy()
    x = x.fill_nan(None).to_numpy().astype(float)
    best = 0.5
    if missing.all():
        return best
    low, high = np.nanmin(x) - 1, np.nanmax(x) + 1
    for fill in (low, high):  # missing as the lowest value, then as the highest
        auc = _auc(np.where(missing, fill, x), y)
        best = max(best, auc, 1 - auc)
    return best


def column_warnings(spec: DatasetSpec, frame: pl.DataFrame) -> list[ColumnWarning]:
    """The warnings for each feature of `spec` in `frame` (as `load_dataset` returns it)."""
    y = frame[LABEL].to_numpy().astype(int)
    rows = frame.height
    out: list[ColumnWarning] = []
    for feature in spec.features:
        name = feature.name
        col = frame[name]
        n_missing = int(_missing(col).sum())
        present = col.filter(~_missing(col))
        if rows and n_missing / rows >= NEARLY_EMPTY:
            out.append(
                ColumnWarning(
                    name,
                    "nearly empty",
                    f"{n_missing / rows:.2%} missing ({n_missing:,} of {rows:,} rows)",
                )
            )
        elif present.len() and present.n_unique() == 1:  # (nearly empty says enough)
            out.append(
                ColumnWarning(
                    name,
                    "constant",
                    f"the one value {present[0]!r} in every row that has a value",
                )
            )
        integer_or_text = col.dtype.is_integer() or col.dtype in (pl.String, pl.Categorical)
        if integer_or_text and rows >= MIN_ROWS_UNIQUE and present.n_unique() == rows:
            out.append(
                ColumnWarning(
                    name,
                    "id-like",
                    f"unique per row ({rows:,} distinct values in {rows:,} rows): exclude it, "
                    f"or declare it as the id",
                )
            )
        elif _words(name) & ID_WORDS:
            out.append(
                ColumnWarning(
                    name,
                    "id-like",
                    f"named like an id ({present.n_unique():,} distinct values): exclude it "
                    f"unless it is a real attribute",
                )
            )
        if col.dtype == pl.String and present.len() and _dates(present):
            out.append(
                ColumnWarning(
                    name,
                    "dates as text",
                    f"every value reads as a date (e.g. {present[0]!r}); as a category it "
                    f"cannot generalise to new dates: exclude it or derive a number from it",
                )
            )
        if present.len() and present.n_unique() > 1:
            auc = single_column_auc(col, y, feature.categorical)
            if auc >= LEAK_AUC:
                out.append(
                    ColumnWarning(
                        name,
                        "leak",
                        f"on its own it separates bad from good with AUC {auc:.4f} (>= "
                        f"{LEAK_AUC}): is it recorded after the outcome? exclude it if so",
                    )
                )
    return out

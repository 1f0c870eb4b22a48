"""Point-in-time PD levels from the published credit aggregates, against today's through-the-cycle
level (issue 13, item 3), on one trained home: does a level model beat the long-run level on the
most recent out-of-time window?

    KAPOK_HOME=/tmp/h-pit/home10k nice -n 19 .venv/bin/python bench/pit.py
    .venv/bin/python bench/pit.py --home /tmp/h-pit/home10k --products microloan

The home must hold a simulated system with the `credit_aggregates` raw table, feature tables,
a Feast registry and an @champion per product (`kapok run` builds all of that). Nothing is
retrained: every variant keeps the champion's ranking and calibration shape and moves only the
level, by a log-odds shift added to today's PD (the through-the-cycle PD, "TTC": calibration
shape on the validation window, level at the long-run default rate of the development months).

Variants, each scored on the test window (the most recent matured months, as training reports):

* `ttc`: today's PD (a).
* `level model (...)`: TTC shifted by offset = b0 + b1·z(level) [+ b2·z(change)], where level is
  the logit of the 30+ (or 90+) dpd rate of the latest aggregate month published at the decision
  date (the 25th of the next month) and change its difference with the month k before; z against
  the months published by the end of the development window. `cohort WLS` fits the offsets of
  the development months' cohorts (logit of the month's bad rate minus logit of the long-run
  rate, weighted by the cohort's size) on the cohort means of z (b); `GLM` fits the Bernoulli
  likelihood of the development rows with logit(TTC PD) as an offset (so the model's own view of
  each applicant is not counted twice); `city` uses the city's series, `industry` / `district`
  the applicant's segment's own series (c).
* `structural`: b fitted on the mean aggregate over each development cohort's outcome window
  (known once the cohort matured), applied with the latest published level as the forecast of
  that mean (persistence) (c).
* `valid level`: the level of the validation window's bad rate (what the previous attempt did).
* `oracle level`: TTC shifted so that its mean equals the test window's bad rate (d): the floor
  of any level that is one number for the window; `oracle by month`: one shift per test month.

Printed per product: the windows, then per variant the mean PD (against the observed bad rate),
ECE (10 equal-count bins, training.metrics.ece) and the fitted coefficients; then per test month
the rows, bad rate, the decision-time z and each variant's mean PD.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.raw_tables import CITY_SEGMENT, read_manifest, scan
from kapok.settings import Paths
from training.data import LABEL, TIME, product_data
from training.metrics import ece
from training.pyfunc import load_scorer
from training.tracking import CHAMPION, alias_version, configure, model_name

EPS = 1e-4
SHOWN_BY_MONTH = ("ttc", "level", "structural:", "oracle")  # first words of the variants shown


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, dtype=float)))


def shifted(p: np.ndarray, offset: np.ndarray | float) -> np.ndarray:
    return sigmoid(logit(p) + offset)


def level_shift(p: np.ndarray, target: float) -> float:
    """The one log-odds shift that makes the mean of `p` equal `target` (bisection)."""
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shifted(p, mid).mean() < target else (lo, mid)
    return (lo + hi) / 2


# -- the aggregates at the decision date ---------------------------------------------------------
def aggregate_series(raw: Path, measure: str) -> pl.DataFrame:
    """Every published aggregate month as a log-odds level (0.5 added to the arrears and 1 to
    the reports, so that a small segment with no arrears has a finite level)."""
    return (
        scan(raw, "credit_aggregates")
        .collect()
        .select(
            "dimension",
            "segment",
            "month",
            "available_at",
            x=((pl.col(f"{measure}_reports") + 0.5) / (pl.col("reports") + 1)).pipe(
                lambda r: (r / (1 - r)).log()
            ),
        )
        .sort("dimension", "segment", "month")
    )


def at_decision(
    apps: pl.DataFrame, series: pl.DataFrame, dimension: str, change_months: int
) -> pl.DataFrame:
    """Per application (in `apps` order): the level of the latest aggregate month published at
    its decision date, for its segment of `dimension`, and its change over `change_months`."""
    column = {"city": None, "district": "district", "industry": "industry"}[dimension]
    keyed = apps.select(
        pl.int_range(pl.len()).alias("row"),
        TIME,
        segment=pl.lit(CITY_SEGMENT) if column is None else pl.col(column),
    ).sort(TIME)
    own = series.filter(pl.col("dimension") == dimension).drop("dimension")
    latest = keyed.join_asof(
        own.sort("available_at"), left_on=TIME, right_on="available_at", by="segment"
    )
    before = own.select(
        "segment",
        pl.col("month").dt.offset_by(f"{change_months}mo").alias("month"),
        x_before=pl.col("x"),
    )
    return (
        latest.join(before, on=["segment", "month"], how="left")
        .with_columns(change=pl.col("x") - pl.col("x_before"))
        .sort("row")
        .select("segment", "month", "x", "change")
    )


def reference(
    series: pl.DataFrame, dimension: str, until: object, change_months: int
) -> pl.DataFrame:
    """Mean and spread of each segment's level and change over the months published by `until`
    (the last development decision): what a z of the decision-time values is measured against."""
    own = (
        series.filter((pl.col("dimension") == dimension) & (pl.col("available_at") <= until))
        .sort("segment", "month")
        .with_columns(change=pl.col("x") - pl.col("x").shift(change_months).over("segment"))
    )
    return own.group_by("segment").agg(
        x_mean=pl.col("x").mean(),
        x_sd=pl.col("x").std(),
        change_mean=pl.col("change").mean(),
        change_sd=pl.col("change").std(),
    )


def zscores(values: pl.DataFrame, ref: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    joined = values.join(ref, on="segment", how="left", maintain_order="left")
    z1 = ((joined["x"] - joined["x_mean"]) / joined["x_sd"]).fill_null(0).to_numpy()
    z2 = ((joined["change"] - joined["change_mean"]) / joined["change_sd"]).fill_null(0)
    return np.nan_to_num(z1), np.nan_to_num(z2.to_numpy())


# -- fitting the level model ---------------------------------------------------------------------
def fit_cohort_wls(month: np.ndarray, y: np.ndarray, z: np.ndarray, long_run: float) -> np.ndarray:
    """b of offset_m = b·[1, z̄_m]: each development month's cohort offset (logit of its bad rate,
    clipped to half a bad, minus logit of the long-run rate) on its mean z, weighted by size."""
    months = np.unique(month)
    rows, target, weight = [], [], []
    for m in months:
        sel = month == m
        n, bad = sel.sum(), y[sel].sum()
        rate = np.clip(bad / n, 0.5 / n, 1 - 0.5 / n)
        rows.append([1.0, *z[sel].mean(axis=0)])
        target.append(float(logit(rate) - logit(long_run)))
        weight.append(float(n))
    x, t, w = np.array(rows), np.array(target), np.array(weight)
    xtw = x.T * w
    return np.linalg.solve(xtw @ x + 1e-9 * np.eye(x.shape[1]), xtw @ t)


def fit_glm_offset(y: np.ndarray, z: np.ndarray, p_base: np.ndarray) -> np.ndarray:
    """b maximising the Bernoulli likelihood of y under sigmoid(logit(p_base) + b·[1, z])."""
    x = np.column_stack([np.ones(len(y)), z])
    off = logit(p_base)
    b = np.zeros(x.shape[1])
    for _ in range(50):
        p = sigmoid(off + x @ b)
        grad = x.T @ (y - p)
        hess = (x.T * (p * (1 - p))) @ x + 1e-6 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        b += step
        if np.abs(step).max() < 1e-10:
            break
    return b


# -- one product ---------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    pd: np.ndarray  # on every row
    coefficients: str = ""


def window_mean(month_index: np.ndarray, window: np.ndarray, city: np.ndarray) -> np.ndarray:
    """Mean of the city's monthly level over months t+1 .. t+W of each application (the outcome
    window), from the series indexed by month index; months past the series are left out."""
    cs = np.concatenate([[0.0], np.cumsum(city)])
    lo = np.clip(month_index + 1, 0, len(city))
    hi = np.clip(month_index + window + 1, 0, len(city))
    return (cs[hi] - cs[lo]) / np.maximum(hi - lo, 1)


def product_variants(paths: Paths, product: str) -> None:
    data = product_data(paths, product)
    frame = data.frame
    split = data.split()
    client = configure(paths)
    name = model_name(product)
    version = alias_version(client, name, CHAMPION)
    scorer = load_scorer(f"models:/{name}/{version}")  # bench/serving.py hides serving/ here
    p_ttc = scorer.pd(frame)
    y = frame[LABEL].to_numpy().astype(float)
    dev = np.concatenate([split.train, split.valid])
    test = split.test
    long_run = float(y[dev].mean())

    raw = paths.raw
    manifest = read_manifest(raw)
    start = np.datetime64(manifest["start"], "M")
    apps = (
        frame.select("application_id", "enterprise_id", TIME)
        .join(
            scan(raw, "registration").select("enterprise_id", "district", "industry").collect(),
            on="enterprise_id",
            how="left",
            maintain_order="left",
        )
        .join(
            scan(raw, "applications").select("application_id", "outcome_window_months").collect(),
            on="application_id",
            how="left",
            maintain_order="left",
        )
    )
    month = frame[TIME].dt.truncate("1mo").dt.date().to_numpy().astype("datetime64[M]")
    month_index = (month - start).astype(int)
    until = frame[TIME].gather(dev).max()  # the last development decision

    variants = [Variant("ttc (a)", p_ttc, f"level {long_run:.4f}")]
    diagnostics: dict[str, np.ndarray] = {}

    def level_model(
        label: str, dimension: str, measure: str, k: int, fit: str, use_change: bool = True
    ) -> None:
        series = aggregate_series(raw, measure)
        values = at_decision(apps, series, dimension, k)
        z1, z2 = zscores(values, reference(series, dimension, until, k))
        z = np.column_stack([z1, z2]) if use_change else z1[:, None]
        if fit == "cohort WLS":
            b = fit_cohort_wls(month_index[dev], y[dev], z[dev], long_run)
        else:
            b = fit_glm_offset(y[dev], z[dev], p_ttc[dev])
        offset = np.column_stack([np.ones(len(y)), z]) @ b
        names = ["b0", "b1", "b2"][: len(b)]
        coef = ", ".join(f"{n} {v:+.3f}" for n, v in zip(names, b, strict=True))
        variants.append(Variant(label, shifted(p_ttc, offset), coef))
        if dimension == "city" and measure == "dpd30" and k == 3 and not diagnostics:
            diagnostics["z level"], diagnostics["z change"] = z1, z2

    level_model("level model (b): city dpd30, level + 3m change, cohort WLS",
                "city", "dpd30", 3, "cohort WLS")  # fmt: skip
    level_model("city dpd30, level only, cohort WLS", "city", "dpd30", 3, "cohort WLS", False)
    level_model("city dpd30, level + 6m change, cohort WLS", "city", "dpd30", 6, "cohort WLS")
    level_model("city dpd90, level + 3m change, cohort WLS", "city", "dpd90", 3, "cohort WLS")
    level_model("city dpd30, level + 3m change, GLM", "city", "dpd30", 3, "GLM")
    level_model("city dpd30, level only, GLM", "city", "dpd30", 3, "GLM", False)
    level_model("industry dpd30, level + 3m change, GLM", "industry", "dpd30", 3, "GLM")
    level_model("district dpd30, level + 3m change, GLM", "district", "dpd30", 3, "GLM")

    # structural: the outcome-window mean of the city level explains the development cohorts
    series = aggregate_series(raw, "dpd30")
    city = series.filter(pl.col("dimension") == "city").sort("month")
    city_index = (city["month"].to_numpy().astype("datetime64[M]") - start).astype(int)
    city_x = np.full(int(city_index.max()) + 1, np.nan)
    city_x[city_index] = city["x"].to_numpy()
    ref = reference(series, "city", until, 3)
    mu, sd = float(ref["x_mean"][0]), float(ref["x_sd"][0])
    filled = np.where(np.isnan(city_x), mu, city_x)
    z_window = (
        window_mean(month_index, apps["outcome_window_months"].to_numpy(), filled) - mu
    ) / sd
    b = fit_cohort_wls(month_index[dev], y[dev], z_window[dev][:, None], long_run)
    z_now = diagnostics["z level"]
    variants.append(
        Variant(
            "structural: window-mean fit, latest level as forecast",
            shifted(p_ttc, b[0] + b[1] * z_now),
            f"b0 {b[0]:+.3f}, b1 {b[1]:+.3f}",
        )
    )
    diagnostics["z window (ex post)"] = z_window

    valid_rate = float(y[split.valid].mean())
    variants.append(
        Variant(
            "valid level (previous attempt's level)",
            shifted(p_ttc, level_shift(p_ttc[split.valid], valid_rate)),
            f"level {valid_rate:.4f}",
        )
    )
    s = level_shift(p_ttc[test], float(y[test].mean()))
    variants.append(Variant("oracle level (d)", shifted(p_ttc, s), f"shift {s:+.3f}"))
    by_month = p_ttc.copy()
    for m in np.unique(month_index[test]):
        sel = test[month_index[test] == m]
        by_month[sel] = shifted(p_ttc[sel], level_shift(p_ttc[sel], float(y[sel].mean())))
    variants.append(Variant("oracle by month", by_month))

    print(f"\n## {product}: {name} v{version} (@{CHAMPION})")
    for part in ("train", "valid", "test"):
        idx = getattr(split, part)
        print(f"  {part:5s} {split.windows[part]}: {len(idx):,} rows, bad rate {y[idx].mean():.4f}")
    print(f"  long-run (development) bad rate {long_run:.4f}")
    print("\n| variant | test mean PD | observed | ECE | coefficients |\n|---|---|---|---|---|")
    for v in variants:
        print(
            f"| {v.name} | {v.pd[test].mean():.4f} | {y[test].mean():.4f} | "
            f"{ece(y[test], v.pd[test]):.4f} | {v.coefficients} |"
        )
    shown = [v for v in variants if v.name.split(" ")[0] in SHOWN_BY_MONTH]
    header = " | ".join(["month", "rows", "bad rate", *diagnostics, *(v.name[:20] for v in shown)])
    print(f"\nby application month (development and test):\n| {header} |")
    print("|" + "---|" * (3 + len(diagnostics) + len(shown)))
    for m in np.unique(month_index):
        sel = np.flatnonzero(month_index == m)
        part = next(p for p in ("train", "valid", "test") if np.isin(sel, getattr(split, p)).all())
        label = f"{start + int(m)} {part}"
        cells = [label, f"{len(sel):,}", f"{y[sel].mean():.4f}"]
        cells += [f"{d[sel].mean():+.2f}" for d in diagnostics.values()]
        cells += [f"{v.pd[sel].mean():.4f}" for v in shown]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KAPOK_HOME", ".")))
    parser.add_argument("--products", default="microloan,guarantee,insurance")
    args = parser.parse_args()
    paths = Paths(args.home.resolve())
    os.environ["KAPOK_HOME"] = str(paths.home)
    manifest = read_manifest(paths.raw)
    print(
        f"# bench/pit.py on {paths.home}: {manifest['enterprises']:,} enterprises x "
        f"{manifest['months']} months from {manifest['start']}, seed {manifest.get('seed')}, "
        f"downturn month {manifest.get('downturn_month')}; load {os.getloadavg()}"
    )
    for product in [p for p in args.products.split(",") if p]:
        product_variants(paths, product)


if __name__ == "__main__":
    main()

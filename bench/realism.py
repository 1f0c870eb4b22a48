"""How honest is the simulator? Prints its realism figures for one generated system.

    python bench/realism.py [--enterprises 100000] [--months 36] [--seed 7]

Kapok's targets for the simulator (also listed in docs/ARCHITECTURE.md, "Raw tables"): the
oracle's true default probabilities rank applications with an AUC of 0.78-0.86, so the outcome
is predictable but noisy; a WOE + logistic scorecard reaches 0.68-0.78; product default rates are
3%-12%, higher through the downturn; no single feature has an AUC above 0.72.
Features are joined point-in-time with polars here (no Feast) to keep the loop fast.

Two more figures put issue 3's quality goals in context, on the same out-of-time split (oldest
70% of matured applications to fit, the most recent 30% to score):

* `lgbm`: LightGBM with fixed, reasonable parameters on the same features (a quick stand-in for
  Kapok's tuned model; bench/quality.py measures the real one);
* `ceiling`: the better of LightGBM and a logistic regression (with squares) on the simulator's
  latent state at application time (health this month and the two before, permanent quality,
  willingness, the loan's burden and term, industry): what a model that saw through every
  observable's noise, without their publication lags, could do. Its Gini as a share of the oracle's
  is the most any feature set can reach; the rest of the oracle's power is the future (health
  over the outcome window), which nobody can see at application time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from features.build import build
from features.raw_tables import MANIFEST, scan
from features.schema import FAMILIES, FEATURES
from kapok.bigdata.generate import CHUNK_SIZE, generate
from kapok.bigdata.simulate import (
    BURN_IN,
    SimulationConfig,
    simulate_chunk_with_state,
    simulate_macro,
)

LGB_PARAMS = {
    "objective": "binary",
    "metric": "auc",
    "learning_rate": 0.03,
    "num_leaves": 15,
    "min_child_samples": 100,
    "feature_fraction": 0.7,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 5.0,
    "verbosity": -1,
    "seed": 7,
    "deterministic": True,
    "num_threads": 2,
}


LABELS = (pl.String, pl.Categorical, pl.Enum)


def lgbm_auc(train: pl.DataFrame, test: pl.DataFrame, names: list[str]) -> float:
    """Fixed parameters, rounds by early stopping on the last 20% of the fitting rows."""

    def matrix(frame: pl.DataFrame) -> np.ndarray:
        cols = []
        for n in names:
            c = frame[n]
            if c.dtype in LABELS:
                c = c.cast(pl.String).hash(seed=0).cast(pl.Float64) % 997  # stable label codes
            cols.append(c.cast(pl.Float64).fill_null(np.nan).to_numpy())
        return np.column_stack(cols)

    cut = int(train.height * 0.8)
    x, y = matrix(train), train["outcome"].to_numpy()
    cats = [i for i, n in enumerate(names) if train[n].dtype in LABELS]
    fit = lgb.Dataset(x[:cut], y[:cut], categorical_feature=cats, free_raw_data=False)
    valid = lgb.Dataset(x[cut:], y[cut:], reference=fit, categorical_feature=cats)
    booster = lgb.train(
        LGB_PARAMS, fit, 3000, valid_sets=[valid], callbacks=[lgb.early_stopping(100, False)]
    )
    return roc_auc_score(test["outcome"], booster.predict(matrix(test)))


def logit_auc(train: pl.DataFrame, test: pl.DataFrame, names: list[str]) -> float:
    """Logistic regression on the (complete) latent columns and their squares."""

    def matrix(frame: pl.DataFrame) -> np.ndarray:
        x = frame.select(names).to_numpy().astype(float)
        return np.column_stack([x, x**2])

    x = matrix(train)
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-9
    model = LogisticRegression(max_iter=2000).fit((x - mu) / sd, train["outcome"].to_numpy())
    return roc_auc_score(test["outcome"], model.predict_proba((matrix(test) - mu) / sd)[:, 1])


def latent_state(config: SimulationConfig) -> pl.DataFrame:
    """Per application: the latent truth at application time (re-simulated; deterministic)."""
    macro = simulate_macro(config)
    parts = []
    n_chunks = -(-config.enterprises // CHUNK_SIZE)
    for chunk in range(n_chunks):
        first = chunk * CHUNK_SIZE
        n = min(CHUNK_SIZE, config.enterprises - first)
        tables, sim = simulate_chunk_with_state(config, macro, chunk, first, n)
        apps = tables["applications"]
        ids = apps["application_id"]
        row = ids.str.slice(2, 9).cast(pl.Int64).to_numpy() - first
        t = ids.str.slice(11, 3).cast(pl.Int64).to_numpy() + BURN_IN
        h = sim.h_full
        annual = sim.revenue_scale[row] * 12
        parts.append(
            pl.DataFrame(
                {
                    "application_id": ids,
                    "lat_h_0": h[row, t],
                    "lat_h_1": h[row, t - 1],
                    "lat_h_2": h[row, t - 2],
                    "lat_quality": sim.quality[row],
                    "lat_willingness": sim.willingness[row],
                    "lat_burden": np.log(apps["requested_amount"].to_numpy() / annual),
                    "lat_window": apps["outcome_window_months"].to_numpy().astype(float),
                    "lat_industry": sim.industry[row].astype(float),
                }
            )
        )
    return pl.concat(parts)


def pit_join(apps: pl.DataFrame, features: Path) -> pl.DataFrame:
    out = apps.sort("applied_at")
    for fam in FAMILIES:
        table = pl.read_parquet(features / fam.name / "*.parquet").sort("event_timestamp")
        out = out.join_asof(
            table,
            left_on="applied_at",
            right_on="event_timestamp",
            by="enterprise_id",
            strategy="backward",
            tolerance=fam.ttl,
            check_sortedness=False,
        ).drop("event_timestamp")
    return out.with_columns(
        req_loan_to_sales_12m=pl.col("requested_amount") / pl.col("tax_sales_12m"),
        req_installment_to_inflow=(pl.col("requested_amount") / pl.col("term_months"))
        / (pl.col("pay_inflow_3m") / 3),
    )


def woe_scorecard_auc(train: pl.DataFrame, test: pl.DataFrame, names: list[str]) -> float:
    """Decile WOE binning per feature (missing its own bin) + logistic regression."""

    def encode(frame: pl.DataFrame, edges: dict, woe: dict) -> np.ndarray:
        cols = []
        for n in names:
            b = np.digitize(frame[n].fill_null(np.nan).to_numpy(), edges[n])
            b = np.where(np.isnan(frame[n].fill_null(np.nan).to_numpy()), -1, b)
            cols.append(np.vectorize(lambda k, n=n: woe[n].get(k, 0.0))(b))
        return np.column_stack(cols)

    y = train["outcome"].to_numpy()
    edges, woe = {}, {}
    for n in names:
        x = train[n].fill_null(np.nan).to_numpy().astype(float)
        qs = (
            np.unique(np.nanquantile(x, np.linspace(0.1, 0.9, 9)))
            if np.isfinite(x).any()
            else np.array([])
        )
        edges[n] = qs
        b = np.where(np.isnan(x), -1, np.digitize(x, qs))
        table = {}
        for k in np.unique(b):
            bad = y[b == k].sum() + 0.5
            good = (1 - y[b == k]).sum() + 0.5
            table[k] = np.log((bad / y.sum()) / (good / (1 - y).sum()))
        woe[n] = table
    model = LogisticRegression(max_iter=2000, C=0.1).fit(encode(train, edges, woe), y)
    return roc_auc_score(test["outcome"], model.predict_proba(encode(test, edges, woe))[:, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--enterprises", type=int, default=100_000)
    parser.add_argument("--months", type=int, default=36)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-models", action="store_true", help="skip the lgbm and ceiling")
    args = parser.parse_args()
    config = SimulationConfig(args.enterprises, args.months, args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kapok-realism-"))
    raw, feats = work / "raw", work / "features"
    t0 = time.perf_counter()
    if not (raw / MANIFEST).exists():
        generate(config, raw)
        build(raw, feats)
    print(f"data ready in {time.perf_counter() - t0:.0f} s under {work}")
    apps = scan(raw, "applications").filter(pl.col("matured")).collect()
    oracle = scan(raw, "oracle").select("application_id", "pd_true").collect()
    data = pit_join(apps.join(oracle, on="application_id"), feats)
    if not args.no_models:
        data = data.join(latent_state(config), on="application_id", how="left")
    latent = [c for c in data.columns if c.startswith("lat_")]
    categorical = [f.name for f in FEATURES if f.categorical]
    numeric = [f.name for f in FEATURES if not f.categorical] + [
        "req_loan_to_sales_12m",
        "req_installment_to_inflow",
    ]
    for product in ("microloan", "guarantee", "insurance"):
        d = data.filter(pl.col("product") == product).sort("applied_at")
        y = d["outcome"].to_numpy()
        by_month = (
            d.group_by(pl.col("applied_at").dt.strftime("%Y-%m").alias("m"))
            .agg(pl.col("outcome").mean())
            .sort("m")["outcome"]
            .to_numpy()
        )
        aucs = {}
        for n in numeric:
            x = d[n].fill_null(np.nan).to_numpy().astype(float)
            ok = np.isfinite(x)
            if ok.sum() > 100 and len(np.unique(y[ok])) == 2:
                a = roc_auc_score(y[ok], x[ok])
                aucs[n] = max(a, 1 - a)
        top = sorted(aucs.items(), key=lambda kv: -kv[1])[:3]
        cut = int(d.height * 0.7)
        card = woe_scorecard_auc(d[:cut], d[cut:], numeric)
        models = ""
        if not args.no_models:
            oracle_gini = 2 * roc_auc_score(d[cut:]["outcome"], d[cut:]["pd_true"]) - 1
            gbm = lgbm_auc(d[:cut], d[cut:], numeric + categorical)
            ceiling = max(lgbm_auc(d[:cut], d[cut:], latent), logit_auc(d[:cut], d[cut:], latent))
            models = (
                f"\n           lgbm AUC {gbm:.3f} (Gini share of oracle "
                f"{(2 * gbm - 1) / oracle_gini:.3f}, {gbm - card:+.3f} vs scorecard) "
                f"ceiling AUC {ceiling:.3f} (share {(2 * ceiling - 1) / oracle_gini:.3f}) "
                f"oracle AUC on the same 30% {(oracle_gini + 1) / 2:.3f}"
            )
        print(
            f"{product:10s} n={d.height:6d} bad rate {y.mean():.3f} "
            f"(by month {by_month.min():.3f}..{by_month.max():.3f}) "
            f"oracle AUC {roc_auc_score(y, d['pd_true']):.3f} "
            f"scorecard AUC (OOT 30%) {card:.3f} "
            f"top single-feature AUC {', '.join(f'{k} {v:.3f}' for k, v in top)}" + models
        )


if __name__ == "__main__":
    main()

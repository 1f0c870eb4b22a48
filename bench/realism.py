"""How honest is the simulator? Prints the DESIGN.md realism figures for one generated system.

    python bench/realism.py [--enterprises 100000] [--months 36] [--seed 7]

Targets (DESIGN.md): oracle AUC 0.78-0.86; a WOE + logistic scorecard 0.68-0.78; product default
rates 3%-12%, higher through the downturn; no single feature with an AUC above 0.72.
Features are joined point-in-time with polars here (no Feast) to keep the loop fast.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from features.build import build
from features.schema import FAMILIES, FEATURES
from kapok.bigdata.generate import generate
from kapok.bigdata.simulate import SimulationConfig


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
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kapok-realism-"))
    raw, feats = work / "raw", work / "features"
    t0 = time.perf_counter()
    if not (raw / "_manifest.json").exists():
        generate(SimulationConfig(args.enterprises, args.months, args.seed), raw)
        build(raw, feats)
    print(f"data ready in {time.perf_counter() - t0:.0f} s under {work}")
    apps = pl.read_parquet(raw / "applications" / "*.parquet").filter(pl.col("matured"))
    oracle = pl.read_parquet(raw / "oracle" / "*.parquet").select("application_id", "pd_true")
    data = pit_join(apps.join(oracle, on="application_id"), feats)
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
        print(
            f"{product:10s} n={d.height:6d} bad rate {y.mean():.3f} "
            f"(by month {by_month.min():.3f}..{by_month.max():.3f}) "
            f"oracle AUC {roc_auc_score(y, d['pd_true']):.3f} "
            f"scorecard AUC (OOT 30%) {card:.3f} "
            f"top single-feature AUC {', '.join(f'{k} {v:.3f}' for k, v in top)}"
        )


if __name__ == "__main__":
    main()

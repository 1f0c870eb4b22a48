"""Batch decisions through the columnar core, against LightGBM's own predict / pred_contrib on the
same matrix (the floor) and the per-row reference path (the naive alternative), in one run.

    python bench/batch.py --home /tmp/kh --rows 100000,1000000
    python bench/batch.py --home /tmp/kh --quick        # CI: seconds, keeps the benchmark working

Requests are the latest online features of the home's enterprises (one bulk read), repeated to
the number of rows with seeded random amounts and terms. Run by hand, never as a test; the
machine is shared, so the ratios measured in the same run are what to compare.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kapok  # noqa: F401  (telemetry off)
from features.online import OnlineFeatures
from features.raw_tables import enterprise_ids
from features.request import request_features
from kapok.settings import Paths
from serving import core
from serving import policy as pol
from serving.batch import _champions
from serving.engine import policy_outcome


def requests(paths: Paths, rows: int, product: str, seed: int) -> pl.DataFrame:
    ids = enterprise_ids(paths.raw).head(rows)
    online = OnlineFeatures(paths, cache=False).read(ids.to_list()).filter(pl.col("found"))
    frame = online.select(*core.STORED_SCHEMA)
    repeat = -(-rows // frame.height)
    frame = pl.concat([frame] * repeat).head(rows)
    prod = pol.load_policy().product(product)
    rng = np.random.default_rng(seed)
    amount = np.round(np.exp(rng.uniform(np.log(prod.amount_min), np.log(prod.amount_max), rows)))
    term = rng.integers(prod.term_months_min, prod.term_months_max + 1, rows)
    return frame.with_columns(
        pl.Series("requested_amount", amount), pl.Series("term_months", term, dtype=pl.Int64)
    )


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def naive_rows_per_second(model, frame: pl.DataFrame, policy: pol.Policy, limits: bool) -> float:
    """The per-row reference: dict features, one-row TreeSHAP, policy.py, bisection per row."""
    rows = frame.to_dicts()
    t0 = time.perf_counter()
    for row in rows:
        amount, term = float(row.pop("requested_amount")), int(row.pop("term_months"))
        values = dict(row)
        values |= request_features(amount, term, row["tax_sales_12m"], row["pay_inflow_3m"])
        contrib = model.contributions(model.row(values))[0]
        pd_ = float(model.scorer.calibrator(np.array([contrib.sum()]))[0])
        policy_outcome(model, values, contrib, pd_, amount, term, policy)
        if limits:

            def pd_of(a: float, values=values, row=row, term=term) -> float:
                v = values | request_features(a, term, row["tax_sales_12m"], row["pay_inflow_3m"])
                return float(model.scorer.calibrator(model.margin(model.row(v)))[0])

            pol.limit(pd_of, amount, term, model.product, values, policy)
    return len(rows) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KAPOK_HOME", ".")))
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--product", default="microloan")
    parser.add_argument("--naive-rows", type=int, default=500)
    parser.add_argument(
        "--contrib-sample", type=int, default=20_000,
        help="rows on which pred_contrib and reasons='all' are timed, then scaled",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few thousand rows (CI)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.naive_rows, args.contrib_sample = "3000", 50, 1000
    paths = Paths(args.home.resolve())
    os.environ["KAPOK_HOME"] = str(paths.home)
    policy = pol.load_policy()
    model = _champions(paths, [args.product])[args.product]
    now = dt.datetime.now().isoformat(timespec="seconds")
    print(f"# bench/batch.py  {now}  load {os.getloadavg()}  cpus {os.cpu_count()}")
    print(f"# command: {' '.join(sys.argv)}")
    print(f"# model {model.name} v{model.version}: {model.scorer.booster.num_trees()} trees, "
          f"{len(model.scorer.features)} features")  # fmt: skip
    results = []
    for n in [int(x) for x in args.rows.split(",")]:
        seconds, frame = timed(requests, paths, n, args.product, 7)
        print(f"\n## {n:,} requests ({seconds:.1f} s to build them)")
        sample = frame.head(min(args.contrib_sample, n))
        # the floor: LightGBM alone on the same matrix
        columns = core.numeric_columns(frame)
        req = core.request_features(
            frame["requested_amount"].to_numpy(), frame["term_months"].to_numpy(),
            columns["tax_sales_12m"], columns["pay_inflow_3m"],
        )  # fmt: skip
        x = core.Matrix(model, frame, columns, req).x
        t_predict, _ = timed(model.scorer.booster.predict, x, raw_score=True)
        t_contrib_s, _ = timed(model.scorer.booster.predict, x[: sample.height], pred_contrib=True)
        t_contrib = t_contrib_s * n / sample.height
        row = {"rows": n, "lgb_predict_s": t_predict, "lgb_pred_contrib_s_projected": t_contrib}
        runs = [
            ("decisions, no reasons", frame, {"reasons": "none"}),
            ("decisions + reasons for refer/decline", frame, {"reasons": "adverse"}),
            ("decisions + reasons for all (sample, scaled)", sample, {"reasons": "all"}),
            ("full: limit, price, adverse reasons", frame, {"reasons": "adverse", "limits": True}),
        ]
        print(f"{'path':48} {'seconds':>9} {'rows/s':>10}  vs LightGBM floor")
        print(f"{'LightGBM predict (floor, PD only)':48} {t_predict:9.2f} {n / t_predict:10,.0f}")
        print(f"{'LightGBM pred_contrib (floor, all reasons)*':48} {t_contrib:9.2f} "
              f"{n / t_contrib:10,.0f}")  # fmt: skip
        for label, data, kw in runs:
            t, d = timed(core.decide, model, data, policy, **kw)
            scaled = t * n / data.height
            floor = t_contrib if kw["reasons"] == "all" else t_predict
            explained = int((d.explained >= 0).sum()) if d.explained is not None else 0
            print(f"{label:48} {scaled:9.2f} {n / scaled:10,.0f}  {scaled / floor:5.1f}x floor"
                  f"  ({explained:,} of {data.height:,} rows explained)")  # fmt: skip
            row[label] = scaled
        naive = frame.head(args.naive_rows)
        for limits in (False, True):
            rps = naive_rows_per_second(model, naive, policy, limits)
            label = "naive per-row reference" + (" with limit" if limits else "")
            core_s = row[
                "full: limit, price, adverse reasons"
                if limits
                else "decisions + reasons for all (sample, scaled)"
            ]
            print(f"{label:48} {n / rps:9.2f} {rps:10,.0f}  core is {n / core_s / rps:5.1f}x "
                  f"faster (on {naive.height} rows, scaled)")  # fmt: skip
            row[label + "_rows_per_s"] = rps
        print(
            "* pred_contrib and reasons='all' timed on the first "
            f"{sample.height:,} rows and scaled to {n:,}"
        )
        results.append(row)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    (out / f"batch-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

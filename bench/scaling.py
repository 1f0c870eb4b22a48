"""Per-unit costs for sizing a cluster (docs/SCALING.md): each unit of work measured on ONE pinned
core, then extrapolated to a region of 5,000,000 enterprises × 60 months and 1,000 requests/s.

    python bench/scaling.py --home /tmp/kh                 # a trained home (make run builds one)
    python bench/scaling.py --home /tmp/kapok-bench-smoke --quick      # CI: keeps it working

Units, each run in a child process pinned to one core (sched_setaffinity, POLARS_MAX_THREADS=1,
OMP_NUM_THREADS=1, LightGBM num_threads=1), so that a figure is per core-second whatever else the
machine is doing with its other core:

- **features**: one raw chunk through every family's pipeline (`features.build.build_chunk`),
  in enterprise-months per core-second. Floor: reading the chunk's input tables. Naive: the
  chunk built by the same code with every core of this machine in one process (polars' own
  threads), which is what scaling up instead of out buys.
- **training**: one LightGBM fit of Kapok's base parameters (250 rounds, 31 leaves, no early
  stopping) on the product's matured applications joined point-in-time, in rows × rounds per
  core-second. Floor: building LightGBM's Dataset (binning), which every fit does first. Naive:
  the same fit on all cores.
- **decisions**: the columnar core deciding requests with the limit search, price and adverse
  reasons (what `kapok decide` and `backfill` run per chunk), in decisions per core-second.
  Floor: LightGBM's predict on the same matrix. Naive: the per-row reference path.
- **peak memory** of each child (ru_maxrss), which sizes a worker.

The serving figure (requests per second per API worker) comes from `bench/serving.py`, which
drives a real server with wrk; pass it with --serving-rps-per-worker (default: the last recorded
cold /score figure in bench/RESULTS.md, per worker). Run by hand, never as a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_ENTERPRISES, TARGET_MONTHS, TARGET_RPS = 5_000_000, 60, 1_000
# bench/RESULTS.md, 2026-12-02: /score cold, 8 clients, two workers on two cores: 215.1 req/s
DEFAULT_RPS_PER_WORKER = 215.1 / 2


def _pin(one_core: bool) -> None:
    """Before polars, numpy or LightGBM start their thread pools."""
    if one_core:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        os.environ["POLARS_MAX_THREADS"] = "1"
        os.environ["OMP_NUM_THREADS"] = "1"


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def unit_features(home: Path, threads: int) -> dict:
    import tempfile
    from datetime import date

    from features.build import build_chunk, raw_chunk
    from features.raw_tables import read_manifest

    raw = home / "data" / "raw"
    manifest = read_manifest(raw)
    start = date.fromisoformat(manifest["start"] + "-01")
    t_read, tables = _timed(lambda: {k: v.collect() for k, v in raw_chunk(raw, 0).items()})
    enterprises = tables["registration"].height
    with tempfile.TemporaryDirectory() as tmp:
        t_build, rows = _timed(build_chunk, raw, Path(tmp), 0, manifest["months"], start)
    return {
        "enterprises": enterprises,
        "months": manifest["months"],
        "read_s": t_read,
        "build_s": t_build,
        "rows": sum(rows.values()),
        "threads": threads,
    }


def _training_matrix(home: Path, product: str, quick: bool):
    import numpy as np
    import polars as pl

    from features.raw_tables import scan
    from features.schema import ALL_FEATURES
    from serving.batch import point_in_time

    apps = (
        scan(home / "data" / "raw", "applications")
        .filter((pl.col("product") == product) & pl.col("matured"))
        .select("enterprise_id", pl.col("applied_at").alias("event_timestamp"), "outcome")
        .collect()
    )
    if quick:
        apps = apps.head(5_000)
    apps = apps.with_row_index("row")
    joined = point_in_time(home / "data" / "features", apps)
    names = [f.name for f in ALL_FEATURES if f.name in joined.columns and not f.categorical]
    x = joined.select(pl.col(names).cast(pl.Float64)).to_numpy()
    return x, joined["outcome"].cast(pl.Int8).to_numpy().astype(np.float64), names


def unit_training(home: Path, threads: int, product: str, quick: bool) -> dict:
    import lightgbm as lgb

    x, y, names = _training_matrix(home, product, quick)
    rounds = 50 if quick else 250
    params = {"objective": "binary", "verbosity": -1, "num_threads": threads, "seed": 7,
              "deterministic": True, "force_row_wise": True, "num_leaves": 31,
              "learning_rate": 0.05, "max_bin": 255}  # fmt: skip
    t_data, data = _timed(lambda: lgb.Dataset(x, y, feature_name=names, params=params).construct())
    t_fit, _ = _timed(lgb.train, params, data, num_boost_round=rounds)
    return {"rows": len(y), "rounds": rounds, "features": len(names), "dataset_s": t_data,
            "fit_s": t_fit, "threads": threads}  # fmt: skip


def unit_decisions(home: Path, threads: int, product: str, quick: bool, naive: bool) -> dict:
    os.environ["KAPOK_HOME"] = str(home)
    sys.path.insert(0, str(REPO / "bench"))
    from batch import naive_rows_per_second, requests  # bench/batch.py

    from kapok.settings import Paths
    from serving import core
    from serving import policy as pol
    from serving.batch import _champions

    paths = Paths(home)
    policy = pol.load_policy()
    model = _champions(paths, [product])[product]
    n = 3_000 if quick else 100_000
    frame = requests(paths, n, product, 7)
    columns = core.numeric_columns(frame)
    req = core.request_features(
        frame["requested_amount"].to_numpy(), frame["term_months"].to_numpy(),
        columns["tax_sales_12m"], columns["pay_inflow_3m"],
    )  # fmt: skip
    x = core.Matrix(model, frame, columns, req).x
    t_predict, _ = _timed(model.scorer.booster.predict, x, raw_score=True, num_threads=threads)
    t_core, _ = _timed(core.decide, model, frame, policy, reasons="adverse", limits=True)
    out = {"rows": n, "predict_s": t_predict, "core_s": t_core, "threads": threads}
    if naive:
        out["naive_rows_per_s"] = naive_rows_per_second(
            model, frame.head(50 if quick else 300), policy, limits=True
        )
    return out


def child(args: argparse.Namespace) -> None:
    _pin(args.threads == 1)
    sys.path.insert(0, str(REPO))
    import kapok  # noqa: F401  (telemetry off)

    home = args.home.resolve()
    if args.unit == "features":
        out = unit_features(home, args.threads)
    elif args.unit == "training":
        out = unit_training(home, args.threads, args.product, args.quick)
    else:
        out = unit_decisions(home, args.threads, args.product, args.quick, args.threads == 1)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


def run_unit(args: argparse.Namespace, unit: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", unit, "--threads", str(threads),
               "--home", str(args.home), "--product", args.product]  # fmt: skip
    if args.quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{unit} ({threads} threads) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def line(label: str, seconds: float, note: str) -> None:
    print(f"  {label:32} {seconds:8.2f} s   {note}")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KAPOK_HOME", ".")))
    parser.add_argument("--product", default="microloan")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--serving-rps-per-worker", type=float, default=DEFAULT_RPS_PER_WORKER)
    parser.add_argument("--child", choices=["features", "training", "decisions"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        args.unit = args.child
        child(args)
        return
    cores = len(os.sched_getaffinity(0))
    now = dt.datetime.now().isoformat(timespec="seconds")
    print(f"# bench/scaling.py  {now}  load {os.getloadavg()}  cores {cores}")
    print(f"# command: {' '.join(sys.argv)}")
    one = {u: run_unit(args, u, 1) for u in ("features", "training", "decisions")}
    every = {u: run_unit(args, u, cores) for u in ("features", "training")}

    f1, fa = one["features"], every["features"]
    em = f1["enterprises"] * f1["months"]
    em_per_core_s = em / f1["build_s"]
    peak = gib(f1["peak_rss_bytes"])
    print(f"\n## features: one chunk of {f1['enterprises']:,} enterprises × {f1['months']} months")
    line("read input (floor)", f1["read_s"], f"build is {f1['build_s'] / f1['read_s']:.1f}x")
    line("build, 1 core", f1["build_s"], f"{em_per_core_s:,.0f} enterprise-months/core-s, {peak}")
    speed = f1["build_s"] / fa["build_s"]
    line(f"build, {cores} cores, 1 process", fa["build_s"], f"speed-up {speed:.2f}x "
         f"(naive: scaling up; sharding chunks over {cores} cores: {cores:.2f}x)")  # fmt: skip

    t1, ta = one["training"], every["training"]
    rr_per_core_s = t1["rows"] * t1["rounds"] / (t1["dataset_s"] + t1["fit_s"])
    peak = gib(t1["peak_rss_bytes"])
    print(f"\n## training: {t1['rows']:,} rows × {t1['features']} features, "
          f"{t1['rounds']} rounds")  # fmt: skip
    line("Dataset (floor)", t1["dataset_s"], f"fit is {t1['fit_s'] / t1['dataset_s']:.1f}x")
    line("fit, 1 core", t1["fit_s"], f"{rr_per_core_s:,.0f} row-rounds/core-s, {peak}")
    line(f"fit, {cores} cores (naive)", ta["fit_s"], f"speed-up {t1['fit_s'] / ta['fit_s']:.2f}x")

    d1 = one["decisions"]
    dps = d1["rows"] / d1["core_s"]
    naive = d1["naive_rows_per_s"]
    peak = gib(d1["peak_rss_bytes"])
    print(f"\n## decisions: {d1['rows']:,} requests, limit search, price, adverse reasons")
    line(
        "LightGBM predict (floor)",
        d1["predict_s"],
        f"core is {d1['core_s'] / d1['predict_s']:.1f}x",
    )
    line("core, 1 core", d1["core_s"], f"{dps:,.0f} decisions/core-s, {peak}")
    line(
        "naive per-row reference",
        d1["rows"] / naive,
        f"{naive:,.0f}/core-s; core {dps / naive:.0f}x",
    )

    # -- extrapolation ------------------------------------------------------------------------
    target_em = TARGET_ENTERPRISES * TARGET_MONTHS
    feat_core_h = target_em / em_per_core_s / 3600
    # training rows: the simulated region's matured applications per enterprise-month, scaled
    rows_per_em = t1["rows"] / em if not args.quick else 0.0
    train_rows = rows_per_em * target_em
    trial_core_h = train_rows * t1["rounds"] / rr_per_core_s / 3600
    book_decisions = TARGET_ENTERPRISES  # one decision per enterprise: a watch or prospect pass
    dec_core_h = book_decisions / dps / 3600
    workers = TARGET_RPS / args.serving_rps_per_worker
    print(f"\n## sized for {TARGET_ENTERPRISES:,} enterprises × {TARGET_MONTHS} months, "
          f"{TARGET_RPS:,} requests/s")  # fmt: skip
    print(f"  features: {target_em:,.0f} enterprise-months = {feat_core_h:,.1f} core-hours; "
          f"{feat_core_h * 60 / 64:,.1f} min on 64 cores; "
          f"~{gib(f1['peak_rss_bytes'])} per worker "
          f"(one {f1['enterprises']:,}-enterprise chunk)")  # fmt: skip
    print(f"  training: ~{train_rows:,.0f} matured applications ({rows_per_em:.4f} per "
          f"enterprise-month here); one {t1['rounds']}-round fit = {trial_core_h:,.2f} core-hours; "
          f"a 50-trial study on 16-core workers ≈ {50 * trial_core_h / 16:,.1f} hours "
          f"(trials in parallel, one worker each)")  # fmt: skip
    print(f"  batch decisions: {book_decisions:,} (one pass over the book) = {dec_core_h:,.2f} "
          f"core-hours; {dec_core_h * 60 / 16:,.1f} min on 16 cores")  # fmt: skip
    print(f"  serving: {TARGET_RPS:,} req/s ÷ {args.serving_rps_per_worker:,.1f} req/s per worker "
          f"= {workers:,.1f} workers (one core each), before headroom")  # fmt: skip
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    (out / f"scaling-{stamp}.json").write_text(json.dumps({"one_core": one, "all": every}))


if __name__ == "__main__":
    main()

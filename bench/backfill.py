"""`kapok backfill` piece by piece: the point-in-time read, the decisions, the records and the log,
against the columnar core alone (the floor) and the per-row reference (the naive alternative),
measured in the same run.

    python bench/backfill.py --home /tmp/kh --since 2025-01-01
    python bench/backfill.py --home /tmp/kapok-bench-smoke --naive-rows 50     # CI: seconds

The log is a fresh SQLite file in a temporary folder (WAL, group commit, as `kapok backfill`
writes it), so nothing is added to the home's own log. Goal (issue 10): ≥ 20,000 decisions/s
after the point-in-time read (decisions + records + log). Run by hand; the machine is shared,
so compare the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch import naive_rows_per_second  # bench/batch.py: the same per-row reference

import kapok  # noqa: F401  (telemetry off)
from features.schema import FEATURES
from kapok.settings import Paths
from review.backfill import FEATURE_CHUNK, WRITE_BATCH, applications, decide_batch
from serving import core
from serving import policy as pol
from serving.batch import point_in_time
from serving.decision_log import DecisionLog
from serving.model import load_champion

GOAL = 20_000  # decisions per second after the point-in-time read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KAPOK_HOME", ".")))
    parser.add_argument("--product", default="microloan")
    parser.add_argument("--since", default=None, help="first application date, YYYY-MM-DD")
    parser.add_argument("--naive-rows", type=int, default=1000, help="rows for the per-row path")
    args = parser.parse_args()
    paths = Paths(args.home.resolve())
    since = dt.datetime.fromisoformat(args.since).replace(tzinfo=dt.UTC) if args.since else None
    apps = applications(paths, args.product, since, None).head(FEATURE_CHUNK)
    model = load_champion(paths, args.product)
    policy = pol.load_policy()
    load = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load[0]:.2f}/{load[1]:.2f}/"
        f"{load[2]:.2f}, {apps.height:,} {args.product} applications, model {model.name} "
        f"v{model.version}"
    )

    entities = apps.select(
        "enterprise_id",
        pl.col("applied_at").alias("event_timestamp"),
        "requested_amount",
        pl.col("term_months").cast(pl.Int64),
    ).with_row_index("row")
    t0 = time.perf_counter()
    feats = point_in_time(paths.features, entities)
    pit = time.perf_counter() - t0

    stored = [f.name for f in FEATURES if f.name in feats.columns]
    frame = feats.select(*stored).with_columns(
        apps["requested_amount"].cast(pl.Float64), apps["term_months"].cast(pl.Int64)
    )
    t0 = time.perf_counter()
    core.decide(model, frame, policy, reasons="adverse")
    floor = time.perf_counter() - t0

    t0 = time.perf_counter()
    records = decide_batch(apps, feats, model, policy)
    decided = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix="kapok-bench-backfill-"))
    try:
        log = DecisionLog(f"sqlite:///{work / 'decisions.db'}")
        t0 = time.perf_counter()
        for b in range(0, len(records), WRITE_BATCH):
            log.write_many(records[b : b + WRITE_BATCH])
        logged = time.perf_counter() - t0
        log.close()
        size = (work / "decisions.db").stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)

    naive = 1 / naive_rows_per_second(model, frame.head(args.naive_rows), policy, False)

    n = apps.height
    after_pit = decided + logged
    rate = n / after_pit
    print(f"point-in-time read (polars join_asof):  {pit:7.2f} s")
    print(f"floor   core.decide alone:              {floor:7.2f} s  {n / floor:9,.0f}/s")
    print(f"        decisions + records:            {decided:7.2f} s  {n / decided:9,.0f}/s")
    print(
        f"        log (SQLite, {WRITE_BATCH:,} a commit):       {logged:7.2f} s  "
        f"{n / logged:9,.0f}/s  {size / n:,.0f} bytes/decision"
    )
    print(
        f"naive   per-row reference (no log):     {naive * 1e6:7.0f} µs a row "
        f"{1 / naive:9,.0f}/s  (on {min(args.naive_rows, n):,} rows)"
    )
    print(
        f"after the point-in-time read: {rate:,.0f} decisions/s = {rate * floor / n:.2f}× the "
        f"floor's rate, {rate * naive:.1f}× the naive rate; goal ≥ {GOAL:,}/s: "
        f"{'met' if rate >= GOAL else 'NOT met'}"
    )


if __name__ == "__main__":
    main()

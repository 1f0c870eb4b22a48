"""Online feature reads: Feast's get_online_features vs features.online.OnlineFeatures.

Run by hand, on a home with built feature tables, e.g.

    KAPOK_HOME=/tmp/kapok_bench .venv/bin/kapok data generate --enterprises 20000
    KAPOK_HOME=/tmp/kapok_bench .venv/bin/kapok features build
    KAPOK_HOME=/tmp/kapok_bench .venv/bin/kapok features apply
    KAPOK_HOME=/tmp/kapok_bench .venv/bin/kapok features materialize
    KAPOK_HOME=/tmp/kapok_bench .venv/bin/python bench/online_read.py

SQLite: the home's own online store when it has been materialized (read only), else a scratch
home. Redis (when reachable): a scratch home whose registry and Redis project are deleted at the
end. Both paths read the stored features of the schema and their event timestamps; each
repetition asks for ids not asked before, and OnlineFeatures runs with its cache off (cold), so
the two do the same work. The cached path is timed apart. The machine may be shared: the load
average is printed with the timings.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

# run as `python bench/x.py`, sys.path[0] is bench/, where serving.py (the load benchmark)
# would shadow the serving package: look in the repository instead
sys.path[0] = str(Path(__file__).resolve().parents[1])

import kapok  # noqa: F401  (telemetry off)
from features import store as fs
from features.build import read_summary
from features.online import OnlineFeatures, redis_generation_key
from features.raw_tables import enterprise_ids
from features.schema import FEATURES
from kapok.settings import Paths, paths

warnings.filterwarnings("ignore", category=RuntimeWarning)
REFS = [f"{f.family}:{f.name}" for f in FEATURES]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def scratch_home(source: Paths) -> Paths:
    home = Paths(Path(tempfile.mkdtemp(prefix="kapok_online_bench_")))
    home.data.mkdir(parents=True)
    home.raw.symlink_to(source.raw)
    home.features.symlink_to(source.features)
    return home


def materialize(p: Paths) -> object:
    store = fs.feature_store(p)
    fs.apply(store, p)
    t0 = time.perf_counter()
    fs.materialize(store, *fs.materialize_window(read_summary(p.features), full=False))
    print(f"  materialized in {time.perf_counter() - t0:.1f} s")
    return store


def timed(fn: Callable[[list[str]], object], batches: list[list[str]]) -> list[float]:
    out = []
    for batch in batches:
        t0 = time.perf_counter()
        fn(batch)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def compare(label: str, p: Paths, store, ids: list[str], reps: int) -> None:
    cold = OnlineFeatures(p, store, cache=False)
    warm = OnlineFeatures(p, store)

    def feast(batch: list[str]) -> object:
        rows = [{"enterprise_id": e} for e in batch]
        return store.get_online_features(features=REFS, entity_rows=rows).to_dict(
            include_event_timestamps=True
        )

    rng = random.Random(3)
    pool = rng.sample(ids, len(ids))
    feast(pool[:10]), cold.read(pool[10:20])  # connections, registry
    print(f"\n{label}  ({load()})")
    print(f"  {'ids':>5}  {'feast ms':>10}  {'online ms':>10}  {'ratio':>6}  (median)")
    offset = 20
    for n in (1, 1000):
        batches = []
        for _ in range(reps if n > 1 else 10 * reps):  # a single id: noisier, more samples
            batches.append(pool[offset : offset + n])
            offset += n
        # interleaved, same ids for both: f on batch i, then o on batch i
        f_ms, o_ms = [], []
        for batch in batches:
            f_ms += timed(feast, [batch])
            o_ms += timed(cold.read, [batch])
        f, o = statistics.median(f_ms), statistics.median(o_ms)
        best = f"min {min(f_ms):.3f} / {min(o_ms):.3f}"
        print(f"  {n:>5}  {f:>10.3f}  {o:>10.3f}  {f / o:>5.1f}x   {best}")
    for n in (1, 1000):
        batch = pool[:n]
        warm.read(batch)
        w = statistics.median(timed(warm.read, [batch] * max(reps, 5)))
        print(f"  {n:>5}  cached read (generation check included): {w:.3f} ms")
    print(f"  ({load()})")


def redis_url_reachable(url: str) -> bool:
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or 6379), timeout=1):
            return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    args = ap.parse_args()
    home = paths()
    ids = enterprise_ids(home.raw).unique()
    ids = sorted(ids.to_list())
    print(f"home {home.home}: {len(ids):,} enterprises; {os.cpu_count()} cpus; {load()}")
    needed = args.reps * 1010 + 20
    if len(ids) < needed:
        ids = (ids * (needed // len(ids) + 1))[:needed]  # repeats: fine for timing

    os.environ.pop("KAPOK_ONLINE_STORE", None)
    scratch: list[Path] = []
    try:
        if (home.feast_data / "online_store.db").exists():
            p, store = home, fs.feature_store(home)
        else:
            p = scratch_home(home)
            scratch.append(p.home)
            store = materialize(p)
        compare("SQLite", p, store, ids, args.reps)

        if args.redis and redis_url_reachable(args.redis):
            project = f"kapok_bench_{uuid.uuid4().hex[:8]}"
            os.environ["KAPOK_ONLINE_STORE"] = args.redis
            os.environ["KAPOK_FEAST_PROJECT"] = project
            p = scratch_home(home)
            scratch.append(p.home)
            print(f"\nRedis project {project}: apply + materialize")
            store = fs.feature_store(p)
            try:
                store = materialize(p)
                compare(f"Redis {args.redis}", p, store, ids, args.reps)
            finally:
                store.teardown()
                import redis

                redis.Redis.from_url(args.redis).delete(redis_generation_key(project))
    finally:
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()

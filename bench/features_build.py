"""`kapok features build` on an existing raw folder: time and peak memory, against a floor and the
naive alternative measured in the same run.

    python bench/features_build.py --raw /tmp/k1m/data/raw            # 1,000,000 enterprises
    python bench/features_build.py --raw /tmp/kapok-bench-smoke/data/raw      # CI: seconds
    python bench/features_build.py --raw /tmp/k100k/data/raw --engine ray     # local vs Ray

- **floor**: reading every input table of every chunk (parquet decode, nothing computed): no build
  can be faster than reading its input.
- **build**: `features.build.build` as `kapok features build` runs it (worker processes,
  KAPOK_BUILD_WORKERS), into a temporary folder; peak memory is the sum of the resident memory
  of this process and its children, sampled every 0.2 s.
- **ray** (`--engine ray`): the same build with KAPOK_ENGINE=ray (Ray Data tasks, one per chunk,
  KAPOK_RAY_CPUS cores, default: as many as the local build's workers), after the local build in
  the same run; its time over the local build's is the ratio. Ray is started first and its
  start-up is shown apart; the peak includes Ray's own processes (raylet, GCS, idle workers).
- **naive**: the previous pipeline (polars window expressions over a joined month grid, one family
  at a time), taken from git at NAIVE_COMMIT, on the first chunk only, and extrapolated to all
  chunks. The same chunk is built by today's pipeline in one process for a like-for-like ratio,
  and the two outputs are compared (same rows, nulls, integers and strings; floats to summation
  order).

Goal (issue 10): 1,000,000 enterprises × 36 months in ≤ 300 s and ≤ 8 GB peak. Run by hand; the
machine is shared, so compare the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kapok  # noqa: F401  (telemetry off)
from features.build import INPUT_TABLES, build, raw_chunk, workers
from features.pipelines import Panel, build_family
from features.raw_tables import read_manifest
from features.schema import FAMILIES

NAIVE_COMMIT = "b0a5588"  # the last commit with the polars-expression pipeline
GOAL_SECONDS, GOAL_BYTES, GOAL_ENTERPRISES = 300.0, 8 * 10**9, 1_000_000


class PeakMemory:
    """Peak of (this process + its children) resident memory, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a child that just exited
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def naive_pipelines():
    """The previous features/pipelines.py, loaded from git as its own module."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{NAIVE_COMMIT}:features/pipelines.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "naive_pipelines.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("naive_pipelines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(old: pl.DataFrame, new: pl.DataFrame, family: str) -> float:
    """Raise unless rows, nulls, integers and strings are identical; the worst float difference
    relative to max(|value|, 1)."""
    if old.schema != new.schema or old.height != new.height:
        raise AssertionError(f"{family}: schema or row count differs")
    keys = ["enterprise_id", "event_timestamp"]
    if not old.select(keys).equals(new.select(keys)):
        raise AssertionError(f"{family}: rows differ")
    worst = 0.0
    for c in new.columns[2:]:
        a, b = old[c], new[c]
        if not (a.is_null() == b.is_null()).all():
            raise AssertionError(f"{family}.{c}: nulls differ")
        if a.dtype in (pl.String, pl.Int64):
            if not a.drop_nulls().equals(b.drop_nulls()):
                raise AssertionError(f"{family}.{c}: values differ")
        else:
            x, y = a.drop_nulls().to_numpy(), b.drop_nulls().to_numpy()
            scale = np.maximum(np.maximum(np.abs(x), np.abs(y)), 1.0)
            worst = max(worst, float((np.abs(x - y) / scale).max(initial=0.0)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--raw", type=Path, required=True, help="a raw folder (kapok data generate)"
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="ray: also build on Ray in the same run and print its ratio to the local build",
    )
    args = parser.parse_args()
    os.environ["KAPOK_ENGINE"] = "local"  # the build line is the local engine's, always
    manifest = read_manifest(args.raw)
    chunks, months = manifest["chunks"], manifest["months"]
    start = date.fromisoformat(manifest["start"] + "-01")
    load = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load[0]:.2f}, "
        f"{manifest['enterprises']:,} enterprises × {months} months, {chunks} chunk(s), "
        f"{min(workers(), chunks)} worker process(es), {os.cpu_count()} cores"
    )

    t0 = time.perf_counter()
    for chunk in range(chunks):
        for table in INPUT_TABLES:
            raw_chunk(args.raw, chunk)[table].collect()
    floor = time.perf_counter() - t0
    print(f"floor  read every input table:        {floor:8.1f} s")

    out = Path(tempfile.mkdtemp(prefix="kapok-bench-features-"))
    try:
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            summary = build(args.raw, out / "features")
            built = time.perf_counter() - t0
        rows = sum(summary["rows"].values())
        print(
            f"build  kapok features build:          {built:8.1f} s, peak {peak.peak / 1e9:.2f} GB, "
            f"{rows:,} rows over {len(FAMILIES)} families ({built / floor:.1f}× the floor)"
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)

    if args.engine == "ray":
        on_ray(args.raw, built, peak.peak, chunks)

    old = naive_pipelines()
    tables = raw_chunk(args.raw, 0)
    t0 = time.perf_counter()
    panel = Panel.of(tables["registration"].collect(), months, start)
    new_frames = {f.name: build_family(f.name, tables, panel) for f in FAMILIES}
    one_new = time.perf_counter() - t0
    t0 = time.perf_counter()
    old_frames = {
        f.name: old.build_family(f.name, tables, months, start).collect() for f in FAMILIES
    }
    one_old = time.perf_counter() - t0
    worst = max(compare(old_frames[n], new_frames[n], n) for n in new_frames)
    print(
        f"naive  previous pipeline, chunk 0:    {one_old:8.1f} s "
        f"(today's, one process: {one_new:.1f} s, {one_old / one_new:.1f}× faster); "
        f"extrapolated to {chunks} chunk(s): {one_old * chunks:.0f} s "
        f"({one_old * chunks / built:.1f}× the build)"
    )
    print(
        "       same rows, nulls, integers and strings as the previous pipeline; floats "
        f"within {worst:.1e} of max(|value|, 1)"
    )
    scale = GOAL_ENTERPRISES / manifest["enterprises"] * 36 / months
    verdict = "met" if built * scale <= GOAL_SECONDS and peak.peak <= GOAL_BYTES else "NOT met"
    print(
        f"goal   ≤ {GOAL_SECONDS:.0f} s and ≤ {GOAL_BYTES / 1e9:.0f} GB at 1,000,000 × 36: "
        f"{built * scale:.0f} s (linear in enterprise-months), {peak.peak / 1e9:.2f} GB: {verdict}"
    )


def on_ray(raw: Path, local_seconds: float, local_peak: int, chunks: int) -> None:
    """The same build on a local Ray, limited like the local build (KAPOK_RAY_CPUS, default the
    local build's worker count), timed without Ray's start-up."""
    from kapok.engine import ray_cpus, ray_init, ray_shutdown

    os.environ.setdefault("KAPOK_RAY_CPUS", str(min(workers(), chunks)))
    os.environ["KAPOK_ENGINE"] = "ray"
    out = Path(tempfile.mkdtemp(prefix="kapok-bench-features-ray-"))
    try:
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            ray_init()
            started = time.perf_counter() - t0
            t0 = time.perf_counter()
            build(raw, out / "features")
            built = time.perf_counter() - t0
        print(
            f"ray    same build on Ray Data:        {built:8.1f} s, peak {peak.peak / 1e9:.2f} GB "
            f"with Ray's processes, {ray_cpus()} CPU(s) ({built / local_seconds:.2f}× the local "
            f"build's time, {peak.peak / local_peak:.2f}× its peak); Ray start-up {started:.1f} s "
            "not counted"
        )
    finally:
        ray_shutdown()
        os.environ["KAPOK_ENGINE"] = "local"
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

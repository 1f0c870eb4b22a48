"""How fast and how big is the simulator? Times `kapok data generate` (and optionally features).

    python bench/simulator.py [--enterprises 100000] [--months 36] [--seed 7]
                              [--baseline 10000] [--features] [--keep]

In one process it runs a baseline generation at `--baseline` enterprises, then the measured one at
`--enterprises`, each into a fresh temporary folder (deleted afterwards unless `--keep`). Every
run happens in its own child process (multiprocessing, "spawn" context), so that its peak memory
is its own: the child reports `resource.getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux, bytes on
macOS) after the run, and also before it (interpreter + numpy/polars imports, shown as "imports").
Wall time is measured in the child around the call only, so start-up and imports are excluded.

For each run it prints wall time, rows written (from the manifest), bytes on disk (sum of file
sizes) and peak RSS; then the measured run as ratios to the baseline (time, memory, time per
enterprise-month: 1.0 means linear scaling), and a verdict against the goals: 100,000 enterprises
x 36 months in at most 120 s and 4 GiB peak memory. A run of another size is extrapolated to the
goal linearly in enterprise-months for time; memory is compared as measured (generation works in
chunks of 20,000 enterprises, so its peak should not grow with N beyond one chunk).
With `--features` it also times `features.build.build` over each run's data, the same way.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kapok  # noqa: F401  (telemetry off before anything else is imported)
from features.build import build
from kapok.bigdata.generate import generate
from kapok.bigdata.simulate import SimulationConfig

GOAL_ENTERPRISES, GOAL_MONTHS = 100_000, 36
GOAL_SECONDS, GOAL_BYTES = 120.0, 4 * 1024**3
GiB, MiB = 1024**3, 1024**2


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _child(task: str, work: str, enterprises: int, months: int, seed: int) -> dict[str, Any]:
    """Runs in the spawned child: one generation or one feature build, timed and measured."""
    raw, feats = Path(work) / "raw", Path(work) / "features"
    before = _max_rss_bytes()
    t0 = time.perf_counter()
    if task == "generate":
        rows = sum(generate(SimulationConfig(enterprises, months, seed), raw)["rows"].values())
        out = raw
    else:
        rows = sum(build(raw, feats)["rows"].values())
        out = feats
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": seconds, "rows": rows, "bytes": size, "peak": _max_rss_bytes(),
            "imports": before}  # fmt: skip


def in_child(task: str, work: Path, enterprises: int, months: int, seed: int) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child, (task, str(work), enterprises, months, seed))


def show(label: str, enterprises: int, months: int, r: dict[str, Any]) -> None:
    print(
        f"{label:<18} {enterprises:>9,} ent x {months} mo: wall {r['seconds']:7.1f} s  "
        f"rows {r['rows']:>13,}  disk {r['bytes'] / MiB:9.1f} MiB  "
        f"peak RSS {r['peak'] / GiB:5.2f} GiB (imports {r['imports'] / GiB:4.2f} GiB)"
    )


def ratios(label: str, base: dict[str, Any], meas: dict[str, Any], scale: float) -> None:
    t, m = meas["seconds"] / base["seconds"], meas["peak"] / base["peak"]
    print(
        f"{label:<18} x{scale:.1f} enterprises: time x{t:.2f}  memory x{m:.2f}  "
        f"rows x{meas['rows'] / base['rows']:.2f}  time per enterprise-month x{t / scale:.2f}"
    )


def verdict(enterprises: int, months: int, r: dict[str, Any]) -> str:
    goal_em = GOAL_ENTERPRISES * GOAL_MONTHS
    exact = enterprises == GOAL_ENTERPRISES and months == GOAL_MONTHS
    seconds = r["seconds"] * goal_em / (enterprises * months)
    ok_t, ok_m = seconds <= GOAL_SECONDS, r["peak"] <= GOAL_BYTES
    how = "measured" if exact else "time extrapolated linearly from the measured run"
    return (
        f"verdict ({GOAL_ENTERPRISES:,} x {GOAL_MONTHS} mo, {how}): "
        f"time {seconds:.0f} s vs {GOAL_SECONDS:.0f} s {'OK' if ok_t else 'TOO SLOW'}; "
        f"peak {r['peak'] / GiB:.2f} GiB vs {GOAL_BYTES / GiB:.0f} GiB "
        f"{'OK' if ok_m else 'TOO BIG'} => {'PASS' if ok_t and ok_m else 'FAIL'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--enterprises", type=int, default=GOAL_ENTERPRISES)
    parser.add_argument("--months", type=int, default=GOAL_MONTHS)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--features", action="store_true", help="also time the feature build")
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for label, n in (("baseline", args.baseline), ("measured", args.enterprises)):
        work = Path(tempfile.mkdtemp(prefix=f"kapok-bench-{label}-"))
        try:
            results[label] = {"generate": in_child("generate", work, n, args.months, args.seed)}
            show(f"generate {label}", n, args.months, results[label]["generate"])
            if args.features:
                results[label]["features"] = in_child("features", work, n, args.months, args.seed)
                show(f"features {label}", n, args.months, results[label]["features"])
        finally:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    scale = args.enterprises / args.baseline
    for task in results["measured"]:
        ratios(f"{task} ratios", results["baseline"][task], results["measured"][task], scale)
    print(verdict(args.enterprises, args.months, results["measured"]["generate"]))


if __name__ == "__main__":
    main()

"""Can `kapok watch` handle a book of 1,000,000 enterprises on this machine? Times it.

    nice python bench/watch.py [--enterprises 1000000] [--baseline 100000] [--months 36]
                               [--seed 7] [--work DIR] [--keep]

In one run: a baseline region of `--baseline` enterprises and the measured region of
`--enterprises`, each simulated (`kapok.bigdata.generate.generate`) and turned into feature
tables (`features.build.build`) in its own folder under `--work` (a temporary folder by default;
with `--work`, folders already complete from an earlier run are reused, so a second run measures
only the watch). A quick microloan model is trained on the baseline region
(`training.train.train`, one Optuna trial) and registered there as @champion; the measured run
scores with the same model. The portfolio of each run is every enterprise of its region (a
parquet file with seeded amounts and terms, read through `--portfolio`'s loader). As-of date: the
last snapshot of the data; previous: one month earlier.

Each watch runs in its own child process (multiprocessing, "spawn"), so its peak RSS
(`ru_maxrss`) is its own; wall time is measured around the watch only (portfolio read, model
load, point-in-time features at both dates, scoring, flags, TreeSHAP of the flagged rows, the
three output files), with the time of each step. It prints both runs, then the measured run as
ratios to the baseline (time, memory, time per enterprise: 1.0 means linear scaling), and a
verdict against the goal: 1,000,000 enterprises within 24 GiB (the machine) and 15 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# run as `python bench/watch.py`, sys.path[0] is bench/, where serving.py (the load benchmark)
# would shadow the serving package that review.watch imports (in the spawned children too)
sys.path[0] = str(Path(__file__).resolve().parents[1])

import kapok  # noqa: F401  (telemetry off before anything else is imported)

GOAL_ENTERPRISES, GOAL_SECONDS, GOAL_BYTES = 1_000_000, 900.0, 24 * 1024**3
GiB = 1024**3


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _prepare(home: str, enterprises: int, months: int, seed: int, train: bool) -> dict[str, Any]:
    """Child: simulate and build features (unless already there); train when asked."""
    from features import build as fb
    from features import raw_tables as rt
    from kapok.bigdata.generate import generate
    from kapok.bigdata.simulate import SimulationConfig
    from kapok.settings import Paths

    p = Paths(Path(home))
    out: dict[str, Any] = {}
    if not (p.raw / rt.MANIFEST).exists():
        t0 = time.perf_counter()
        generate(SimulationConfig(enterprises, months, seed), p.raw)
        out["generate_s"] = time.perf_counter() - t0
    if not (p.features / fb.MANIFEST).exists():
        t0 = time.perf_counter()
        fb.build(p.raw, p.features)
        out["features_s"] = time.perf_counter() - t0
    if train:
        from training.tracking import CHAMPION, alias_version, configure, model_name

        if alias_version(configure(p), model_name("microloan"), CHAMPION) is None:
            from features import store as fs
            from training.data import product_data
            from training.train import train as fit

            fs.apply(fs.feature_store(p), p)
            t0 = time.perf_counter()
            fit(product_data(p, "microloan"), p, trials=1, seed=seed)
            out["train_s"] = time.perf_counter() - t0
    return out


def _book(home: str, seed: int) -> str:
    """Child: the portfolio file, every enterprise of the region with a loan amount and term."""
    import numpy as np
    import polars as pl

    from features.raw_tables import enterprise_ids
    from kapok.settings import Paths

    path = Path(home) / "book.parquet"
    if not path.exists():
        ids = enterprise_ids(Paths(Path(home)).raw).to_frame()
        rng = np.random.default_rng(seed)
        ids.with_columns(
            requested_amount=pl.Series(rng.integers(2, 100, ids.height) * 10_000.0),
            term_months=pl.Series(rng.choice([6, 12, 24, 36], ids.height)),
        ).write_parquet(path)
    return str(path)


def _watch(home: str, model_home: str, book: str) -> dict[str, Any]:
    """Child: one watch, timed step by step, peak RSS measured."""
    from kapok.settings import Paths
    from review import portfolio as pf
    from review import watch

    before = _max_rss_bytes()
    p, model_paths = Paths(Path(home)), Paths(Path(model_home))
    marks: list[tuple[str, float]] = []

    def mark(what: str) -> None:  # a step starts; it lasts until the next mark
        marks.append((" ".join(what.split()[:2]), time.perf_counter()))

    as_of = pf.data_range(p.features)[1].date()
    previous = pf.months_before(as_of)
    mark("load champion")
    scorer, model = watch.champion(model_paths, "microloan")
    mark("read portfolio")
    frame = pf.from_file(Path(book), pf.end_of_day(as_of))
    source = f"bench book {Path(book).name}"
    result = watch.watch(p.features, scorer, frame, as_of, previous, product="microloan",
                         model=model, source=source, step=mark)  # fmt: skip
    mark("write outputs")
    watch.write_outputs(result, Path(home) / "reports")
    mark("end")
    seconds = marks[-1][1] - marks[0][1]
    steps = [(a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks)]
    return {
        "seconds": seconds,
        "peak": _max_rss_bytes(),
        "imports": before,
        "book": result.book_size,
        "scored": result.scores.height,
        "flagged": result.flagged.height,
        "flags": result.flag_counts(),
        "as_of": str(as_of),
        "steps": steps,
    }


def in_child(func: Any, *args: Any) -> Any:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(func, args)


def show(label: str, n: int, r: dict[str, Any]) -> None:
    print(
        f"{label:<9} {n:>9,} enterprises, as of {r['as_of']}: wall {r['seconds']:7.1f} s  "
        f"peak RSS {r['peak'] / GiB:5.2f} GiB (imports {r['imports'] / GiB:4.2f} GiB)  "
        f"scored {r['scored']:,}  flagged {r['flagged']:,} ({r['flagged'] / r['scored']:.1%})"
    )
    print("          steps: " + "; ".join(f"{name} {s:.1f} s" for name, s in r["steps"]))
    print("          flags: " + json.dumps(r["flags"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--enterprises", type=int, default=GOAL_ENTERPRISES)
    parser.add_argument("--baseline", type=int, default=100_000)
    parser.add_argument("--months", type=int, default=36)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, default=None, help="reuse/keep data folders here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kapok-bench-watch-"))
    homes = {
        "baseline": (work / f"n{args.baseline}-m{args.months}-s{args.seed}", args.baseline),
        "measured": (work / f"n{args.enterprises}-m{args.months}-s{args.seed}", args.enterprises),
    }
    try:
        for label, (home, n) in homes.items():
            t0 = time.perf_counter()
            done = in_child(_prepare, str(home), n, args.months, args.seed, label == "baseline")
            took = ", ".join(f"{k} {v:.0f} s" for k, v in done.items()) or "reused"
            print(f"prepared {label} ({n:,}) in {time.perf_counter() - t0:.0f} s: {took}")
        results = {}
        model_home = str(homes["baseline"][0])
        for label, (home, n) in homes.items():
            book = in_child(_book, str(home), args.seed)
            results[label] = in_child(_watch, str(home), model_home, book)
            show(label, n, results[label])
        base, meas = results["baseline"], results["measured"]
        scale = meas["book"] / base["book"]
        t, m = meas["seconds"] / base["seconds"], meas["peak"] / base["peak"]
        print(
            f"ratios    x{scale:.1f} enterprises: time x{t:.2f}  memory x{m:.2f}  "
            f"time per enterprise x{t / scale:.2f}"
        )
        ok_t, ok_m = meas["seconds"] <= GOAL_SECONDS, meas["peak"] <= GOAL_BYTES
        goal = "measured" if meas["book"] >= GOAL_ENTERPRISES else "NOT the goal size"
        print(
            f"verdict ({meas['book']:,} enterprises, {goal}): time {meas['seconds']:.0f} s vs "
            f"{GOAL_SECONDS:.0f} s {'OK' if ok_t else 'TOO SLOW'}; peak {meas['peak'] / GiB:.2f} "
            f"GiB vs {GOAL_BYTES / GiB:.0f} GiB {'OK' if ok_m else 'TOO BIG'} => "
            f"{'PASS' if ok_t and ok_m else 'FAIL'}"
        )
    finally:
        if args.work or args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Tuning that searches (issue 13): validation and test AUC against the number of Optuna trials,
Kapok's search against the pruner set-up it replaced and random search with the same number of
trials (the naive alternatives), with LightGBM's default parameters as the floor, in one run.

    python bench/tuning.py --home /tmp/kh                     # the figures in bench/RESULTS.md
    python bench/tuning.py --home /tmp/ksmoke --quick         # CI: a minute, keeps it working

Data: the simulated products of a trained home (their matured applications through Feast point
in time, read once and cached under --cache, since Feast takes minutes on a 100,000-enterprise
home) and the two shipped real data sets. Each search runs one fresh study per trial count, as
`kapok train --trials N` would (TPE's random start-up depends on N), in memory, seeded; random
search runs once, with the most trials, and is read at each count (its first N trials are exactly
a study of N trials).

* simulated products, out of time as `kapok train` splits them: tuned on the training window
  against the validation window; "valid AUC" is the study's best value; "test AUC" is the best
  parameters refit on train + validation with the early-stopped rounds scaled (as train() does)
  and scored on the test window (raw margin: calibration is monotone and leaves AUC alone).
* real sets (no timestamps): one stratified hold-out (--holdout of the rows) is the test set;
  tuning runs train()'s 5-fold cross-validation on the rest ("valid AUC" is its best mean AUC),
  the final model is fit on the rest with the cross-validated rounds.
* the floor: LightGBM's default parameters (31 leaves, learning rate 0.1, no depth limit) with
  Kapok's fixed ones (monotone constraints, seed), early-stopped and refit the same way: 0 trials.
* the timing goal, "a 50-trial study on 50,000 applications fits in 10 minutes": `train()` (the
  whole of `kapok train`: tuning, refit, calibration, MLflow logging, registration) on the
  simulated products' matured applications stacked, the latest 50,000, 50 trials.

Wall times are on a shared machine: the ratios measured in the same run (time against random
search, AUC against the floor and the old set-up) are what to compare. Run by hand, never as a
test; `--quick` is what `make bench-smoke` runs.
"""

from __future__ import annotations

import os

# before LightGBM loads its OpenMP runtime: idle threads sleep instead of spinning on a shared
# machine (bench/quality.py measured 25x slower training with spinning threads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import optuna
import polars as pl
from optuna_integration import LightGBMPruningCallback
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kapok  # noqa: F401  (telemetry off)
from features.spec import load_spec
from kapok.settings import Paths
from training.data import LABEL, TIME, TrainingData, out_of_time_split, product_data, spec_data
from training.scorer import category_levels, encode
from training.train import _monotone, train
from training.tune import (
    SEARCH,
    Matrices,
    Search,
    base_params,
    best_params,
    cross_validate,
    fit,
    refit,
    summarize,
    tune,
)

ROOT = Path(__file__).resolve().parents[1]
PRODUCTS = ("microloan", "guarantee", "insurance")
REAL = ("german_credit", "credit_scoring_belanche")
TIMING_ROWS, TIMING_TRIALS, TIMING_SECONDS = 50_000, 50, 600.0


OLD = Search(
    name="TPE; MedianPruner(5 start-up trials, warm-up 30) on the current AUC / 10 rounds",
    sampler=SEARCH.sampler,
    pruner=lambda trials: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=30),
    # as before issue 13: the current round's AUC, the step being the 0-based iteration
    reporter=lambda trial: LightGBMPruningCallback(trial, "auc", "valid", report_interval=10),
)
RANDOM = Search(
    name="random search, no pruning",
    sampler=lambda seed, trials: optuna.samplers.RandomSampler(seed=seed),
    pruner=lambda trials: optuna.pruners.NopPruner(),
    reporter=None,
)
TPE_ONLY = Search(
    name="TPE, no pruning",
    sampler=SEARCH.sampler,
    pruner=lambda trials: optuna.pruners.NopPruner(),
    reporter=None,
)
SEARCHES = {"kapok": SEARCH, "old": OLD, "random": RANDOM, "tpe": TPE_ONLY}


def say(text: str = "") -> None:
    print(text, flush=True)


def note(text: str) -> None:
    """Progress, to stderr: not part of the report."""
    print(f"  .. {text}", file=sys.stderr, flush=True)


def hanley_se(auc: float, y: np.ndarray) -> float:
    """Hanley & McNeil's standard error of an AUC: how far apart two AUCs on this test set must
    be before the difference means anything (paired differences are less noisy than this)."""
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    return float(np.sqrt(var))


# -- data -----------------------------------------------------------------------------------------
def _linked_home(tmp: Path, home: Paths) -> Paths:
    """A throwaway KAPOK_HOME reading the home's raw and feature tables: nothing written there."""
    from features import store as fs

    p = Paths(tmp)
    p.data.mkdir(parents=True)
    (p.data / "raw").symlink_to(home.raw)
    (p.data / "features").symlink_to(home.features)
    fs.apply(fs.feature_store(p), p)
    return p


def product_sets(home: Paths, products: list[str], cache: Path) -> dict[str, TrainingData]:
    """The products' training data, from the cache when these very tables were read before (the
    key: the home, its raw and feature manifests and when they were written)."""
    from features.build import MANIFEST as FEATURES
    from features.raw_tables import MANIFEST as RAW

    stamp = [str(home.home)]
    for manifest in (home.raw / RAW, home.features / FEATURES):
        stamp += [manifest.read_text(), str(manifest.stat().st_mtime_ns)]
    key = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    folder = cache / key
    out: dict[str, TrainingData] = {}
    missing = [p for p in products if not (folder / f"{p}.json").exists()]
    if missing:
        with tempfile.TemporaryDirectory(prefix="kapok-bench-tuning-") as tmp:
            linked = _linked_home(Path(tmp), home)
            for product in missing:
                note(f"{product}: the training set through Feast (cached in {folder})")
                data = product_data(linked, product)
                folder.mkdir(parents=True, exist_ok=True)
                data.frame.write_parquet(folder / f"{product}.parquet")
                meta = {
                    f.name: getattr(data, f.name)
                    for f in dataclasses.fields(data)
                    if f.name != "frame"
                }
                (folder / f"{product}.json").write_text(json.dumps(meta))
    for product in products:
        meta = json.loads((folder / f"{product}.json").read_text())
        frame = pl.read_parquet(folder / f"{product}.parquet")
        out[product] = TrainingData(frame=frame, **meta)
    return out


@dataclass
class Problem:
    """One data set as the searches see it: tuning matrices and how to score a parameter set."""

    name: str
    description: str
    tuning: Matrices
    base: dict
    x_fit: np.ndarray  # the rows the final model learns from
    y_fit: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    out_of_time: bool

    def test_auc(self, params: dict, rounds: int) -> float:
        """Fit as train() would with these parameters and score the test rows. rounds: the
        early-stopped rounds on the training window (out of time; train() scales them to the
        larger sample), or the cross-validated rounds."""
        if self.out_of_time:
            rounds = max(1, round(rounds * len(self.y_fit) / len(self.tuning.y_train)))
        booster = refit(self.x_fit, self.y_fit, self.tuning.feature_names, params, rounds)
        return float(roc_auc_score(self.y_test, booster.predict(self.x_test, raw_score=True)))


def _encoded(data: TrainingData, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    frame = data.frame
    x = encode(frame, data.features, category_levels(frame, data.categorical))
    cat = [data.features.index(c) for c in data.categorical]
    return x, frame[LABEL].to_numpy().astype(int), base_params(seed, _monotone(data), cat)


def simulated_problem(data: TrainingData, seed: int) -> Problem:
    x, y, base = _encoded(data, seed)
    split = out_of_time_split(data.frame[TIME])
    develop = np.concatenate([split.train, split.valid])
    m = Matrices(x[split.train], y[split.train], x[split.valid], y[split.valid], data.features)
    w = split.windows
    description = (
        f"{data.frame.height:,} matured applications, {len(data.features)} features; train "
        f"{w['train']} ({len(split.train):,}), valid {w['valid']} ({len(split.valid):,}), test "
        f"{w['test']} ({len(split.test):,}, bad rate {y[split.test].mean():.3f})"
    )
    return Problem(data.name, description, m, base, x[develop], y[develop], x[split.test],
                   y[split.test], out_of_time=True)  # fmt: skip


def real_problem(name: str, seed: int, holdout: float) -> Problem:
    data = spec_data(load_spec(ROOT / "datasets" / f"{name}.toml"))
    x, y, base = _encoded(data, seed)
    rest, test = train_test_split(
        np.arange(len(y)), test_size=holdout, stratify=y, random_state=seed
    )
    m = Matrices(x[rest], y[rest], None, None, data.features)
    description = (
        f"{len(y):,} rows, {len(data.features)} features, no timestamp; stratified hold-out "
        f"{len(test):,} rows (bad rate {y[test].mean():.3f}) as the test set, 5-fold CV on the "
        f"other {len(rest):,} for tuning"
    )
    return Problem(name, description, m, base, x[rest], y[rest], x[test], y[test],
                   out_of_time=False)  # fmt: skip


# -- searches -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    search: str
    trials: int
    complete: int
    pruned: int
    pruned_rounds: list[int]
    best_trial: int
    valid_auc: float
    test_auc: float
    seconds: float  # tuning only


def outcome(problem: Problem, key: str, study: optuna.Study, seconds: float) -> Outcome:
    s = summarize(study)
    params, rounds = best_params(study, problem.base, len(problem.tuning.y_train))
    return Outcome(key, s.trials, s.complete, s.pruned, s.pruned_rounds, s.best_trial,
                   s.best_value, problem.test_auc(params, rounds), seconds)  # fmt: skip


def run_search(problem: Problem, key: str, counts: list[int], seed: int) -> list[Outcome]:
    """One study per trial count; random search (no pruning) once, with the most trials: its
    sampler draws the same parameters whatever came before, so its first N trials are exactly a
    study of N trials, and their time is the sum of theirs."""
    search = SEARCHES[key]
    prefixes = search is RANDOM
    out = []
    for trials in [max(counts)] if prefixes else counts:
        note(f"{problem.name}: {key}, {trials} trials")
        start = time.perf_counter()
        study = tune(problem.tuning, problem.base, seed=seed, trials=trials, timeout=None,
                     storage=None, study_name=f"{problem.name}-{key}-{trials}",
                     search=search)  # fmt: skip
        seconds = time.perf_counter() - start
        if not prefixes:
            out.append(outcome(problem, key, study, seconds))
            continue
        for n in counts:
            first = study.trials[:n]
            part = optuna.create_study(direction="maximize")
            part.add_trials(first)
            spent = sum((t.duration or dt.timedelta()).total_seconds() for t in first)
            out.append(outcome(problem, key, part, spent))
    return out


def floor(problem: Problem, seed: int) -> Outcome:
    """LightGBM's defaults for every searched parameter, in Kapok's pipeline: no trials."""
    start = time.perf_counter()
    params = dict(problem.base)
    if problem.out_of_time:
        booster, valid = fit(problem.tuning, params)
        rounds = booster.best_iteration
    else:
        valid, rounds = cross_validate(problem.tuning, params, seed)
    seconds = time.perf_counter() - start
    return Outcome("floor", 0, 1, 0, [], 0, valid, problem.test_auc(params, rounds), seconds)


def pruned_text(o: Outcome) -> str:
    if not o.pruned:
        return "0"
    low, high = min(o.pruned_rounds), max(o.pruned_rounds)
    return f"{o.pruned} ({low})" if low == high else f"{o.pruned} ({low}-{high})"


def bench_problem(problem: Problem, keys: list[str], counts: list[int], seed: int) -> list[Outcome]:
    say(f"## {problem.name}: {problem.description}")
    base = floor(problem, seed)
    se = hanley_se(base.test_auc, problem.y_test)
    outcomes = [base]
    for key in keys:
        outcomes += run_search(problem, key, counts, seed)
    outcomes.sort(key=lambda o: (o.trials, keys.index(o.search) if o.trials else -1))
    by = {(o.search, o.trials): o for o in outcomes}
    header = (
        f"{'search':8} {'trials':>6} {'done':>4} {'pruned (rounds)':>16} {'best#':>5} "
        f"{'valid AUC':>9} {'test AUC':>8} {'vs floor':>8} {'vs old':>7} {'vs random':>9} "
        f"{'tuning s':>8} {'x random':>8}"
    )
    say(header)
    say("-" * len(header))
    for o in outcomes:
        old, rnd = by.get(("old", o.trials)), by.get(("random", o.trials))
        vs_old = f"{o.test_auc - old.test_auc:+.4f}" if old and o.search != "old" else ""
        vs_rnd = f"{o.test_auc - rnd.test_auc:+.4f}" if rnd and o.search != "random" else ""
        x_rnd = f"{o.seconds / rnd.seconds:.2f}" if rnd and o.trials else ""
        say(
            f"{o.search:8} {o.trials:6d} {o.complete:4d} {pruned_text(o):>16} {o.best_trial:5d} "
            f"{o.valid_auc:9.4f} {o.test_auc:8.4f} {o.test_auc - base.test_auc:+8.4f} "
            f"{vs_old:>7} {vs_rnd:>9} {o.seconds:8.1f} {x_rnd:>8}"
        )
    say(f"test AUC standard error (Hanley-McNeil, one model): {se:.4f}")
    say()
    return outcomes


# -- the timing goal ------------------------------------------------------------------------------
def timing(sets: dict[str, TrainingData], trials: int, seed: int, rows: int) -> None:
    say(
        f"## timing goal: a {TIMING_TRIALS}-trial study on {TIMING_ROWS:,} applications fits in "
        f"{TIMING_SECONDS / 60:.0f} minutes"
    )
    first = next(iter(sets.values()))
    frame = pl.concat([d.frame for d in sets.values()]).sort(TIME, "application_id").tail(rows)
    data = dataclasses.replace(first, name="timing", frame=frame)
    clock = {"last": 0.0, "n": 0}

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        clock["last"], clock["n"] = time.perf_counter(), clock["n"] + 1

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="kapok-bench-tuning-train-") as tmp:
        start = time.perf_counter()
        result = train(data, Paths(Path(tmp)), trials=trials, seed=seed, on_trial=on_trial)
        total = time.perf_counter() - start
    tuning = clock["last"] - start
    say(
        f"applications: {frame.height:,} (the matured applications of {', '.join(sets)} stacked, "
        f"the latest {rows:,}); train window {int(result.windows['train']['rows']):,} rows"
    )
    per_trial = tuning / max(clock["n"], 1)
    say(f"train(): {total:.1f} s = {total / 60:.2f} min; tuning {tuning:.1f} s "
        f"({per_trial:.2f} s a trial), the rest {total - tuning:.1f} s")  # fmt: skip
    say(f"tuning: {result.tuning.line()}")
    if frame.height >= TIMING_ROWS and trials == TIMING_TRIALS:
        met = "MET" if total <= TIMING_SECONDS else "NOT MET"
        say(f"{total:.0f} s vs {TIMING_SECONDS:.0f} s: {met}")
    else:
        say(f"{frame.height:,} rows, {trials} trials: not the goal's condition, no verdict")
    say()


# -- main -----------------------------------------------------------------------------------------
def quiet() -> None:
    for name in ("mlflow", "alembic", "feast", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KAPOK_HOME", ".")))
    parser.add_argument("--trials", default="5,10,20,40", help="trial counts, one study each")
    parser.add_argument("--searches", default="kapok,old,random", help=f"of {','.join(SEARCHES)}")
    parser.add_argument("--products", default=",".join(PRODUCTS))
    parser.add_argument("--real", default=",".join(REAL), help='real data sets ("" for none)')
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--holdout", type=float, default=0.3, help="real sets' test share")
    parser.add_argument("--timing-trials", type=int, default=TIMING_TRIALS, help="0: skip")
    parser.add_argument("--timing-rows", type=int, default=TIMING_ROWS)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/kapok-bench-tuning-cache"))
    parser.add_argument("--quick", action="store_true", help="tiny: keeps the benchmark working")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.products, args.real = "2,4", "microloan", "german_credit"
        args.timing_trials = 3
    quiet()
    counts = [int(n) for n in split_list(args.trials)]
    keys = split_list(args.searches)
    unknown = set(keys) - set(SEARCHES)
    if unknown:
        parser.error(f"unknown searches {sorted(unknown)}: choose from {', '.join(SEARCHES)}")
    home = Paths(args.home.expanduser().resolve())

    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    say(f"# bench/tuning.py  {now}  load {load}  cpus {os.cpu_count()}")
    say(f"# command: {' '.join(sys.argv)}")
    say(f"# lightgbm {lgb.__version__}, optuna {optuna.__version__}; home {home.home}; seed "
        f"{args.seed}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")  # fmt: skip
    for key in keys:
        say(f"# {key}: {SEARCHES[key].name}")
    say("# floor: LightGBM's default parameters with Kapok's fixed ones, no tuning")
    say()
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    products = split_list(args.products)
    sets = product_sets(home, products, args.cache) if products else {}
    problems = [simulated_problem(d, args.seed) for d in sets.values()]
    problems += [real_problem(n, args.seed, args.holdout) for n in split_list(args.real)]
    for problem in problems:
        outcomes = bench_problem(problem, keys, counts, args.seed)
        results[problem.name] = [dataclasses.asdict(o) for o in outcomes]

    say("## test AUC against the number of trials (floor: 0 trials)")
    say(f"{'data set':24} {'search':8} {'floor':>7} " + " ".join(f"{n:>7}" for n in counts))
    for name, rows in results.items():
        by = {(r["search"], r["trials"]): r for r in rows}
        for key in keys:
            cells = " ".join(f"{by[(key, n)]['test_auc']:7.4f}" for n in counts)
            say(f"{name:24} {key:8} {by[('floor', 0)]['test_auc']:7.4f} {cells}")
    say()
    if args.timing_trials and sets:
        timing(sets, args.timing_trials, args.seed, args.timing_rows)
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    say(f"# wall time {time.perf_counter() - started:.0f} s; load at the end {load}")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    (out / f"tuning-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

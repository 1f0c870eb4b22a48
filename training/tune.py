"""Optuna (TPE, seeded) over the LightGBM parameters that matter, with pruning and a resumable
study stored in SQLite under the MLflow store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import optuna
from lightgbm.callback import CallbackEnv

# Trees are kept shallow: exact TreeSHAP (every decision's reasons) costs about trees x leaves x
# depth^2, and on the simulated products depth-3/4 models match the out-of-time AUC of unlimited
# leaf-wise trees (depth ~20) at 1/20-1/60 of the TreeSHAP time (bench/reasons_cost.py)
MAX_DEPTH = (3, 4)
# part of the study name: change it whenever suggest() or what trials report to the pruner
# changes (a resumed study must not mix trials judged in two ways)
SEARCH_SPACE = "space3-p2"
MAX_ROUNDS = 300
EARLY_STOPPING = 100
# Pruning (issue 13). Before, MedianPruner(5 start-up trials, 30 warm-up rounds) judged the AUC of
# the current round: on the 100,000-enterprise microloan it pruned 35 of 40 trials at round 39 and
# kept one of the first five. Before round ~100 the AUC a trial has reached ranks trials by their
# learning rate, not by the AUC they end with: over 60 random trials (microloan / insurance) the
# rank correlation of the best AUC so far with the final validation AUC is -0.07 / 0.64 at round
# 40, 0.73 / 0.96 at round 100 and 0.99 at round 150; with the learning rate 0.71 / 0.37 at round
# 40 and 0.00 / 0.03 at round 100. Hence:
# - no trial is judged before round PRUNING_WARMUP, the early-stopping patience: a trial is not cut
#   before early stopping itself could have given up on it;
# - a trial reports the best validation AUC so far: what early stopping keeps and what the
#   trial's value will be;
# - pruning starts once the sampler's random start-up trials have all completed: the median is
#   taken over at least those, and TPE learns from complete trials.
# Replayed through Optuna on those 60 trials' curves (30 random orders of 40 trials, microloan /
# insurance), this rule kept the best trial in every order at 0.71 / 0.74 of the boosting rounds
# of no pruning. With 5 start-up trials it cost 0.65 / 0.68 and lost the best trial in 7% / 0% of
# orders; successive halving from round 100 cost 0.65-0.73 and lost it in 3-7% / 0%; Hyperband
# (100-300 rounds) cost 0.79 / 0.82; the old rule cost 0.39 / 0.42 and lost the best trial in
# 77% / 10% of orders. bench/tuning.py measures whole searches, TPE included.
PRUNING_WARMUP = EARLY_STOPPING
# Optuna's pruner reads every trial from its SQLite storage at each report: reporting every round
# spent about 70% of a small study's tuning time there (cProfile); judging every 20 rounds kept
# the same trials as every 10 in the replays
PRUNING_REPORT_INTERVAL = 20


def base_params(seed: int, monotone: list[int], categorical: list[int]) -> dict[str, Any]:
    """Fixed parameters: reproducible (deterministic, fixed threads), binary log loss."""
    return {
        "objective": "binary",
        "metric": "auc",
        "verbosity": -1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 2,
        "feature_pre_filter": False,
        "monotone_constraints": monotone,
        "categorical_feature": categorical,
    }


def suggest(trial: optuna.Trial, n_train: int = 100_000) -> dict[str, Any]:
    """The search space; leaf sizes scale with the data so that no trial is unable to split."""
    max_child = max(20, min(500, n_train // 20))
    bagging = trial.suggest_float("bagging_fraction", 0.5, 1.0)
    depth = trial.suggest_int("max_depth", *MAX_DEPTH)
    return {
        "max_depth": depth,
        "num_leaves": trial.suggest_int("num_leaves", 4, 2**depth),
        # at most 0.1: faster rates let a 16-round model win on the validation window and lose
        # 0.013 AUC out of time (guarantee, 100,000 enterprises)
        "learning_rate": trial.suggest_float("learning_rate", 0.03, 0.1, log=True),
        "min_child_samples": trial.suggest_int("min_child_samples", 10, max_child, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.3, 1.0),
        "bagging_fraction": bagging,
        "bagging_freq": 1 if bagging < 1.0 else 0,
        "lambda_l1": trial.suggest_float("lambda_l1", 1e-8, 10.0, log=True),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-8, 10.0, log=True),
        "min_gain_to_split": trial.suggest_float("min_gain_to_split", 0.0, 0.5),
        "monotone_constraints_method": trial.suggest_categorical(
            "monotone_constraints_method", ["basic", "intermediate", "advanced"]
        ),
        "cat_smooth": trial.suggest_float("cat_smooth", 1.0, 50.0, log=True),
    }


@dataclass
class Matrices:
    """Training matrices: out-of-time (train/valid) or, without timestamps, all rows for K-fold."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray | None
    y_valid: np.ndarray | None
    feature_names: list[str]


def _datasets(m: Matrices, params: dict) -> tuple[lgb.Dataset, lgb.Dataset | None]:
    common = {
        "feature_name": m.feature_names,
        "categorical_feature": params["categorical_feature"],
        "free_raw_data": False,
        # the K-fold path trains on subsets, which construct this Dataset before lgb.train sees
        # the parameters: say here what the training parameters say
        "params": {"feature_pre_filter": False},
    }
    train = lgb.Dataset(m.x_train, m.y_train, **common)
    if m.x_valid is None:
        return train, None
    return train, lgb.Dataset(m.x_valid, m.y_valid, reference=train, **common)


def lgb_params(params: dict) -> dict:
    """The parameters as lgb.train takes them: categoricals belong to the Dataset, not here."""
    return {k: v for k, v in params.items() if k != "categorical_feature"}


Reporter = Callable[[CallbackEnv], None]  # a LightGBM callback that reports to Optuna's pruner


def valid_auc(env: CallbackEnv) -> float:
    """This round's validation AUC (lgb.train's "valid" set, or lgb.cv's mean over the folds)."""
    for result in env.evaluation_result_list or []:
        if result[0] == "valid" and result[1] in ("auc", "valid auc"):
            return float(result[2])
    raise ValueError(f"no validation AUC in {env.evaluation_result_list}")


class BestSoFar:
    """Reports the trial's best validation AUC so far from round PRUNING_WARMUP on, every
    PRUNING_REPORT_INTERVAL rounds (the step is the number of rounds run), and raises
    optuna.TrialPruned when the pruner says so; the round is kept as the trial's user attribute
    "pruned_at_round". Nothing is reported before the warm-up: the pruner would not look at it,
    and every report is a write to the study's SQLite store (~40 ms each on this machine)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.best = trial, -np.inf

    def __call__(self, env: CallbackEnv) -> None:
        self.best = max(self.best, valid_auc(env))
        rounds = env.iteration + 1
        if rounds < PRUNING_WARMUP or (rounds - PRUNING_WARMUP) % PRUNING_REPORT_INTERVAL:
            return
        self.trial.report(self.best, rounds)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_round", rounds)
            raise optuna.TrialPruned(f"pruned after {rounds} rounds, best AUC {self.best:.4f}")


def _callbacks(reporter: Reporter | None) -> list[Callable]:
    """Early stopping, plus the reporter to Optuna's pruner when tuning."""
    callbacks: list[Callable] = [lgb.early_stopping(EARLY_STOPPING, verbose=False)]
    if reporter is not None:
        callbacks.append(reporter)
    return callbacks


def fit(m: Matrices, params: dict, reporter: Reporter | None = None) -> tuple[lgb.Booster, float]:
    """Train with early stopping on the validation window; returns the booster and its AUC."""
    train, valid = _datasets(m, params)
    booster = lgb.train(
        lgb_params(params),
        train,
        MAX_ROUNDS,
        valid_sets=[valid],
        valid_names=["valid"],
        callbacks=_callbacks(reporter),
    )
    return booster, float(booster.best_score["valid"]["auc"])


def refit(
    x: np.ndarray, y: np.ndarray, features: list[str], params: dict, rounds: int
) -> lgb.Booster:
    """The final model: the tuned parameters on all development rows, a fixed number of rounds."""
    m = Matrices(x, y, None, None, features)
    train, _ = _datasets(m, params)
    return lgb.train(lgb_params(params), train, rounds)


def cross_validate(
    m: Matrices, params: dict, seed: int, reporter: Reporter | None = None
) -> tuple[float, int]:
    """Stratified 5-fold AUC and the mean best number of rounds (datasets without timestamps)."""
    train, _ = _datasets(m, params)
    result = lgb.cv(
        lgb_params(params),
        train,
        MAX_ROUNDS,
        nfold=5,
        stratified=True,
        seed=seed,
        callbacks=_callbacks(reporter),
    )
    scores = result["valid auc-mean"]
    return float(scores[-1]), len(scores)


def study_storage(mlruns: Path) -> str:
    mlruns.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlruns / 'optuna.db'}"


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the search, and completed trials before any pruning."""
    return min(10, max(trials // 3, 3))


@dataclass(frozen=True)
class Search:
    """How a study searches: its sampler, its pruner and what each trial reports to the pruner.
    Kapok's is SEARCH; bench/tuning.py measures it against the alternatives."""

    name: str
    sampler: Callable[[int, int], optuna.samplers.BaseSampler]  # (seed, trials)
    pruner: Callable[[int], optuna.pruners.BasePruner]  # (trials)
    reporter: Callable[[optuna.Trial], Reporter] | None  # None: nothing reported, no pruning


SEARCH = Search(
    name=(
        f"TPE; median pruning from round {PRUNING_WARMUP} on the best validation AUC so far, "
        f"every {PRUNING_REPORT_INTERVAL} rounds, once the random start-up trials completed"
    ),
    sampler=lambda seed, trials: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup_trials(trials)
    ),
    pruner=lambda trials: optuna.pruners.MedianPruner(
        n_startup_trials=startup_trials(trials), n_warmup_steps=PRUNING_WARMUP
    ),
    reporter=BestSoFar,
)


def tune(
    m: Matrices,
    base: dict,
    *,
    seed: int,
    trials: int,
    timeout: float | None,
    storage: str | None,
    study_name: str,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    search: Search = SEARCH,
) -> optuna.Study:
    """Run until the study holds `trials` finished trials (a re-run resumes, never repeats).

    Reproducible: trials run one at a time, each LightGBM fit is deterministic and the pruner
    judges stored values only, so the same data, seed and trials give the same trials, pruned at
    the same rounds, and the same best parameters. A --timeout that stops tuning early is the
    exception: how many trials ran then depends on the machine. storage None: in memory."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        sampler=search.sampler(seed, trials),
        pruner=search.pruner(trials),
        load_if_exists=True,
    )
    done = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}

    def objective(trial: optuna.Trial) -> float:
        params = base | suggest(trial, len(m.y_train))
        reporter = search.reporter(trial) if search.reporter else None
        if m.x_valid is None:
            auc, rounds = cross_validate(m, params, seed, reporter)
        else:
            booster, auc = fit(m, params, reporter)
            rounds = booster.best_iteration
        trial.set_user_attr("rounds", int(rounds))
        return auc

    remaining = trials - sum(t.state in done for t in study.trials)
    if remaining > 0:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=timeout,
            callbacks=[on_trial] if on_trial else None,
            catch=(),
        )
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise RuntimeError("no Optuna trial completed: raise --trials or --timeout")
    return study


@dataclass(frozen=True)
class Summary:
    """What a study did: how many trials completed, how many were pruned and when."""

    trials: int
    complete: int
    pruned: int
    pruned_rounds: list[int]  # the round each pruned trial was stopped at, in trial order
    best_trial: int
    best_value: float

    def line(self) -> str:
        """One line for the CLI and the benchmarks."""
        at = ""
        if self.pruned_rounds:
            low, high = min(self.pruned_rounds), max(self.pruned_rounds)
            at = f" after {low}" if low == high else f" after {low}-{high}"
            at += " rounds"
        return (
            f"{self.trials} trials: {self.complete} completed, {self.pruned} pruned{at}; "
            f"best trial #{self.best_trial}, validation AUC {self.best_value:.4f}"
        )


def summarize(study: optuna.Study) -> Summary:
    state = optuna.trial.TrialState
    trials = study.trials
    pruned = [t for t in trials if t.state == state.PRUNED]
    return Summary(
        trials=len(trials),
        complete=sum(t.state == state.COMPLETE for t in trials),
        pruned=len(pruned),
        pruned_rounds=[int(t.user_attrs.get("pruned_at_round", t.last_step or 0)) for t in pruned],
        best_trial=study.best_trial.number,
        best_value=float(study.best_value),
    )


def best_params(study: optuna.Study, base: dict, n_train: int) -> tuple[dict, int]:
    """Parameters of the best trial, as LightGBM takes them, and its number of rounds."""
    best = study.best_trial
    fixed = optuna.trial.FixedTrial(best.params)
    return base | suggest(fixed, n_train), int(best.user_attrs["rounds"])

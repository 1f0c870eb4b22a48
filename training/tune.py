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
from optuna_integration import LightGBMPruningCallback

# Trees are kept shallow: exact TreeSHAP (every decision's reasons) costs about trees x leaves x
# depth^2, and on the simulated products depth-3/4 models match the out-of-time AUC of unlimited
# leaf-wise trees (depth ~20) at 1/20-1/60 of the TreeSHAP time (bench/reasons_cost.py)
MAX_DEPTH = (3, 4)
SEARCH_SPACE = "space3"  # part of the study name: change it whenever suggest() changes
MAX_ROUNDS = 300
EARLY_STOPPING = 100
# Optuna's pruner reads every trial from its SQLite storage at each report: reporting every round
# spent about 70% of a small study's tuning time there (cProfile); every 10th round is enough to
# stop a hopeless trial early
PRUNING_REPORT_INTERVAL = 10


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


def _callbacks(trial: optuna.Trial | None) -> list[Callable]:
    """Early stopping, plus Optuna pruning on the validation AUC when tuning."""
    callbacks: list[Callable] = [lgb.early_stopping(EARLY_STOPPING, verbose=False)]
    if trial is not None:
        callbacks.append(
            LightGBMPruningCallback(
                trial, "auc", valid_name="valid", report_interval=PRUNING_REPORT_INTERVAL
            )
        )
    return callbacks


def fit(m: Matrices, params: dict, trial: optuna.Trial | None = None) -> tuple[lgb.Booster, float]:
    """Train with early stopping on the validation window; returns the booster and its AUC."""
    train, valid = _datasets(m, params)
    booster = lgb.train(
        lgb_params(params),
        train,
        MAX_ROUNDS,
        valid_sets=[valid],
        valid_names=["valid"],
        callbacks=_callbacks(trial),
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
    m: Matrices, params: dict, seed: int, trial: optuna.Trial | None = None
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
        callbacks=_callbacks(trial),
    )
    scores = result["valid auc-mean"]
    return float(scores[-1]), len(scores)


def study_storage(mlruns: Path) -> str:
    mlruns.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlruns / 'optuna.db'}"


def tune(
    m: Matrices,
    base: dict,
    *,
    seed: int,
    trials: int,
    timeout: float | None,
    storage: str,
    study_name: str,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> optuna.Study:
    """Run until the study holds `trials` finished trials (a re-run resumes, never repeats)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=min(10, max(trials // 3, 3))
        ),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=30),
        load_if_exists=True,
    )
    done = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}

    def objective(trial: optuna.Trial) -> float:
        params = base | suggest(trial, len(m.y_train))
        if m.x_valid is None:
            auc, rounds = cross_validate(m, params, seed, trial)
        else:
            booster, auc = fit(m, params, trial)
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


def best_params(study: optuna.Study, base: dict, n_train: int) -> tuple[dict, int]:
    """Parameters of the best trial, as LightGBM takes them, and its number of rounds."""
    best = study.best_trial
    fixed = optuna.trial.FixedTrial(best.params)
    return base | suggest(fixed, n_train), int(best.user_attrs["rounds"])

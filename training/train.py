"""`kapok train`: tune, fit, calibrate and validate one model, log it to MLflow and register it.

Out of time when the data has application dates (train on the oldest months, tune and calibrate
on the next, report on the most recent); repeated stratified K-fold when it has none.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import mlflow
import numpy as np
import optuna
import polars as pl
from mlflow.models import infer_signature
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

import kapok
from kapok.settings import Paths
from training import plots
from training.calibration import aligned, fit_calibrator
from training.data import LABEL, TIME, TrainingData, describe_windows
from training.metrics import binary_metrics, psi
from training.pyfunc import KapokModel, model_input
from training.scorer import Scorer, category_levels, encode
from training.tracking import CHALLENGER, CHAMPION, alias_version, configure, experiment
from training.tracking import model_name as registered_name
from training.tune import (
    SEARCH,
    SEARCH_SPACE,
    Matrices,
    Summary,
    _datasets,
    base_params,
    best_params,
    fit,
    lgb_params,
    refit,
    study_storage,
    summarize,
    tune,
)

KFOLD_REPEATS = 2
MIN_SEGMENT_ROWS = 50
REFERENCE_ROWS = 50_000  # training-window rows kept as the reference for stability and monitoring
PD_COLUMN, MARGIN_COLUMN = "kapok_pd", "kapok_margin"


@dataclass
class TrainResult:
    model_name: str
    version: str
    alias: str
    run_id: str
    validation: str
    metrics: dict[str, float]
    windows: dict[str, Any]
    scorer: Scorer
    study_name: str
    tuning: Summary  # the Optuna study: trials completed and pruned, best trial


def _monotone(data: TrainingData) -> list[int]:
    return [0 if f in data.categorical else data.directions.get(f, 0) for f in data.features]


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def segment_metrics(
    frame: pl.DataFrame, segments: list[str], y: np.ndarray, p: np.ndarray
) -> dict[str, dict[str, dict[str, float]]]:
    """The test-window metrics per value of each segment column (small groups left out)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for seg in segments:
        values = frame[seg].cast(pl.String).fill_null("(missing)").to_numpy()
        out[seg] = {}
        for value in sorted(set(values)):
            mask = values == value
            if mask.sum() >= MIN_SEGMENT_ROWS:
                out[seg][str(value)] = binary_metrics(y[mask], p[mask])
    return out


def train(
    data: TrainingData,
    paths: Paths,
    *,
    trials: int = 30,
    timeout: float | None = None,
    seed: int = 7,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> TrainResult:
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    frame, features = data.frame, data.features
    y = frame[LABEL].to_numpy().astype(int)
    categories = category_levels(frame, data.categorical)
    x = encode(frame, features, categories)
    cat_idx = [features.index(c) for c in data.categorical]
    base = base_params(seed, _monotone(data), cat_idx)
    fingerprint = data.fingerprint()
    name = registered_name(data.name)
    # the search space's version too: a study resumed across a change of space would mix trials
    study_name = f"{name}-{fingerprint['content_hash']}-seed{seed}-{SEARCH_SPACE}"
    if data.valid_months or data.test_months:  # tuned on another validation window: its own study
        study_name += f"-valid{data.valid_months or 'auto'}-test{data.test_months or 'auto'}"
    storage = study_storage(paths.mlruns)

    if data.has_time:
        split = data.split()
        m = Matrices(x[split.train], y[split.train], x[split.valid], y[split.valid], features)
        study = tune(m, base, seed=seed, trials=trials, timeout=timeout, storage=storage,
                     study_name=study_name, on_trial=on_trial)  # fmt: skip
        params, _ = best_params(study, base, len(m.y_train))
        held_out, _ = fit(m, params)  # train window only, early-stopped on validation
        develop = np.concatenate([split.train, split.valid])
        held_margin = held_out.predict(x[develop], raw_score=True)  # validation rows come last
        # calibration shape from the held-out validation margins, level from the long-run
        # default rate of all development months (training.calibration explains why)
        calibrator, losses = fit_calibrator(
            held_margin[len(split.train) :], y[split.valid], level=float(y[develop].mean())
        )
        # the model that ships learns from the validation months too (the most recent before the
        # test window), with the early-stopped number of rounds scaled to the larger sample
        rounds = max(1, round(held_out.best_iteration * len(develop) / len(split.train)))
        booster = refit(x[develop], y[develop], features, params, rounds)
        margin_all = booster.predict(x, raw_score=True)
        calibrator = aligned(calibrator, margin_all[develop], held_margin)
        p_all = calibrator(margin_all)
        eval_idx, p_eval = split.test, p_all[split.test]
        m_eval, ref_idx = margin_all[split.test], split.train
        metrics = binary_metrics(y[eval_idx], p_eval)
        metrics["psi_train_test"] = psi(p_all[split.train], p_eval)
        validation = (
            "out-of-time: train / validation (tuning, early stopping, calibration shape) / test;"
            " final model refit on train + validation (margins aligned to the held-out model's),"
            " PD level at their long-run default rate"
        )
        windows: dict[str, Any] = describe_windows(split, frame)
    else:
        m = Matrices(x, y, None, None, features)
        study = tune(m, base, seed=seed, trials=trials, timeout=timeout, storage=storage,
                     study_name=study_name, on_trial=on_trial)  # fmt: skip
        params, rounds = best_params(study, base, len(m.y_train))
        train_set, _ = _datasets(m, params)
        final_params = lgb_params(params)
        oof = np.zeros((KFOLD_REPEATS, len(y)))
        for r in range(KFOLD_REPEATS):
            folds = StratifiedKFold(5, shuffle=True, random_state=seed + r)
            for fit_idx, held in folds.split(x, y):
                fold_booster = lgb.train(final_params, train_set.subset(fit_idx), rounds)
                oof[r, held] = fold_booster.predict(x[held], raw_score=True)
        # calibrate on one repeat's out-of-fold margins, report on the other's: no row is judged
        # by a calibration fitted on its own prediction
        first_calibration, _ = fit_calibrator(oof[0], y)
        eval_idx, p_eval = np.arange(len(y)), first_calibration(oof[1])
        m_eval, ref_idx = oof[1], np.arange(len(y))
        metrics = binary_metrics(y, p_eval)
        metrics["auc_repeats_mean"] = float(np.mean([roc_auc_score(y, o) for o in oof]))
        booster = lgb.train(final_params, train_set, rounds)
        calibrator, losses = fit_calibrator(oof.ravel(), np.tile(y, KFOLD_REPEATS))
        validation = f"repeated stratified K-fold (5 folds, {KFOLD_REPEATS} repeats): no timestamp"
        windows = {"all": {"window": "no timestamp", "rows": float(len(y)),
                           "bad_rate": float(y.mean())}}  # fmt: skip

    scorer = Scorer(booster, features, categories, calibrator)
    tuning = summarize(study)
    eval_frame = frame[eval_idx]
    if data.has_oracle:
        oracle = eval_frame["pd_true"].to_numpy()
        oracle_auc = float(roc_auc_score(y[eval_idx], oracle))
        metrics["oracle_auc"] = oracle_auc
        metrics["gini_share_of_oracle"] = metrics["gini"] / (2 * oracle_auc - 1)
    segments = segment_metrics(eval_frame, data.segments, y[eval_idx], p_eval)

    client = configure(paths)
    experiment_id = experiment(client, name, paths)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"train {data.name}") as run:
        mlflow.set_tags(
            {
                **{f"kapok.{k}": v for k, v in data.source.items()},
                "kapok.validation": validation,
                "kapok.version": kapok.__version__,
                "kapok.code_version": _git_commit(),
                "kapok.optuna_study": study_name,
                "kapok.optuna_search": SEARCH.name,
                "kapok.optuna_trials": tuning.line(),
            }
        )
        mlflow.log_params(
            {
                f"lgb.{k}": v
                for k, v in params.items()
                if k not in ("monotone_constraints", "categorical_feature")
            }
        )
        mlflow.log_params(
            {
                "trials": trials,
                "seed": seed,
                "rounds": rounds,
                "calibration": calibrator.method,
                "calibration_shift": round(calibrator.shift, 6),
                **{f"data.{k}": v for k, v in fingerprint.items()},
                **{f"window.{part}": w["window"] for part, w in windows.items()},
            }
        )
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        mlflow.log_metrics({f"calibration_logloss_{k}": v for k, v in losses.items()})
        _log_study(study, tuning)
        mlflow.log_dict(windows, "windows.json")
        mlflow.log_dict(segments, "segments.json")
        mlflow.log_dict(
            {
                "features": features,
                "categorical": data.categorical,
                "monotone_constraints": dict(zip(features, _monotone(data), strict=True)),
                "categories": categories,
                "segments": data.segments,
                "label": data.source.get("label", LABEL),
            },
            "model_spec.json",
        )
        y_eval = y[eval_idx]
        plots.log(plots.roc(y_eval, p_eval, f"{name}: ROC on the test window"), "plots/roc.png")
        plots.log(
            plots.calibration(y_eval, p_eval, f"{name}: calibration"), "plots/calibration.png"
        )
        gain = booster.feature_importance(importance_type="gain")
        plots.log(plots.importance(features, gain, f"{name}: importance"), "plots/importance.png")
        _log_evaluation(data, scorer, eval_idx, p_eval, m_eval, ref_idx, seed)
        version = _log_model(scorer, frame, name)
        run_id = run.info.run_id
    alias = CHALLENGER if alias_version(client, name, CHAMPION) else CHAMPION
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "validation", validation)
    for key in ("auc", "ece", "ks"):
        if key in metrics:
            client.set_model_version_tag(name, version, f"test_{key}", f"{metrics[key]:.4f}")
    return TrainResult(
        name, version, alias, run_id, validation, metrics, windows, scorer, study_name, tuning
    )


def _log_study(study: optuna.Study, tuning: Summary) -> None:
    trials = study.trials
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    values = [float(t.value) for t in finished if t.value is not None]
    mlflow.log_dict(
        {
            "study_name": study.study_name,
            "search": SEARCH.name,
            "trials": tuning.trials,
            "complete": tuning.complete,
            "pruned": tuning.pruned,
            "pruned_at_rounds": tuning.pruned_rounds,
            "best_value_valid_auc": study.best_value,
            "best_params": study.best_params,
            "best_trial": study.best_trial.number,
        },
        "optuna/study.json",
    )
    table = pl.DataFrame(
        {
            "number": [t.number for t in trials],
            "state": [t.state.name for t in trials],
            "value": [t.value for t in trials],
            "rounds": [
                t.user_attrs.get("rounds", t.user_attrs.get("pruned_at_round")) for t in trials
            ],
            "params": [str(t.params) for t in trials],
        }
    )
    mlflow.log_text(table.write_csv(), "optuna/trials.csv")
    plots.log(plots.history(values, "Optuna: validation AUC by trial"), "plots/optuna_history.png")
    mlflow.log_metrics(
        {
            "best_valid_auc": study.best_value,
            "optuna_trials": tuning.trials,
            "optuna_trials_complete": tuning.complete,
            "optuna_trials_pruned": tuning.pruned,
            "optuna_best_trial": tuning.best_trial,
        }
    )
    if tuning.pruned_rounds:
        mlflow.log_metric("optuna_first_pruned_round", min(tuning.pruned_rounds))


def _log_evaluation(
    data: TrainingData,
    scorer: Scorer,
    eval_idx: np.ndarray,
    p_eval: np.ndarray,
    m_eval: np.ndarray,
    ref_idx: np.ndarray,
    seed: int,
) -> None:
    """The rows behind the reported figures, so that reports and monitoring need no retraining:
    evaluation/test.parquet (the test window, or every row with out-of-fold PD under K-fold) and
    evaluation/train.parquet (the training window, at most REFERENCE_ROWS rows, seeded sample):
    features, segments, label, application time and the model's PD and margin."""
    keep = [c for c in ("application_id", "enterprise_id", TIME, LABEL) if c in data.frame.columns]
    keep = list(dict.fromkeys([*keep, *data.segments, *data.features]))
    if len(ref_idx) > REFERENCE_ROWS:
        ref_idx = np.sort(np.random.default_rng(seed).choice(ref_idx, REFERENCE_ROWS, False))
    reference = data.frame[ref_idx].select(keep)
    parts = {
        "test": data.frame[eval_idx]
        .select(keep)
        .with_columns(pl.Series(PD_COLUMN, p_eval), pl.Series(MARGIN_COLUMN, m_eval)),
        "train": reference.with_columns(
            pl.Series(PD_COLUMN, scorer.pd(reference)),
            pl.Series(MARGIN_COLUMN, scorer.margin(reference)),
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for part, frame in parts.items():
            target = Path(tmp) / f"{part}.parquet"
            frame.write_parquet(target, compression="zstd")
            mlflow.log_artifact(str(target), "evaluation")


def _log_model(scorer: Scorer, frame: pl.DataFrame, name: str) -> str:
    example = frame.head(5)
    example_pd = model_input(example, scorer)
    signature = infer_signature(example_pd, scorer.pd(example), params={"output": "pd"})
    with tempfile.TemporaryDirectory() as tmp:
        folder = scorer.save(Path(tmp) / "scorer")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=KapokModel(),
            artifacts={"scorer": str(folder)},
            signature=signature,
            input_example=example_pd,
            registered_model_name=name,
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=[
                f"lightgbm=={lgb.__version__}",
                f"polars=={pl.__version__}",
                f"mlflow=={mlflow.__version__}",
            ],
        )
    return str(info.registered_model_version)

"""`kapok train`: tune, fit, calibrate and validate one model, log it to MLflow and register it.

Out of time when the data has application dates (train on the oldest months, tune and calibrate
on the next, report on the most recent); repeated stratified K-fold when it has none.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
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
from training.candidates import (
    BLEND,
    LIGHTGBM,
    SCORECARD,
    Candidate,
    blend_weight,
    choose,
    complexity_premium,
    judge,
    reason,
)
from training.data import LABEL, TIME, Split, TrainingData, describe_windows
from training.metrics import binary_metrics, ks, psi
from training.pyfunc import KapokModel, model_input
from training.scorecard import Scorecard, ScorecardError, fit_scorecard, score_scale
from training.scorer import Scorer, category_levels, encode
from training.tracking import CHALLENGER, CHAMPION, alias_version, configure, experiment
from training.tracking import model_name as registered_name
from training.trees import blend
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
    model_kind: str = LIGHTGBM  # the chosen candidate: scorecard, blend or lightgbm
    candidates: list[Candidate] = field(default_factory=list)
    choice: str = ""  # why it was chosen, one line


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
        # the early-stopped number of rounds scaled to the larger sample of the refit
        rounds = max(1, round(held_out.best_iteration * len(develop) / len(split.train)))
        chosen = _candidates(data, x, y, split, categories, held_out, params, rounds, seed)
        booster, held_margin = chosen.booster, chosen.held_margin  # validation rows come last
        # calibration shape from the held-out validation margins, level from the long-run
        # default rate of all development months (training.calibration explains why)
        calibrator, losses = fit_calibrator(
            held_margin[len(split.train) :], y[split.valid], level=float(y[develop].mean())
        )
        margin_all = booster.predict(x, raw_score=True)
        calibrator = aligned(calibrator, margin_all[develop], held_margin)
        p_all = calibrator(margin_all)
        eval_idx, p_eval = split.test, p_all[split.test]
        m_eval, ref_idx = margin_all[split.test], split.train
        metrics = binary_metrics(y[eval_idx], p_eval)
        metrics["psi_train_test"] = psi(p_all[split.train], p_eval)
        validation = (
            "out-of-time: train / validation (tuning, early stopping, choice of candidate,"
            " calibration shape) / test; final model refit on train + validation (margins"
            " aligned to the held-out model's), PD level at their long-run default rate"
        )
        windows: dict[str, Any] = describe_windows(split, frame)
    else:
        m = Matrices(x, y, None, None, features)
        study = tune(m, base, seed=seed, trials=trials, timeout=timeout, storage=storage,
                     study_name=study_name, on_trial=on_trial)  # fmt: skip
        params, rounds = best_params(study, base, len(m.y_train))
        train_set, _ = _datasets(m, params)
        final_params = lgb_params(params)
        lgb_oof = np.zeros((KFOLD_REPEATS, len(y)))
        card_oof: np.ndarray | None = np.zeros((KFOLD_REPEATS, len(y)))
        for r in range(KFOLD_REPEATS):
            folds = StratifiedKFold(5, shuffle=True, random_state=seed + r)
            for fit_idx, held in folds.split(x, y):
                fold_booster = lgb.train(final_params, train_set.subset(fit_idx), rounds)
                lgb_oof[r, held] = fold_booster.predict(x[held], raw_score=True)
                if card_oof is not None:
                    try:
                        card = fit_scorecard(frame[fit_idx], y[fit_idx], x[fit_idx], features,
                                             categories, data.directions, seed)  # fmt: skip
                        card_oof[r, held] = card.log_odds(x[held])
                    except ScorecardError:
                        card_oof = None  # no scorecard in some fold: LightGBM only
        chosen = _kfold_candidates(
            data, x, y, categories, lgb_oof, card_oof,
            lambda: lgb.train(final_params, train_set, rounds), seed,
        )  # fmt: skip
        booster, oof = chosen.booster, chosen.held_margin.reshape(KFOLD_REPEATS, len(y))
        # calibrate on one repeat's out-of-fold margins, report on the other's: no row is judged
        # by a calibration fitted on its own prediction
        first_calibration, _ = fit_calibrator(oof[0], y)
        eval_idx, p_eval = np.arange(len(y)), first_calibration(oof[1])
        m_eval, ref_idx = oof[1], np.arange(len(y))
        metrics = binary_metrics(y, p_eval)
        metrics["auc_repeats_mean"] = float(np.mean([roc_auc_score(y, o) for o in oof]))
        calibrator, losses = fit_calibrator(oof.ravel(), np.tile(y, KFOLD_REPEATS))
        validation = (
            f"repeated stratified K-fold (5 folds, {KFOLD_REPEATS} repeats): no timestamp;"
            " candidates chosen on their out-of-fold margins"
        )
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
                "kapok.model_kind": chosen.kind,
                "kapok.candidates": chosen.choice,
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
        _log_candidates(chosen)
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
        plots.log(
            plots.importance(features, _mean_abs_shap(scorer, eval_frame), f"{name}: importance"),
            "plots/importance.png",
        )
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
        name,
        version,
        alias,
        run_id,
        validation,
        metrics,
        windows,
        scorer,
        study_name,
        tuning,
        chosen.kind,
        chosen.candidates,
        chosen.choice,
    )


@dataclass
class Chosen:
    """The candidate that ships: its final Booster, the held-out (train-window) model's margins on
    the development rows (train, then validation) that calibrate it, and the record."""

    kind: str
    booster: lgb.Booster
    held_margin: np.ndarray
    candidates: list[Candidate]
    choice: str
    scorecard: Scorecard | None = None  # the scorecard in the shipped model, or the candidate's
    weight: float = 1.0  # the scorecard's weight in the shipped model's log-odds


def _candidates(
    data: TrainingData,
    x: np.ndarray,
    y: np.ndarray,
    split: Split,
    categories: dict[str, list[str]],
    held_out: lgb.Booster,
    params: dict,
    rounds: int,
    seed: int,
) -> Chosen:
    """Scorecard, tuned LightGBM and blend fitted on the training window, judged on the
    validation window (training.candidates); the winner refit on train + validation.

    The scorecard that ships is refit (binning, sign check and regression) on train +
    validation, as the LightGBM is: the validation months are the most recent before the test
    window, and a scorecard's bins and weights drift with the population as much as trees do.
    Its calibration, like LightGBM's, takes its shape from the train-window fit's validation
    log-odds, mapped onto the refit's scale (training.calibration.aligned)."""
    develop = np.concatenate([split.train, split.valid])
    n_train, y_valid, y_test = len(split.train), y[split.valid], y[split.test]
    lgb_held = held_out.predict(x[develop], raw_score=True)
    lgb_test = held_out.predict(x[split.test], raw_score=True)

    def tested(margin: np.ndarray) -> dict[str, float]:
        if not 0 < y_test.sum() < len(y_test):
            return {}
        return {"test_auc": float(roc_auc_score(y_test, margin)), "test_ks": ks(y_test, margin)}

    candidates = [judge(LIGHTGBM, y_valid, lgb_held[n_train:], **tested(lgb_test))]
    card: Scorecard | None = None
    try:
        card = fit_scorecard(
            data.frame[split.train], y[split.train], x[split.train], data.features,
            categories, data.directions, seed,
        )  # fmt: skip
    except ScorecardError as e:
        candidates[0].note = f"scorecard failed: {e}"
    if card is not None:
        card_held, card_test = card.log_odds(x[develop]), card.log_odds(x[split.test])
        w = blend_weight(y_valid, card_held[n_train:], lgb_held[n_train:])
        blend_held, blend_test = (
            w * card_held + (1 - w) * lgb_held,
            w * card_test + (1 - w) * lgb_test,
        )
        candidates += [
            judge(SCORECARD, y_valid, card_held[n_train:], **tested(card_test),
                  note=f"{len(card.characteristics)} characteristics"),
            judge(BLEND, y_valid, blend_held[n_train:], **tested(blend_test), weight=w,
                  note=f"scorecard weight {w:.2f}"),
        ]  # fmt: skip
    premium = complexity_premium()
    winner = choose(candidates, premium)
    choice = reason(candidates, premium)
    candidates.sort(key=lambda c: c.steps)

    def final_lgb() -> lgb.Booster:
        return refit(x[develop], y[develop], data.features, params, rounds)

    def final_card() -> Scorecard:
        try:
            return fit_scorecard(
                data.frame[develop], y[develop], x[develop], data.features, categories,
                data.directions, seed,
            )  # fmt: skip
        except ScorecardError:  # the train-window card did survive: it ships as it was judged
            return card  # type: ignore[return-value]

    if winner.kind == LIGHTGBM:
        return Chosen(LIGHTGBM, final_lgb(), lgb_held, candidates, choice, card, 0.0)
    shipped = final_card()
    if winner.kind == SCORECARD:
        return Chosen(SCORECARD, shipped.booster(), card_held, candidates, choice, shipped)
    booster = blend(final_lgb(), shipped.steps(), shipped.intercept, w)
    return Chosen(BLEND, booster, blend_held, candidates, choice, shipped, w)


def _kfold_candidates(
    data: TrainingData,
    x: np.ndarray,
    y: np.ndarray,
    categories: dict[str, list[str]],
    lgb_oof: np.ndarray,
    card_oof: np.ndarray | None,
    final_lgb: Callable[[], lgb.Booster],
    seed: int,
) -> Chosen:
    """Without timestamps the candidates are judged on their out-of-fold margins of the
    repeated K-fold (every row once per repeat, pooled): the same rule, with out-of-fold AUC in
    place of the validation window's (its `valid_` figures; there is no test window). The blend's
    weight is chosen on the same margins. The winner is refit on every row; `held_margin` holds
    its out-of-fold margins, repeat after repeat, for calibration."""
    y_all = np.tile(y, len(lgb_oof))
    note = "out-of-fold margins of the repeated K-fold (no timestamp)"
    candidates = [judge(LIGHTGBM, y_all, lgb_oof.ravel(), note=note)]
    if card_oof is None:
        candidates[0].note += "; scorecard failed in a fold"
    else:
        w = blend_weight(y_all, card_oof.ravel(), lgb_oof.ravel())
        blend_oof = w * card_oof + (1 - w) * lgb_oof
        candidates += [
            judge(SCORECARD, y_all, card_oof.ravel(), note=note),
            judge(BLEND, y_all, blend_oof.ravel(), weight=w, note=f"scorecard weight {w:.2f}"),
        ]
    premium = complexity_premium()
    winner = choose(candidates, premium)
    choice = reason(candidates, premium)
    candidates.sort(key=lambda c: c.steps)
    if winner.kind == LIGHTGBM or card_oof is None:
        return Chosen(LIGHTGBM, final_lgb(), lgb_oof.ravel(), candidates, choice, None, 0.0)
    card = fit_scorecard(data.frame, y, x, data.features, categories, data.directions, seed)
    if winner.kind == SCORECARD:
        return Chosen(SCORECARD, card.booster(), card_oof.ravel(), candidates, choice, card)
    booster = blend(final_lgb(), card.steps(), card.intercept, w)
    return Chosen(BLEND, booster, blend_oof.ravel(), candidates, choice, card, w)


def _log_candidates(chosen: Chosen) -> None:
    """candidates.json, each candidate's validation and test figures as metrics and, when a
    scorecard was fitted, its points table on the policy's score scale (scorecard/points.csv:
    the shipped scorecard's when the chosen model holds one, else the candidate's)."""
    record = {
        "chosen": chosen.kind,
        "choice": chosen.choice,
        "complexity_premium": complexity_premium(),
        "candidates": [c.to_dict() for c in chosen.candidates],
    }
    for c in chosen.candidates:
        for key in ("valid_auc", "valid_ks", "test_auc", "test_ks"):
            value = getattr(c, key)
            if value is not None:
                mlflow.log_metric(f"candidate_{c.kind}_{key}", value)
    if chosen.kind == BLEND:
        mlflow.log_param("blend_scorecard_weight", chosen.weight)
    card = chosen.scorecard
    if card is not None:
        factor, offset = score_scale()
        shipped = chosen.kind != LIGHTGBM
        weight = chosen.weight if shipped else 1.0
        record["points"] = {
            "of": "the shipped scorecard" if shipped else "the scorecard candidate (not shipped)",
            "weight": weight,
            "score_scale": {"factor": factor, "offset": offset},
            "characteristics": [c.feature for c in card.characteristics],
            "dropped": card.dropped,
        }
        table = card.points(factor, offset, weight)
        mlflow.log_text(table.write_csv(), "scorecard/points.csv")
    mlflow.log_dict(record, "candidates.json")


def _mean_abs_shap(scorer: Scorer, frame: pl.DataFrame, rows: int = 2_000) -> np.ndarray:
    """Mean |TreeSHAP| per feature on (a seeded sample of) the evaluation rows: gain would be
    zero for a compiled scorecard's hand-built trees and only count the trained half of a
    blend."""
    if frame.height > rows:
        frame = frame.sample(n=rows, seed=7)
    contrib = scorer.booster.predict(scorer.matrix(frame), pred_contrib=True)
    return np.abs(contrib[:, :-1]).mean(axis=0)


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

"""Tuning that searches (issue 13): no trial is cut before early stopping could have judged it,
the study says how many trials completed and how many were pruned, and the same data and seed
give the same search."""

from __future__ import annotations

import numpy as np
import optuna
import polars as pl
import pytest
from typer.testing import CliRunner

from kapok.cli import app
from kapok.settings import paths
from training.tracking import configure
from training.tune import (
    EARLY_STOPPING,
    Matrices,
    base_params,
    best_params,
    startup_trials,
    summarize,
    tune,
)

PRUNED, COMPLETE = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE


def problem(n: int = 1500, out_of_time: bool = True) -> tuple[Matrices, dict]:
    """A small non-linear problem on which some settings learn better than others."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6))
    logit = x[:, 0] - 2 + 0.8 * np.sin(2 * x[:, 1]) + 0.5 * x[:, 2] * x[:, 3]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    names = list("abcdef")
    k = int(n * 0.6)
    m = (
        Matrices(x[:k], y[:k], x[k:], y[k:], names)
        if out_of_time
        else Matrices(x, y, None, None, names)
    )
    return m, base_params(7, [0] * 6, []) | {"num_threads": 1}  # no OpenMP spinning


def run(m: Matrices, base: dict, trials: int, seed: int = 7, storage: str | None = None):
    return tune(m, base, seed=seed, trials=trials, timeout=None, storage=storage,
                study_name="toy")  # fmt: skip


def test_no_trial_is_pruned_before_early_stopping_could_judge_it():
    """Before issue 13 the pruner judged trials at round 39, when their AUC ranks them by
    learning rate rather than by the AUC they end with, and pruned nearly all of them there."""
    m, base = problem()
    study = run(m, base, trials=12)
    pruned = [t for t in study.trials if t.state == PRUNED]
    assert pruned, "the pruner never pruned: this test would prove nothing"
    assert all(t.last_step >= EARLY_STOPPING for t in pruned), [t.last_step for t in pruned]
    assert all(t.user_attrs["pruned_at_round"] >= EARLY_STOPPING for t in pruned)
    # the sampler's random start-up trials all run to the end: the median is taken over them
    assert all(t.state == COMPLETE for t in study.trials[: startup_trials(12)])
    assert sum(t.state == COMPLETE for t in study.trials) > len(study.trials) / 2

    s = summarize(study)
    assert (s.trials, s.complete + s.pruned, s.pruned) == (12, 12, len(pruned))
    assert s.best_trial == study.best_trial.number
    low, high = min(s.pruned_rounds), max(s.pruned_rounds)
    rounds = f"after {low} rounds" if low == high else f"after {low}-{high} rounds"
    assert s.line().startswith(f"12 trials: {s.complete} completed, {s.pruned} pruned {rounds};")


def test_cross_validated_trials_are_judged_the_same_way():
    """Data sets without timestamps tune on lgb.cv, whose results are named differently."""
    m, base = problem(n=600, out_of_time=False)
    study = run(m, base, trials=8)
    assert {t.state for t in study.trials} == {COMPLETE, PRUNED}
    assert all(t.last_step >= EARLY_STOPPING for t in study.trials if t.state == PRUNED)
    assert all(t.user_attrs["rounds"] > 0 for t in study.trials if t.state == COMPLETE)


def test_same_data_and_seed_give_the_same_search():
    """Two fresh studies: the same trials, pruned at the same rounds, the same best parameters;
    another seed searches elsewhere. (Through the SQLite store a re-run resumes instead:
    test_training.py checks that, and that the same model comes out.)"""
    m, base = problem()

    def trace(study: optuna.Study) -> list[tuple]:
        return [(t.params, t.state, t.value, t.last_step) for t in study.trials]

    first, second = run(m, base, 12), run(m, base, 12)
    assert trace(first) == trace(second)
    assert any(t.state == PRUNED for t in first.trials)
    n_train = len(m.y_train)
    assert best_params(first, base, n_train) == best_params(second, base, n_train)
    other = run(m, base, 12, seed=8)
    assert [t.params for t in other.trials] != [t.params for t in first.trials]


SPEC = """
name = "toy"
path = "toy.csv"
[label]
column = "bad"
bad = 1
[features.a]
direction = 1
[features.b]
[features.c]
"""


@pytest.mark.slow
def test_kapok_train_reports_completed_and_pruned_trials(tmp_path):
    """The CLI says how the search went, and the MLflow run keeps it as metrics and tags."""
    m, _ = problem(n=500, out_of_time=False)
    x, y = m.x_train, m.y_train
    pl.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "bad": y}).write_csv(
        tmp_path / "toy.csv"
    )
    (tmp_path / "toy.toml").write_text(SPEC)
    args = ["train", "--dataset", str(tmp_path / "toy.toml"), "--trials", "6"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("tuning: "))
    assert line.startswith("tuning: 6 trials: ")

    client = configure(paths())
    [run_] = client.search_runs([client.get_experiment_by_name("kapok-toy").experiment_id])
    metrics, tags = run_.data.metrics, run_.data.tags
    complete, pruned = metrics["optuna_trials_complete"], metrics["optuna_trials_pruned"]
    assert metrics["optuna_trials"] == complete + pruned == 6
    assert f"{int(complete)} completed, {int(pruned)} pruned" in line
    assert tags["kapok.optuna_trials"] == line.removeprefix("tuning: ")
    assert f"median pruning from round {EARLY_STOPPING}" in tags["kapok.optuna_search"]
    if pruned:
        assert metrics["optuna_first_pruned_round"] >= EARLY_STOPPING

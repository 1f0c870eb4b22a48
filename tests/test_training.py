"""Training: Optuna-tuned, monotone, calibrated LightGBM registered in MLflow with champion /
challenger aliases, and the promotion gate."""

from __future__ import annotations

import uuid

import lightgbm as lgb
import mlflow
import numpy as np
import optuna
import polars as pl
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from features.schema import monotone_constraints
from features.spec import load_spec
from kapok.settings import Paths
from tests.conftest import linked_home, repo_root, require_service
from training.calibration import aligned, fit_calibrator, fit_isotonic, fit_platt
from training.data import LABEL, product_data, spec_data
from training.promote import Comparison, Gate, PromotionError, promote, verdict
from training.pyfunc import load_scorer, model_input
from training.scorer import Scorer
from training.tracking import alias_version, configure, experiment
from training.train import _log_model, train
from training.tune import Matrices, base_params, study_storage, tune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory, small_system) -> Paths:
    return linked_home(tmp_path_factory.mktemp("train_home"), small_system)


@pytest.fixture(scope="module")
def microloan(home):
    return product_data(home, "microloan")


@pytest.fixture(scope="module")
def first(home, microloan):
    return train(microloan, home, trials=3, seed=7)


def test_first_version_is_champion_second_is_challenger(home, microloan, first):
    assert (first.model_name, first.version, first.alias) == ("kapok-microloan", "1", "champion")
    assert {
        "auc",
        "ks",
        "brier",
        "ece",
        "calibration_slope",
        "psi_train_test",
        "oracle_auc",
    } <= set(first.metrics)
    assert 0.6 < first.metrics["auc"] < first.metrics["oracle_auc"] + 0.05
    assert first.scorer.pd(microloan.frame).std() > 0.01  # a model, not a constant
    assert first.windows["train"]["window"] < first.windows["test"]["window"]
    client = configure(home)
    run = client.get_run(first.run_id)
    assert run.data.tags["kapok.feature_service"] == "microloan_v1"
    assert run.data.params["data.content_hash"]
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert {
        "plots/roc.png",
        "plots/calibration.png",
        "plots/importance.png",
        "plots/optuna_history.png",
    } <= artifacts
    second = train(microloan, home, trials=3, seed=8)
    assert (second.version, second.alias) == ("2", "challenger")
    champion = load_scorer("models:/kapok-microloan@champion")
    frame = microloan.frame.head(50)
    assert np.allclose(champion.pd(frame), first.scorer.pd(frame))
    pd_ = mlflow.pyfunc.load_model("models:/kapok-microloan@challenger").predict(
        model_input(frame, second.scorer)
    )
    assert np.allclose(pd_, second.scorer.pd(frame))
    assert ((pd_ > 0) & (pd_ < 1)).all()


def test_same_data_seed_and_trials_give_the_same_model(tmp_path, small_system, microloan, first):
    home = linked_home(tmp_path, small_system)
    again = train(microloan, home, trials=3, seed=7)
    frame = microloan.frame
    assert np.array_equal(again.scorer.margin(frame), first.scorer.margin(frame))
    assert again.scorer.booster.model_to_string() == first.scorer.booster.model_to_string()

    # a re-run with the same data and seed finds its Optuna study where training left it (the
    # resuming itself: test_a_rerun_resumes_its_optuna_study)
    assert again.study_name == first.study_name
    stored = optuna.load_study(study_name=again.study_name, storage=study_storage(home.mlruns))
    assert len(stored.trials) == 3


def test_a_rerun_resumes_its_optuna_study(tmp_path):
    """Asked for 4 trials, a study that holds 3 runs one more and keeps the three; asked again
    for 4, it runs none."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 4))
    y = (rng.random(1200) < 1 / (1 + np.exp(-(x[:, 0] - 2)))).astype(int)
    m = Matrices(x[:800], y[:800], x[800:], y[800:], ["a", "b", "c", "d"])
    base = base_params(7, [0, 0, 0, 0], []) | {"num_threads": 1}  # no OpenMP spinning
    storage, name = f"sqlite:///{tmp_path / 'optuna.db'}", "kapok-toy-seed7"

    def run(trials: int) -> list[int]:
        ran: list[int] = []
        tune(m, base, seed=7, trials=trials, timeout=None, storage=storage, study_name=name,
             on_trial=lambda _s, t: ran.append(t.number))  # fmt: skip
        return ran

    assert run(3) == [0, 1, 2]
    before = optuna.load_study(study_name=name, storage=storage).trials
    assert run(4) == [3]
    after = optuna.load_study(study_name=name, storage=storage).trials
    assert [(t.params, t.value) for t in after[:3]] == [(t.params, t.value) for t in before]
    assert run(4) == []


def test_predictions_are_monotone_along_constrained_features(microloan, first):
    scorer = first.scorer
    base = microloan.frame.head(40)
    constrained = [
        f for f, d in zip(scorer.features, monotone_constraints(scorer.features), strict=True) if d
    ]
    assert len(constrained) > 30
    for name in (
        "cred_dpd30_months_12m",
        "tax_sales_12m",
        "arap_overdue_receivables_ratio_6m",
        "jud_lawsuits_12m",
    ):
        direction = monotone_constraints([name])[0]
        values = microloan.frame[name].drop_nulls()
        grid = np.quantile(values.to_numpy(), np.linspace(0, 1, 12))
        curves = np.column_stack(
            [
                scorer.pd(base.with_columns(pl.lit(v).cast(base.schema[name]).alias(name)))
                for v in grid
            ]
        )
        steps = np.diff(curves, axis=1) * direction
        assert (steps >= -1e-12).all(), name


def test_calibration_is_monotone_and_bounded():
    rng = np.random.default_rng(0)
    margin = rng.normal(-2.5, 1.2, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-(margin + 0.3 * rng.normal(size=5000))))).astype(int)
    grid = np.linspace(-12, 8, 400)
    for calibrator in (fit_platt(margin, y), fit_isotonic(margin, y), fit_calibrator(margin, y)[0]):
        p = calibrator(grid)
        assert (np.diff(p) >= 0).all()
        assert (p > 0).all() and (p < 1).all()
    chosen, losses = fit_calibrator(margin, y)
    assert chosen.method == min(losses, key=losses.__getitem__)


def test_calibration_level_and_alignment_keep_the_ranking():
    """The long-run level moves the mean PD to the asked rate; a refit model's margins on another
    scale get the held-out model's PDs back; neither reorders anybody."""
    rng = np.random.default_rng(1)
    margin = rng.normal(-2.5, 1.2, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-margin))).astype(int)
    plain, _ = fit_calibrator(margin, y)
    for level in (0.03, 0.2):
        leveled, _ = fit_calibrator(margin, y, level=level)
        p = leveled(margin)
        assert abs(p.mean() - level) < 1e-6
        order = np.argsort(margin)
        assert (np.diff(p[order]) >= 0).all()
        assert (np.diff(plain(margin)[order]) >= 0).all()
    # a refit model whose margins are 1.5x wider and shifted by 0.7: aligned, same PDs
    refit_margin = 1.5 * margin + 0.7
    same = aligned(plain, refit_margin, margin)
    assert np.allclose(same(refit_margin), plain(margin))
    with pytest.raises(ValueError, match="same margin"):
        aligned(plain, np.zeros(10), margin[:10])
    with pytest.raises(ValueError, match="rate in"):
        fit_calibrator(margin, y, level=1.5)


def _weak_scorer(frame: pl.DataFrame, strong: Scorer) -> Scorer:
    """A deliberately worse model: LightGBM on the district alone."""
    x = strong.matrix(frame)[:, [strong.features.index("reg_district")]]
    booster = lgb.train(
        {"objective": "binary", "verbosity": -1, "num_leaves": 4, "seed": 1},
        lgb.Dataset(
            x, frame[LABEL].to_numpy(), feature_name=["reg_district"], categorical_feature=[0]
        ),
        30,
    )
    weak = Scorer(
        booster,
        ["reg_district"],
        {"reg_district": strong.categories["reg_district"]},
        strong.calibrator,
    )
    margin = weak.margin(frame)
    return Scorer(
        booster, weak.features, weak.categories, fit_calibrator(margin, frame[LABEL].to_numpy())[0]
    )


def _register(home: Paths, scorer: Scorer, frame: pl.DataFrame, name: str, alias: str) -> str:
    """Log and register `scorer` as `name`@`alias`; its artifacts stay under the home's mlruns
    (mlflow.set_experiment would put them under ./mlruns, in the checkout)."""
    client = configure(home)
    with mlflow.start_run(experiment_id=experiment(client, name, home)):
        version = _log_model(scorer, frame, name)
    client.set_registered_model_alias(name, alias, version)
    return version


def test_promotion_gate_promotes_better_and_refuses_worse(tmp_path, microloan, first):
    home = Paths(tmp_path)
    weak = _weak_scorer(microloan.frame, first.scorer)
    data = microloan
    data_named = type(data)(**{**data.__dict__, "name": "gate_case"})
    _register(home, first.scorer, data.frame, "kapok-gate_case", "champion")
    _register(home, weak, data.frame, "kapok-gate_case", "challenger")
    # the small test window (a few hundred applications) makes ECE noisy: a wider ECE limit here
    gate = Gate(auc_tolerance=0.005, ece_limit=0.15, psi_limit=0.25)
    refused = promote(data_named, home, gate=gate)
    assert not refused.promoted
    assert any(r.startswith("FAIL auc") for r in refused.reasons)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("kapok-gate_case", "champion").version) == "1"
    with pytest.raises(PromotionError, match="--reason"):
        promote(data_named, home, force=True)
    # a worse champion and a better challenger: promoted, aliases move
    _register(home, weak, data.frame, "kapok-gate_case", "champion")
    better = _register(home, first.scorer, data.frame, "kapok-gate_case", "challenger")
    promoted = promote(data_named, home, gate=gate)
    assert promoted.promoted and not promoted.forced, promoted.reasons
    assert str(client.get_model_version_by_alias("kapok-gate_case", "champion").version) == better
    verdicts = mlflow.search_runs(experiment_names=["kapok-promotions"], output_format="list")
    assert sorted(r.data.tags["verdict"] for r in verdicts) == ["promoted", "refused"]
    with pytest.raises(PromotionError, match="challenger"):
        promote(
            data_named, home, gate=gate
        )  # nothing left to compare: the challenger alias moved on


def test_a_forced_promotion_moves_the_champion_and_keeps_the_previous_one(
    tmp_path, small_system, microloan, first, monkeypatch
):
    """`kapok promote --force --reason`: a challenger the gate refuses becomes @champion, the
    old champion @previous-champion, and the override and its reason are recorded."""
    from kapok.cli import app

    home = linked_home(tmp_path, small_system)
    weak = _weak_scorer(microloan.frame, first.scorer)
    champion = _register(home, first.scorer, microloan.frame, "kapok-microloan", "champion")
    challenger = _register(home, weak, microloan.frame, "kapok-microloan", "challenger")
    monkeypatch.setenv("KAPOK_HOME", str(home.home))
    reason = "credit committee 2026-11-27: approved"
    result = CliRunner().invoke(
        app, ["promote", "--product", "microloan", "--force", "--reason", reason]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "FAIL auc" in output and "PROMOTED (forced)" in output and reason in output
    client = configure(home)
    aliases = {
        alias: alias_version(client, "kapok-microloan", alias)
        for alias in ("champion", "previous-champion", "challenger")
    }
    assert aliases == {"champion": challenger, "previous-champion": champion, "challenger": None}
    (run,) = mlflow.search_runs(experiment_names=["kapok-promotions"], output_format="list")
    tags = run.data.tags
    assert (tags["verdict"], tags["forced"], tags["override_reason"]) == (
        "promoted",
        "true",
        reason,
    )
    assert (tags["champion_version"], tags["challenger_version"]) == (champion, challenger)
    assert client.get_model_version("kapok-microloan", challenger).tags["promotion_verdict"] == (
        "promoted"
    )


def test_verdict_rules_each_can_refuse():
    gate = Gate(auc_tolerance=0.005, ece_limit=0.02, psi_limit=0.25)
    good = {"auc": 0.78, "ece": 0.01}
    assert verdict(Comparison("w", 100, good, {"auc": 0.777, "ece": 0.01}, 0.05, 0.9), gate)[0]
    assert not verdict(Comparison("w", 100, good, {"auc": 0.77, "ece": 0.01}, 0.05, 0), gate)[0]
    assert not verdict(Comparison("w", 100, good, {"auc": 0.80, "ece": 0.03}, 0.05, 0), gate)[0]
    assert not verdict(Comparison("w", 100, good, {"auc": 0.80, "ece": 0.01}, 0.25, 0), gate)[0]


def test_german_credit_trains_end_to_end(tmp_path):
    import matplotlib.pyplot as plt

    data = spec_data(load_spec(repo_root() / "datasets" / "german_credit.toml"))
    open_before = len(plt.get_fignums())
    result = train(data, Paths(tmp_path), trials=3, seed=7)
    assert len(plt.get_fignums()) == open_before  # logged plots are freed, not piled up
    assert result.model_name == "kapok-german_credit" and result.alias == "champion"
    assert "K-fold" in result.validation
    assert result.metrics["auc"] > 0.7
    frame = data.frame.head(20)
    assert np.allclose(
        load_scorer("models:/kapok-german_credit@champion").pd(frame), result.scorer.pd(frame)
    )


@pytest.mark.postgres
def test_mlflow_on_postgresql(tmp_path, monkeypatch):
    require_service("127.0.0.1", 5432, "PostgreSQL")
    import psycopg2

    database = f"kapok_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {database}")
    try:
        monkeypatch.setenv(
            "MLFLOW_TRACKING_URI", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
        )
        data = spec_data(load_spec(repo_root() / "datasets" / "credit_scoring_belanche.toml"))
        result = train(data, Paths(tmp_path), trials=2, seed=7)
        client = MlflowClient()
        champion = client.get_model_version_by_alias("kapok-credit_scoring_belanche", "champion")
        assert str(champion.version) == result.version
        assert client.get_run(result.run_id).data.metrics["test_auc"] == pytest.approx(
            result.metrics["auc"]
        )
        assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nothing went to SQLite
        assert (tmp_path / "mlruns" / "artifacts").exists()  # artifacts stay under KAPOK_HOME
    finally:
        mlflow.set_tracking_uri(None)
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()


def test_unknown_product_and_bad_arguments_are_clear(home):
    from training.data import UnknownProductError

    with pytest.raises(UnknownProductError, match="microloan, guarantee, insurance"):
        product_data(home, "mortgage")
    data = spec_data(load_spec(repo_root() / "datasets" / "german_credit.toml"))
    with pytest.raises(ValueError, match="--trials"):
        train(data, home, trials=0)

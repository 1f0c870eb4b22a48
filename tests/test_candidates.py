"""Candidates per product (issue 13, item 1): the WOE scorecard compiled into a LightGBM Booster
exactly, its reasons measured against each characteristic's best bin, wrong-signed
characteristics dropped, the blend as one Booster, the choice rule with its complexity premium,
and train() shipping and logging the chosen candidate."""

from __future__ import annotations

import dataclasses
import itertools
import json
from datetime import datetime, timedelta
from pathlib import Path

import lightgbm as lgb
import mlflow
import numpy as np
import polars as pl
import pytest

import training.train as train_module
from kapok.settings import Paths
from training.candidates import BLEND, LIGHTGBM, SCORECARD, Candidate, choose, complexity_premium
from training.data import LABEL, TIME, TrainingData
from training.pyfunc import model_input
from training.scorecard import Characteristic, Scorecard, fit_scorecard, score_scale
from training.scorer import Scorer, category_levels, encode
from training.tracking import configure
from training.trees import REFERENCE_COUNT, blend

FEATURES = ["overdue", "income", "noise", "region"]
DIRECTIONS = {"overdue": 1, "income": -1, "noise": 0}
CATEGORICAL = ["region"]
REGIONS = ["east", "north", "south", "west"]


def synthetic(n: int = 6000, seed: int = 0) -> TrainingData:
    """12 months of applications: risk rises with overdue months, falls with income, differs by
    region; overdue is 10% missing; noise is noise. A step in overdue x income gives LightGBM
    something a scorecard cannot add up."""
    rng = np.random.default_rng(seed)
    start = datetime(2024, 1, 1)
    applied = [start + timedelta(days=int(d)) for d in np.sort(rng.integers(0, 365, n))]
    overdue = rng.poisson(1.2, n).astype(float)
    income = rng.lognormal(10, 0.5, n)
    region = rng.choice(REGIONS, n)
    effect = {"east": 0.0, "north": 0.4, "south": -0.3, "west": 0.2}
    logit = (
        -2.2
        + 0.7 * overdue
        - 1.2 * (np.log(income) - 10) / 0.5 * 0.5
        + np.array([effect[r] for r in region])
        + 0.8 * ((overdue >= 2) & (income < np.median(income)))
    )
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    overdue[rng.random(n) < 0.1] = np.nan
    frame = pl.DataFrame(
        {
            TIME: applied,
            LABEL: y,
            "overdue": overdue,
            "income": income,
            "noise": rng.normal(size=n),
            "region": region,
        }
    ).with_columns(pl.col("overdue").fill_nan(None))
    return TrainingData(
        name="candtoy",
        frame=frame,
        features=FEATURES,
        categorical=CATEGORICAL,
        directions=DIRECTIONS,
        segments=[],
        source={"data": "synthetic"},
    )


def hand_card() -> Scorecard:
    """A scorecard written by hand: a numeric characteristic with a split at 0, a categorical
    one whose bins are not contiguous in code order."""
    a = Characteristic(
        "overdue", 0, [-1.5, 0.0, 2.25], [0.9, 0.3, -0.2, -1.1], 0.1, ["a", "b", "c", "d"], -0.8
    )
    # codes 0..3 (east, north, south, west): WOE by code 0.2, -0.4, 0.2, -0.1
    r = Characteristic("region", 3, [1.0, 2.0, 3.0], [0.2, -0.4, 0.2, -0.1], -0.6, REGIONS, -1.3)
    return Scorecard(FEATURES, [a, r], -1.7)


EDGES = np.array(
    [
        np.nan,
        -np.inf,
        np.inf,
        -1.5,
        np.nextafter(-1.5, -np.inf),
        np.nextafter(-1.5, np.inf),
        0.0,
        -0.0,
        np.nextafter(0.0, -np.inf),
        2.25,
        np.nextafter(2.25, -np.inf),
        1e300,
        -1e300,
        float(np.finfo(np.float64).min),
        7.0,
    ]
)


def edge_matrix() -> np.ndarray:
    """Every edge value of `overdue` against every region code (and missing = unseen)."""
    codes = [0.0, 1.0, 2.0, 3.0, np.nan]
    rows = [[v, 0.0, 0.0, c] for v in EDGES for c in codes]
    return np.array(rows, dtype=float)


def test_compiled_scorecard_is_exact_on_edges_missing_infinities_and_unseen_categories():
    card = hand_card()
    x = edge_matrix()
    compiled = card.booster().predict(x, raw_score=True)
    own = card.log_odds(x)
    assert np.max(np.abs(compiled - own)) < 1e-9
    # optbinning's convention: a value on a split belongs to the bin above it
    on, below = np.array([[2.25, 0, 0, 0.0], [np.nextafter(2.25, -np.inf), 0, 0, 0.0]])
    assert card.log_odds(on[None])[0] - card.log_odds(below[None])[0] == pytest.approx(
        -0.8 * (-1.1 - -0.2)
    )
    # an unseen category is encoded as missing and scored with the missing WOE
    unseen = pl.DataFrame({"overdue": [1.0], "income": [1.0], "noise": [0.0], "region": ["x"]})
    xu = encode(unseen, FEATURES, {"region": REGIONS})
    assert np.isnan(xu[0, 3])
    expected = -1.7 + -0.8 * -0.2 + -1.3 * -0.6
    assert card.booster().predict(xu, raw_score=True)[0] == pytest.approx(expected, abs=1e-12)


def test_scorecard_reasons_are_the_log_odds_lost_against_the_best_bin():
    card = hand_card()
    x = edge_matrix()
    booster = card.booster()
    contrib = booster.predict(x, pred_contrib=True)
    margin = booster.predict(x, raw_score=True)
    # TreeSHAP is additive: base + contributions = margin
    assert np.max(np.abs(contrib.sum(axis=1) - margin)) < 1e-9
    for c in card.characteristics:
        values, missing = c.contributions()
        best = min([*values, missing])
        lost = c.coefficient * c.woe_of(x[:, c.index]) - best
        assert np.max(np.abs(contrib[:, c.index] - lost)) < 1e-6
        assert (contrib[:, c.index] >= -1e-6).all()  # never below the best bin: risk added
    # features outside the scorecard give nothing; the base is the best applicant's log-odds
    assert np.all(contrib[:, 1] == 0) and np.all(contrib[:, 2] == 0)
    best_margin = card.intercept + sum(
        min([*v, m]) for v, m in (c.contributions() for c in card.characteristics)
    )
    assert np.max(np.abs(contrib[:, -1] - best_margin)) < 1e-6
    # and the points table says the same on the policy's scale
    factor, offset = 20 / np.log(2), 600.0
    table = card.points(factor, offset)
    lost = dict(
        table.filter(pl.col("characteristic") == "overdue").select("bin", "points_lost").iter_rows()
    )
    assert lost["a"] == 0  # the best bin
    assert lost["d"] == pytest.approx(factor * (-0.8 * -1.1 - -0.8 * 0.9))
    assert table.filter(pl.col("characteristic") == "(base points)")["points"][0] == (
        pytest.approx(offset - factor * -1.7)
    )


@pytest.fixture(scope="module")
def toy() -> TrainingData:
    return synthetic()


@pytest.fixture(scope="module")
def toy_matrix(toy):
    categories = category_levels(toy.frame, toy.categorical)
    return categories, encode(toy.frame, toy.features, categories)


def test_fitted_scorecard_compiles_exactly_on_its_own_edges(toy, toy_matrix):
    categories, x = toy_matrix
    y = toy.frame[LABEL].to_numpy()
    card = fit_scorecard(toy.frame, y, x, toy.features, categories, toy.directions)
    names = [c.feature for c in card.characteristics]
    assert "overdue" in names and "income" in names and "region" in names
    assert all(c.coefficient < 0 for c in card.characteristics)  # safer WOE, lower risk
    assert card.dropped.get("noise", "").startswith(("information value", "wrong sign"))
    probes = [x]
    for c in card.characteristics:
        for s in c.splits:
            for v in (s, np.nextafter(s, -np.inf), np.nextafter(s, np.inf), np.nan, np.inf):
                row = x[:1].copy()
                row[0, c.index] = v
                probes.append(row)
    xs = np.vstack(probes)
    assert np.max(np.abs(card.booster().predict(xs, raw_score=True) - card.log_odds(xs))) < 1e-9
    # monotone in the schema's direction: risk (log-odds) rises with overdue, falls with income
    for feature, sign in (("overdue", 1), ("income", -1)):
        c = next(c for c in card.characteristics if c.feature == feature)
        values, _ = c.contributions()
        assert all(sign * (b - a) >= -1e-12 for a, b in itertools.pairwise(values))


def test_wrong_signed_characteristics_are_dropped():
    """`shadow` tracks `risk` closely and is riskier on its own, but once `risk` is in the
    regression its own effect is the opposite: its coefficient would score safer bins as
    riskier, so the scorecard leaves it out."""
    rng = np.random.default_rng(3)
    n = 8000
    risk = rng.normal(size=n)
    shadow = risk + 0.35 * rng.normal(size=n)
    logit = -1.5 + 1.6 * risk - 0.9 * shadow
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pl.DataFrame({"risk": risk, "shadow": shadow})
    x = encode(frame, ["risk", "shadow"], {})
    card = fit_scorecard(frame, y, x, ["risk", "shadow"], {}, {})
    assert [c.feature for c in card.characteristics] == ["risk"]
    assert card.dropped["shadow"].startswith("wrong sign")
    assert card.characteristics[0].coefficient < 0


@pytest.mark.parametrize(
    ("aucs", "premium", "winner"),
    [
        ({SCORECARD: 0.740, BLEND: 0.744, LIGHTGBM: 0.748}, 0.005, SCORECARD),
        ({SCORECARD: 0.730, BLEND: 0.742, LIGHTGBM: 0.748}, 0.005, LIGHTGBM),
        ({SCORECARD: 0.730, BLEND: 0.745, LIGHTGBM: 0.748}, 0.005, BLEND),
        ({SCORECARD: 0.740, BLEND: 0.745, LIGHTGBM: 0.750}, 0.005, SCORECARD),  # a three-way tie
        ({SCORECARD: 0.740, BLEND: 0.744, LIGHTGBM: 0.748}, 0.0, LIGHTGBM),
        ({SCORECARD: 0.750, BLEND: 0.750, LIGHTGBM: 0.750}, 0.0, SCORECARD),  # tie: the simpler
        ({BLEND: 0.700, LIGHTGBM: 0.760}, 0.005, LIGHTGBM),
        ({LIGHTGBM: 0.600}, 0.005, LIGHTGBM),  # the scorecard failed: the only candidate
    ],
)
def test_the_choice_pays_a_premium_per_step_and_ties_go_to_the_simpler(aucs, premium, winner):
    candidates = [Candidate(kind, auc, 0.3) for kind, auc in aucs.items()]
    assert choose(candidates, premium).kind == winner
    assert [c.kind for c in candidates if c.chosen] == [winner]


def test_the_premium_is_stated_in_promotion_toml():
    assert complexity_premium() == 0.005


def test_blend_is_one_booster_with_the_weighted_log_odds(toy, toy_matrix, tmp_path):
    categories, x = toy_matrix
    y = toy.frame[LABEL].to_numpy()
    card = fit_scorecard(toy.frame, y, x, toy.features, categories, toy.directions)
    params = {"objective": "binary", "verbosity": -1, "num_threads": 1, "max_depth": 3,
              "num_leaves": 8, "seed": 1, "deterministic": True}  # fmt: skip
    data = lgb.Dataset(x, y, feature_name=FEATURES, categorical_feature=[3])
    trees = lgb.train(params, data, 40)
    assert "cat_threshold" in trees.model_to_string()  # categorical splits survive the blend
    probes = np.vstack([x[:500], edge_matrix()])
    w = 0.35
    blended = blend(trees, card.steps(), card.intercept, w)
    want = w * card.log_odds(probes) + (1 - w) * trees.predict(probes, raw_score=True)
    assert np.max(np.abs(blended.predict(probes, raw_score=True) - want)) < 1e-9
    contrib = blended.predict(probes, pred_contrib=True)
    assert np.max(np.abs(contrib.sum(axis=1) - want)) < 1e-9
    # saved and loaded as a Kapok scorer, the blend gives the same margins
    from training.calibration import Calibrator

    folder = Scorer(blended, FEATURES, categories, Calibrator("platt", a=1.0)).save(tmp_path / "s")
    again = Scorer.load(folder)
    frame = toy.frame.head(300)
    assert np.array_equal(again.margin(frame), Scorer(blended, FEATURES, categories,
                                                      again.calibrator).margin(frame))  # fmt: skip


def _train(toy: TrainingData, home: Path, monkeypatch, premium: float):
    monkeypatch.setattr(train_module, "complexity_premium", lambda: premium)
    return train_module.train(toy, Paths(home), trials=2, seed=7)


@pytest.mark.parametrize(("premium", "kind"), [(1.0, SCORECARD), (-1.0, LIGHTGBM)])
def test_train_ships_and_logs_the_chosen_candidate(toy, tmp_path, monkeypatch, premium, kind):
    """A premium of 1 AUC per step makes the scorecard win, -1 the LightGBM: either way the run
    says which, keeps every candidate's figures, and the registered model scores as the
    Booster that was chosen."""
    result = _train(toy, tmp_path, monkeypatch, premium)
    assert result.model_kind == kind
    assert [c.kind for c in result.candidates] == [SCORECARD, BLEND, LIGHTGBM]
    assert [c.kind for c in result.candidates if c.chosen] == [kind]
    client = configure(Paths(tmp_path))
    run = client.get_run(result.run_id)
    assert run.data.tags["kapok.model_kind"] == kind
    assert run.data.tags["kapok.candidates"].startswith(f"chose {kind}")
    for k in (SCORECARD, BLEND, LIGHTGBM):
        for metric in ("valid_auc", "valid_ks", "test_auc", "test_ks"):
            assert f"candidate_{k}_{metric}" in run.data.metrics
    got = {
        artifact: Path(
            mlflow.artifacts.download_artifacts(
                run_id=result.run_id, artifact_path=artifact, dst_path=str(tmp_path / "a")
            )
        )
        for artifact in ("candidates.json", "scorecard/points.csv")
    }
    record = json.loads(got["candidates.json"].read_text())
    assert record["chosen"] == kind and record["complexity_premium"] == premium
    points = pl.read_csv(got["scorecard/points.csv"])
    assert {"characteristic", "bin", "woe", "coefficient", "points", "points_lost"} <= set(
        points.columns
    )
    # the registered pyfunc gives the margins of the Booster train() returned
    frame = toy.frame.tail(400)
    model = mlflow.pyfunc.load_model(f"models:/{result.model_name}/{result.version}")
    served = model.predict(model_input(frame, result.scorer), params={"output": "margin"})
    assert np.max(np.abs(np.asarray(served) - result.scorer.margin(frame))) < 1e-9
    if kind == SCORECARD:
        # a compiled scorecard: every tree is a characteristic's, nothing was boosted
        booster = result.scorer.booster
        assert booster.num_trees() == len(points["characteristic"].unique()) - 1
        assert str(REFERENCE_COUNT) in booster.model_to_string()  # the best bins' leaf counts


def test_train_can_ship_the_blend(toy, tmp_path, monkeypatch):
    """Forced to choose the blend, train() ships one Booster whose margins are the blend's."""
    real_choose = train_module.choose

    def pick_blend(candidates, premium):
        real_choose(candidates, premium)
        for c in candidates:
            c.chosen = c.kind == BLEND
        return next(c for c in candidates if c.kind == BLEND)

    monkeypatch.setattr(train_module, "choose", pick_blend)
    result = _train(toy, tmp_path, monkeypatch, 0.005)
    assert result.model_kind == BLEND
    weight = next(c.weight for c in result.candidates if c.kind == BLEND)
    assert 0 < weight < 1
    client = configure(Paths(tmp_path))
    assert float(client.get_run(result.run_id).data.params["blend_scorecard_weight"]) == weight
    frame = toy.frame.tail(400)
    model = mlflow.pyfunc.load_model(f"models:/{result.model_name}/{result.version}")
    served = model.predict(model_input(frame, result.scorer), params={"output": "margin"})
    assert np.max(np.abs(np.asarray(served) - result.scorer.margin(frame))) < 1e-9


def test_kfold_data_choose_among_the_candidates_too(toy, tmp_path, monkeypatch):
    """Without timestamps the candidates are judged on their out-of-fold margins: the same rule,
    the same record, no test window."""
    kfold = dataclasses.replace(toy, frame=toy.frame.drop(TIME).head(3000))
    result = _train(kfold, tmp_path, monkeypatch, 1.0)
    assert result.model_kind == SCORECARD
    assert [c.kind for c in result.candidates] == [SCORECARD, BLEND, LIGHTGBM]
    assert all(c.test_auc is None and 0.5 < c.valid_auc < 1 for c in result.candidates)
    run = configure(Paths(tmp_path)).get_run(result.run_id)
    assert run.data.tags["kapok.model_kind"] == SCORECARD
    assert "out-of-fold" in run.data.tags["kapok.validation"]
    frame = kfold.frame.tail(400)
    model = mlflow.pyfunc.load_model(f"models:/{result.model_name}/{result.version}")
    served = model.predict(model_input(frame, result.scorer), params={"output": "margin"})
    assert np.max(np.abs(np.asarray(served) - result.scorer.margin(frame))) < 1e-9


def test_points_use_the_policy_score_scale():
    """The scorecard's points are on serving.policy's scale, read without importing serving."""
    from serving.policy import load_policy

    factor, offset = score_scale()
    scale = load_policy().scale
    assert (factor, offset) == pytest.approx((scale.factor, scale.offset))

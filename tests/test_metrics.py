"""training/metrics.py against hand computations on constructed data: KS, ECE (the promotion
gate reads it) and the calibration slope and intercept."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from training.metrics import binary_metrics, calibration_line, ece, ks


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_ks_by_hand():
    # scores ascending with outcomes 0 0 1 0 1 1: after each score the share of bads seen is
    # 0 0 1/3 1/3 2/3 1 and of goods 1/3 2/3 2/3 1 1 1; the largest gap is 2/3
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0, 0, 1, 0, 1, 1])
    assert ks(y, p) == pytest.approx(2 / 3, abs=1e-15)
    shuffled = np.random.default_rng(0).permutation(6)
    assert ks(y[shuffled], p[shuffled]) == pytest.approx(2 / 3, abs=1e-15)
    assert ks(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0  # separated


def test_ks_compares_the_curves_only_between_distinct_scores():
    """Three applications at PD 0.3 (one bad) and two at 0.7 (both bad): at 0.3 the curves are
    at 1/3 (bads) and 2/2 (goods), a gap of 2/3; at 0.7 both at 1. Listing the tied goods first
    must not create a gap of 1 inside the tie."""
    p = np.array([0.3, 0.3, 0.3, 0.7, 0.7])
    for y in ([1, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 1, 0, 1, 1]):
        assert ks(np.array(y), p) == pytest.approx(2 / 3, abs=1e-15), y
    # one PD for everybody separates nobody
    assert ks(np.array([0, 0, 1, 1]), np.full(4, 0.05)) == 0.0
    # many ties (an isotonic calibrator's steps): the two-sample KS statistic of bads vs goods
    rng = np.random.default_rng(4)
    pd_ = np.round(rng.random(3000), 1)
    y = (rng.random(3000) < pd_).astype(int)
    expected = ks_2samp(pd_[y == 1], pd_[y == 0]).statistic
    assert ks(y, pd_) == pytest.approx(expected, abs=1e-12)
    bads_first = np.argsort(-y, kind="stable")
    assert ks(y[bads_first], pd_[bads_first]) == pytest.approx(expected, abs=1e-12)


def test_ece_by_hand():
    # 10 applications, 2 equal-count bins of 5 (lowest PDs first):
    # bin 1: mean PD (0.1+0.1+0.2+0.2+0.4)/5 = 0.2, bad rate 2/5 = 0.4 -> |0.2 - 0.4| = 0.2
    # bin 2: mean PD (0.5+0.6+0.6+0.8+0.9)/5 = 0.68, bad rate 4/5 -> 0.12
    # ECE = (5 * 0.2 + 5 * 0.12) / 10 = 0.16
    p = np.array([0.1, 0.1, 0.2, 0.2, 0.4, 0.5, 0.6, 0.6, 0.8, 0.9])
    y = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 1])
    assert ece(y, p, bins=2) == pytest.approx(0.16, abs=1e-12)
    shuffled = np.random.default_rng(1).permutation(10)
    assert ece(y[shuffled], p[shuffled], bins=2) == pytest.approx(0.16, abs=1e-12)
    # 7 applications in 3 bins: sizes 3, 2, 2
    # bins: PD 0.2 vs 1/3 bad (x3), PD 0.5 vs 1/2 (x2), PD 0.85 vs 1 (x2)
    p = np.array([0.1, 0.2, 0.3, 0.45, 0.55, 0.8, 0.9])
    y = np.array([0, 0, 1, 1, 0, 1, 1])
    hand = (3 * abs(0.2 - 1 / 3) + 2 * 0.0 + 2 * 0.15) / 7
    assert ece(y, p, bins=3) == pytest.approx(hand, abs=1e-12)
    # calibrated bins give 0
    assert ece(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5]), bins=2) == 0.0


def test_ece_keeps_equal_pds_in_one_bin():
    """Four applications at PD 0.2 (one bad) and two at 0.6 (one bad), 2 bins of 3: the tie
    at 0.2 stays whole, so the bins are {0.2 x4: 1/4 bad} and {0.6 x2: 1/2 bad};
    ECE = (4 * |0.2 - 0.25| + 2 * |0.6 - 0.5|) / 6 = 0.4 / 6, whatever the order of the rows."""
    p = np.array([0.2, 0.2, 0.2, 0.2, 0.6, 0.6])
    for y in ([1, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 1, 0]):
        assert ece(np.array(y), p, bins=2) == pytest.approx(0.4 / 6, abs=1e-12), y
    # everybody at 0.5 with half of them bad is perfectly calibrated in any order
    assert ece(np.array([0, 0, 1, 1]), np.full(4, 0.5), bins=2) == 0.0


def test_calibration_slope_and_intercept_by_hand():
    """Two PD levels make the logistic recalibration saturated: it passes through the observed
    bad rate at each level. PD 0.1 with 20% bad and PD 0.5 with 60% bad:
    slope = (logit 0.6 - logit 0.2) / (logit 0.5 - logit 0.1), intercept = logit 0.6."""
    p = np.array([0.1] * 1000 + [0.5] * 1000)
    y = np.array([1] * 200 + [0] * 800 + [1] * 600 + [0] * 400)
    slope, intercept = calibration_line(y, p)
    assert slope == pytest.approx((logit(0.6) - logit(0.2)) / (0 - logit(0.1)), abs=1e-3)
    assert intercept == pytest.approx(logit(0.6), abs=1e-3)
    # bad rates equal to the PDs: a calibrated model, slope 1 and intercept 0
    y = np.array([1] * 100 + [0] * 900 + [1] * 500 + [0] * 500)
    slope, intercept = calibration_line(y, p)
    assert slope == pytest.approx(1.0, abs=1e-3) and intercept == pytest.approx(0.0, abs=1e-3)
    # PDs twice as spread out as the truth (over-confident): slope 1/2
    truth = np.array([0.1] * 1000 + [0.5] * 1000)
    spread = 1 / (1 + np.exp(-2 * np.log(truth / (1 - truth))))
    slope, _ = calibration_line(np.array([1] * 100 + [0] * 900 + [1] * 500 + [0] * 500), spread)
    assert slope == pytest.approx(0.5, abs=1e-3)


def test_binary_metrics_report_the_same_values():
    p = np.array([0.1, 0.1, 0.2, 0.2, 0.4, 0.5, 0.6, 0.6, 0.8, 0.9])
    y = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 1])
    m = binary_metrics(y, p)
    assert m["ks"] == ks(y, p) and m["ece"] == ece(y, p)
    assert (m["calibration_slope"], m["calibration_intercept"]) == calibration_line(y, p)
    assert m["bad_rate"] == 0.6 and m["mean_pd"] == pytest.approx(0.44)

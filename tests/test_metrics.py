"""Metrics are pure functions: check them against hand-computed cases."""
import numpy as np
import pytest

from train import metrics as M


def test_threshold_reaches_target_sensitivity_on_its_data():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(50), np.zeros(200)].astype(int)
    p = np.r_[rng.uniform(0.3, 1, 50), rng.uniform(0, 0.7, 200)]
    for target in (0.8, 0.9, 1.0):
        t = M.threshold_for_sensitivity(y, p, target)
        sens = (p[y == 1] >= t).mean()
        assert sens >= target
        # the highest such threshold: any higher one drops below target
        assert (p[y == 1] >= np.nextafter(t, 2)).mean() < target


def test_confusion_and_rates():
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.8, 0.1, 0.3])
    m = M.binary_metrics(y, p, 0.5, bootstrap=0)
    assert m["confusion_matrix"] == {"tp": 1, "fn": 1, "tn": 2, "fp": 1}
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["roc_auc"] == pytest.approx(4 / 6)


def test_ece_zero_when_calibrated_and_large_when_not():
    p = np.repeat([0.05, 0.25, 0.75], 400)
    y = np.concatenate([np.r_[np.ones(20), np.zeros(380)], np.r_[np.ones(100), np.zeros(300)], np.r_[np.ones(300), np.zeros(100)]])
    assert M.calibration(y, p)["ece"] < 1e-9
    assert M.calibration(y, 1 - p)["ece"] > 0.4


def test_bootstrap_interval_brackets_auc_and_is_reproducible():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = y * 0.3 + rng.uniform(0, 1, 300)
    lo, hi = M.bootstrap_auc_ci(y, p, 300, seed=3)
    assert lo < M.roc_auc(y, p) < hi and hi - lo < 0.2
    assert M.bootstrap_auc_ci(y, p, 300, seed=3) == (lo, hi)


def test_per_source_breakdown():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.4, 0.6])
    out = M.metrics_by_source(y, p, np.array(["a", "a", "b", "b"]), 0.5, bootstrap=0)
    assert out["a"]["roc_auc"] == 1.0 and out["b"]["roc_auc"] == 0.0 and out["all"]["n"] == 4


def test_auc_matches_mann_whitney_and_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    p = np.round(rng.uniform(0, 1, 120) + 0.2 * y, 2)  # rounded: ties count one half
    pos, neg = p[y == 1], p[y == 0]
    u = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    assert M.roc_auc(y, p) == pytest.approx(u / (len(pos) * len(neg)))
    m = M.binary_metrics(y, p, 0.5, bootstrap=0)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert M.roc_auc(np.zeros(5), np.arange(5)) is None  # one class: undefined, not a crash


def test_platt_fit_recovers_a_known_calibration():
    from edge.runner import platt
    from train.metrics import calibration, fit_platt
    rng = np.random.default_rng(0)
    score = rng.uniform(0.01, 0.99, 20000)
    truth = platt(score, 0.5, -1.5)  # the score is overconfident and too high
    y = (rng.random(score.size) < truth).astype(int)
    fit = fit_platt(y, score)
    assert fit["a"] == pytest.approx(0.5, abs=0.05) and fit["b"] == pytest.approx(-1.5, abs=0.08)
    assert calibration(y, platt(score, fit["a"], fit["b"]))["ece"] < calibration(y, score)["ece"] / 3

"""DeLong: a hand-worked example, agreement with the bootstrap, and the paired test's size and power."""

import numpy as np
import pytest
from scipy.stats import kstest

from scaling.metrics import auroc, bootstrap_ci, delong_ci, delong_components, delong_test


def test_hand_worked_example():
    # Positives X = {0.9, 0.6}, negatives Y = {0.7, 0.3, 0.1}.
    # V10 = (1, 2/3); V01 = (1/2, 1, 1); AUROC = 5/6.
    # S10 = var(1, 2/3) = 1/18; S01 = var(1/2, 1, 1) = 1/12; Var = S10/2 + S01/3 = 1/36 + 1/36 = 1/18.
    y = np.array([1, 1, 0, 0, 0], dtype=float)
    p = np.array([0.9, 0.6, 0.7, 0.3, 0.1])
    aucs, cov = delong_components(y, p)
    assert aucs[0] == pytest.approx(5 / 6, abs=1e-15)
    assert cov[0, 0] == pytest.approx(1 / 18, abs=1e-15)
    ci = delong_ci(y, p)
    assert ci.se == pytest.approx(np.sqrt(1 / 18), abs=1e-15)


def test_ties_count_one_half():
    y = np.array([1, 0, 1, 0], dtype=float)
    p = np.array([0.5, 0.5, 0.8, 0.2])
    assert delong_ci(y, p).auroc == pytest.approx(auroc(y, p)) == pytest.approx(0.875)


def test_variance_agrees_with_bootstrap_se_at_n_2000():
    rng = np.random.default_rng(0)
    n = 2500
    y = (rng.random(n) < 0.3).astype(float)
    p = 1 / (1 + np.exp(-(1.2 * y + rng.normal(size=n))))
    d = delong_ci(y, p)
    b = bootstrap_ci("auroc", y, p, cluster=None, n_boot=2000, seed=0)
    assert d.auroc == pytest.approx(b.estimate, abs=1e-12)
    assert abs(d.se - b.se) / b.se < 0.10


def test_paired_p_value_uniform_under_null_and_small_for_better_model():
    rng = np.random.default_rng(1)
    p_values = []
    for _ in range(300):
        n = 150
        y = (rng.random(n) < 0.4).astype(float)
        shared = y + rng.normal(size=n)
        # Two models of equal skill, correlated through the shared signal.
        p_values.append(delong_test(y, shared + rng.normal(size=n), shared + rng.normal(size=n)).p_value)
    p_values = np.array(p_values)
    assert kstest(p_values, "uniform").pvalue > 0.01
    assert 0.02 <= np.mean(p_values < 0.05) <= 0.09

    y = (rng.random(1000) < 0.4).astype(float)
    better = 2.0 * y + rng.normal(size=1000)
    worse = 0.5 * y + rng.normal(size=1000)
    res = delong_test(y, better, worse)
    assert res.diff > 0 and res.lo > 0 and res.p_value < 1e-6
    assert res.auroc_a == pytest.approx(auroc(y, better))


def test_too_few_samples_of_a_class_give_nan_variance_not_a_false_verdict():
    res = delong_test([1.0, 0.0, 0.0], [0.9, 0.2, 0.5], [0.3, 0.2, 0.5])
    assert res.diff == 0.5 and np.isnan(res.se) and np.isnan(res.p_value)
    ci = delong_ci([1.0, 0.0, 0.0], [0.9, 0.2, 0.5])
    assert ci.auroc == 1.0 and np.isnan(ci.lo) and np.isnan(ci.hi)
    same = delong_test([1.0, 0.0, 0.0, 1.0], [0.9, 0.2, 0.5, 0.6], [0.9, 0.2, 0.5, 0.6])
    assert same.diff == 0 and same.p_value == 1.0


def test_one_class_and_bad_input():
    with pytest.warns(UserWarning):
        assert np.isnan(delong_ci([1.0, 1.0], [0.2, 0.3]).auroc)
    with pytest.raises(ValueError, match="y needs both classes"):
        delong_test([1.0, 1.0], [0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="p_a"):
        delong_test([1.0, 0.0, 1.0], [0.2, 0.3], [0.1, 0.2, 0.3])

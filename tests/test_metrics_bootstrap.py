"""Cluster bootstrap: vectorised replicates equal explicit resampling; patient-level equivalence; paired diff;
the rescaled resample of few seeds."""

import numpy as np
import pytest

from scaling.metrics import (ClusterBootstrap, auprc, auroc, bootstrap_ci, brier, ece, mce, nll,
                             paired_bootstrap_diff, percentile_interval, rescale_resample, satterthwaite_widening)


def _data(seed=0, n=600, n_patients=200):
    rng = np.random.default_rng(seed)
    pid = rng.integers(0, n_patients, n)
    y = (rng.random(n) < 0.3).astype(float)
    y[rng.random(n) < 0.1] = np.nan
    p = np.round(np.clip(0.25 * np.nan_to_num(y) + 0.75 * rng.random(n), 0, 1), 2)
    return y, p, pid


@pytest.mark.parametrize("metric", [auroc, auprc, brier, nll, ece, mce])
def test_vectorised_replicates_equal_explicit_resampling(metric):
    y, p, pid = _data()
    boot = ClusterBootstrap(pid, n_boot=40, seed=3)
    fast = boot.replicates(metric, y, p)
    slow = boot.replicates(lambda a, b: metric(a, b), y, p)  # an unknown callable takes the resampling loop
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-10)


def test_identical_images_per_patient_give_the_patient_level_ci():
    rng = np.random.default_rng(5)
    n_patients = 300
    y_pat = (rng.random(n_patients) < 0.35).astype(float)
    p_pat = np.clip(0.3 * y_pat + 0.7 * rng.random(n_patients), 0, 1)
    pid = np.repeat(np.arange(n_patients), 3)  # three identical images per patient
    shuffle = rng.permutation(pid.size)  # image order must not matter
    pid = pid[shuffle]
    patient = bootstrap_ci("auroc", y_pat, p_pat, cluster=None, n_boot=300, seed=11)
    clustered = bootstrap_ci("auroc", y_pat[pid], p_pat[pid], cluster=pid, n_boot=300, seed=11)
    assert clustered.estimate == pytest.approx(patient.estimate, abs=1e-12)
    assert clustered.lo == pytest.approx(patient.lo, abs=1e-12)
    assert clustered.hi == pytest.approx(patient.hi, abs=1e-12)
    # Resampling images instead of patients understates the uncertainty (the reason for the cluster bootstrap).
    naive = bootstrap_ci("auroc", y_pat[pid], p_pat[pid], cluster=None, n_boot=300, seed=11)
    assert naive.hi - naive.lo < 0.85 * (patient.hi - patient.lo)


def test_ci_is_seeded_contains_estimate_and_shrinks_with_n():
    y, p, pid = _data(n=400)
    a = bootstrap_ci(auroc, y, p, cluster=pid, n_boot=200, seed=1)
    b = bootstrap_ci("auroc", y, p, cluster=pid, n_boot=200, seed=1)
    assert (a.lo, a.hi) == (b.lo, b.hi) and a.n_valid == 200
    assert a.lo < a.estimate < a.hi
    y2, p2, pid2 = _data(n=4000, n_patients=2000)
    big = bootstrap_ci(auroc, y2, p2, cluster=pid2, n_boot=200, seed=1)
    assert big.hi - big.lo < 0.5 * (a.hi - a.lo)


def test_paired_bootstrap_diff():
    y, p, pid = _data(n=800, n_patients=300)
    same = paired_bootstrap_diff(auroc, y, p, p, cluster=pid, n_boot=100)
    assert same.diff == 0 and same.lo == 0 and same.hi == 0 and same.p_value == 1.0
    rng = np.random.default_rng(2)
    worse = np.clip(p + rng.normal(0, 0.4, p.size), 0, 1)
    res = paired_bootstrap_diff("auroc", y, p, worse, cluster=pid, n_boot=300)
    assert res.diff == pytest.approx(auroc(y, p) - auroc(y, worse))
    assert res.lo > 0 and res.p_value < 0.01


def test_integer_and_string_patient_ids_give_the_same_clusters_and_replicates():
    """Integer ids (or codes from a caller that numbered its patients once) take a fast path; it must number the
    clusters exactly as the string path numbers the same ids in the same sorted order."""
    from scaling.metrics.bootstrap import cluster_codes

    y, p, pid = _data()
    as_text = np.array([f"{i:05d}" for i in pid], dtype=object)  # zero-padded: sorts like the integers
    np.testing.assert_array_equal(cluster_codes(pid), cluster_codes(as_text))
    np.testing.assert_array_equal(cluster_codes(pid), np.searchsorted(np.unique(pid), pid))
    np.testing.assert_array_equal(ClusterBootstrap(pid, n_boot=30, seed=1).replicates(auroc, y, p),
                                  ClusterBootstrap(as_text, n_boot=30, seed=1).replicates(auroc, y, p))
    with pytest.raises(ValueError, match="length 600, expected 5"):
        cluster_codes(pid, n=5)


def test_rescaled_resample_of_a_mean_has_the_sample_means_variance_exactly():
    # Every one of the 4^4 equally likely resamples of four values, enumerated: the plain resample mean varies
    # (n-1)/n * s^2/n; rescaled (Rao & Wu) it varies s^2/n, the variance of the sample mean, and is centred on it.
    import itertools

    y = np.array([0.71, 0.74, 0.69, 0.78])
    drawn = np.array([y[list(i)].mean() for i in itertools.product(range(4), repeat=4)])
    s2 = y.var(ddof=1)
    assert drawn.var() == pytest.approx(3 / 4 * s2 / 4, rel=1e-12)
    rescaled = rescale_resample(drawn, y.mean(), 4)
    assert rescaled.mean() == pytest.approx(y.mean(), abs=1e-15) and rescaled.var() == pytest.approx(s2 / 4, rel=1e-12)
    # one value: nothing to rescale, the centre comes back (in the draws' shape)
    np.testing.assert_array_equal(rescale_resample(np.full(3, 0.7), 0.7, 1), np.full(3, 0.7))
    with pytest.raises(ValueError, match="confidence"):
        rescale_resample(drawn, y.mean(), 4, confidence=95)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_rescaled_resample_with_confidence_widens_to_students_t(n):
    # Over all n^n resamples, the rescaled, widened resample mean has exactly Student's spread: t(n-1)/z times the
    # standard error of the mean (scipy's t and sem). With five values the resample mean is close enough to normal
    # that its percentile interval is scipy's t-interval of the mean; with two or three it is too coarse for that.
    import itertools

    from scipy import stats

    y = np.random.default_rng(n).normal(0.8, 0.02, n)
    drawn = np.array([y[list(i)].mean() for i in itertools.product(range(n), repeat=n)])
    rescaled = rescale_resample(drawn, y.mean(), n, confidence=0.95)
    widen = stats.t.ppf(0.975, n - 1) / stats.norm.ppf(0.975)
    assert rescaled.std() == pytest.approx(widen * stats.sem(y), rel=1e-12)
    if n == 5:
        lo, hi = percentile_interval(rescaled, alpha=0.05)
        t_lo, t_hi = stats.t.interval(0.95, n - 1, loc=y.mean(), scale=stats.sem(y))
        tol = 0.03 * (t_hi - t_lo)
        assert lo == pytest.approx(t_lo, abs=tol) and hi == pytest.approx(t_hi, abs=tol)


def test_satterthwaite_widening_by_hand():
    from scipy import stats

    z = stats.norm.ppf(0.975)
    one = np.array([0.1, 0.4, 0.2, 0.3, 0.5])  # one stratum of five: 4 degrees of freedom
    factor, df = satterthwaite_widening([one])
    assert df == pytest.approx(4.0) and factor == pytest.approx(stats.t.ppf(0.975, 4) / z)
    # statistic 0 rests on two equal strata (their degrees of freedom add up), statistic 1 on the second only
    factor, df = satterthwaite_widening([np.c_[one, 0 * one], np.c_[one, one]])
    np.testing.assert_allclose(df, [8.0, 4.0])
    np.testing.assert_allclose(factor, stats.t.ppf(0.975, [8.0, 4.0]) / z)
    # unequal strata, by hand: V_h = (n-1)/n · Σ (θ_(i) - mean)², ν = (ΣV)² / Σ V²/(n_h - 1)
    small, big = np.array([0.0, 1.0]), np.array([0.0, 0.5, 1.0, 1.5])
    v1, v2 = 1 / 2 * 0.5, 3 / 4 * (2 * 0.75**2 + 2 * 0.25**2)
    factor, df = satterthwaite_widening([small, big], confidence=0.9)
    assert df == pytest.approx((v1 + v2) ** 2 / (v1**2 / 1 + v2**2 / 3))
    assert factor == pytest.approx(stats.t.ppf(0.95, df) / stats.norm.ppf(0.95))
    # no seed-to-seed spread anywhere, or only single-unit strata: nothing to widen
    assert satterthwaite_widening([np.ones(3), np.ones(2)]) == (1.0, np.inf)
    assert satterthwaite_widening([np.array([0.3])]) == (1.0, np.inf)
    # a left-out unit whose refit failed (NaN) takes its stratum out rather than poisoning the others
    factor, df = satterthwaite_widening([one, np.array([0.2, np.nan])])
    assert df == pytest.approx(4.0)

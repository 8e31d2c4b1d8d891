"""Obuchowski–Rockette–Hillis over seeds: DeLong's test with one seed, the DBM pseudovalue ANOVA it equals with
jackknife covariances (Hillis 2005, 2007), and its size when seeds matter."""

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from scaling.metrics import (ClusterBootstrap, MetricWarning, delong_components, delong_test, holm, or_hillis,
                             or_test, or_test_brier, or_test_labels, or_test_macro)


def _clustered_data(rng, n_patients=40, per_patient=2, seeds=3, gap=0.3):
    """Two images per patient sharing the patient's label and a patient effect; models a and b trained with
    ``seeds`` seeds, a separating the classes ``gap`` better on average."""
    patient = np.repeat(np.arange(n_patients), per_patient)
    y = np.repeat((rng.random(n_patients) < 0.4).astype(float), per_patient)
    y[:per_patient], y[per_patient: 2 * per_patient] = 1.0, 0.0  # both classes present
    base = np.repeat(rng.normal(size=n_patients), per_patient)
    a = np.stack([(1.0 + gap + 0.2 * rng.normal()) * y + base + rng.normal(size=y.size) for _ in range(seeds)])
    b = np.stack([(1.0 + 0.2 * rng.normal()) * y + base + rng.normal(size=y.size) for _ in range(seeds)])
    return y, a, b, patient


def test_one_seed_is_delong_clustered_test():
    y, a, b, patient = _clustered_data(np.random.default_rng(0), seeds=1)
    res, ref = or_test(y, a[0], b[0], cluster=patient), delong_test(y, a[0], b[0], cluster=patient)
    assert res.method == "delong" and res.n_seeds == 1 and res.df == math.inf and math.isnan(res.ms_seed_interaction)
    for got, want in [(res.auroc_a, ref.auroc_a), (res.auroc_b, ref.auroc_b), (res.diff, ref.diff), (res.se, ref.se),
                      (res.t, ref.z), (res.p_value, ref.p_value), (res.lo, ref.lo), (res.hi, ref.hi)]:
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_seed_means_and_interaction_by_hand():
    # θ_a = (0.80, 0.84, 0.82), θ_b = (0.70, 0.78, 0.77): mean difference 0.07; interaction residuals of the
    # difference across seeds d_j − d̄ = (0.03, −0.01, −0.02) split half to each model, so
    # MS(T×R) = 2 · Σ ((d_j − d̄)/2)² / (r − 1) = (0.0009 + 0.0001 + 0.0004) / 4 = 0.00035.
    theta = np.array([[0.80, 0.84, 0.82], [0.70, 0.78, 0.77]])
    cov = np.zeros((6, 6))
    res = or_hillis(theta, cov)
    assert res.diff == pytest.approx(0.07) and res.ms_seed_interaction == pytest.approx(0.00035)
    # No patient variance: D = MS(T×R), se = sqrt(2 D / 3), df = (r − 1) = 2, a t-test of the per-seed differences.
    d = theta[0] - theta[1]
    assert res.se == pytest.approx(d.std(ddof=1) / math.sqrt(3)) and res.df == pytest.approx(2)
    assert res.p_value == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)


def _covariance(r, var, cov1, cov2, cov3):
    """A (2r, 2r) case covariance whose OR means are exactly var, cov1, cov2, cov3 (each entry the mean)."""
    c = np.full((2, r, 2, r), cov3)
    for i in range(2):
        c[i, :, i, :] = cov2
    for j in range(r):
        c[0, j, 1, j] = c[1, j, 0, j] = cov1
        c[0, j, 0, j] = c[1, j, 1, j] = var
    return c.reshape(2 * r, 2 * r)


@pytest.mark.parametrize("r", [2, 3, 4])
def test_few_seeds_use_the_original_or_degrees_of_freedom(r):
    # With 2–4 seeds the statistic is referred to Obuchowski & Rockette's (1995) ddf (t − 1)(r − 1) = r − 1, not
    # Hillis's, which runs off to infinity when MS(T×R) comes out small by chance (benchmarks/or_type1_error.py:
    # 8 % type-I error at the 5 % level with 2 seeds). By hand: seed differences d_j = θ_aj − θ_bj, MS(T×R) =
    # Σ (d_j − d̄)² / (2 (r − 1)), D = MS(T×R) + r (Cov2 − Cov3), se = √(2 D / r), t = d̄ / se.
    theta = np.array([[0.80, 0.84, 0.82, 0.83][:r], [0.70, 0.78, 0.77, 0.76][:r]])
    var, cov1, cov2, cov3 = 0.004, 0.002, 0.003, 0.001
    res = or_hillis(theta, _covariance(r, var, cov1, cov2, cov3))
    d = theta[0] - theta[1]
    ms = ((d - d.mean()) ** 2).sum() / (2 * (r - 1))
    big_d = ms + r * (cov2 - cov3)
    se = math.sqrt(2 * big_d / r)
    assert res.ms_seed_interaction == pytest.approx(ms, rel=1e-12) and res.se == pytest.approx(se, rel=1e-12)
    assert res.method == "or" and res.df == r - 1
    assert res.p_value == pytest.approx(2 * stats.t.sf(d.mean() / se, r - 1), rel=1e-9)
    half = stats.t.ppf(0.975, r - 1) * se
    assert (res.lo, res.hi) == (pytest.approx(d.mean() - half, rel=1e-9), pytest.approx(d.mean() + half, rel=1e-9))
    hillis_df = big_d**2 / (ms**2 / (r - 1))  # what the test used before: far more degrees of freedom
    assert hillis_df > 10 * (r - 1) and res.p_value > 2 * stats.t.sf(d.mean() / se, hillis_df)


def test_five_seeds_use_hillis_degrees_of_freedom():
    theta = np.array([[0.80, 0.84, 0.82, 0.83, 0.81], [0.70, 0.78, 0.77, 0.76, 0.74]])
    res = or_hillis(theta, _covariance(5, 0.004, 0.002, 0.003, 0.001))
    d = theta[0] - theta[1]
    ms = ((d - d.mean()) ** 2).sum() / 8
    big_d = ms + 5 * 0.002
    assert res.method == "or-hillis" and res.df == pytest.approx(big_d**2 / (ms**2 / 4), rel=1e-12)
    assert res.p_value == pytest.approx(2 * stats.t.sf(d.mean() / math.sqrt(2 * big_d / 5), res.df), rel=1e-9)


def test_zero_variance_gives_nan_p_not_zero():
    # A perfect model against a constant one on four patients, both "trained" twice alike: every AUROC is 1 or 1/2
    # with DeLong variance 0 and the seeds agree, so D = 0. Before: se 0, p = 0 and a zero-width interval.
    y = np.array([1.0, 1.0, 0.0, 0.0])
    a, b = np.array([0.9, 0.8, 0.2, 0.1]), np.full(4, 0.5)
    for scores_a, scores_b in ((np.vstack([a, a]), np.vstack([b, b])), (a, b)):
        with pytest.warns(MetricWarning, match="variance of the difference"):
            res = or_test(y, scores_a, scores_b)
        assert (res.auroc_a, res.auroc_b, res.diff, res.se) == (1.0, 0.5, 0.5, 0.0)
        assert np.isnan(res.t) and np.isnan(res.p_value) and np.isnan(res.lo) and np.isnan(res.hi)
    # the macro test too (one label), which the subgroup comparisons call; Holm then counts it as no test
    with pytest.warns(MetricWarning):
        res = or_test_macro(y[:, None], np.vstack([a, a])[..., None], np.vstack([b, b])[..., None])
    assert np.isnan(res.p_value)
    np.testing.assert_allclose(holm([res.p_value, 0.01]), [np.nan, 0.01])


def _jackknife(y, scores, patient):
    """Leave-one-patient-out AUROCs (K patients × models) and OR's jackknife covariance
    (K − 1)/K Σ (θ_(k) − θ̄)², computed with scikit-learn."""
    ids = np.unique(patient)
    loo = np.array([[roc_auc_score(y[patient != k], s[patient != k]) for s in scores] for k in ids])
    centred = loo - loo.mean(axis=0)
    k = ids.size
    return loo, (k - 1) / k * centred.T @ centred


def test_equals_dbm_anova_of_pseudovalues_with_jackknife_covariance():
    # Hillis (2005, 2007): OR with jackknife covariances and DBM's ANOVA of normalised pseudovalues give the same F
    # and the same denominator degrees of freedom. The DBM side is written here from its own definition.
    y, a, b, patient = _clustered_data(np.random.default_rng(3), n_patients=36, seeds=5, gap=0.15)
    scores = np.concatenate([a, b])
    theta = np.array([roc_auc_score(y, s) for s in scores]).reshape(2, 5)
    loo, cov = _jackknife(y, scores, patient)
    res = or_hillis(theta, cov)

    big_k = loo.shape[0]
    t, r = 2, 5
    pseudo = theta.ravel() + (big_k - 1) * (loo.mean(axis=0) - loo)  # normalised pseudovalues, (K, 2r)
    yv = pseudo.T.reshape(t, r, big_k)
    m = yv.mean()
    m_t, m_r, m_c = yv.mean(axis=(1, 2)), yv.mean(axis=(0, 2)), yv.mean(axis=(0, 1))
    m_tr, m_tc, m_rc = yv.mean(axis=2), yv.mean(axis=1), yv.mean(axis=0)
    ms_t = r * big_k * ((m_t - m) ** 2).sum() / (t - 1)
    ms_tr = big_k * ((m_tr - m_t[:, None] - m_r[None, :] + m) ** 2).sum() / ((t - 1) * (r - 1))
    ms_tc = r * ((m_tc - m_t[:, None] - m_c[None, :] + m) ** 2).sum() / ((t - 1) * (big_k - 1))
    resid = (yv - m_tr[:, :, None] - m_tc[:, None, :] - m_rc[None, :, :] + m_t[:, None, None] + m_r[None, :, None]
             + m_c[None, None, :] - m)
    ms_trc = (resid**2).sum() / ((t - 1) * (r - 1) * (big_k - 1))
    denom = ms_tr + max(ms_tc - ms_trc, 0.0)
    f_dbm = ms_t / denom
    ddf_dbm = denom**2 / (ms_tr**2 / ((t - 1) * (r - 1)))

    assert res.method == "or-hillis" and res.n_seeds == 5
    assert res.t**2 == pytest.approx(f_dbm, rel=1e-9)
    assert res.df == pytest.approx(ddf_dbm, rel=1e-9)
    assert res.p_value == pytest.approx(stats.f.sf(f_dbm, 1, ddf_dbm), rel=1e-9)


def test_delong_covariance_is_the_clustered_covariance_of_all_seeds():
    y, a, b, patient = _clustered_data(np.random.default_rng(4), seeds=3)
    aucs, cov = delong_components(y, np.concatenate([a, b]), cluster=patient)
    res = or_test(y, a, b, cluster=patient)
    ref = or_hillis(aucs.reshape(2, 3), cov)
    assert res == ref
    assert res.auroc_a == pytest.approx(np.mean([roc_auc_score(y, s) for s in a]), abs=1e-12)


def test_size_with_seed_variation_and_power():
    # Each training draws its own class separation (sd 0.25 around the model's mean): under the null the two
    # models have the same mean, so a test that treats the trained networks as fixed (patients the only source of
    # variation) rejects far too often, while OR (r − 1 df with 3 seeds) keeps its level. 400 simulated studies, 3
    # seeds each.
    rng = np.random.default_rng(7)

    def study(gap):
        n = 150
        y = (rng.random(n) < 0.4).astype(float)
        y[:2], y[2:4] = 1.0, 0.0
        base = rng.normal(size=n)
        a = np.stack([(1.0 + gap + 0.25 * rng.normal()) * y + base + 0.7 * rng.normal(size=n) for _ in range(3)])
        b = np.stack([(1.0 + 0.25 * rng.normal()) * y + base + 0.7 * rng.normal(size=n) for _ in range(3)])
        return y, a, b

    or_null, fixed_null = [], []
    for _ in range(400):
        y, a, b = study(0.0)
        res = or_test(y, a, b)
        or_null.append(res.p_value)
        # seeds fixed: se² = (2/r)(Var − Cov1 + (r − 1)(Cov2 − Cov3)) from the same covariance, normal reference
        aucs, cov = delong_components(y, np.concatenate([a, b]))
        blk = cov.reshape(2, 3, 2, 3)
        off = ~np.eye(3, dtype=bool)
        var = np.mean([blk[i, j, i, j] for i in range(2) for j in range(3)])
        cov1 = np.mean(np.diag(blk[0, :, 1, :]))
        cov2 = np.mean([blk[i, :, i, :][off] for i in range(2)])
        cov3 = np.mean(blk[0, :, 1, :][off])
        se_fixed = math.sqrt(2 / 3 * (var - cov1 + 2 * (cov2 - cov3)))
        fixed_null.append(2 * stats.norm.sf(abs(res.diff) / se_fixed))
    or_size, fixed_size = np.mean(np.array(or_null) < 0.05), np.mean(np.array(fixed_null) < 0.05)
    assert 0.02 <= or_size <= 0.085, or_size
    assert fixed_size > 0.15, fixed_size
    power = np.mean([or_test(*study(1.2)).p_value < 0.05 for _ in range(100)])
    print(f"size OR {or_size:.3f}, seeds fixed {fixed_size:.3f}, power {power:.2f}")
    assert power > 0.6, power


def test_bad_shapes_are_refused():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="same shape"):
        or_test(y, np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"cov must have shape \(4, 4\)"):
        or_hillis(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="aurocs must have shape"):
        or_hillis(np.zeros((3, 2)), np.zeros((6, 6)))


def _multilabel(rng, n_patients, per_patient=2, labels=3, seeds=1, gap=0.3):
    """Three correlated labels on images of the same patients (a shared patient effect and a shared image effect),
    NaN where a label was not read; models a (``gap`` better) and b with ``seeds`` seeds, each network with a
    patient effect of its own (what it makes of each patient's anatomy), so the difference is clustered too."""
    patient = np.repeat(np.arange(n_patients), per_patient)
    n = patient.size
    y = np.repeat((rng.random((n_patients, labels)) < 0.35).astype(float), per_patient, axis=0)
    y[rng.random((n, labels)) < 0.1] = np.nan
    shared = np.repeat(rng.normal(size=(n_patients, 1)), per_patient, axis=0) + rng.normal(size=(n, 1))
    sep = np.nan_to_num(y)

    def model(strength):
        own = [np.repeat(rng.normal(size=(n_patients, 1)), per_patient, axis=0) for _ in range(seeds)]
        return np.stack([strength * sep + shared + o + rng.normal(size=(n, labels)) for o in own])

    return y, model(1.0 + gap), model(1.0), patient


def test_macro_is_the_mean_over_labels_and_one_label_is_close_to_or_test():
    y, a, b, patient = _multilabel(np.random.default_rng(11), 200, seeds=3)
    res = or_test_macro(y, a, b, cluster=patient)
    per_run = [[np.mean([roc_auc_score(y[~np.isnan(y[:, k]), k], s[~np.isnan(y[:, k]), k]) for k in range(3)])
                for s in m] for m in (a, b)]
    assert (res.auroc_a, res.auroc_b) == (pytest.approx(np.mean(per_run[0]), abs=1e-12),
                                          pytest.approx(np.mean(per_run[1]), abs=1e-12))
    assert res.method == "or" and res.n_seeds == 3 and res.df == 2  # 3 seeds: OR's original r − 1
    one, ref = or_test_macro(y[:, :1], a[..., :1], b[..., :1], cluster=patient), None
    keep = ~np.isnan(y[:, 0])
    ref = or_test(y[keep, 0], a[:, keep, 0], b[:, keep, 0], cluster=patient[keep])
    assert one.diff == pytest.approx(ref.diff, abs=1e-12)
    assert one.se == pytest.approx(ref.se, rel=0.02)  # I/(I-1) in place of Obuchowski's per-class factors


def test_macro_covariance_matches_the_patient_bootstrap():
    # One seed: se is the standard error of the macro AUROC difference over patient resamples.
    y, a, b, patient = _multilabel(np.random.default_rng(12), 1200, seeds=1)
    res = or_test_macro(y, a[0], b[0], cluster=patient)
    boot = ClusterBootstrap(patient, n_boot=2000, seed=0)
    reps = {name: np.mean([boot.replicates("auroc", y[:, k], s[0][:, k]) for k in range(3)], axis=0)
            for name, s in (("a", a), ("b", b))}
    sd_boot = np.std(reps["a"] - reps["b"], ddof=1)
    print(f"macro diff se: influence {res.se:.5f}, bootstrap {sd_boot:.5f}")
    assert res.se == pytest.approx(sd_boot, rel=0.1)
    # per-image (no cluster) understates it: two images per patient share a patient effect and the labels
    assert or_test_macro(y, a[0], b[0]).se < 0.9 * res.se


@pytest.mark.parametrize("seeds,clustered", [(3, True), (1, True), (3, False)])
def test_or_test_labels_equals_the_macro_and_each_labels_test_made_apart(seeds, clustered):
    """One DeLong pass per label serves the macro test and every label's own test: exactly the numbers of
    or_test_macro and of or_test on each label's labelled rows (NaN rows of a label left out)."""
    y, a, b, patient = _multilabel(np.random.default_rng(13), 80, seeds=seeds)
    cluster = patient.astype(str) if clustered else None  # string ids, as stored
    macro, each = or_test_labels(y, a, b, cluster=cluster)
    same = np.testing.assert_equal  # field by field, NaN equal to NaN (one seed: no seed interaction)
    same(dataclasses.astuple(macro), dataclasses.astuple(or_test_macro(y, a, b, cluster=cluster)))
    assert len(each) == 3
    for k, res in enumerate(each):
        keep = ~np.isnan(y[:, k])
        alone = or_test(y[keep, k], a[:, keep, k], b[:, keep, k], cluster=None if cluster is None else cluster[keep])
        same(dataclasses.astuple(res), dataclasses.astuple(alone), err_msg=str(k))


def test_macro_shapes_are_checked():
    with pytest.raises(ValueError, match=r"shape \(seeds, 4, 2\)"):
        or_test_macro(np.zeros((4, 2)), np.zeros((1, 4, 3)), np.zeros((1, 4, 3)))


def _brier_data(seed=0, n_patients=150, r=3, labels=3):
    """Two or three images per patient, ``labels`` labels with some unlabelled entries, r seeds per model."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(n_patients), rng.integers(2, 4, n_patients))
    n = cluster.size
    y = (rng.random((n, labels)) < 0.3).astype(float)
    y[rng.random((n, labels)) < 0.1] = np.nan
    base = np.clip(np.nan_to_num(y, nan=0.5) * 0.5 + 0.25 + rng.normal(0, 0.15, (n, labels)), 0.01, 0.99)
    pa = np.clip(base + rng.normal(0, 0.05, (r, n, labels)), 0, 1)
    pb = np.clip(base + rng.normal(0.05, 0.08, (r, n, labels)), 0, 1)
    return y, pa, pb, cluster


def test_brier_one_seed_is_the_clustered_paired_z_test():
    y, pa, pb, cluster = _brier_data(r=1)
    res = or_test_brier(y, pa[0], pb[0], cluster=cluster)
    known = np.isfinite(y)
    rows = known.sum(axis=0)
    # by hand, from the differences: each label's loss difference per image, over that label's rows
    d = np.where(known, (pa[0] - np.nan_to_num(y)) ** 2 - (pb[0] - np.nan_to_num(y)) ** 2, 0.0)
    diff = float(np.mean(d.sum(axis=0) / rows))
    centred = np.where(known, d - d.sum(axis=0) / rows, 0.0) / rows / y.shape[1]
    per_patient = np.array([centred[cluster == c].sum() for c in np.unique(cluster)])
    i = per_patient.size
    se = math.sqrt(i / (i - 1) * (per_patient**2).sum())
    assert res.method == "paired" and res.diff == pytest.approx(diff, abs=1e-15)
    assert res.se == pytest.approx(se, rel=1e-10)
    assert res.p_value == pytest.approx(2 * stats.norm.sf(abs(diff / se)), rel=1e-9)
    brier_b = np.mean([np.mean((pb[0][known[:, k], k] - y[known[:, k], k]) ** 2) for k in range(y.shape[1])])
    assert res.value_a == res.auroc_a == pytest.approx(
        np.mean([np.mean((pa[0][known[:, k], k] - y[known[:, k], k]) ** 2) for k in range(y.shape[1])]), abs=1e-15)
    assert res.value_b == res.auroc_b == pytest.approx(brier_b, abs=1e-15)


def test_brier_covariance_matches_the_patient_jackknife():
    # The influence covariance of the 2r macro Brier scores against a leave-one-patient-out jackknife.
    y, pa, pb, cluster = _brier_data(seed=1, n_patients=120, r=2)
    runs = np.concatenate([pa, pb])

    def macro(keep):
        yk = y[keep]
        return np.array([np.nanmean(np.where(np.isfinite(yk), (run[keep] - yk) ** 2, np.nan), axis=0).mean()
                         for run in runs])

    ids = np.unique(cluster)
    jack = np.array([macro(cluster != c) for c in ids])
    i = ids.size
    cov_jack = (i - 1) / i * (jack - jack.mean(axis=0)).T @ (jack - jack.mean(axis=0))
    res = or_test_brier(y, pa, pb, cluster=cluster)
    ref = or_hillis(macro(np.ones(len(y), bool)).reshape(2, -1), cov_jack)
    assert res.method == "or" and res.auroc_a == pytest.approx(ref.auroc_a, abs=1e-15)
    assert res.se == pytest.approx(ref.se, rel=0.03) and res.df == ref.df == 1  # 2 seeds: OR's r − 1
    assert res.diff < 0 and res.p_value < 0.05  # model b is noisier and biased upwards: a has the lower Brier


def test_brier_shapes_and_unlabelled_labels_are_refused():
    y, pa, pb, cluster = _brier_data(r=2)
    with pytest.raises(ValueError, match="shape"):
        or_test_brier(y, pa, pb[:1], cluster=cluster)
    y[:, 1] = np.nan
    with pytest.raises(ValueError, match="labelled row"):
        or_test_brier(y, pa, pb, cluster=cluster)

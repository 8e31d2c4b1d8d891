"""DeLong: a hand-worked example, agreement with the bootstrap, and the paired test's size and power."""

import numpy as np
import pytest
from scipy.stats import kstest

from scaling.metrics import MetricWarning, auroc, bootstrap_ci, delong_ci, delong_components, delong_test, holm


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


def test_zero_variance_gives_nan_p_and_interval_not_certainty():
    # y = (1, 1, 0, 0); a = (0.9, 0.8, 0.2, 0.1) separates perfectly: V10 = (1, 1), V01 = (1, 1), AUROC 1;
    # b = 0.5 everywhere ties every pair: V10 = V01 = (1/2, 1/2), AUROC 1/2. Every component is constant, so
    # DeLong's variance is S10/2 + S01/2 = 0 for both and for their difference: four patients leave nothing to refer
    # the difference 1/2 to. Before, the test said p = 0 with the interval [0.5, 0.5], and the AUROC [1, 1].
    y, a, b = [1.0, 1.0, 0.0, 0.0], [0.9, 0.8, 0.2, 0.1], [0.5, 0.5, 0.5, 0.5]
    with pytest.warns(MetricWarning, match="variance of the AUROC difference"):
        res = delong_test(y, a, b)
    assert (res.auroc_a, res.auroc_b, res.diff, res.se) == (1.0, 0.5, 0.5, 0.0)
    assert np.isnan(res.z) and np.isnan(res.p_value) and np.isnan(res.lo) and np.isnan(res.hi)
    for scores, value in ((a, 1.0), (b, 0.5)):
        with pytest.warns(MetricWarning, match="variance of the AUROC"):
            ci = delong_ci(y, scores)
        assert (ci.auroc, ci.se) == (value, 0.0) and np.isnan(ci.lo) and np.isnan(ci.hi)
    # Two identical models: the difference's variance is 0 up to rounding; no test either (Holm leaves it out).
    with pytest.warns(MetricWarning):
        same = delong_test([1.0, 0.0, 0.0, 1.0], [0.9, 0.2, 0.5, 0.6], [0.9, 0.2, 0.5, 0.6])
    assert same.diff == 0 and same.se == 0 and np.isnan(same.p_value) and np.isnan(same.lo)
    np.testing.assert_allclose(holm([same.p_value, 0.02, 0.04]), [np.nan, 0.04, 0.04])


def test_one_class_and_bad_input():
    with pytest.warns(UserWarning):
        assert np.isnan(delong_ci([1.0, 1.0], [0.2, 0.3]).auroc)
    with pytest.raises(ValueError, match="y needs both classes"):
        delong_test([1.0, 1.0], [0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="p_a"):
        delong_test([1.0, 0.0, 1.0], [0.2, 0.3], [0.1, 0.2, 0.3])


# --- Clustered (several images per patient): Obuchowski, Biometrics 53 (1997) 567-578 ---------------------------

def test_clustered_hand_worked_example():
    # The example above, with the images grouped into patients a: {pos 0.9, neg 0.3}, b: {pos 0.6},
    # c: {neg 0.7, neg 0.1}. V10 = (1, 2/3), V01 = (1 for 0.3, 1/2 for 0.7, 1 for 0.1), A = 5/6.
    # Per-patient sums minus m_i A: X = (1/6, -1/6, 0); minus n_i A: Y = (1/6, 0, 3/2 - 5/3 = -1/6).
    # I = 3, I10 = 2, I01 = 2, M = 2, N = 3: S10 = 2/(1*2) * 2/36 = 1/18, S01 = 2/(1*3) * 2/36 = 1/27,
    # S11 = 3/2 * 1/36 = 1/24; Var = 1/36 + 1/81 + 2 (1/24) / 6 = 35/648 (DeLong, independent: 36/648).
    y = np.array([1, 0, 1, 0, 0], dtype=float)
    p = np.array([0.9, 0.3, 0.6, 0.7, 0.1])
    patients = ["a", "a", "b", "c", "c"]
    aucs, cov = delong_components(y, p, cluster=patients)
    assert aucs[0] == pytest.approx(5 / 6, abs=1e-15)
    assert cov[0, 0] == pytest.approx(35 / 648, abs=1e-15)
    assert delong_components(y, p)[1][0, 0] == pytest.approx(36 / 648, abs=1e-15)
    assert delong_ci(y, p, cluster=patients).se == pytest.approx(np.sqrt(35 / 648), abs=1e-15)


def _obuchowski_brute_force(y, scores, cluster):
    """The paper's estimator term by term, O(M N) per model: the reference the fast path must match."""
    keep = ~np.isnan(y)
    y, scores, cluster = y[keep], scores[:, keep], np.asarray(cluster, dtype=object)[keep]
    ids = list(dict.fromkeys(cluster))
    big_m, big_n = int((y == 1).sum()), int((y == 0).sum())

    def psi(a, b):
        return 1.0 if a > b else 0.5 if a == b else 0.0

    comps = []
    for s in scores:
        pos, neg = s[y == 1], s[y == 0]
        auc = sum(psi(a, b) for a in pos for b in neg) / (big_m * big_n)
        x, yy, m_i, n_i = [], [], [], []
        for c in ids:
            in_c = cluster == c
            x.append(sum(sum(psi(a, b) for b in neg) / big_n for a in s[in_c & (y == 1)]))
            yy.append(sum(sum(psi(a, b) for a in pos) / big_m for b in s[in_c & (y == 0)]))
            m_i.append(int((in_c & (y == 1)).sum()))
            n_i.append(int((in_c & (y == 0)).sum()))
        comps.append((auc, np.array(x) - np.array(m_i) * auc, np.array(yy) - np.array(n_i) * auc))
    m_i, n_i = np.array(m_i), np.array(n_i)
    n_clu, i10, i01 = len(ids), int((m_i > 0).sum()), int((n_i > 0).sum())
    k = len(comps)
    cov = np.empty((k, k))
    for r in range(k):
        for t in range(k):
            s10 = i10 / ((i10 - 1) * big_m) * np.sum(comps[r][1] * comps[t][1])
            s01 = i01 / ((i01 - 1) * big_n) * np.sum(comps[r][2] * comps[t][2])
            s11_rt = n_clu / (n_clu - 1) * np.sum(comps[r][1] * comps[t][2])
            s11_tr = n_clu / (n_clu - 1) * np.sum(comps[t][1] * comps[r][2])
            cov[r, t] = s10 / big_m + s01 / big_n + (s11_rt + s11_tr) / (big_m * big_n)
    return np.array([c[0] for c in comps]), cov


def test_clustered_covariance_matches_the_papers_estimator_term_by_term():
    rng = np.random.default_rng(3)
    n = 90
    cluster = rng.integers(0, 25, size=n).astype(str)  # 1 to ~8 images per patient, some patients one class only
    y = (rng.random(n) < 0.35).astype(float)
    y[rng.random(n) < 0.1] = np.nan  # unlabelled images are left out
    scores = np.round(np.vstack([y, 0.5 * y]) + rng.normal(size=(2, n)), 1)  # rounding makes ties
    scores = np.nan_to_num(scores, nan=0.0)
    aucs, cov = delong_components(y, scores, cluster=cluster)
    ref_aucs, ref_cov = _obuchowski_brute_force(y, scores, cluster)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=0, atol=1e-14)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-12, atol=1e-16)
    assert abs(cov[0, 1]) > 1e-5  # the cross term is exercised, not zero


def test_one_image_per_patient_is_delong_exactly():
    rng = np.random.default_rng(4)
    y = (rng.random(400) < 0.3).astype(float)
    scores = np.vstack([y, 0.3 * y]) + rng.normal(size=(2, 400))
    _, independent = delong_components(y, scores)
    _, clustered = delong_components(y, scores, cluster=np.arange(400))
    np.testing.assert_allclose(clustered, independent, rtol=1e-12)


def _clustered_study(rng, n_patients=80, images=4):
    """Patients with several images: the label is the patient's, and each of two equally good models scores a
    patient's images alike (a shared and a model-specific patient effect, little per-image noise)."""
    patient_y = (rng.random(n_patients) < 0.4).astype(float)
    y = np.repeat(patient_y, images)
    patient = np.repeat(np.arange(n_patients), images)

    def per_patient(scale):
        return np.repeat(rng.normal(size=n_patients), images) * scale

    shared = y + per_patient(1.0)
    a = shared + per_patient(0.8) + 0.2 * rng.normal(size=y.size)
    b = shared + per_patient(0.8) + 0.2 * rng.normal(size=y.size)
    return y, a, b, patient


def test_clustered_variance_matches_the_spread_over_repeated_studies():
    # 400 simulated studies with 4 strongly correlated images per patient: the per-image DeLong SE is far too small
    # and its paired test rejects a true null far too often; the clustered SE matches the observed spread of the
    # AUROC and its test keeps its size.
    rng = np.random.default_rng(5)
    aucs, se_iid, se_clu, p_iid, p_clu = [], [], [], [], []
    for _ in range(400):
        y, a, b, patient = _clustered_study(rng)
        aucs.append(auroc(y, a))
        se_iid.append(delong_ci(y, a).se)
        se_clu.append(delong_ci(y, a, cluster=patient).se)
        p_iid.append(delong_test(y, a, b).p_value)
        p_clu.append(delong_test(y, a, b, cluster=patient).p_value)
    spread = np.std(aucs, ddof=1)
    assert 0.85 < np.mean(se_clu) / spread < 1.15
    assert np.mean(se_iid) / spread < 0.7
    assert np.mean(np.array(p_iid) < 0.05) > 0.15
    assert 0.02 <= np.mean(np.array(p_clu) < 0.05) <= 0.09


def test_clustered_bad_input():
    with pytest.raises(ValueError, match="missing ids"):
        delong_components([1.0, 0.0, 1.0], [0.2, 0.3, 0.4], cluster=["a", None, "b"])
    with pytest.raises(ValueError, match="cluster"):
        delong_components([1.0, 0.0, 1.0], [0.2, 0.3, 0.4], cluster=["a", "b"])
    # One patient holds every positive: no between-patient variance of the positives can be estimated.
    res = delong_test([1.0, 1.0, 0.0, 0.0], [0.9, 0.8, 0.1, 0.5], [0.7, 0.8, 0.2, 0.1], cluster=["a", "a", "b", "c"])
    assert res.diff == 0.0 and np.isnan(res.se) and np.isnan(res.p_value)


def test_holm_adjustment_by_hand():
    # Defined p-values sorted: 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running maximum
    # 0.02, 0.03, 0.06, 0.06. A NaN is no test: left NaN and not counted in m.
    out = holm([0.01, 0.04, 0.03, np.nan, 0.005])
    np.testing.assert_allclose(out, [0.03, 0.06, 0.06, np.nan, 0.02], rtol=1e-12)
    np.testing.assert_array_equal(holm([0.6, 0.9]), [1.0, 1.0])  # capped at 1
    assert holm([]).size == 0

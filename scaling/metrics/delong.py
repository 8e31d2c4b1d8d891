"""DeLong's AUROC variance and paired test, with the fast algorithm of Sun & Xu (2014).

DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of correlated AUROCs from the structural
components V10 (per positive: share of negatives it outranks) and V01 (per negative: share of positives that
outrank it): Cov = S10 / m + S01 / n for m positives and n negatives. Sun & Xu ("Fast implementation of DeLong's
algorithm for comparing the areas under correlated receiver operating characteristic curves", IEEE SPL 2014)
obtain the components from three midrankings (positives alone, negatives alone, all together), which costs
O(N log N) instead of O(m n). Ties count one half, consistent with :func:`scaling.metrics.auroc`.

DeLong treats samples as independent, which understates the variance when a patient has several images (their
scores and labels are correlated). Given ``cluster`` (one patient id per sample), the components are summed per
patient and the variance is Obuchowski's ("Nonparametric analysis of clustered ROC curve data", Biometrics 53,
1997): for I patients, I10 of them with a positive image and I01 with a negative one, per-patient sums
X_i = sum of V10 over its m_i positives and Y_i = sum of V01 over its n_i negatives, M and N positives and
negatives in all,

    S10 = I10 / ((I10 - 1) M) * sum_i (X_i - m_i A)(X_i - m_i A')
    S01 = I01 / ((I01 - 1) N) * sum_i (Y_i - n_i A)(Y_i - n_i A')
    S11 = I / (I - 1)         * sum_i (X_i - m_i A)(Y_i - n_i A')
    Cov(A, A') = S10 / M + S01 / N + (S11 + S11') / (M N)

With one image per patient this is DeLong's covariance exactly (S11 = 0, I10 = M, I01 = N).

The estimate is 0 when the components do not vary: a model that separates the classes perfectly, or one that scores
every sample alike (and the difference of two such models, or of two identical ones). The sample then shows no
variation to refer the AUROC or the difference to, which is no evidence that there is none (four patients of a
perfect model do not make its AUROC certain): :func:`delong_ci` and :func:`delong_test` return a NaN interval and
p-value with a :class:`~scaling.metrics.validation.MetricWarning` instead of a zero-width interval and p = 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from scaling.metrics.bootstrap import cluster_codes
from scaling.metrics.validation import MetricWarning, check_labels, check_same_length, check_scores, one_class_nan

ZERO_VARIANCE_RTOL = 1e-12
"""A variance of a difference at most this fraction of the magnitude of the terms it is made of is zero: what is
left is rounding (e.g. two identical models)."""


@dataclass(frozen=True)
class DelongCI:
    """AUROC with its DeLong standard error and normal-approximation interval (clipped to [0, 1])."""

    auroc: float
    """AUROC on the labelled rows."""
    se: float
    """DeLong standard error."""
    lo: float
    """Lower bound (NaN when ``se`` is 0)."""
    hi: float
    """Upper bound (NaN when ``se`` is 0)."""


@dataclass(frozen=True)
class DelongTest:
    """DeLong's paired comparison of two models' AUROCs on the same samples."""

    auroc_a: float
    """AUROC of model a."""
    auroc_b: float
    """AUROC of model b."""
    diff: float
    """auroc_a - auroc_b."""
    se: float
    """Standard error of the difference (accounts for the correlation of the two models)."""
    z: float
    """diff / se."""
    p_value: float
    """Two-sided p-value of H0: equal AUROC (NaN when ``se`` is 0: no variation to test against)."""
    lo: float
    """Lower bound of the difference's normal-approximation interval (NaN when ``se`` is 0)."""
    hi: float
    """Upper bound of the difference's normal-approximation interval (NaN when ``se`` is 0)."""


def _sorted_midranks(sorted_values: np.ndarray) -> np.ndarray:
    """1-based midranks of already sorted values (tied values share the mean of their ranks), in linear time."""
    size = sorted_values.size
    first = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    last = np.r_[first[1:], size]  # one past the end of each tie group
    return np.repeat((first + last + 1) / 2.0, last - first)


def _three_midrankings(row: np.ndarray, m: int):
    """Midranks of the m positives (first) among themselves, of the negatives among themselves, and of all
    together: one sort of the combined row serves the three (Sun & Xu 2014, section III)."""
    order = np.argsort(row)  # tie order is irrelevant: tied values share a midrank
    values = row[order]
    is_pos = order < m
    tz = np.empty(row.size)
    tz[order] = _sorted_midranks(values)
    tx = np.empty(m)
    tx[order[is_pos]] = _sorted_midranks(values[is_pos])
    ty = np.empty(row.size - m)
    ty[order[~is_pos] - m] = _sorted_midranks(values[~is_pos])
    return tx, ty, tz


def delong_components(y, scores, cluster=None) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs and their DeLong covariance matrix for k score vectors on the same samples.

    ``y``: (N,) labels (1/0/NaN; NaN rows masked); ``scores``: (k, N) or (N,); ``cluster``: None (samples are
    independent: DeLong 1988) or (N,) patient ids (Obuchowski 1997: samples of one patient are correlated).
    Returns (aurocs (k,), cov (k, k)); the covariance is NaN with fewer than two samples (or, with ``cluster``,
    patients) of a class. Raises ValueError (naming ``y``) when a class is absent: the variance is then undefined.
    """
    y, s = _checked(y, scores)
    codes = None if cluster is None else cluster_codes(cluster, y.size)
    components = _structural_components(y, s)
    return components[2], _covariance(components, codes)


def delong_components_and_influence(y, scores, cluster=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(aurocs, cov, psi): the AUROCs and covariance of :func:`delong_components` and each patient's first-order
    influence on the AUROCs, from one sort of each score row — what a per-label test and a macro test over the same
    labels both need (:func:`scaling.metrics.or_test_labels`).

    psi is (k, C), C = the distinct ``cluster`` ids of all N samples (labelled or not, numbered as
    :func:`scaling.metrics.bootstrap.cluster_codes` numbers them; without ``cluster`` one per sample), with
    psi_i = (X_i − m_i A) / M + (Y_i − n_i A) / N in the notation of the module docstring (0 for a patient without
    a labelled image). Influences of different labels of the same samples add up patient by patient, so
    ``I / (I − 1) · Ψ Ψᵀ`` of their average Ψ is the covariance of macro AUROCs (I: patients with a labelled
    image); for one label it is Obuchowski's with I / (I − 1) in place of his per-class factors.
    """
    y, s = _checked(y, scores)
    codes = None if cluster is None else cluster_codes(cluster, y.size)
    components = _structural_components(y, s)
    return (components[2], _covariance(components, codes),
            _influence(components, np.arange(y.size) if codes is None else codes))


def _covariance(components, codes: np.ndarray | None) -> np.ndarray:
    """DeLong's covariance of the AUROCs (independent samples: ``codes`` None) or Obuchowski's (clustered)."""
    is_pos, is_neg, aucs, v10, v01 = components
    m, n = v10.shape[1], v01.shape[1]
    if codes is None:
        if m < 2 or n < 2:  # a variance needs two samples of each class
            return np.full((aucs.size, aucs.size), np.nan)
        return np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return _clustered_cov(aucs, v10, v01, codes[is_pos], codes[is_neg])


def _checked(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) and scores (k, N), validated."""
    y = check_labels(y, "y")
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    for j in range(s.shape[0]):
        check_scores(s[j], "scores", probability=False)
    check_same_length(y=y, scores=s[0])
    return y, s


def _structural_components(y: np.ndarray, s: np.ndarray):
    """Masks of the labelled positives and negatives, the AUROCs (k,) and DeLong's structural components V10 (k, m)
    and V01 (k, n) from three midrankings per score row (Sun & Xu 2014)."""
    mask = ~np.isnan(y)
    is_pos, is_neg = mask & (y == 1.0), mask & (y == 0.0)
    pos, neg = s[:, is_pos], s[:, is_neg]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError(f"y needs both classes for DeLong, got {m} positive and {n} negative labelled samples")
    tx, ty, tz = np.empty_like(pos), np.empty_like(neg), np.empty((s.shape[0], m + n))
    for k, row in enumerate(np.concatenate([pos, neg], axis=1)):
        tx[k], ty[k], tz[k] = _three_midrankings(row, m)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives below it
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives above it
    return is_pos, is_neg, aucs, v10, v01


def _influence(components, codes: np.ndarray) -> np.ndarray:
    """psi (k, C) of :func:`delong_components_and_influence` from :func:`_structural_components` and every sample's
    cluster code."""
    is_pos, is_neg, aucs, v10, v01 = components
    n_clusters = int(codes.max()) + 1 if codes.size else 0
    big_m, big_n = v10.shape[1], v01.shape[1]
    pos_c, neg_c = codes[is_pos], codes[is_neg]
    m_i = np.bincount(pos_c, minlength=n_clusters).astype(float)
    n_i = np.bincount(neg_c, minlength=n_clusters).astype(float)
    x = np.stack([np.bincount(pos_c, weights=row, minlength=n_clusters) for row in v10]) - m_i * aucs[:, None]
    yy = np.stack([np.bincount(neg_c, weights=row, minlength=n_clusters) for row in v01]) - n_i * aucs[:, None]
    return x / big_m + yy / big_n


def _clustered_cov(aucs, v10, v01, pos_codes, neg_codes) -> np.ndarray:
    """Obuchowski's (1997) covariance of the AUROCs from the structural components summed per patient."""
    k = aucs.size
    # Renumbered over the patients with a labelled image: I counts those only.
    codes = np.unique(np.concatenate([pos_codes, neg_codes]), return_inverse=True)[1]
    pos_c, neg_c = codes[: pos_codes.size], codes[pos_codes.size:]
    n_clusters = int(codes.max()) + 1
    m_i = np.bincount(pos_c, minlength=n_clusters).astype(float)
    n_i = np.bincount(neg_c, minlength=n_clusters).astype(float)
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if i10 < 2 or i01 < 2:  # a variance needs two patients with each class
        return np.full((k, k), np.nan)
    big_m, big_n = pos_codes.size, neg_codes.size
    x = np.stack([np.bincount(pos_c, weights=v10[r], minlength=n_clusters) for r in range(k)]) - m_i * aucs[:, None]
    yy = np.stack([np.bincount(neg_c, weights=v01[r], minlength=n_clusters) for r in range(k)]) - n_i * aucs[:, None]
    s10 = i10 / ((i10 - 1) * big_m) * (x @ x.T)
    s01 = i01 / ((i01 - 1) * big_n) * (yy @ yy.T)
    s11 = n_clusters / (n_clusters - 1) * (x @ yy.T)
    return s10 / big_m + s01 / big_n + (s11 + s11.T) / (big_m * big_n)


def delong_ci(y, p, alpha: float = 0.05, cluster=None) -> DelongCI:
    """AUROC with DeLong standard error and a (1 - alpha) normal interval clipped to [0, 1].

    ``cluster``: patient id per sample for Obuchowski's clustered variance (module docstring), None for
    independent samples. NaN fields (with a ``MetricWarning``) when the labelled rows hold one class. With fewer
    than two samples (or patients) of a class the variance is NaN. When the estimated variance is 0 (perfect
    separation, or constant scores) ``se`` is 0 and the interval NaN, with a ``MetricWarning``.
    """
    y_arr = check_labels(y, "y")
    n_pos = int(np.nansum(y_arr))
    if one_class_nan(n_pos, int((y_arr == 0).sum()), "DeLong AUROC"):
        nan = float("nan")
        return DelongCI(nan, nan, nan, nan)
    aucs, cov = delong_components(y_arr, p, cluster)
    auc, var = float(aucs[0]), float(cov[0, 0])
    if var <= 0:  # a sum of squares: exactly 0 when the components do not vary
        _zero_variance(f"the DeLong variance of the AUROC ({auc:.4g}) is 0")
        return DelongCI(auc, 0.0, float("nan"), float("nan"))
    se = float(np.sqrt(var))  # NaN with fewer than two samples (patients) of a class
    z = norm.ppf(1.0 - alpha / 2.0)
    return DelongCI(auc, se, float(np.clip(auc - z * se, 0.0, 1.0)), float(np.clip(auc + z * se, 0.0, 1.0)))


def delong_test(y, p_a, p_b, alpha: float = 0.05, cluster=None) -> DelongTest:
    """Paired DeLong test of AUROC(p_a) = AUROC(p_b) on the same samples (two-sided), with the difference's
    (1 - alpha) interval. ``cluster``: patient id per sample (Obuchowski 1997), None for independent samples.
    Raises ValueError when ``y`` lacks a class. When the estimated variance of the difference is 0 (module
    docstring) ``se`` is 0 and ``z``, ``p_value``, ``lo``, ``hi`` are NaN, with a ``MetricWarning``."""
    check_same_length(p_a=np.asarray(p_a), p_b=np.asarray(p_b))
    aucs, cov = delong_components(y, np.vstack([np.asarray(p_a, float), np.asarray(p_b, float)]), cluster)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    nan = float("nan")
    if not np.isfinite(var):  # fewer than two samples (patients) of a class
        return DelongTest(float(aucs[0]), float(aucs[1]), diff, nan, nan, nan, nan, nan)
    if var <= ZERO_VARIANCE_RTOL * float(np.abs(cov).sum()):  # 0 up to the rounding of the three terms
        _zero_variance(f"the DeLong variance of the AUROC difference ({diff:+.4g}) is 0")
        return DelongTest(float(aucs[0]), float(aucs[1]), diff, 0.0, nan, nan, nan, nan)
    se = float(np.sqrt(var))
    z = diff / se
    half = float(norm.ppf(1.0 - alpha / 2.0)) * se
    return DelongTest(float(aucs[0]), float(aucs[1]), diff, se, z, float(2.0 * norm.sf(abs(z))), diff - half,
                      diff + half)


def _zero_variance(what: str) -> None:
    """Warn that a DeLong variance estimate is 0, so no interval or p-value is given (module docstring)."""
    warnings.warn(f"{what}: no interval or p-value (NaN); the sample shows no variation to refer it to, which is "
                  f"no evidence that there is none", MetricWarning, stacklevel=3)

"""DeLong's AUROC variance and paired test, with the fast algorithm of Sun & Xu (2014).

DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of correlated AUROCs from the structural
components V10 (per positive: share of negatives it outranks) and V01 (per negative: share of positives that
outrank it): Cov = S10 / m + S01 / n for m positives and n negatives. Sun & Xu ("Fast implementation of DeLong's
algorithm for comparing the areas under correlated receiver operating characteristic curves", IEEE SPL 2014)
obtain the components from three midrankings (positives alone, negatives alone, all together), which costs
O(N log N) instead of O(m n). Ties count one half, consistent with :func:`scaling.metrics.auroc`.

DeLong treats samples as independent; with several images per patient prefer the cluster bootstrap
(:func:`scaling.metrics.bootstrap_ci`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from scaling.metrics.validation import check_labels, check_same_length, check_scores, one_class_nan


@dataclass(frozen=True)
class DelongCI:
    """AUROC with its DeLong standard error and normal-approximation interval (clipped to [0, 1])."""

    auroc: float
    """AUROC on the labelled rows."""
    se: float
    """DeLong standard error."""
    lo: float
    """Lower bound."""
    hi: float
    """Upper bound."""


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
    """Two-sided p-value of H0: equal AUROC."""
    lo: float
    """Lower bound of the difference's normal-approximation interval."""
    hi: float
    """Upper bound of the difference's normal-approximation interval."""


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


def delong_components(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs and their DeLong covariance matrix for k score vectors on the same samples.

    ``y``: (N,) labels (1/0/NaN; NaN rows masked); ``scores``: (k, N) or (N,). Returns (aurocs (k,), cov (k, k)).
    Raises ValueError (naming ``y``) when a class is absent: the variance is then undefined.
    """
    y = check_labels(y, "y")
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    for j in range(s.shape[0]):
        check_scores(s[j], "scores", probability=False)
    check_same_length(y=y, scores=s[0])
    mask = ~np.isnan(y)
    pos = s[:, mask & (y == 1.0)]
    neg = s[:, mask & (y == 0.0)]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError(f"y needs both classes for DeLong, got {m} positive and {n} negative labelled samples")
    tx, ty, tz = np.empty_like(pos), np.empty_like(neg), np.empty((s.shape[0], m + n))
    for k, row in enumerate(np.concatenate([pos, neg], axis=1)):
        tx[k], ty[k], tz[k] = _three_midrankings(row, m)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives below it
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives above it
    if m < 2 or n < 2:  # a variance needs two samples of each class
        return aucs, np.full((s.shape[0], s.shape[0]), np.nan)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_ci(y, p, alpha: float = 0.05) -> DelongCI:
    """AUROC with DeLong standard error and a (1 - alpha) normal interval clipped to [0, 1].

    NaN fields (with a ``MetricWarning``) when the labelled rows hold one class. With fewer than two samples of a
    class the variance is NaN.
    """
    y_arr = check_labels(y, "y")
    n_pos = int(np.nansum(y_arr))
    if one_class_nan(n_pos, int((y_arr == 0).sum()), "DeLong AUROC"):
        nan = float("nan")
        return DelongCI(nan, nan, nan, nan)
    aucs, cov = delong_components(y_arr, p)
    se = float(np.sqrt(cov[0, 0]))
    z = norm.ppf(1.0 - alpha / 2.0)
    auc = float(aucs[0])
    return DelongCI(auc, se, float(np.clip(auc - z * se, 0.0, 1.0)), float(np.clip(auc + z * se, 0.0, 1.0)))


def delong_test(y, p_a, p_b, alpha: float = 0.05) -> DelongTest:
    """Paired DeLong test of AUROC(p_a) = AUROC(p_b) on the same samples (two-sided), with the difference's
    (1 - alpha) interval. Raises ValueError when ``y`` lacks a class."""
    check_same_length(p_a=np.asarray(p_a), p_b=np.asarray(p_b))
    aucs, cov = delong_components(y, np.vstack([np.asarray(p_a, float), np.asarray(p_b, float)]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if not np.isfinite(var):  # fewer than two samples of a class
        nan = float("nan")
        return DelongTest(float(aucs[0]), float(aucs[1]), diff, nan, nan, nan, nan, nan)
    se = float(np.sqrt(max(var, 0.0)))  # rounding can make an exactly-zero variance slightly negative
    if se > 0:
        z = diff / se
        p_value = float(2.0 * norm.sf(abs(z)))
    elif diff == 0:  # identical rankings: no evidence of a difference
        z, p_value = 0.0, 1.0
    else:  # a difference without sampling variance
        z, p_value = float(np.sign(diff) * np.inf), 0.0
    half = float(norm.ppf(1.0 - alpha / 2.0)) * se
    return DelongTest(float(aucs[0]), float(aucs[1]), diff, se, z, p_value, diff - half, diff + half)

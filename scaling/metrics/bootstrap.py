"""Cluster (patient-level) bootstrap: percentile confidence intervals and paired differences for any metric.

Images of one patient are not independent, so resampling images understates the uncertainty; we resample
*patients* with replacement and keep all of their images (the cluster bootstrap, Field & Welsh 2007). A
resample is therefore a vector of per-patient multiplicities ``counts[b, g]``, and a metric of the resample
equals the metric of the original data with sample ``i`` weighted by ``counts[b, codes[i]]``. For the metrics
that have a weighted form (AUROC, AUPRC, Brier, NLL, equal-width ECE/MCE, prevalence, TPR/FPR) all replicates
are computed with array operations on that weight matrix: no Python loop over replicates. Any other callable is
evaluated per replicate on the explicitly resampled rows.

Intervals are percentile intervals (Efron & Tibshirani 1993, ch. 13); replicates in which the metric is
undefined (e.g. no positive patient drawn) are left out and counted in ``n_valid``. With ``cluster=None`` every
row is its own cluster (the ordinary bootstrap). NaN labels are masked after resampling, so the number of
labelled rows varies across replicates exactly as it would in a new sample of patients. For statistics that are
biased in small samples (ECE, MCE, max - min gaps, minima over groups) the replicates are biased the same way, so
the percentile interval need not contain the point estimate.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats

from scaling.metrics import calibration, discrimination
from scaling.metrics.validation import MetricWarning, check_labels, check_same_length, check_scores

# Metrics with a vectorised weighted form: public function → replicate function (y bool, p, counts, codes).
REPLICATE_FUNCTIONS: dict[Callable, Callable] = {
    discrimination.auroc: discrimination.auroc_replicates,
    discrimination.auprc: discrimination.auprc_replicates,
    calibration.brier: calibration.brier_replicates,
    calibration.nll: calibration.nll_replicates,
    calibration.ece: calibration.ece_replicates,
    calibration.mce: calibration.mce_replicates,
}
_BY_NAME = {f.__name__: f for f in REPLICATE_FUNCTIONS}

# Counts are drawn in fixed blocks of replicates so results depend only on (seed, n_boot, clusters).
_DRAW_BLOCK = 64


@dataclass(frozen=True)
class BootstrapResult:
    """A point estimate with its percentile interval and the replicates behind it."""

    estimate: float
    """The metric on the original sample."""
    lo: float
    """Lower percentile bound (alpha / 2)."""
    hi: float
    """Upper percentile bound (1 - alpha / 2)."""
    se: float
    """Standard deviation of the valid replicates (bootstrap standard error)."""
    n_valid: int
    """Replicates in which the metric was defined."""
    replicates: np.ndarray = field(repr=False)
    """All replicate values (NaN where undefined)."""


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Difference of a metric between two models on the same samples, with a percentile interval."""

    diff: float
    """metric(p_a) - metric(p_b) on the original sample."""
    lo: float
    """Lower percentile bound of the difference."""
    hi: float
    """Upper percentile bound of the difference."""
    p_value: float
    """Two-sided bootstrap p-value for 'no difference': 2 x the smaller tail share of replicates at/below/above 0
    ((count + 1) / (n_valid + 1), capped at 1)."""
    estimate_a: float
    """metric(p_a)."""
    estimate_b: float
    """metric(p_b)."""
    n_valid: int
    """Replicates in which both metrics were defined."""
    replicates: np.ndarray = field(repr=False)
    """Replicate differences (NaN where undefined)."""


def resolve_metric(metric) -> Callable:
    """A metric callable from a callable or the name of a ``scaling.metrics`` function with a weighted form."""
    if isinstance(metric, str):
        if metric not in _BY_NAME:
            raise ValueError(f"metric={metric!r} is not known by name; choose one of {sorted(_BY_NAME)} "
                             "or pass a callable metric(y, p)")
        return _BY_NAME[metric]
    if not callable(metric):
        raise ValueError(f"metric must be a callable metric(y, p) or a name, got {metric!r}")
    return metric


def cluster_codes(cluster, n: int | None = None) -> np.ndarray:
    """0-based integer code of each sample's cluster (patient) id, numbered in sorted order of the ids. Every sample
    needs an id; ``n``: the number of samples expected."""
    arr = np.asarray(cluster).ravel()
    if arr.dtype.kind in "iu":  # integer ids (or codes already): no missing value possible, no object detour
        if n is not None and arr.size != n:
            raise ValueError(f"cluster has length {arr.size}, expected {n}")
        return np.unique(arr, return_inverse=True)[1].astype(np.intp)
    ids = pd.Series(arr.astype(object))
    if ids.isna().any():
        raise ValueError("cluster contains missing ids; every sample needs a patient id")
    if n is not None and len(ids) != n:
        raise ValueError(f"cluster has length {len(ids)}, expected {n}")
    return pd.factorize(ids, sort=True)[0].astype(np.intp)


class ClusterBootstrap:
    """Per-cluster multiplicities of ``n_boot`` cluster resamples, reusable across metrics, labels and subsets.

    ``cluster`` holds one cluster id (patient id) per sample, or is None for one cluster per sample. Clusters are
    numbered in sorted order of their ids, so the same patients with the same seed give the same replicates
    whatever the number of images per patient. ``counts`` is (n_boot, n_clusters) float32 (small integers, so
    exact); ``codes`` maps each sample to its cluster.
    """

    def __init__(self, cluster=None, n: int | None = None, n_boot: int = 1000, seed: int | Sequence[int] = 0):
        if cluster is None:
            if n is None:
                raise ValueError("ClusterBootstrap needs cluster ids or the number of samples n")
            self.codes = np.arange(int(n))
        else:
            self.codes = cluster_codes(cluster, n)
        if int(n_boot) < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        self.n_boot = int(n_boot)
        self.n_clusters = int(self.codes.max()) + 1 if self.codes.size else 0
        self.counts = self._draw(np.random.default_rng(seed))

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        g = self.n_clusters
        out = np.empty((self.n_boot, g), dtype=np.float32)  # small integers: exact, half the memory traffic
        for start in range(0, self.n_boot, _DRAW_BLOCK):
            b = min(_DRAW_BLOCK, self.n_boot - start)
            draws = rng.integers(0, max(g, 1), size=(b, g), dtype=np.int64)
            draws += (np.arange(b, dtype=np.int64) * g)[:, None]  # one bincount for the whole block
            out[start:start + b] = np.bincount(draws.ravel(), minlength=b * g).reshape(b, g)
        return out

    def subset(self, rows) -> ClusterBootstrap:
        """The same replicates restricted to samples ``rows`` (positions or a boolean mask). Cluster numbering
        and counts are shared, so a subgroup's replicates stay paired with the whole set's: the subgroup's size
        varies across replicates as it would in a new sample of patients."""
        view = object.__new__(ClusterBootstrap)
        view.codes = self.codes[rows]
        view.n_boot, view.n_clusters, view.counts = self.n_boot, self.n_clusters, self.counts
        return view

    def replicates(self, metric, y, p) -> np.ndarray:
        """Replicate values of ``metric`` (a callable or name, see :func:`bootstrap_ci`) on ``y``/``p`` aligned
        with this bootstrap's samples. NaN-label rows are masked. Returns (n_boot,) values (NaN where undefined)."""
        codes = self.codes
        y = check_labels(y, "y")
        p = check_scores(p, "p", probability=False)
        check_same_length(y=y, p=p, cluster=codes)
        mask = ~np.isnan(y)
        y, p, codes = y[mask] == 1.0, p[mask], codes[mask]
        metric = resolve_metric(metric)
        fast = REPLICATE_FUNCTIONS.get(metric)
        if fast is not None:
            return fast(y, p, self.counts, codes)
        return self._loop(metric, y, p, codes)

    def _loop(self, metric, y, p, codes) -> np.ndarray:
        out = np.full(self.n_boot, np.nan)
        rows = np.arange(y.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            for b in range(self.n_boot):
                idx = np.repeat(rows, self.counts[b, codes].astype(np.intp))
                if idx.size:
                    out[b] = metric(y[idx].astype(np.float64), p[idx])
        return out


def percentile_interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The (alpha/2, 1 - alpha/2) percentiles of the defined replicates; NaN when none is defined."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    valid = np.sort(replicates[np.isfinite(replicates)])
    if not valid.size:
        return float("nan"), float("nan")
    # numpy's default ('linear') quantile, inlined: np.quantile's overhead dominates for a few hundred values.
    pos = np.array([alpha / 2.0, 1.0 - alpha / 2.0]) * (valid.size - 1)
    below = np.floor(pos).astype(np.intp)
    above = np.minimum(below + 1, valid.size - 1)
    lo, hi = valid[below] + (pos - below) * (valid[above] - valid[below])
    return float(lo), float(hi)


def rescale_resample(drawn, center, n: int, confidence: float | None = None):
    """Rao & Wu (1988) rescaling of a with-replacement resample of ``n`` values: ``center + √(n/(n−1))·(drawn −
    center)``, where ``drawn`` is a statistic of the resample that is linear in its values (a mean, or each drawn
    value itself) and ``center`` the same statistic of the sample. With n = 1 there is nothing to rescale and
    ``center`` comes back.

    A resample's mean varies (n − 1)/n as much as the sample mean does across samples, so a percentile interval
    over few resampled units (five seeds: 80 % of the variance) runs short; the factor restores the variance (Rao &
    Wu, "Resampling inference with complex survey data", JASA 83, 1988, with m = n). With ``confidence`` the
    deviations are widened further by t(n−1)/z at (1 + confidence)/2, so that a resampled mean spreads as Student's
    t says the mean does (with five values its percentile interval is within 2 % of the t-interval; with two or
    three the resample is too coarse to match it closely): right for a statistic of *one* sample of few units (data
    efficiency over one set of seeds), the correction Hesterberg's expanded percentile interval makes through the
    quantile levels ("What teachers should know about the bootstrap", The American Statistician 69, 2015). A
    statistic pooled over many strata (a line or a law fitted through every cell) has more degrees of freedom than
    any stratum: rescale only.
    """
    drawn, center = np.asarray(drawn, dtype=np.float64), np.asarray(center, dtype=np.float64)
    if n <= 1:
        return np.broadcast_to(center, np.broadcast_shapes(drawn.shape, center.shape)).copy()
    factor = np.sqrt(n / (n - 1))
    if confidence is not None:
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        q = 0.5 + confidence / 2.0
        factor *= stats.t.ppf(q, n - 1) / stats.norm.ppf(q)
    return center + factor * (drawn - center)


def satterthwaite_widening(jackknife, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """How much to widen a stratified bootstrap's deviations about the estimate so that its percentile interval has
    Student's, not the normal's, tails: ``(factor, df)`` with ``factor = t(df)/z`` at (1 + confidence)/2, one per
    element of the statistic.

    ``jackknife`` holds, per stratum (e.g. one cell's seeds), an array ``(n_h, ...)`` of the statistic recomputed
    with each of that stratum's units left out in turn (strata of one unit are passed as empty or omitted). Each
    stratum's share of the variance is its delete-one jackknife estimate ``V_h = (n_h − 1)/n_h · Σ (θ₍ᵢ₎ − θ̄)²``
    (Efron & Tibshirani 1993, ch. 11), estimated with n_h − 1 degrees of freedom, and the degrees of freedom of
    the whole are Welch–Satterthwaite's ``(Σ V_h)² / Σ V_h²/(n_h − 1)`` (Satterthwaite, Biometrics Bulletin 2,
    1946). A statistic that rests on one stratum of five seeds gets 4 and is widened 1.42×; one pooled evenly over
    many strata gets their summed degrees of freedom and is barely widened. No variance from any stratum (every
    unit equal): factor 1.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    parts, dof = [], []
    for jack in jackknife:
        jack = np.asarray(jack, dtype=np.float64)
        n = jack.shape[0]
        if n < 2:
            continue
        parts.append((n - 1) / n * ((jack - jack.mean(axis=0)) ** 2).sum(axis=0))
        dof.append(n - 1)
    if not parts:
        return np.float64(1.0), np.float64(np.inf)
    parts = np.nan_to_num(np.array(parts), nan=0.0)  # a left-out unit whose refit failed (NaN): stratum left out
    dof = np.array(dof, dtype=np.float64).reshape((-1,) + (1,) * (parts.ndim - 1))
    total, spread = parts.sum(axis=0), (parts**2 / dof).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(spread > 0, total**2 / spread, np.inf)
    q = 0.5 + confidence / 2.0
    factor = np.where(np.isfinite(df), stats.t.ppf(q, np.where(np.isfinite(df), df, 1.0)) / stats.norm.ppf(q), 1.0)
    return factor, df


def summarize(estimate: float, replicates: np.ndarray, alpha: float = 0.05) -> BootstrapResult:
    """A :class:`BootstrapResult` from a point estimate and its replicates."""
    lo, hi = percentile_interval(replicates, alpha)
    valid = replicates[np.isfinite(replicates)]
    se = float(np.std(valid, ddof=1)) if valid.size > 1 else float("nan")
    return BootstrapResult(float(estimate), lo, hi, se, int(valid.size), replicates)


def bootstrap_ci(metric, y, p, cluster=None, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> BootstrapResult:
    """Cluster-bootstrap percentile confidence interval of ``metric(y, p)``.

    ``metric`` is a callable ``metric(y, p) -> float`` or the name of a metric with a vectorised weighted form
    (``auroc``, ``auprc``, ``brier``, ``nll``, ``ece``, ``mce``; passing those functions themselves is the same).
    ``cluster`` holds the patient id of every sample: patients are resampled with replacement and keep all their
    images. NaN labels are masked. Returns a :class:`BootstrapResult` (estimate on the original data, lo, hi, se).
    """
    metric = resolve_metric(metric)
    y = check_labels(y, "y")
    p = check_scores(p, "p", probability=False)
    check_same_length(y=y, p=p, cluster=None if cluster is None else np.asarray(cluster, dtype=object))
    boot = ClusterBootstrap(cluster, n=y.size, n_boot=n_boot, seed=seed)
    return summarize(metric(y, p), boot.replicates(metric, y, p), alpha)


def paired_bootstrap_diff(metric, y, p_a, p_b, cluster=None, n_boot: int = 1000, alpha: float = 0.05,
                          seed: int = 0) -> PairedBootstrapResult:
    """Paired cluster bootstrap of ``metric(y, p_a) - metric(y, p_b)``: both models are evaluated on the same
    resampled patients in every replicate, so their correlation is kept. Returns a :class:`PairedBootstrapResult`."""
    metric = resolve_metric(metric)
    y = check_labels(y, "y")
    p_a = check_scores(p_a, "p_a", probability=False)
    p_b = check_scores(p_b, "p_b", probability=False)
    check_same_length(y=y, p_a=p_a, p_b=p_b, cluster=None if cluster is None else np.asarray(cluster, dtype=object))
    boot = ClusterBootstrap(cluster, n=y.size, n_boot=n_boot, seed=seed)
    a, b = metric(y, p_a), metric(y, p_b)
    diffs = boot.replicates(metric, y, p_a) - boot.replicates(metric, y, p_b)
    lo, hi = percentile_interval(diffs, alpha)
    valid = diffs[np.isfinite(diffs)]
    if valid.size:
        tail = min(int((valid <= 0).sum()), int((valid >= 0).sum()))
        p_value = min(1.0, 2.0 * (tail + 1) / (valid.size + 1))
    else:
        p_value = float("nan")
    return PairedBootstrapResult(float(a - b), lo, hi, p_value, float(a), float(b), int(valid.size), diffs)

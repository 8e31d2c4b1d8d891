"""Calibration: expected and maximum calibration error, Brier score, negative log-likelihood, reliability diagrams.

Binning follows the textbook definition (Naeini et al. 2015; Guo et al. 2017): bins partition the fixed interval
[0, 1], not the observed [min, max] of the predictions. (MEDFAIR/CXR_Fairness use ``pd.cut(p, 10)``, which spans
the observed range; numbers from those code bases are therefore not comparable bin for bin.) Two strategies:

* ``uniform`` (equal width): edges 0, 1/M, ..., 1;
* ``quantile`` (equal mass; Nixon et al. 2019): interior edges are the k/M quantiles of the predictions, outer
  edges 0 and 1. Tied predictions can make some bins empty; empty bins contribute nothing.

Bin k holds predictions with ``edges[k] <= p < edges[k+1]``; the last bin also holds p = 1.
ECE = sum_k (n_k / n) |mean(y in k) - mean(p in k)|; MCE = max over non-empty bins of the same gap.
NaN labels are masked (per label) as everywhere in ``scaling.metrics``.

The ``*_replicates`` functions evaluate a metric under many weightings at once (sample ``i`` weighs
``counts[b, codes[i]]``), which is how ``scaling.metrics.bootstrap`` vectorises the cluster bootstrap: these
metrics are sums over samples, so per-cluster sums times the cluster multiplicities give every replicate with one
matrix product. Replicates of ECE keep the bins of the original sample (equal-width bins do not depend on it).
"""

from __future__ import annotations

import weakref

import numpy as np
import pandas as pd

from scaling.metrics.validation import labelled

_EPS = np.finfo(np.float64).eps


def bin_edges(p, n_bins: int = 10, strategy: str = "uniform") -> np.ndarray:
    """Bin edges on [0, 1]: ``uniform`` (equal width) or ``quantile`` (equal mass, from the predictions ``p``)."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, int(n_bins) + 1)
    if strategy == "quantile":
        inner = np.quantile(np.asarray(p, dtype=np.float64), np.linspace(0.0, 1.0, int(n_bins) + 1)[1:-1])
        return np.concatenate([[0.0], inner, [1.0]])
    raise ValueError(f"strategy={strategy!r} is not allowed; choose 'uniform' or 'quantile'")


def assign_bins(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of every prediction: ``edges[k] <= p < edges[k+1]`` (the last bin is closed at 1)."""
    return np.searchsorted(edges[1:-1], p, side="right")


def _binned(y, p, n_bins, strategy):
    y, p, _ = labelled(y, p)
    edges = bin_edges(p, n_bins, strategy if p.size else "uniform")
    k = assign_bins(p, edges)
    n_k = np.bincount(k, minlength=len(edges) - 1).astype(np.float64)
    gap_sum = np.bincount(k, weights=y - p, minlength=len(edges) - 1)
    return y, p, edges, k, n_k, gap_sum


def ece(y, p, n_bins: int = 10, strategy: str = "uniform") -> float:
    """Expected calibration error of probabilities ``p`` for labels ``y`` (1/0/NaN; NaN rows are masked).

    ``strategy`` is ``uniform`` (equal-width bins on [0, 1]) or ``quantile`` (equal-mass bins); ``n_bins`` bins.
    NaN when no row is labelled.
    """
    y, p, _, _, n_k, gap_sum = _binned(y, p, n_bins, strategy)
    return float(np.abs(gap_sum).sum() / y.size) if y.size else float("nan")


def mce(y, p, n_bins: int = 10, strategy: str = "uniform") -> float:
    """Maximum calibration error: the largest |observed rate - mean probability| over non-empty bins."""
    y, p, _, _, n_k, gap_sum = _binned(y, p, n_bins, strategy)
    full = n_k > 0
    return float(np.max(np.abs(gap_sum[full]) / n_k[full])) if y.size else float("nan")


def brier(y, p) -> float:
    """Brier score: mean squared difference between probability and label over labelled rows."""
    y, p, _ = labelled(y, p)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def nll(y, p) -> float:
    """Mean negative log-likelihood (binary cross-entropy) of probabilities ``p``; ``p`` is clipped to
    [eps, 1 - eps] (float64 machine epsilon) so a confident mistake costs about 36 nats, not infinity."""
    y, p, _ = labelled(y, p)
    if not y.size:
        return float("nan")
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return float(-np.mean(np.where(y, np.log(q), np.log1p(-q))))


def reliability_diagram(y, p, n_bins: int = 10, strategy: str = "uniform") -> pd.DataFrame:
    """Reliability-diagram data: one row per bin with ``lo``, ``hi``, ``n``, ``mean_predicted``,
    ``fraction_positive`` and ``gap`` (= fraction_positive - mean_predicted; NaN for empty bins)."""
    y, p, edges, k, n_k, gap_sum = _binned(y, p, n_bins, strategy)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(k, weights=p, minlength=n_k.size) / n_k
        frac = np.bincount(k, weights=y.astype(np.float64), minlength=n_k.size) / n_k
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "n": n_k.astype(int), "mean_predicted": mean_p,
                         "fraction_positive": frac, "gap": frac - mean_p})


def plot_reliability(y=None, p=None, *, data: pd.DataFrame | None = None, n_bins: int = 10,
                     strategy: str = "uniform", ax=None, label: str | None = None):
    """Plot a reliability diagram (observed rate vs mean probability per bin, with the diagonal) and return the
    matplotlib Axes. Pass ``y`` and ``p``, or ``data`` from :func:`reliability_diagram`."""
    import matplotlib.pyplot as plt  # plotting is optional; metrics never import matplotlib

    if data is None:
        if y is None or p is None:
            raise ValueError("plot_reliability needs y and p, or data from reliability_diagram")
        data = reliability_diagram(y, p, n_bins=n_bins, strategy=strategy)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    full = data[data["n"] > 0]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.plot(full["mean_predicted"], full["fraction_positive"], marker="o", label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction positive")
    if label is not None:
        ax.legend()
    return ax


# -- replicate (weighted) forms used by the vectorised bootstrap ---------------------------------------------------


_FLOAT64_COUNTS: dict[int, np.ndarray] = {}
"""float64 copies of the count matrices in use, by ``id``; each is dropped when its matrix is freed."""


def float64_counts(counts: np.ndarray) -> np.ndarray:
    """``counts`` as float64, converted once per matrix: a run's scoring multiplies one bootstrap's float32 counts
    with float64 per-cluster sums hundreds of times (every label, metric and subgroup), and numpy would convert the
    whole matrix again for each product (at 1,000 replicates of 2,800 patients a fresh 22 MB copy per product,
    more than the product itself costs). The copy lives as long as ``counts`` does; the products are the same."""
    if counts.dtype == np.float64:
        return counts
    key = id(counts)
    converted = _FLOAT64_COUNTS.get(key)
    if converted is None:
        converted = counts.astype(np.float64)
        _FLOAT64_COUNTS[key] = converted
        weakref.finalize(counts, _FLOAT64_COUNTS.pop, key, None)
    return converted


def weighted_mean_replicates(values: np.ndarray, counts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Weighted mean of per-sample ``values`` in every replicate (NaN when a replicate has zero weight)."""
    g = counts.shape[1]
    counts = float64_counts(counts)
    num = counts @ np.bincount(codes, weights=values, minlength=g)
    den = counts @ np.bincount(codes, minlength=g).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def brier_replicates(y, p, counts, codes) -> np.ndarray:
    """Brier score under every replicate weighting."""
    return weighted_mean_replicates((p - y) ** 2, counts, codes)


def nll_replicates(y, p, counts, codes) -> np.ndarray:
    """Negative log-likelihood under every replicate weighting."""
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return weighted_mean_replicates(-np.where(y, np.log(q), np.log1p(-q)), counts, codes)


def _bin_replicates(y, p, counts, codes, n_bins):
    k = assign_bins(p, bin_edges(p, n_bins, "uniform"))
    g = counts.shape[1]
    cell = codes * n_bins + k  # (cluster, bin) cell of every sample
    counts = float64_counts(counts)
    gap = counts @ np.bincount(cell, weights=y - p, minlength=g * n_bins).reshape(g, n_bins)
    mass = counts @ np.bincount(cell, minlength=g * n_bins).reshape(g, n_bins).astype(np.float64)
    return gap, mass


def ece_replicates(y, p, counts, codes, n_bins: int = 10) -> np.ndarray:
    """Equal-width-bin ECE under every replicate weighting."""
    gap, mass = _bin_replicates(y, p, counts, codes, n_bins)
    total = mass.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(gap).sum(axis=1) / total, np.nan)


def mce_replicates(y, p, counts, codes, n_bins: int = 10) -> np.ndarray:
    """Equal-width-bin MCE under every replicate weighting."""
    gap, mass = _bin_replicates(y, p, counts, codes, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_bin = np.where(mass > 0, np.abs(gap) / mass, -np.inf)
    out = per_bin.max(axis=1)
    return np.where(np.isfinite(out), out, np.nan)

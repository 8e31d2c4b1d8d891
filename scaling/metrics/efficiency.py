"""Data efficiency: the fraction of training labels at which a model reaches a reference AUROC.

Mustafa et al. (2021) report how much labelled data a larger / better-pretrained model needs to match a
baseline. Given a metric measured at several label fractions, the crossing of the reference value is found on
the first segment where the curve reaches it and interpolated linearly in log-fraction (scaling curves are close
to linear in log data). A curve already at the reference at its smallest fraction returns that fraction
(``censored='below'``: the true crossing may be lower); one that never reaches it returns NaN
(``censored='above'``).

The interval comes from replicate curves: ``replicates='seeds'`` resamples the seed columns with replacement
(the mean curve of each resample gives one crossing), ``replicates='bootstrap'`` takes each column as one
bootstrap replicate curve. A reference that is itself a mean over seeds (a baseline model's full-data AUROC) can be
given as its seeds' values: with ``replicates='seeds'`` each replicate then also resamples the reference's seeds,
so the interval holds the baseline's seed spread as well as the curve's. A replicate that never reaches the
reference counts as +inf, so ``hi = inf`` says
the upper bound lies beyond the largest measured fraction. With a single column there is nothing to resample: every
"replicate" would be the curve itself, so ``lo`` and ``hi`` are NaN (``n_replicates = 0``) rather than a zero-width
interval at the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaling.metrics.bootstrap import rescale_resample


@dataclass(frozen=True)
class DataEfficiency:
    """Label fraction at which a curve reaches a reference value, with its interval."""

    fraction: float
    """Interpolated fraction (NaN when not reached)."""
    lo: float
    """Lower percentile bound over replicate curves (NaN with a single curve: nothing to resample)."""
    hi: float
    """Upper percentile bound (inf when more than alpha/2 of the replicates never reach the reference)."""
    censored: str
    """'' (interpolated), 'below' (reached at the smallest fraction) or 'above' (never reached)."""
    n_replicates: int
    """Replicate curves behind the interval (0: no interval)."""


def _crossing(fractions: np.ndarray, values: np.ndarray, reference: float) -> tuple[float, str]:
    hit = np.flatnonzero(values >= reference)
    if not hit.size:
        return float("nan"), "above"
    k = int(hit[0])
    if k == 0:
        return float(fractions[0]), "below"
    lf = np.log(fractions[k - 1:k + 1])
    t = (reference - values[k - 1]) / (values[k] - values[k - 1])
    return float(np.exp(lf[0] + t * (lf[1] - lf[0]))), ""


def fraction_to_reach(fractions, values, reference: float) -> float:
    """Smallest label fraction at which ``values`` (one per fraction) reaches ``reference``, interpolated in
    log-fraction; NaN when never reached."""
    f, v = _check(fractions, values)
    return _crossing(f, v if v.ndim == 1 else v.mean(axis=1), reference)[0]


def _check(fractions, values):
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if f.ndim != 1 or f.size < 1 or np.any(f <= 0) or np.any(np.diff(f) <= 0):
        raise ValueError(f"fractions must be positive and strictly increasing, got {fractions!r}")
    if v.shape[0] != f.size or v.ndim not in (1, 2):
        raise ValueError(f"values must be (n_fractions,) or (n_fractions, n_replicates), got shape {v.shape}")
    if np.isnan(v).any():
        raise ValueError("values contains NaN; every fraction needs a measured value")
    return f, v


def data_efficiency(fractions, values, reference, replicates: str = "seeds", n_boot: int = 1000,
                    alpha: float = 0.05, seed: int = 0) -> DataEfficiency:
    """Label fraction at which the curve ``values`` reaches ``reference``, with a percentile interval.

    ``values`` is (n_fractions, n_columns): one column per seed (``replicates='seeds'``, resampled ``n_boot``
    times) or per bootstrap replicate (``replicates='bootstrap'``). The estimate uses the mean curve. ``reference``
    is a number, or the values of the reference's seeds (its mean is the target; with ``replicates='seeds'`` every
    replicate draws them too, rescaled and widened as the curve's seeds are, independently of them: the baseline is
    another model). Returns a :class:`DataEfficiency`; with one column its ``lo`` and ``hi`` are NaN and
    ``n_replicates`` is 0 (one seed gives no spread to resample).
    """
    f, v = _check(fractions, values)
    if v.ndim == 1:
        v = v[:, None]
    if replicates not in ("seeds", "bootstrap"):
        raise ValueError(f"replicates={replicates!r} is not allowed; choose 'seeds' or 'bootstrap'")
    ref = np.atleast_1d(np.asarray(reference, dtype=np.float64))
    if ref.ndim != 1 or not ref.size or not np.isfinite(ref).all():
        raise ValueError(f"reference must be a finite number or a 1-D array of finite seed values, got {reference!r}")
    estimate, censored = _crossing(f, v.mean(axis=1), float(ref.mean()))
    if v.shape[1] < 2:
        return DataEfficiency(estimate, float("nan"), float("nan"), censored, 0)
    if replicates == "seeds":
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, v.shape[1], size=(n_boot, v.shape[1]))
        # rescaled about the seed mean and widened to Student's t (one sample of few seeds; rescale_resample):
        # the plain percentile interval of five seeds covered 81-85 % in simulation, this one 94 %
        # (benchmarks/interval_coverage.py)
        curves = rescale_resample(v[:, pick].mean(axis=2), v.mean(axis=1, keepdims=True), v.shape[1],
                                  confidence=1.0 - alpha)
        drawn = ref[rng.integers(0, ref.size, size=(n_boot, ref.size))].mean(axis=1)
        targets = rescale_resample(drawn, ref.mean(), ref.size, confidence=1.0 - alpha)
    else:
        curves, targets = v, np.full(v.shape[1], ref.mean())
    reps = np.array([_crossing(f, curves[:, b], targets[b])[0] for b in range(curves.shape[1])])
    reps = np.where(np.isnan(reps), np.inf, reps)
    lo = float(np.quantile(reps, alpha / 2.0, method="lower"))
    hi = float(np.quantile(reps, 1.0 - alpha / 2.0, method="higher"))
    return DataEfficiency(estimate, lo, hi, censored, int(curves.shape[1]))

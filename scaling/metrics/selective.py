"""Selective prediction: refer the least-confident cases to a clinician and measure the model on the rest.

Two views (Leibig et al. 2017, referral curves for diabetic retinopathy; Geifman & El-Yaniv 2017, risk-coverage):

* :func:`referral_curve`: a metric (AUROC by default) on the retained cases versus the referral rate, and
  :func:`referral_area`, its mean over the referral range (normalised area; higher is better for AUROC);
* :func:`aurc`: the area under the risk-coverage curve, risk = misclassification rate of ``p >= threshold`` on
  the retained cases, averaged over every coverage k/n (lower is better).

Confidence defaults to the distance of the logit from the decision threshold's logit, |logit p - logit t|: the
cases nearest to the decision boundary are referred first (for t = 0.5 this ranks like max(p, 1 - p)). Pass your
own ``confidence`` (e.g. the negative MC-dropout spread) to rank by another uncertainty. Ties in confidence are
broken by sample order. NaN labels are masked.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.integrate import trapezoid

from scaling.metrics.discrimination import auroc
from scaling.metrics.validation import MetricWarning, check_same_length, check_scores, labelled

_CLIP = 1e-12


def threshold_confidence(p, threshold: float = 0.5) -> np.ndarray:
    """|logit(p) - logit(threshold)|: how far each prediction is from the decision boundary."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1] to define confidence, got {threshold}")
    q = np.clip(np.asarray(p, dtype=np.float64), _CLIP, 1 - _CLIP)
    t = min(max(threshold, _CLIP), 1 - _CLIP)
    return np.abs(np.log(q) - np.log1p(-q) - (np.log(t) - np.log1p(-t)))


def _ranked(y, p, confidence, threshold):
    y, p, mask = labelled(y, p)
    if confidence is None:
        conf = threshold_confidence(p, threshold)
    else:
        conf = check_scores(confidence, "confidence", probability=False)
        check_same_length(y=mask, confidence=conf)
        conf = conf[mask]
    order = np.argsort(-conf, kind="stable")
    return y[order], p[order]


def referral_curve(y, p, metric=auroc, referral_rates=None, confidence=None,
                   threshold: float = 0.5) -> pd.DataFrame:
    """``metric(y, p)`` on the cases kept after referring the least-confident fraction, per referral rate.

    ``referral_rates`` default to 0, 0.05, ..., 0.5. Returns a DataFrame with ``referral_rate``, ``n_retained``
    and ``value`` (NaN where the metric is undefined on what is kept).
    """
    rates = np.linspace(0.0, 0.5, 11) if referral_rates is None else np.asarray(referral_rates, dtype=np.float64)
    if rates.size == 0 or rates.min() < 0 or rates.max() >= 1:
        raise ValueError(f"referral_rates must lie in [0, 1), got {rates}")
    ys, ps = _ranked(y, p, confidence, threshold)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        for r in rates:
            keep = int(round(ys.size * (1.0 - r)))
            value = metric(ys[:keep].astype(np.float64), ps[:keep]) if keep else np.nan
            rows.append({"referral_rate": float(r), "n_retained": keep, "value": float(value)})
    return pd.DataFrame(rows)


def referral_area(curve: pd.DataFrame) -> float:
    """Mean of a referral curve over its referral range (trapezoid area / range); NaN if any point is NaN."""
    x = curve["referral_rate"].to_numpy(dtype=np.float64)
    v = curve["value"].to_numpy(dtype=np.float64)
    if x.size < 2 or np.isnan(v).any():
        return float(v[0]) if x.size == 1 else float("nan")
    return float(trapezoid(v, x) / (x[-1] - x[0]))  # scipy's: np.trapezoid needs NumPy >= 2.0


def aurc(y, p, threshold: float = 0.5, confidence=None) -> float:
    """Area under the risk-coverage curve: mean over coverages k/n (k = 1..n, most confident first) of the
    misclassification rate of ``p >= threshold`` on the k retained cases. NaN when no row is labelled."""
    ys, ps = _ranked(y, p, confidence, threshold)
    if not ys.size:
        return float("nan")
    errors = (ps >= threshold) != ys
    risk = np.cumsum(errors) / np.arange(1, ys.size + 1)
    return float(risk.mean())

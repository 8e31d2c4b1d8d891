"""Operating points: choose a decision threshold on validation data and measure TPR / FPR at it.

A sample is called positive when ``p >= threshold`` (the convention of ``sklearn.metrics.roc_curve``). Policies:

* ``max_f1``: the threshold maximising F1 (CheXclusion, Seyyed-Kalantari et al. 2020; MEDFAIR ``find_threshold``);
  on ties the highest threshold wins;
* ``sensitivity`` (target s): the highest threshold whose sensitivity is at least s (the most specific point that
  still meets the sensitivity target; e.g. screening at 90 % sensitivity);
* ``specificity`` (target s): the lowest threshold whose specificity is at least s;
* ``fixed``: the given value.

Thresholds are fitted on the validation split and then applied unchanged to every reported set.
"""

from __future__ import annotations

import numpy as np

from scaling.metrics.calibration import weighted_mean_replicates
from scaling.metrics.validation import labelled, one_class_nan

POLICIES = ("max_f1", "sensitivity", "specificity", "fixed")

# EvalConfig.threshold names → (policy, target)
CONFIG_POLICIES = {
    "max_f1": ("max_f1", None),
    "sens90": ("sensitivity", 0.9),
    "spec90": ("specificity", 0.9),
    "fixed": ("fixed", None),
}


def choose_threshold(y, p, policy: str = "max_f1", target: float | None = None) -> float:
    """The decision threshold chosen on (validation) labels ``y`` and scores ``p`` by ``policy``.

    ``policy`` is one of ``max_f1``, ``sensitivity``, ``specificity`` (``target`` = the required rate in (0, 1])
    or ``fixed`` (``target`` = the threshold itself). NaN labels are masked; NaN with a ``MetricWarning`` when the
    labelled rows hold a single class (except for ``fixed``).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not allowed; choose one of {list(POLICIES)}")
    if policy == "fixed":
        if target is None or not np.isfinite(target):
            raise ValueError("target must be the threshold value when policy='fixed'")
        return float(target)
    if policy in ("sensitivity", "specificity") and (target is None or not 0 < target <= 1):
        raise ValueError(f"target must be a rate in (0, 1] for policy={policy!r}, got {target!r}")
    y, p, _ = labelled(y, p, probability=False)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if one_class_nan(n_pos, n_neg, f"threshold ({policy})"):
        return float("nan")
    order = np.argsort(-p)  # tied scores are grouped into one threshold below
    ps = p[order]
    ends = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])
    values = ps[ends]  # distinct thresholds, descending
    tp = np.cumsum(y[order])[ends].astype(np.float64)
    fp = (ends + 1) - tp
    if policy == "max_f1":
        return float(values[np.argmax(2 * tp / (tp + fp + n_pos))])
    if policy == "sensitivity":
        return float(values[np.flatnonzero(tp / n_pos >= target - 1e-12)[0]])
    ok = np.flatnonzero(fp / n_neg <= 1.0 - target + 1e-12)
    # Specificity 1 may need a threshold above every score: then nothing is called positive.
    return float(values[ok[-1]]) if ok.size else float(np.nextafter(ps[0], np.inf))


def rates_at(y, p, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) of the rule ``p >= threshold`` on labelled rows; NaN where a class is absent or the threshold
    is NaN."""
    y, p, _ = labelled(y, p, probability=False)
    if not np.isfinite(threshold):
        return float("nan"), float("nan")
    pred = p >= threshold
    tpr = float(pred[y].mean()) if y.any() else float("nan")
    fpr = float(pred[~y].mean()) if (~y).any() else float("nan")
    return tpr, fpr


def rate_replicates(y: np.ndarray, p: np.ndarray, threshold: float, counts: np.ndarray,
                    codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR) under every replicate weighting (``y`` boolean, already masked)."""
    if not np.isfinite(threshold):
        nan = np.full(counts.shape[0], np.nan)
        return nan, nan.copy()
    pred = (p >= threshold).astype(np.float64)
    return (weighted_mean_replicates(pred[y], counts, codes[y]),
            weighted_mean_replicates(pred[~y], counts, codes[~y]))

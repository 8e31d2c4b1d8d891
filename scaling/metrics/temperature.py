"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

For a sigmoid output (multi-label: one temperature per label) the calibrated probability is sigmoid(z / T); for a
softmax output (one-of-K: one temperature for all classes, as Guo et al.) it is softmax(z / T). T > 1 softens
over-confident logits, T < 1 sharpens. T is fitted by minimising the NLL on *validation* logits and then applied
unchanged to every reported set; it never changes the ranking, so AUROC (and the argmax) is unaffected and only
calibration metrics move.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

from scaling.metrics.multiclass import check_one_hot
from scaling.metrics.validation import MetricWarning, check_labels, check_same_length, check_scores, one_class_nan

# Search range for log T: T in [0.01, 100] covers any temperature a trained network needs.
T_BOUNDS = (0.01, 100.0)
"""The temperatures searched; an optimum on one of them is returned with a ``MetricWarning`` (:func:`_at_bound`)."""
_LOG_T_BOUNDS = (np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1]))


def _at_bound(nll, log_t: float, what: str) -> float:
    """The fitted temperature ``exp(log_t)`` of the objective ``nll(log_t)``, or the search bound, with a
    ``MetricWarning``, when the objective there is no higher: the NLL was still falling (or flat) towards it, so the
    temperature is a limit of the search, not an optimum. At 100 the logits carry no signal on validation (a flat
    0.5 is best); at 0.01 they separate the classes perfectly (the NLL falls towards 0 with T, and calibrated
    probabilities become 0 and 1)."""
    best = nll(log_t)
    for bound, why in ((T_BOUNDS[1], "the validation logits carry no signal"),
                       (T_BOUNDS[0], "the validation logits separate the classes perfectly")):
        if nll(np.log(bound)) <= best:
            warnings.warn(f"{what}: the fitted temperature is the search bound {bound:g} ({why}); the calibrated "
                          f"probabilities are those of that bound, not of an optimum", MetricWarning, stacklevel=3)
            return bound
    return float(np.exp(log_t))


def nll_from_logits(y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of logits ``z`` for boolean/0-1 labels ``y`` (stable: log(1 + e^z) - y z)."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _fit_one(y, z) -> float:
    y, z = check_labels(y, "y"), check_scores(z, "logits", probability=False)
    check_same_length(y=y, logits=z)
    mask = ~np.isnan(y)
    y, z = y[mask], z[mask]
    n_pos = int(y.sum())
    if one_class_nan(n_pos, y.size - n_pos, "temperature (needs both classes on validation)"):
        return float("nan")
    def objective(log_t):
        return nll_from_logits(y, z / np.exp(log_t))

    res = minimize_scalar(objective, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return _at_bound(objective, res.x, "temperature")


def fit_temperature(y, logits):
    """Fit the temperature minimising validation NLL of ``sigmoid(logits / T)``.

    ``y``/``logits`` 1-D → a float; (n, L) → an array of L temperatures, one per label column, each fitted on that
    label's labelled rows (NaN labels masked). NaN (with a ``MetricWarning``) for a label with one class only. T is
    searched in :data:`T_BOUNDS` ([0.01, 100]); an optimum on a bound (perfectly separated or signal-free validation
    logits) is returned with a ``MetricWarning``.
    """
    y_arr = np.asarray(y, dtype=np.float64)
    z_arr = np.asarray(logits, dtype=np.float64)
    if y_arr.shape != z_arr.shape:
        raise ValueError(f"y and logits must have the same shape, got {y_arr.shape} and {z_arr.shape}")
    if y_arr.ndim == 1:
        return _fit_one(y_arr, z_arr)
    if y_arr.ndim != 2:
        raise ValueError(f"y must be 1-D or (n, L), got shape {y_arr.shape}")
    return np.array([_fit_one(y_arr[:, j], z_arr[:, j]) for j in range(y_arr.shape[1])])


def apply_temperature(logits, temperature) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logits / T)``; ``temperature`` is a scalar or one value per column."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    if np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return expit(z / t)


def fit_softmax_temperature(y, logits) -> float:
    """The one temperature minimising the validation NLL of ``softmax(logits / T)`` for a one-of-K task.

    ``y`` is (n, K) one-hot (all-NaN rows = unlabelled, masked), ``logits`` (n, K). NaN (with a ``MetricWarning``)
    when the labelled rows hold a single class.
    """
    t, mask = check_one_hot(y, "y")
    z = np.asarray(logits, dtype=np.float64)
    if z.shape != np.shape(y) or not np.isfinite(z).all():
        raise ValueError(f"logits must be finite with the shape of y {np.shape(y)}, got {z.shape}")
    z = z[mask]
    if np.unique(t).size < 2:
        warnings.warn(f"softmax temperature is undefined with {np.unique(t).size} class(es) among the labelled "
                      "validation rows; reported as NaN", MetricWarning, stacklevel=2)
        return float("nan")
    rows = np.arange(t.size)
    def objective(log_t):
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, t].mean())

    res = minimize_scalar(objective, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return _at_bound(objective, res.x, "softmax temperature")


def apply_softmax_temperature(logits, temperature: float) -> np.ndarray:
    """Calibrated one-of-K probabilities ``softmax(logits / T)`` of (n, K) logits."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)

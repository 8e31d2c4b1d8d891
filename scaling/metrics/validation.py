"""Input checks shared by every metric: one place decides what counts as bad input.

Conventions (the same for every public function of ``scaling.metrics``):

* ``y`` holds 1.0 / 0.0 / NaN. NaN means "not labelled" (e.g. a CheXpert blank). Single-label metrics drop the
  rows whose label is NaN *for that label only* and report ``n`` = the rows kept; this is the documented masking
  of the sample-table contract (``scaling.data.table``), not silent dropping.
* Probabilities and logits must be finite; a NaN there is a bug upstream and raises.
* Every error is a ``ValueError`` whose message names the offending argument.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


class MetricWarning(UserWarning):
    """A metric is undefined on the data given (e.g. only one class present) and is reported as NaN."""


def as_1d(x, name: str, dtype=np.float64) -> np.ndarray:
    """``x`` as a 1-D array; raise ValueError naming ``name`` when it is not one-dimensional."""
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def check_labels(y, name: str = "y") -> np.ndarray:
    """Labels as float64 with values in {0, 1, NaN}; anything else raises naming ``name``."""
    arr = as_1d(y, name)
    bad = ~(np.isnan(arr) | (arr == 0.0) | (arr == 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must hold 0, 1 or NaN (not labelled); element {i} is {arr[i]!r}")
    return arr


def check_scores(p, name: str = "p", probability: bool = True) -> np.ndarray:
    """Finite scores (in [0, 1] when ``probability``); NaN/inf raise naming ``name``."""
    arr = as_1d(p, name)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite; element {i} is {arr[i]!r}")
    if probability and arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1]; got range [{arr.min()}, {arr.max()}]")
    return arr


def check_same_length(**arrays) -> int:
    """The common length of the named arrays; raise naming every argument when they differ."""
    lengths = {k: len(v) for k, v in arrays.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arguments must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def labelled(y, p, name_y: str = "y", name_p: str = "p", probability: bool = True):
    """Validate ``y``/``p`` and return (y as bool, p, mask of labelled rows) for a single label."""
    y = check_labels(y, name_y)
    p = check_scores(p, name_p, probability=probability)
    check_same_length(**{name_y: y, name_p: p})
    mask = ~np.isnan(y)
    return y[mask] == 1.0, p[mask], mask


def check_groups(groups, name: str = "groups", n: int | None = None) -> np.ndarray:
    """Group values as an object array; raise naming ``name`` on a length mismatch or when all are missing."""
    arr = np.asarray(groups, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has length {arr.size}, expected {n} (one value per sample)")
    if arr.size and pd.isna(arr).all():
        raise ValueError(f"{name} is missing for every sample; cannot form subgroups")
    return arr


def one_class_nan(n_pos: int, n_neg: int, what: str) -> bool:
    """True (after a MetricWarning) when a rank metric is undefined because a class is absent."""
    if n_pos == 0 or n_neg == 0:
        warnings.warn(f"{what} is undefined with {n_pos} positive and {n_neg} negative labelled samples; "
                      "reported as NaN", MetricWarning, stacklevel=3)
        return True
    return False

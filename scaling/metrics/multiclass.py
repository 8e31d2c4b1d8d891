"""One-of-K (multi-class) metrics: top-1 and top-k accuracy, balanced accuracy, multi-class NLL and Brier score,
top-label ECE.

A one-of-K task (e.g. the HAM10000 / ISIC diagnosis) stores one-hot ``label:<class>`` columns and ``prob:<class>``
= the softmax over the classes. Conventions:

* ``y`` is (n, K) one-hot (1/0); a row that is entirely NaN is unlabelled and masked, anything else that is not
  exactly one 1 raises (naming the row);
* ``p`` is (n, K) probabilities whose rows sum to 1 (1e-4 tolerance: a softmax, not K independent sigmoids).

Definitions: accuracy = share of labelled rows whose argmax is the true class (ties: the first class); top-k
accuracy = share whose true class is among the k most probable (the differential-diagnosis view of dermatology:
Liu et al., Nat. Med. 2020, report top-1 and top-3), ties ordered like the argmax (the earlier class first), so
top-1 is accuracy; balanced
accuracy = mean over the classes present of the recall (``sklearn.metrics.balanced_accuracy_score``; Brodersen et
al. 2010); NLL = mean −log p_true, p clipped at float64 eps (``sklearn.metrics.log_loss``); Brier = mean over rows
of Σ_k (p_k − y_k)², Brier's (1950) original multi-class score in [0, 2] (``sklearn.metrics.brier_score_loss``
with ``labels``); top-label ECE = ECE of the confidence max_k p_k against "the argmax is right" (Guo et al. 2017),
in equal-width bins on [0, 1].

Each metric has a ``*_replicates(t, p, counts, codes)`` form (``t`` the true class index of each labelled row)
evaluating it under every cluster-bootstrap weighting at once, as in :mod:`scaling.metrics.calibration`.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

from scaling.metrics.calibration import ece, ece_replicates, weighted_mean_replicates

_EPS = np.finfo(np.float64).eps
_SUM_TOL = 1e-4


def check_one_hot(y, name: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """(class index of every labelled row, mask of labelled rows) from a one-hot (n, K) array; bad rows raise."""
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"{name} must be (n, K) one-hot with K >= 2 classes, got shape {arr.shape}")
    nan = np.isnan(arr)
    mask = ~nan.all(axis=1)
    ok = (~nan & ((arr == 0.0) | (arr == 1.0))).all(axis=1) & (np.nansum(arr, axis=1) == 1.0)
    bad = mask & ~ok
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} row {i} is {arr[i].tolist()}: a labelled row needs exactly one 1 and 0 elsewhere "
                         "(all NaN = unlabelled)")
    return np.argmax(np.nan_to_num(arr[mask]), axis=1), mask


def check_probabilities(p, k: int, name: str = "p") -> np.ndarray:
    """(n, k) finite probabilities whose rows sum to 1; anything else raises naming ``name`` and the row."""
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != k:
        raise ValueError(f"{name} must be (n, {k}), got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1) | (arr < 0).any(axis=1) | (np.abs(arr.sum(axis=1) - 1.0) > _SUM_TOL)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} row {i} is {arr[i].tolist()}: multi-class probabilities must be finite, >= 0 and "
                         "sum to 1 (a softmax over the classes)")
    return arr


def _labelled(y, p):
    t, mask = check_one_hot(y)
    p = check_probabilities(p, np.shape(y)[1])
    if len(p) != len(mask):
        raise ValueError(f"y and p must have the same number of rows, got {len(mask)} and {len(p)}")
    return t, p[mask]


def _correct(t, p):
    return (np.argmax(p, axis=1) == t).astype(np.float64)


def _true_prob(t, p):
    return p[np.arange(t.size), t]


def _sq_error(t, p):
    sq = (p ** 2).sum(axis=1)
    return sq - 2.0 * _true_prob(t, p) + 1.0


def accuracy(y, p) -> float:
    """Top-1 accuracy on the labelled rows (NaN when none is labelled)."""
    t, p = _labelled(y, p)
    return float(_correct(t, p).mean()) if t.size else float("nan")


def _in_top_k(t, p, k: int):
    """1.0 where the true class ranks among the ``k`` most probable: fewer than ``k`` classes come before it, a class
    coming before it when it is more probable, or as probable and earlier."""
    pt = _true_prob(t, p)[:, None]
    earlier = np.arange(p.shape[1])[None, :] < t[:, None]
    before = (p > pt) | ((p == pt) & earlier)
    return (before.sum(axis=1) < k).astype(np.float64)


def top_k_accuracy(y, p, k: int = 3) -> float:
    """Share of labelled rows whose true class is among the ``k`` most probable (NaN when none is labelled)."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    t, p = _labelled(y, p)
    return float(_in_top_k(t, p, int(k)).mean()) if t.size else float("nan")


def balanced_accuracy(y, p) -> float:
    """Mean over the classes present among the labelled rows of each class's recall."""
    t, p = _labelled(y, p)
    if not t.size:
        return float("nan")
    c = _correct(t, p)
    return float(np.mean([c[t == k].mean() for k in np.unique(t)]))


def nll_multiclass(y, p) -> float:
    """Mean negative log-likelihood of the true class (p clipped to [eps, 1])."""
    t, p = _labelled(y, p)
    return float(-np.log(np.clip(_true_prob(t, p), _EPS, 1.0)).mean()) if t.size else float("nan")


def brier_multiclass(y, p) -> float:
    """Mean over labelled rows of the squared distance between the probability vector and the one-hot label."""
    t, p = _labelled(y, p)
    return float(_sq_error(t, p).mean()) if t.size else float("nan")


def ece_top_label(y, p, n_bins: int = 10) -> float:
    """Top-label ECE: calibration of the confidence max_k p_k as the probability that the argmax is right."""
    t, p = _labelled(y, p)
    return ece(_correct(t, p), p.max(axis=1), n_bins=n_bins) if t.size else float("nan")


# -- replicate (weighted) forms used by the vectorised bootstrap ---------------------------------------------------


def accuracy_replicates(t, p, counts, codes) -> np.ndarray:
    """Accuracy under every replicate weighting (``t`` class indices of labelled rows, ``p`` their probabilities)."""
    return weighted_mean_replicates(_correct(t, p), counts, codes)


def top_k_accuracy_replicates(t, p, counts, codes, k: int = 3) -> np.ndarray:
    """Top-k accuracy under every replicate weighting."""
    return weighted_mean_replicates(_in_top_k(t, p, k), counts, codes)


def balanced_accuracy_replicates(t, p, counts, codes) -> np.ndarray:
    """Balanced accuracy under every replicate weighting: per-class recall, averaged over the classes drawn."""
    c = _correct(t, p)
    recalls = np.vstack([weighted_mean_replicates(c[t == k], counts, codes[t == k]) for k in np.unique(t)])
    with np.errstate(invalid="ignore"):
        n = np.isfinite(recalls).sum(axis=0)
        return np.where(n > 0, np.nansum(recalls, axis=0) / np.maximum(n, 1), np.nan)


def nll_multiclass_replicates(t, p, counts, codes) -> np.ndarray:
    """Multi-class NLL under every replicate weighting."""
    return weighted_mean_replicates(-np.log(np.clip(_true_prob(t, p), _EPS, 1.0)), counts, codes)


def brier_multiclass_replicates(t, p, counts, codes) -> np.ndarray:
    """Multi-class Brier score under every replicate weighting."""
    return weighted_mean_replicates(_sq_error(t, p), counts, codes)


def ece_top_label_replicates(t, p, counts, codes, n_bins: int = 10) -> np.ndarray:
    """Top-label ECE under every replicate weighting."""
    return ece_replicates(_correct(t, p).astype(bool), p.max(axis=1), counts, codes, n_bins=n_bins)


def softmax_probabilities(logits) -> np.ndarray:
    """Row-wise softmax of (n, K) logits (stable: scipy.special.softmax)."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def group_scores(logits, members) -> tuple[np.ndarray, np.ndarray]:
    """(probability, logit) that the class is one of ``members`` (column indices), from (n, K) logits.

    The probability is the summed softmax of the group; its logit, log p − log(1 − p), is computed as
    logsumexp(z_group) − logsumexp(z_rest), which keeps its digits where p is within rounding of 0 or 1. A binary
    label derived from a one-of-K model (``data.derived_labels``, e.g. malignant = MEL + BCC + AK + SCC) is scored
    with these, like a sigmoid output.
    """
    z = np.asarray(logits, dtype=np.float64)
    inside = np.zeros(z.shape[1], dtype=bool)
    inside[list(members)] = True
    if not inside.any() or inside.all():
        raise ValueError(f"a class group needs at least one class inside and one outside, got members {list(members)} "
                         f"of {z.shape[1]} classes")
    prob = softmax(z, axis=1)[:, inside].sum(axis=1)
    return prob, logsumexp(z[:, inside], axis=1) - logsumexp(z[:, ~inside], axis=1)

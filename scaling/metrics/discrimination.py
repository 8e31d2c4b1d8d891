"""Discrimination: AUROC and AUPRC for one label, per label and macro-averaged over labels.

Each metric comes in two forms that share one definition:

* ``auroc(y, p)`` / ``auprc(y, p)``: the number on the labelled rows (NaN labels masked for this label only);
* ``auroc_replicates(y, p, counts, codes)`` / ``auprc_replicates``: the same metric under many weightings at once,
  sample ``i`` having weight ``counts[b, codes[i]]`` in replicate ``b``. This is how the cluster bootstrap is
  vectorised (``scaling.metrics.bootstrap``): a resample is a vector of per-patient multiplicities, and a rank
  metric of a resample equals the weighted rank metric of the original data with those multiplicities.

AUROC is the Mann-Whitney statistic with ties counted one half (Hanley & McNeil 1982), which is exactly what
scikit-learn's trapezoidal ``roc_auc_score`` computes. AUPRC is average precision as in scikit-learn
(step-wise, no interpolation: AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds; Davis & Goadrich 2006 on
why the trapezoid over PR space is optimistic).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from scaling.metrics.validation import MetricWarning, labelled, one_class_nan

# Replicates are processed in blocks whose weight matrix stays a few MB, so memory does not grow with n_boot.
_BLOCK_ELEMENTS = 2_000_000


def auroc(y, p) -> float:
    """Area under the ROC curve of scores ``p`` for binary labels ``y`` (1/0/NaN; NaN rows are masked).

    Ties between a positive and a negative count one half. Returns NaN with a ``MetricWarning`` when the labelled
    rows hold only one class. Equal to ``sklearn.metrics.roc_auc_score`` (to floating-point rounding).
    """
    y, p, _ = labelled(y, p, probability=False)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if one_class_nan(n_pos, n_neg, "AUROC"):
        return float("nan")
    # Mann-Whitney U from midranks (ties share the mean rank); only the positives' ranks are needed.
    rank_sum = midranks(p, p[y]).sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def midranks(values: np.ndarray, at: np.ndarray | None = None) -> np.ndarray:
    """1-based midranks (ties get the mean of their ranks) within ``values``, of the entries ``at`` (all when
    None). Same as ``scipy.stats.rankdata(values)`` without its per-call overhead."""
    s = np.sort(values)
    at = values if at is None else at
    return (np.searchsorted(s, at, side="left") + np.searchsorted(s, at, side="right") + 1) / 2.0


def auprc(y, p) -> float:
    """Average precision (area under the precision-recall curve, step-wise) of scores ``p`` for labels ``y``.

    NaN labels are masked; NaN with a ``MetricWarning`` when no positive (or no negative) is labelled.
    Equal to ``sklearn.metrics.average_precision_score``.
    """
    y, p, _ = labelled(y, p, probability=False)
    n_pos = int(y.sum())
    if one_class_nan(n_pos, y.size - n_pos, "AUPRC"):
        return float("nan")
    return float(auprc_replicates(y, p, np.ones((1, 1)), np.zeros(y.size, dtype=np.intp))[0])


def _blocks(counts: np.ndarray, n: int):
    """Row blocks of ``counts`` sized so that a (block x n) weight matrix stays under ``_BLOCK_ELEMENTS``."""
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, counts.shape[0], step):
        yield counts[start:start + step]


def _cumulative_dtype(counts: np.ndarray, n: int):
    """The dtype to cumulate weights of ``counts`` over ``n`` samples in: float32 for a bootstrap's float32 counts
    (small integers, exact in float32 while every cumulative sum stays below 2**24: the same numbers for half the
    memory traffic), else float64."""
    exact32 = counts.size == 0 or float(counts.max()) * n < 2 ** 24  # bounds every cumulative sum
    return np.float32 if counts.dtype == np.float32 and exact32 else np.float64


def auroc_replicates(y: np.ndarray, p: np.ndarray, counts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Weighted AUROC for every row of ``counts`` (sample ``i`` weighs ``counts[b, codes[i]]``); NaN if a class
    has zero weight.

    ``y`` is boolean (already masked), ``p`` finite. One sort serves all replicates: negatives' weights are
    cumulated in score order per replicate, and each positive collects the weight of the negatives strictly below
    it plus half of those tied with it.
    """
    order = np.argsort(p)  # ties are resolved by searchsorted below, not by the sort order
    neg = order[~y[order]]
    pos = order[y[order]]
    neg_scores = p[neg]
    below = np.searchsorted(neg_scores, p[pos], side="left")
    upto = np.searchsorted(neg_scores, p[pos], side="right")
    tied = np.flatnonzero(below != upto)
    neg_codes, pos_codes = codes[neg], codes[pos]
    # The products and sums over positives are accumulated in float64, so the result is exact.
    work = _cumulative_dtype(counts, y.size)
    step = max(1, _BLOCK_ELEMENTS // max(y.size, 1))
    # Buffers are allocated once and refilled per block (fresh large arrays cost page faults on every block).
    cum_buf = np.zeros((step, neg.size + 1), dtype=work)
    pos_buf = np.empty((step, pos.size), dtype=work)
    at_buf = np.empty((step, pos.size), dtype=work)
    out = np.empty(counts.shape[0])
    for start in range(0, counts.shape[0], step):
        block = counts[start:start + step].astype(work, copy=False)
        k = block.shape[0]
        cum, w_pos, cum_at = cum_buf[:k], pos_buf[:k], at_buf[:k]
        np.take(block, neg_codes, axis=1, out=cum[:, 1:])
        np.cumsum(cum[:, 1:], axis=1, out=cum[:, 1:])
        np.take(block, pos_codes, axis=1, out=w_pos)
        np.take(cum, below, axis=1, out=cum_at)
        num = np.einsum("bi,bi->b", w_pos, cum_at, dtype=np.float64)
        if tied.size:
            num += 0.5 * np.einsum("bi,bi->b", w_pos[:, tied], cum[:, upto[tied]] - cum[:, below[tied]],
                                   dtype=np.float64)
        den = w_pos.sum(axis=1, dtype=np.float64) * cum[:, -1].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + k] = np.where(den > 0, num / den, np.nan)
    return out


def auprc_replicates(y: np.ndarray, p: np.ndarray, counts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Weighted average precision for every row of ``counts`` (see :func:`auroc_replicates` for the weights).

    One sort serves all replicates: the weight called positive at each distinct threshold is the cumulative weight
    of the samples down to it, the true-positive weight that of the positives among them (cumulated over the
    positives alone, and in float32 where that is exact: :func:`_cumulative_dtype`). The sum runs over the
    thresholds that hold a positive: the others' terms are zero."""
    if not y.any():  # also covers no labelled sample at all
        return np.full(counts.shape[0], np.nan)
    order = np.argsort(-p)  # tied scores are grouped into one threshold below
    ys = y[order]
    ps = p[order]
    ends = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])  # last index of each distinct threshold
    codes_s = codes[order]
    pos_codes = codes_s[ys]
    pos_upto = np.cumsum(ys)[ends]  # positives among the samples down to each distinct threshold
    with_pos = np.flatnonzero(np.diff(pos_upto, prepend=0) > 0)  # the thresholds that hold a positive
    work = _cumulative_dtype(counts, y.size)
    out = []
    for block in _blocks(counts, y.size):
        block = block.astype(work, copy=False)
        called = np.cumsum(block[:, codes_s], axis=1)[:, ends[with_pos]].astype(np.float64)  # tp + fp there
        tp_cum = np.zeros((block.shape[0], pos_codes.size + 1), dtype=work)
        np.cumsum(block[:, pos_codes], axis=1, out=tp_cum[:, 1:])
        tp = tp_cum[:, pos_upto[with_pos]].astype(np.float64)
        d_tp = np.diff(tp, axis=1, prepend=0.0)  # the positives' weight at each of those thresholds
        with np.errstate(invalid="ignore", divide="ignore"):
            # d_tp > 0 implies called > 0, so the 0/0 cases carry zero weight.
            ap = (d_tp * np.where(called > 0, tp / called, 0.0)).sum(axis=1) / tp[:, -1]
        out.append(np.where(tp[:, -1] > 0, ap, np.nan))
    return np.concatenate(out)


def per_label(metric, y, p, labels=None) -> pd.Series:
    """``metric(y[:, j], p[:, j])`` for every label column, as a Series indexed by label name.

    ``y`` and ``p`` are (n, L) arrays or DataFrames with the same columns; NaN labels are masked per label by the
    metric. A label with only one class is NaN (with a ``MetricWarning``), never dropped.
    """
    if isinstance(y, pd.DataFrame) and isinstance(p, pd.DataFrame):
        missing = [c for c in y.columns if c not in p.columns]
        if missing:
            raise ValueError(f"p lacks the label column(s) {missing} of y")
        p = p[list(y.columns)]  # align by name, not by position
    if labels is None:
        labels = list(y.columns) if isinstance(y, pd.DataFrame) else list(range(np.shape(y)[1]))
    y_arr = np.asarray(y, dtype=np.float64)
    p_arr = np.asarray(p, dtype=np.float64)
    if y_arr.ndim != 2 or p_arr.shape != y_arr.shape:
        raise ValueError(f"y and p must be (n, L) with the same shape, got {y_arr.shape} and {p_arr.shape}")
    if len(labels) != y_arr.shape[1]:
        raise ValueError(f"labels has {len(labels)} names for {y_arr.shape[1]} columns")
    return pd.Series([metric(y_arr[:, j], p_arr[:, j]) for j in range(y_arr.shape[1])], index=list(labels),
                     dtype=np.float64)


def macro_average(values) -> float:
    """Mean over labels whose value is not NaN (NaN, with a ``MetricWarning``, when every label is NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.isnan(arr).all():
        warnings.warn("macro average over no defined label is NaN", MetricWarning, stacklevel=2)
        return float("nan")
    return float(np.nanmean(arr))

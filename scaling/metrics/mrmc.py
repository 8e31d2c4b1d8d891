"""Comparing two models trained with several seeds: the Obuchowski–Rockette test (with Hillis's degrees of freedom
from five seeds on).

A DeLong test of two trained models answers "do *these two networks* differ on patients like these?". A scaling
study asks more: does the bigger backbone win *whatever the seed* — the random initialisation, data order and
augmentation draws that make two trainings of one cell differ. That is the question of a multi-reader multi-case
(MRMC) reader study, with seeds in the role of readers and patients in the role of cases, and its standard analysis
is Obuchowski & Rockette's ("Hypothesis testing of diagnostic accuracy for multiple readers and multiple tests: an
ANOVA approach with dependent observations", Commun. Stat. Simul. Comput. 24, 1995), with the denominator degrees
of freedom of Hillis ("A comparison of denominator degrees of freedom methods for multiple observer ROC analysis",
Stat. Med. 26, 2007; Hillis, Berbaum & Metz, "Recent developments in the Dorfman-Berbaum-Metz procedure for
multireader ROC study analysis", Acad. Radiol. 15, 2008) when there are enough seeds to estimate them.

For two models (a, b) and r seeds, θ_ij is the AUROC of model i trained with seed j, all on the same patients. The
case-sampling covariance of the 2r AUROCs (here DeLong's, clustered by patient: :func:`delong_components`) gives

    Var   the mean variance of one AUROC,
    Cov1  the mean covariance of a and b with the same seed,
    Cov2  the mean covariance of one model with two different seeds,
    Cov3  the mean covariance of a and b with different seeds,

and the seed-by-model interaction mean square MS(T×R) = Σ_ij (θ_ij − θ_i. − θ_.j + θ_..)² / (r − 1) measures
how much the difference between the models changes from seed to seed. Then, with d = θ_a. − θ_b. (the difference
of the seed-mean AUROCs),

    D  = MS(T×R) + r · max(Cov2 − Cov3, 0)
    se = sqrt(2 D / r),   t = d / se   (Student t with df degrees of freedom, below),
    df = r − 1 (2 to 4 seeds)   or   df = D² / (MS(T×R)² / (r − 1)) (Hillis; 5 seeds or more).

Both sources of variation are in ``se``: new patients (the covariance terms) and new seeds (MS(T×R)). The
denominator degrees of freedom depend on the number of seeds (``method`` says which were used):

* ``or-hillis`` (``HILLIS_MIN_SEEDS`` = 5 seeds or more): Hillis's ddf, small when the seeds disagree and growing
  towards a normal test when patient sampling dominates. It is always at least r − 1 (D ≥ MS(T×R)).
* ``or`` (2 to 4 seeds): Obuchowski & Rockette's original ddf (t − 1)(r − 1) = r − 1. With few seeds MS(T×R) rests
  on r − 1 degrees of freedom; when it comes out small by chance, Hillis's ddf runs off towards infinity just when
  the seed variation is underestimated, and the test is anti-conservative. In simulated null studies in which every
  training draws its own class separation (``benchmarks/or_type1_error.py``; 3,000–4,000 studies per setting, the
  separation's sd from 0 to 0.6) Hillis's ddf rejected at the 5 % level 7.1–9.3 % of the time with 2 seeds,
  5.1–6.7 % with 3 and 4.6–6.8 % with 4 (5.4 % on average), r − 1 2.1–3.6 %, 3.3–4.7 % and 3.7–5.5 %; with 5 seeds
  Hillis's ddf gave 4.6–5.4 %. Hillis (2007) proposed his ddf because r − 1 is conservative with the usual numbers
  of readers, as it is here with 2 seeds: with few seeds a valid test has little power, and more seeds are the
  remedy.
* ``delong`` (one seed): there is no seed-to-seed variation to estimate; the test is DeLong's on that pair
  (se² = 2 (Var − Cov1)).

When the estimated variance of the difference is zero (e.g. a perfect model against a constant one on four
patients, with identical seeds), there is nothing to refer ``diff`` to: the p-value and the interval are NaN, with a
:class:`~scaling.metrics.validation.MetricWarning`, not a p of 0 and a zero-width interval.

:func:`or_test_macro` compares macro AUROCs (the mean over labels of each run's AUROC). Their covariance adds the
labels' per-patient influences (:func:`scaling.metrics.delong.delong_components_and_influence`) before squaring,
so that labels scored on the same patients count as correlated. :func:`or_test_brier` runs the same analysis on the
macro Brier score.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from scaling.metrics.bootstrap import cluster_codes
from scaling.metrics.delong import ZERO_VARIANCE_RTOL, delong_components, delong_components_and_influence
from scaling.metrics.validation import MetricWarning, check_same_length

HILLIS_MIN_SEEDS = 5
"""Seeds from which the test uses Hillis's denominator degrees of freedom; with 2 to HILLIS_MIN_SEEDS − 1 seeds it
uses Obuchowski & Rockette's original (t − 1)(r − 1) (module docstring, ``benchmarks/or_type1_error.py``)."""


@dataclass(frozen=True)
class ORTest:
    """Comparison of two models' seed-mean AUROCs with seeds and patients random (module docstring)."""

    auroc_a: float
    """Mean AUROC of model a over the seeds."""
    auroc_b: float
    """Mean AUROC of model b over the seeds."""
    diff: float
    """auroc_a − auroc_b."""
    se: float
    """Standard error of the difference: patient and seed variation."""
    df: float
    """Denominator degrees of freedom: r − 1 (``method`` ``or``), Hillis's (``or-hillis``; inf when the seeds
    agree exactly), inf with one seed (``delong``)."""
    t: float
    """diff / se."""
    p_value: float
    """Two-sided p-value of H0: equal expected AUROC (Student t with ``df``); NaN when the estimated variance is 0."""
    lo: float
    """Lower bound of the difference's interval."""
    hi: float
    """Upper bound of the difference's interval."""
    n_seeds: int
    """Seeds (readers) the test rests on."""
    ms_seed_interaction: float
    """MS(T×R): the variation of the difference across seeds (NaN with one seed)."""
    method: str
    """The degrees of freedom used: ``or-hillis`` (Hillis's, HILLIS_MIN_SEEDS seeds or more), ``or`` (Obuchowski &
    Rockette's original r − 1, 2 to HILLIS_MIN_SEEDS − 1 seeds) or ``delong`` (one seed: DeLong's test)."""

    @property
    def value_a(self) -> float:
        """Model a's seed-mean figure of merit, whichever it is: the AUROC, or the Brier score from
        :func:`or_test_brier` (the same number as ``auroc_a``, under a name that fits both)."""
        return self.auroc_a

    @property
    def value_b(self) -> float:
        """Model b's seed-mean figure of merit (``value_a``)."""
        return self.auroc_b


def or_hillis(aurocs, cov, alpha: float = 0.05) -> ORTest:
    """Obuchowski–Rockette test of model a against model b from their AUROCs and its case-sampling covariance.

    ``aurocs``: (2, r), row 0 model a and row 1 model b, column j trained with seed j (seeds paired by column);
    ``cov``: (2r, 2r) covariance of ``aurocs.ravel()`` (a's seeds, then b's) over patient sampling — DeLong's,
    clustered by patient, in :func:`or_test`; any consistent estimate (a jackknife over patients) works. A NaN
    covariance (fewer than two patients of a class) gives NaN statistics; a zero variance of the difference gives
    NaN ``t``, ``p_value``, ``lo`` and ``hi`` with a ``MetricWarning`` (module docstring).
    """
    theta = np.asarray(aurocs, dtype=np.float64)
    if theta.ndim != 2 or theta.shape[0] != 2 or theta.shape[1] < 1:
        raise ValueError(f"aurocs must have shape (2, seeds), got {theta.shape}")
    r = theta.shape[1]
    c = np.asarray(cov, dtype=np.float64)
    if c.shape != (2 * r, 2 * r):
        raise ValueError(f"cov must have shape ({2 * r}, {2 * r}) for {r} seed(s), got {c.shape}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    mean_a, mean_b = (float(v) for v in theta.mean(axis=1))
    diff = mean_a - mean_b
    nan = math.nan
    block = c.reshape(2, r, 2, r)  # block[i, j, i', j'] = Cov(θ_ij, θ_i'j')
    same_seed = np.eye(r, dtype=bool)
    var = float(np.mean([block[i, j, i, j] for i in range(2) for j in range(r)]))
    cov1 = float(np.mean(block[0, :, 1, :][same_seed]))
    if r == 1:
        ms_tr, denom, df = nan, 2.0 * (var - cov1), math.inf
        scale = 2.0 * (abs(var) + abs(cov1))
        method = "delong"
    else:
        cov2 = float(np.mean([block[i, :, i, :][~same_seed] for i in range(2)]))
        cov3 = float(np.mean(block[0, :, 1, :][~same_seed]))
        interaction = theta - theta.mean(axis=1, keepdims=True) - theta.mean(axis=0, keepdims=True) + theta.mean()
        ms_tr = float((interaction**2).sum() / (r - 1))
        d_or = ms_tr + r * max(cov2 - cov3, 0.0)
        denom = 2.0 * d_or / r
        # rounding of the covariance terms, and of MS(T×R) (squares of differences of the θ's)
        scale = 2.0 * (abs(var) + abs(cov1) + abs(cov2) + abs(cov3) + float(np.max(theta**2)) * 1e-12)
        if r >= HILLIS_MIN_SEEDS:  # Hillis (2007): D² / (MS(T×R)² / (r − 1)), at least r − 1
            df = math.inf if ms_tr == 0 else d_or**2 / (ms_tr**2 / (r - 1))
            method = "or-hillis"
        else:  # Obuchowski & Rockette (1995): (t − 1)(r − 1) with t = 2 models
            df, method = float(r - 1), "or"
    if not np.isfinite(denom):
        return ORTest(mean_a, mean_b, diff, nan, nan, nan, nan, nan, nan, r, ms_tr, method)
    if denom <= ZERO_VARIANCE_RTOL * scale:
        warnings.warn(f"the estimated variance of the difference of the two models' mean figures of merit is 0 "
                      f"({r} seed(s), difference {diff:+.4g}): no p-value or interval (NaN); the sample shows no "
                      f"variation to refer the difference to, which is no evidence that there is none",
                      MetricWarning, stacklevel=3)
        return ORTest(mean_a, mean_b, diff, 0.0, float(df), nan, nan, nan, nan, r, ms_tr, method)
    se = math.sqrt(denom)
    t = diff / se
    p_value = float(2.0 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
    return ORTest(mean_a, mean_b, diff, se, float(df), t, p_value, diff - half, diff + half, r, ms_tr, method)


def or_test(y, scores_a, scores_b, alpha: float = 0.05, cluster=None) -> ORTest:
    """Is model a better than model b over seeds and patients? (Obuchowski–Rockette–Hillis, module docstring.)

    ``y``: (N,) labels (1/0/NaN; NaN rows masked); ``scores_a``, ``scores_b``: (r, N) scores of the two models, row
    j trained with seed j (the same seeds, in the same order), or (N,) for one seed; ``cluster``: (N,) patient
    ids, so that a patient's images count as correlated (Obuchowski 1997), or None for independent samples. Raises
    ValueError when ``y`` lacks a class or the shapes disagree.
    """
    a = np.atleast_2d(np.asarray(scores_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(scores_b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError("scores_a and scores_b must have the same shape (seeds, samples), "
                         f"got {a.shape} and {b.shape}")
    check_same_length(y=np.asarray(y), scores_a=a[0])
    aurocs, cov = delong_components(y, np.concatenate([a, b]), cluster)
    return or_hillis(aurocs.reshape(2, -1), cov, alpha)


def or_test_macro(y, scores_a, scores_b, alpha: float = 0.05, cluster=None) -> ORTest:
    """:func:`or_test` of macro AUROC: the unweighted mean over L labels of each run's AUROC.

    ``y``: (N, L) labels (1/0/NaN; each label masked on its own); ``scores_a``, ``scores_b``: (r, N, L), or (N, L)
    for one seed; ``cluster``: (N,) patient ids or None. Every label must have both classes among its labelled
    rows (pass the labels a set can score). The case covariance of the 2r macro AUROCs is I / (I − 1) · Ψ Ψᵀ with
    Ψ the patients' influences averaged over the labels (I: patients with a labelled image); for one label it is
    Obuchowski's up to his per-class small-sample factors.
    """
    return or_test_labels(y, scores_a, scores_b, alpha, cluster)[0]


def or_test_labels(y, scores_a, scores_b, alpha: float = 0.05, cluster=None) -> tuple[ORTest, list[ORTest]]:
    """(:func:`or_test_macro`, [:func:`or_test` of each label]) from one DeLong pass per label: the same numbers as
    calling them apart, at half the sorting. Inputs as for :func:`or_test_macro`; label l's test uses the rows
    where it is labelled."""
    labels, a, b, codes = _multilabel_inputs(y, scores_a, scores_b, cluster, "scores")
    n_labels = labels.shape[1]
    aucs, psi, each = 0.0, 0.0, []
    for lab in range(n_labels):
        auc_l, cov_l, psi_l = delong_components_and_influence(
            labels[:, lab], np.concatenate([a[..., lab], b[..., lab]]), None if cluster is None else codes)
        each.append(or_hillis(auc_l.reshape(2, -1), cov_l, alpha))
        aucs, psi = aucs + auc_l / n_labels, psi + psi_l / n_labels
    return or_hillis(np.asarray(aucs).reshape(2, -1), _influence_covariance(psi, codes, labels), alpha), each


def _multilabel_inputs(y, runs_a, runs_b, cluster, name: str):
    """``y`` as (N, L) floats, both models' runs as (seeds, N, L) (one seed may come as (N, L)), and the patient
    codes of the N samples; a ValueError naming ``name`` when the shapes disagree."""
    labels = np.asarray(y, dtype=np.float64)
    labels = labels[:, None] if labels.ndim == 1 else labels
    a, b = np.asarray(runs_a, dtype=np.float64), np.asarray(runs_b, dtype=np.float64)
    a, b = (a[None] if a.ndim == 2 else a), (b[None] if b.ndim == 2 else b)
    if a.shape != b.shape or a.ndim != 3 or a.shape[1:] != labels.shape:
        raise ValueError(f"{name}_a and {name}_b must have shape (seeds, {labels.shape[0]}, {labels.shape[1]}) "
                         f"like y (samples, labels), got {a.shape} and {b.shape}")
    codes = np.arange(labels.shape[0]) if cluster is None else cluster_codes(cluster, labels.shape[0])
    return labels, a, b, codes


def _influence_covariance(psi: np.ndarray, codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """I / (I − 1) · Ψ Ψᵀ: the case covariance of the runs' figures of merit from their per-patient influences Ψ
    (runs, patients); I counts the patients with a labelled sample (NaN with fewer than two)."""
    n_patients = np.unique(codes[np.isfinite(labels).any(axis=1)]).size
    if n_patients < 2:
        return np.full((psi.shape[0],) * 2, np.nan)
    return n_patients / (n_patients - 1) * (psi @ psi.T)


def or_test_brier(y, probs_a, probs_b, alpha: float = 0.05, cluster=None) -> ORTest:
    """:func:`or_hillis` on the macro Brier score (lower is better): is model a better *calibrated and sharper* than
    model b, over seeds and patients? ``value_a`` / ``value_b`` of the result hold the seed-mean Brier scores (so do
    ``auroc_a`` / ``auroc_b``, the fields' names from the AUROC tests).

    ``y``: (N, L) labels (1/0/NaN; each label scored on its labelled rows); ``probs_a``, ``probs_b``: (r, N, L)
    probabilities, or (N, L) for one seed; ``cluster``: (N,) patient ids or None. A run's macro Brier score is the
    mean over labels of the mean squared error on that label's rows. Its case covariance is I / (I − 1) · Ψ Ψᵀ,
    Ψ the patients' first-order influences (Σ over the patient's rows of the loss minus the label's mean, divided
    by the label's rows, averaged over labels), as for :func:`or_test_macro`; with one seed the test is the
    clustered paired z-test of the two models' scores (``method = "paired"``).
    """
    labels, a, b, codes = _multilabel_inputs(y, probs_a, probs_b, cluster, "probs")
    known = np.isfinite(labels)
    if not known.any(axis=0).all():
        raise ValueError("every label needs at least one labelled row")
    target, rows = np.where(known, labels, 0.0), known.sum(axis=0)
    briers, psi = [], []
    for run in (*a, *b):  # one (N, L) run at a time: a 240,000-image set with 14 labels is 27 MB per array
        loss = np.where(known, (run - target) ** 2, 0.0)
        per_label = loss.sum(axis=0) / rows  # the run's Brier score of each label
        briers.append(per_label.mean())
        centred = np.where(known, loss - per_label, 0.0) / rows
        psi.append(np.bincount(codes, weights=centred.mean(axis=1), minlength=int(codes.max()) + 1))
    res = or_hillis(np.reshape(briers, (2, -1)), _influence_covariance(np.stack(psi), codes, labels), alpha)
    return res if res.method != "delong" else dataclasses.replace(res, method="paired")

"""Every metric of one study run, computed from its stored per-sample predictions.

:func:`compute_run_metrics` is what the study runner calls after prediction. Input: one DataFrame per evaluation
set with ``sample_id``, ``patient_id``, ``label:<L>`` (1/0/NaN), ``logit:<L>``, ``prob:<L>`` for every label and
the attribute columns. ``val`` must be present: per label, the decision threshold (``eval.threshold`` policy)
and the temperature are fitted there and applied unchanged to every set, ``val`` included.

Output rows (tidy; columns ``eval_set, label, attribute, group, metric, value, lo, hi, n``), for every evaluation
set (``val``, ``test`` and each OOD set):

* ``label``: a label name, or ``macro`` = the mean over labels whose value is not NaN. Macro ``lo``/``hi`` come
  from the per-replicate mean over those labels (the replicates of all labels are drawn from the same patients);
  macro ``n`` = samples with at least one label. The macro of an attribute's ``worst_group_auroc`` and
  ``auroc_gap`` is taken over its groups' macro AUROCs (the smallest, and max − min; ``GROUP_SUMMARIES``), its
  interval from the same replicates; the other summary macros (``tpr_gap``, ``eod``, ...) are means of the
  per-label summaries.
* ``attribute='all', group='all'``: overall ``auroc``, ``auprc``, ``ece``, ``mce``, ``brier``, ``nll`` and, after
  the validation-fitted temperature, ``ece_temp``, ``brier_temp``, ``nll_temp``; ``prevalence``, ``tpr`` and
  ``fpr`` (at the val-fitted threshold) and ``aurc`` (area under the risk-coverage curve at that threshold; see
  ``selective``).
* ``attribute=<column>, group=<value>``: ``prevalence``, ``auroc``, ``ece``, ``tpr``, ``fpr`` (and
  ``underdiagnosis_rate`` for "No Finding"); groups below ``eval.min_group_size`` labelled samples or
  ``eval.min_group_patients`` patients have NaN values and their true ``n``; a missing attribute value forms the
  group ``missing``.
* ``attribute=<column>, group='all'``: ``worst_group_auroc``, ``auroc_gap``, ``tpr_gap``, ``fpr_gap``, ``eod``
  (equalized-odds difference) and, for "No Finding", ``underdiagnosis_gap`` (see ``fairness``).
* distribution shift, ``eval_set=<OOD set>, attribute='all', group='all'``: ``auroc_id`` (the in-distribution
  ``test`` AUROC), ``auroc_ood`` (the OOD set's AUROC) and ``auroc_drop`` (their difference), for each label that
  *both* sets can score — both classes present among its labelled rows in ``test`` and in the OOD set — and their
  ``macro`` over exactly those labels. A macro over all labels in-distribution against a macro over the two labels
  an OOD set happens to have would compare different tasks. ``info['shift_labels']`` lists the labels per set.
  The drop's interval comes from the difference of the two sets' replicates (different patients, independent
  resamples); for a set in ``paired`` (one that shares patients with ``test``, such as the test patients' lateral
  films) from one bootstrap over the patients of both sets, so a patient drawn counts in both AUROCs at once.
* pooled per breast / exam (``eval.aggregate``, mammography; see :mod:`scaling.metrics.exam`): the overall rows
  again, for every set, with metric names ``<metric>@<level>_<reducer>`` (``auroc@exam_max``,
  ``tpr@breast_mean``): the image probabilities of each unit pooled by their max and by their mean, threshold and
  temperatures refitted on pooled ``val``, ``n`` = units, intervals from the same patient-level bootstrap.
  No subgroup or shift rows at these levels. ``info['pooled']`` holds each level's fits and unit counts.
* one-of-K tasks (``task='multiclass'``: ``label:<class>`` one-hot, ``prob:<class>`` the softmax): every row
  above is computed one-vs-rest per class (so ``macro`` AUROC is the one-vs-rest macro AUROC of
  ``roc_auc_score(multi_class='ovr')``, and each class's ``*_temp`` uses the one softmax temperature fitted on
  val), plus ``label='all'`` rows scoring the classes together: ``accuracy`` (top-1), ``top3_accuracy`` (the true
  class among the 3 most probable; only with more than 3 classes), ``balanced_accuracy`` (mean
  per-class recall), ``nll_multiclass``, ``brier_multiclass`` and ``ece_top_label``, the last three also
  ``*_temp`` (see :mod:`scaling.metrics.multiclass`). A row's class is its one positive ``label:<class>`` (blank
  classes of such a row count as 0: the classes exclude each other); a row with no positive is unlabelled for these
  rows. A set where some rows carry labels but no class (an OOD set that knows only "melanoma or not") gets no
  ``label='all'`` rows: scoring only its rows with a class would select them by their class
  (``info['multiclass_sets']`` says which sets were scored and why not).
* derived binary labels (``derived``, e.g. ``Malignant`` = the summed softmax of MEL/BCC/AK/SCC of a one-of-K model,
  ``logit:<name>`` its log-odds): every per-label row above through the binary path — own threshold and own
  temperature fitted on val — and the shift rows, but outside every per-set ``macro`` (a one-of-K ``macro`` is
  the one-vs-rest macro over the classes). The shift ``macro`` is over every shared label, derived ones included.
* ``lo``/``hi``: percentile interval of a patient-level cluster bootstrap (``eval.n_boot`` replicates,
  ``eval.alpha``, ``eval.bootstrap_seed``; each OOD set its own stream, :func:`set_seed`); NaN where not computed
  (``aurc``) or undefined.
* ``n``: labelled samples the value is computed on (for macro rows, samples with any label).

On ``val`` the numbers in :data:`IN_SAMPLE_METRICS` use a threshold or temperature fitted on those very samples:
they are in-sample (optimistic) and reported as such (``info['in_sample']``); discrimination (AUROC, AUPRC) and the
raw calibration metrics do not depend on the fit.

An attribute column absent from an evaluation set, or missing for all its samples (an OOD dataset without that
demographic), is skipped for that set with a warning and listed in ``info['skipped_attributes']``; an attribute
present only on an OOD set (Fitzpatrick skin type on DDI) is reported there.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from scaling.metrics.bootstrap import ClusterBootstrap, percentile_interval
from scaling.metrics.calibration import (brier, brier_replicates, ece, ece_replicates, mce, mce_replicates, nll,
                                         nll_replicates, weighted_mean_replicates)
from scaling.metrics.discrimination import auprc, auprc_replicates, auroc, auroc_replicates
from scaling.metrics.exam import REDUCERS, aggregate_predictions
from scaling.metrics.fairness import GROUP_METRICS, MISSING_GROUP, analyse_subgroups, group_labels
from scaling.metrics.schema import METRIC_COLUMNS
from scaling.metrics.selective import aurc
from scaling.metrics.multiclass import (accuracy, accuracy_replicates, balanced_accuracy, balanced_accuracy_replicates,
                                        brier_multiclass, brier_multiclass_replicates, check_one_hot,
                                        check_probabilities, ece_top_label, ece_top_label_replicates, nll_multiclass,
                                        nll_multiclass_replicates, top_k_accuracy, top_k_accuracy_replicates)
from scaling.metrics.temperature import (apply_softmax_temperature, apply_temperature, fit_softmax_temperature,
                                         fit_temperature)
from scaling.metrics.thresholds import CONFIG_POLICIES, choose_threshold, rate_replicates, rates_at
from scaling.metrics.validation import MetricWarning, check_labels, check_scores

FIT_SPLIT = "val"
"""The evaluation set thresholds and temperatures are fitted on."""
ID_SPLIT = "test"
"""The in-distribution evaluation set every OOD set is compared with."""
NO_FINDING = "No Finding"
TASKS = ("multilabel", "multiclass")
"""Independent findings (sigmoid per label) or one class out of K (softmax over the labels)."""
MULTICLASS_LABEL = "all"
"""The ``label`` of the rows that score all classes of a one-of-K task together (accuracy, ...)."""
TOP_K = 3
"""The k of the ``top3_accuracy`` row of a one-of-K task (with more than k classes)."""
MULTICLASS_METRICS = ("accuracy", f"top{TOP_K}_accuracy", "balanced_accuracy", "nll_multiclass", "brier_multiclass",
                      "ece_top_label")
"""The one-of-K rows, each also after the validation-fitted softmax temperature (``<metric>_temp``) where it moves."""
IN_SAMPLE_METRICS = ("tpr", "fpr", "aurc", "ece_temp", "brier_temp", "nll_temp", "tpr_gap", "fpr_gap", "eod",
                     "underdiagnosis_rate", "underdiagnosis_gap", "nll_multiclass_temp", "brier_multiclass_temp",
                     "ece_top_label_temp")
"""Metrics that depend on the validation-fitted threshold or temperature: in-sample when reported on ``val``."""
SHIFT_METRICS = ("auroc_id", "auroc_ood", "auroc_drop")
"""The distribution-shift rows of an OOD set (on the labels it shares with the in-distribution test set)."""
# Metrics that exist for one label only are not macro-averaged.
_NOT_MACRO = ("underdiagnosis_rate", "underdiagnosis_gap")


def _gap(values, axis=None):
    """max − min."""
    return np.max(values, axis=axis) - np.min(values, axis=axis)


GROUP_SUMMARIES = {"worst_group_auroc": ("auroc", np.min, 1), "auroc_gap": ("auroc", _gap, 2)}
"""Attribute summaries whose ``macro`` row is taken over the groups' macro AUROCs — (group metric, reducer over
groups, groups needed) — not averaged over the labels' own summaries: the worst group's macro AUROC and the spread
of the groups' macro AUROCs, as the report's group table shows them. A label's worst group can differ from label to
label, so the mean of the labels' worst groups lies below every group's macro AUROC."""

SCORING_VERSION = 3
"""Raised whenever a stored metric row changes its definition (what :func:`compute_run_metrics` writes for the same
predictions and settings), so that a study rescores its finished runs from their stored predictions instead of
mixing rows of two definitions (``scaling.study.runner.metric_settings`` records it). 2: the macro rows of
``worst_group_auroc`` and ``auroc_gap`` are taken over the groups' macro AUROCs (``GROUP_SUMMARIES``). 3: a subgroup
of fewer than ``eval.min_group_patients`` patients gets NaN metrics, however many images it has."""


def _columns(df: pd.DataFrame, eval_set: str, labels, source=None) -> None:
    """Every column the metrics read is there, and patient ids are complete (the bootstrap resamples them).
    ``source`` (the file the frame was read from) is named in the error: a stored file may be damaged or foreign."""
    at = f" ({source})" if source is not None else ""
    need = ["patient_id"] + [f"{k}:{lab}" for lab in labels for k in ("label", "logit", "prob")]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"predictions[{eval_set!r}]{at} lacks column(s) {missing}")
    if df["patient_id"].isna().any():
        raise ValueError(f"predictions[{eval_set!r}]['patient_id']{at} has missing ids; the bootstrap resamples "
                         f"patients")


def _fit_on_val(val: pd.DataFrame, labels, eval_cfg, task: str = "multilabel", derived=()) -> dict:
    """Per label the decision threshold (one-vs-rest for a one-of-K task) and the temperature: one per label for
    sigmoid outputs and derived labels, one softmax temperature for all classes of a one-of-K task."""
    policy, target = CONFIG_POLICIES[eval_cfg.threshold]
    if policy == "fixed":
        target = eval_cfg.fixed_threshold
    thresholds, temperatures, n_val = {}, {}, {}
    for lab in [*labels, *derived]:
        y = check_labels(val[f"label:{lab}"], f"predictions['val']['label:{lab}']")
        p = check_scores(val[f"prob:{lab}"], f"predictions['val']['prob:{lab}']")
        z = check_scores(val[f"logit:{lab}"], f"predictions['val']['logit:{lab}']", probability=False)
        thresholds[lab] = choose_threshold(y, p, policy, target)
        if task == "multilabel" or lab in derived:
            temperatures[lab] = fit_temperature(y, z)
        n_val[lab] = int((~np.isnan(y)).sum())
    fitted = {"task": task, "fitted_on": FIT_SPLIT, "threshold_policy": eval_cfg.threshold,
              "threshold_target": target, "thresholds": thresholds, "temperatures": temperatures, "n_val": n_val,
              "derived": list(derived)}
    if task == "multiclass":
        y, _, z, _ = _class_arrays(val, labels, FIT_SPLIT)
        fitted["softmax_temperature"] = fit_softmax_temperature(y, z)
    return fitted


def _class_arrays(df: pd.DataFrame, labels, eval_set: str):
    """(one-hot labels, probabilities, logits, rows with labels but no class) of a one-of-K prediction frame as
    (n, K) arrays, validated. A row with one positive class is that class (its blank classes 0); a row without a
    positive is NaN (unlabelled); two positives raise, naming the row."""
    where = f"predictions[{eval_set!r}]"
    y = df[[f"label:{lab}" for lab in labels]].to_numpy(np.float64)
    positive = (y == 1.0).sum(axis=1)
    without_class = (positive == 0) & ~np.isnan(y).all(axis=1)
    y = np.where((positive == 1)[:, None], np.nan_to_num(y), y)
    y[positive == 0] = np.nan
    check_one_hot(y, f"{where} label:<class> one-hot")
    p = check_probabilities(df[[f"prob:{lab}" for lab in labels]].to_numpy(np.float64), len(labels),
                            f"{where} prob:<class>")
    return y, p, df[[f"logit:{lab}" for lab in labels]].to_numpy(np.float64), int(without_class.sum())


def level_suffix(metric: str) -> str:
    """The ``@<level>_<reducer>`` part of a pooled metric's name (``auroc@exam_max`` → ``@exam_max``), else ''."""
    return metric[metric.index("@"):] if "@" in metric else ""


def base_metric(metric: str) -> str:
    """A metric's name without its pooling suffix (``tpr@breast_mean`` → ``tpr``)."""
    return metric.split("@", 1)[0]


def _pooled_rows(out: _Rows, predictions: dict[str, pd.DataFrame], labels, eval_cfg, n_any: dict) -> dict:
    """Rows of every ``eval.aggregate`` level × reducer, with threshold and temperatures refitted on pooled val."""
    fits = {}
    for level in eval_cfg.aggregate:
        for reducer in REDUCERS:
            suffix = f"@{level}_{reducer}"
            pooled = {name: aggregate_predictions(df, labels, level, reducer, where=f"predictions[{name!r}]")
                      for name, df in predictions.items()}
            fitted = _fit_on_val(pooled[FIT_SPLIT], labels, eval_cfg, "multilabel")
            for name, df in pooled.items():
                _evaluate_set(out, name, df, labels, [], fitted, eval_cfg, n_any, {}, {}, suffix)
            fits[suffix[1:]] = {**_json_safe(fitted), "units": {name: len(df) for name, df in pooled.items()}}
    return fits


def calibrated_probabilities(pred: pd.DataFrame, labels, fitted: dict) -> pd.DataFrame:
    """The probabilities of a prediction frame after the temperatures fitted on validation (``fitted`` = the
    ``info`` of :func:`compute_run_metrics`, as stored in a run's ``meta.json`` under ``fitted_on_val``): one
    column per label. A label without a fitted temperature (one class on validation) keeps its raw probabilities;
    a one-of-K task's classes share one softmax temperature (``labels`` must then hold all of its classes) and its
    derived labels have their own."""
    def fitted_ok(t) -> bool:
        return t is not None and np.isfinite(t) and t > 0

    derived = set(fitted.get("derived") or ())
    out, binary = {}, list(labels)
    if fitted.get("task") == "multiclass":
        classes = [lab for lab in labels if lab not in derived]
        binary = [lab for lab in labels if lab in derived]
        t = fitted.get("softmax_temperature")
        if fitted_ok(t):
            scaled = apply_softmax_temperature(pred[[f"logit:{lab}" for lab in classes]].to_numpy(np.float64), t)
            out.update(zip(classes, scaled.T))
        else:
            out.update({lab: pred[f"prob:{lab}"].to_numpy(np.float64) for lab in classes})
    temps = fitted.get("temperatures") or {}
    for lab in binary:
        t = temps.get(lab)
        out[lab] = apply_temperature(pred[f"logit:{lab}"], t) if fitted_ok(t) else pred[f"prob:{lab}"].to_numpy(
            np.float64)
    return pd.DataFrame({lab: out[lab] for lab in labels}, index=pred.index)


class _Rows:
    """Collects rows and, per (eval_set, attribute, group, metric), each label's value, replicates and n.
    ``outside_macro`` labels (derived ones) enter only the macro of the shift rows."""

    def __init__(self, alpha: float, outside_macro=()):
        self.alpha = alpha
        self.outside_macro = set(outside_macro)
        self.rows: list[dict] = []
        self.by_key: dict[tuple, dict[str, tuple[float, np.ndarray | None, int]]] = {}

    def add(self, eval_set, label, attribute, group, metric, value, n, reps=None, lo=None, hi=None, macro=True):
        if lo is None:
            lo, hi = percentile_interval(reps, self.alpha) if reps is not None else (math.nan, math.nan)
        self.rows.append({"eval_set": eval_set, "label": label, "attribute": attribute, "group": str(group),
                          "metric": metric, "value": float(value), "lo": float(lo), "hi": float(hi), "n": int(n)})
        if macro and metric not in _NOT_MACRO:
            self.by_key.setdefault((eval_set, attribute, str(group), metric), {})[label] = (float(value), reps, int(n))

    def add_macro(self, n_any: dict[tuple, int]) -> None:
        for (eval_set, attribute, group, metric), per_label in self.by_key.items():
            summary = GROUP_SUMMARIES.get(base_metric(metric)) if attribute != "all" and group == "all" else None
            if summary is not None:
                value, rep = self._over_group_macros(eval_set, attribute, metric, *summary)
            else:
                value, rep = self._macro(metric, per_label)
            lo, hi = percentile_interval(rep, self.alpha) if rep is not None else (math.nan, math.nan)
            self.rows.append({"eval_set": eval_set, "label": "macro", "attribute": attribute, "group": group,
                              "metric": metric, "value": float(value), "lo": float(lo), "hi": float(hi),
                              "n": int(n_any.get((eval_set, attribute, group, level_suffix(metric)), 0))})

    def _macro(self, metric: str, per_label: dict) -> tuple[float, np.ndarray | None]:
        """The macro of one metric row over the labels whose value is defined, and its replicates (the mean of the
        labels' replicates, all drawn from the same patients; None when a label has none)."""
        defined = {k: v for k, v in per_label.items() if np.isfinite(v[0])
                   and (k not in self.outside_macro or metric in SHIFT_METRICS)}
        value = np.mean([v[0] for v in defined.values()]) if defined else math.nan
        reps = [r for _, r, _ in defined.values()]
        same = defined and all(r is not None and r.shape == reps[0].shape for r in reps)
        return value, (np.mean(np.vstack(reps), axis=0) if same else None)

    def _over_group_macros(self, eval_set, attribute, metric, group_metric, reducer, need):
        """A summary over the groups of ``attribute`` (worst group, max − min) taken of the groups' *macro* rows —
        the numbers the report prints per group — and its replicates from the same replicates of those macros
        (reduced replicate by replicate). Groups whose macro is undefined (below ``eval.min_group_size`` or
        ``eval.min_group_patients``, no label
        with both classes) and the ``missing`` group are left out, as in each label's own summary."""
        name = group_metric + level_suffix(metric)
        macros = [self._macro(name, per_label) for (e, a, g, m), per_label in self.by_key.items()
                  if e == eval_set and a == attribute and g not in ("all", MISSING_GROUP) and m == name]
        macros = [(v, r) for v, r in macros if np.isfinite(v)]
        if len(macros) < need:
            return math.nan, None
        reps = [r for _, r in macros]
        same = all(r is not None and r.shape == reps[0].shape for r in reps)
        return float(reducer(np.array([v for v, _ in macros]))), (reducer(np.vstack(reps), axis=0) if same else None)


def _overall(out: _Rows, eval_set, lab, y, p, pt, thr, boot, n_bins, suffix=""):
    """Overall rows of one label on its labelled rows (y boolean; ``pt`` the temperature-scaled probabilities, or
    None when no temperature could be fitted); ``suffix`` is appended to every metric name."""
    n = y.size
    counts, codes = (boot.counts, boot.codes) if boot is not None else (None, None)

    def add(metric, value, replicates=None):
        out.add(eval_set, lab, "all", "all", metric + suffix, value, n, replicates)

    def reps(fn, *args, **kw):
        return fn(y, *args, counts, codes, **kw) if boot is not None else None

    yf = y.astype(np.float64)
    add("auroc", auroc(yf, p), reps(auroc_replicates, p))
    add("auprc", auprc(yf, p), reps(auprc_replicates, p))
    add("ece", ece(yf, p, n_bins=n_bins), reps(ece_replicates, p, n_bins=n_bins))
    add("mce", mce(yf, p, n_bins=n_bins), reps(mce_replicates, p, n_bins=n_bins))
    add("brier", brier(yf, p), reps(brier_replicates, p))
    add("nll", nll(yf, p), reps(nll_replicates, p))
    if pt is not None:
        add("ece_temp", ece(yf, pt, n_bins=n_bins), reps(ece_replicates, pt, n_bins=n_bins))
        add("brier_temp", brier(yf, pt), reps(brier_replicates, pt))
        add("nll_temp", nll(yf, pt), reps(nll_replicates, pt))
    else:
        for m in ("ece_temp", "brier_temp", "nll_temp"):
            add(m, math.nan)
    add("prevalence", yf.mean() if n else math.nan,
        weighted_mean_replicates(yf, counts, codes) if boot is not None else None)
    tpr, fpr = rates_at(yf, p, thr)
    tpr_reps, fpr_reps = rate_replicates(y, p, thr, counts, codes) if boot is not None else (None, None)
    add("tpr", tpr, tpr_reps)
    add("fpr", fpr, fpr_reps)
    add("aurc", aurc(yf, p, threshold=thr) if np.isfinite(thr) else math.nan)


def _attribute_values(df: pd.DataFrame, attribute: str):
    if attribute not in df.columns or df[attribute].isna().all():
        return None
    return group_labels(df[attribute].to_numpy(dtype=object))


def set_seed(seed: int, eval_set: str) -> int | list[int]:
    """The bootstrap seed of one evaluation set: ``eval.bootstrap_seed`` for ``val`` and ``test``, and a stream of
    its own for each OOD set (the seed and a CRC-32 of its name). Each set's replicates are still the same in every
    run (paired comparisons across runs); but two sets of different patients are resampled independently even when
    they hold the same number of patients, where one shared stream would draw the same multiplicities by id rank
    and couple the test and OOD AUROCs of the drop."""
    return seed if eval_set in (FIT_SPLIT, ID_SPLIT) else [int(seed), zlib.crc32(eval_set.encode())]


def _evaluate_set(out: _Rows, eval_set: str, df: pd.DataFrame, labels, subgroups, fitted: dict, eval_cfg,
                  n_any: dict, skipped: dict, worst: dict, suffix: str = "", one_of_k: dict | None = None) -> list[str]:
    """Every row of one evaluation set (metric names + ``suffix``); returns the labels it can score (both classes
    among the labelled rows), derived labels included. ``one_of_k`` receives whether a one-of-K set got its
    ``label='all'`` rows."""
    patients = df["patient_id"].to_numpy(dtype=object)
    boot = (ClusterBootstrap(patients, n=len(df), n_boot=eval_cfg.n_boot,
                             seed=set_seed(eval_cfg.bootstrap_seed, eval_set)) if eval_cfg.n_boot > 0 else None)
    attrs = {}
    for a in subgroups:
        values = _attribute_values(df, a)
        if values is None:
            skipped.setdefault(eval_set, []).append(a)
            warnings.warn(f"attribute {a!r} is absent or all missing in eval set {eval_set!r}; "
                          "no subgroup rows for it", MetricWarning, stacklevel=3)
        else:
            attrs[a] = values
    names = {a: sorted(set(values.tolist())) for a, values in attrs.items()}  # every group gets its rows
    any_label = np.zeros(len(df), dtype=bool)
    evaluable = []
    task = fitted["task"]
    scaled = None  # one-of-K: softmax(logits / T), the temperature-scaled probability of every class
    derived = fitted.get("derived") or []
    if task == "multiclass":
        y_all, p_all, z_all, without_class = _class_arrays(df, labels, eval_set)
        t_soft = fitted["softmax_temperature"]
        if np.isfinite(t_soft):
            scaled = apply_softmax_temperature(z_all, t_soft)
        if without_class:
            warnings.warn(f"{without_class} row(s) of eval set {eval_set!r} carry labels but no class among {labels}: "
                          f"no one-of-K rows (label {MULTICLASS_LABEL!r}) for it, only the per-class ones",
                          MetricWarning, stacklevel=3)
        else:
            _multiclass_rows(out, eval_set, y_all, p_all, scaled, boot, eval_cfg)
        if one_of_k is not None:
            one_of_k[eval_set] = {"scored": not without_class, "labelled_without_class": without_class}
    for j, lab in enumerate([*labels, *derived]):
        where = f"predictions[{eval_set!r}]"
        y = check_labels(df[f"label:{lab}"], f"{where}['label:{lab}']")
        p = check_scores(df[f"prob:{lab}"], f"{where}['prob:{lab}']")
        z = check_scores(df[f"logit:{lab}"], f"{where}['logit:{lab}']", probability=False)
        mask = ~np.isnan(y)
        if lab not in derived:
            any_label |= mask
        yl, pl, zl = y[mask] == 1.0, p[mask], z[mask]
        if yl.any() and not yl.all():
            evaluable.append(lab)
        sub = boot.subset(mask) if boot is not None else None
        thr = fitted["thresholds"][lab]
        if task == "multiclass" and lab not in derived:  # one-vs-rest rows of class `lab`, shared temperature
            pt = scaled[mask, j] if scaled is not None else None
        else:
            temp = fitted["temperatures"][lab]
            pt = apply_temperature(zl, temp) if np.isfinite(temp) else None
        _overall(out, eval_set, lab, yl, pl, pt, thr, sub, eval_cfg.ece_bins, suffix)
        for a, values in attrs.items():
            worst.setdefault(eval_set, {}).setdefault(lab, {})[a] = _subgroup_rows(
                out, eval_set, lab, a, yl, pl, values[mask], patients[mask], names[a], thr, sub, eval_cfg)
    n_any[(eval_set, "all", "all", suffix)] = int(any_label.sum())
    for a, values in attrs.items():
        n_any[(eval_set, a, "all", suffix)] = int(any_label.sum())
        for g in names[a]:
            n_any[(eval_set, a, str(g), suffix)] = int((any_label & (values == g)).sum())
    return evaluable


def _multiclass_rows(out: _Rows, eval_set: str, y, p, scaled, boot, eval_cfg) -> None:
    """The one-of-K rows (label ``all``) of one set: accuracy, balanced accuracy, NLL, Brier, top-label ECE, and
    the calibration metrics again after the softmax temperature (``scaled``; None when none was fitted)."""
    t, mask = check_one_hot(y)
    sub = boot.subset(mask) if boot is not None else None
    n = int(mask.sum())

    def add(metric, value, replicates):
        out.add(eval_set, MULTICLASS_LABEL, "all", "all", metric, value, n,
                replicates(t, q, sub.counts, sub.codes) if sub is not None and n else None, macro=False)

    bins = eval_cfg.ece_bins
    for suffix, probs in (("", p), ("_temp", scaled)):
        if probs is None:
            for metric in ("nll_multiclass", "brier_multiclass", "ece_top_label"):
                out.add(eval_set, MULTICLASS_LABEL, "all", "all", metric + suffix, math.nan, n, macro=False)
            continue
        q = probs[mask]
        if not suffix:  # the argmax does not move with the temperature
            add("accuracy", accuracy(y, p), accuracy_replicates)
            if y.shape[1] > TOP_K:  # with K <= 3 classes the true one is always among the top 3
                add(f"top{TOP_K}_accuracy", top_k_accuracy(y, p, TOP_K),
                    lambda *a: top_k_accuracy_replicates(*a, k=TOP_K))
            add("balanced_accuracy", balanced_accuracy(y, p), balanced_accuracy_replicates)
        add("nll_multiclass" + suffix, nll_multiclass(y, probs), nll_multiclass_replicates)
        add("brier_multiclass" + suffix, brier_multiclass(y, probs), brier_multiclass_replicates)
        add("ece_top_label" + suffix, ece_top_label(y, probs, n_bins=bins),
            lambda *a: ece_top_label_replicates(*a, n_bins=bins))


def _shift_rows(out: _Rows, ood_sets, evaluable: dict[str, list[str]], predictions: dict[str, pd.DataFrame],
                paired, eval_cfg) -> dict[str, list[str]]:
    """``auroc_id`` / ``auroc_ood`` / ``auroc_drop`` of every OOD set on the labels it shares with ``test``; the
    drops of the ``paired`` sets are resampled jointly with ``test`` (:func:`_paired_drop_replicates`)."""
    test = out.by_key.get((ID_SPLIT, "all", "all", "auroc"), {})
    shared = {}
    for e in ood_sets:
        ood = out.by_key.get((e, "all", "all", "auroc"), {})
        shared[e] = [lab for lab in evaluable[ID_SPLIT] if lab in evaluable[e]]
        joint = (_paired_drop_replicates(predictions[ID_SPLIT], predictions[e], shared[e], eval_cfg)
                 if e in paired and eval_cfg.n_boot > 0 else {})
        for lab in shared[e]:
            (v_id, r_id, n_id), (v_ood, r_ood, n_ood) = test[lab], ood[lab]
            r_drop = r_id - r_ood if r_id is not None and r_ood is not None else None
            r_drop = joint.get(lab, r_drop)
            out.add(e, lab, "all", "all", "auroc_id", v_id, n_id, r_id)
            out.add(e, lab, "all", "all", "auroc_ood", v_ood, n_ood, r_ood)
            out.add(e, lab, "all", "all", "auroc_drop", v_id - v_ood, n_ood, r_drop)
    return shared


def _paired_drop_replicates(test: pd.DataFrame, ood: pd.DataFrame, labels, eval_cfg) -> dict[str, np.ndarray]:
    """Per label, replicates of AUROC(test) − AUROC(OOD) from one cluster bootstrap over the patients of both sets
    (a patient in both contributes its images of each set whenever drawn), for sets that share patients."""
    ids = np.concatenate([test["patient_id"].to_numpy(dtype=object), ood["patient_id"].to_numpy(dtype=object)])
    boot = ClusterBootstrap(ids, n=ids.size, n_boot=eval_cfg.n_boot, seed=eval_cfg.bootstrap_seed)
    in_test, in_ood = boot.subset(np.arange(len(test))), boot.subset(np.arange(len(test), ids.size))
    return {lab: in_test.replicates("auroc", test[f"label:{lab}"], test[f"prob:{lab}"])
            - in_ood.replicates("auroc", ood[f"label:{lab}"], ood[f"prob:{lab}"]) for lab in labels}


# The bootstrap's matrix products (replicates x patients by one or ten columns, hundreds per run) are too small for
# BLAS threads: starting and spinning them cost more than they save (a run of 25,596 images and 14 labels at 1,000
# replicates took 134 s instead of 42 s with two threads on a busy 2-core machine), and a threaded product splits
# its sums by the number of cores, so the stored ECE/MCE intervals changed in their last bits from one machine to
# the next. One BLAS thread makes the rows a function of the predictions and the settings alone.
@threadpool_limits.wrap(limits=1, user_api="blas")
def compute_run_metrics(predictions: dict[str, pd.DataFrame], labels: list[str], subgroups: list[str],
                        eval_cfg, task: str = "multilabel", derived: Sequence[str] = (),
                        paired: Sequence[str] = (), sources: Mapping[str, object] | None = None,
                        ) -> tuple[pd.DataFrame, dict]:
    """All metric rows of one run (see the module docstring for the row conventions) and the fitted state.

    ``predictions`` maps evaluation-set name → per-sample prediction frame and must include ``val``;
    ``labels`` are the label names; ``subgroups`` the attribute columns to split by; ``eval_cfg`` a
    ``scaling.config.EvalConfig``. Returns ``(rows, info)``: ``rows`` a DataFrame with exactly the columns
    ``eval_set, label, attribute, group, metric, value, lo, hi, n``; ``info`` the thresholds and temperatures per
    label, the split they were fitted on (``val``), the metrics that are in-sample there, the labels each set can
    score and each OOD set shares with ``test``, the attributes skipped per set and the worst group's name per
    ``[eval_set][label][attribute]``. ``task='multiclass'`` scores a one-of-K task (``labels`` = its classes,
    ``label:<class>`` one-hot, ``prob:<class>`` a softmax): every row above one-vs-rest per class, plus the
    one-of-K rows (see the module docstring). ``derived`` are further binary labels (``label:``/``logit:``/``prob:``
    columns of their own, e.g. a group of classes) scored through the binary path and kept out of the per-set
    macros. ``paired`` are OOD sets that share patients with ``test``: their AUROC drop is resampled over the
    patients of both sets together. ``sources`` names where each set's frame was read from (a run store's
    predictions file), for the errors about a frame that lacks columns. While it runs, the process's BLAS uses one
    thread (the comment above says why).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not allowed; choose one of {list(TASKS)}")
    if task == "multiclass" and len(labels) < 2:
        raise ValueError(f"task='multiclass' needs at least two classes in labels, got {list(labels)}")
    if task == "multiclass" and eval_cfg.aggregate:
        raise ValueError("eval.aggregate (breast/exam pooling) is implemented for multi-label findings only, "
                         "not for task='multiclass'")
    if FIT_SPLIT not in predictions:
        raise ValueError(f"predictions must contain {FIT_SPLIT!r} (thresholds and temperatures are fitted there); "
                         f"got {sorted(predictions)}")
    if not labels:
        raise ValueError("labels must name at least one label")
    derived = list(derived)
    if set(derived) & set(labels):
        raise ValueError(f"derived labels {sorted(set(derived) & set(labels))} are also in labels")
    if derived and eval_cfg.aggregate:
        raise ValueError("eval.aggregate (breast/exam pooling) does not pool derived labels")
    for name, df in predictions.items():
        _columns(df, name, [*labels, *derived], (sources or {}).get(name))
    fitted = _fit_on_val(predictions[FIT_SPLIT], labels, eval_cfg, task, derived)
    out = _Rows(eval_cfg.alpha, outside_macro=derived)
    n_any: dict[tuple, int] = {}
    skipped: dict[str, list[str]] = {}
    worst: dict[str, dict[str, dict[str, str | None]]] = {}
    one_of_k: dict[str, dict] = {}
    evaluable = {eval_set: _evaluate_set(out, eval_set, df, labels, subgroups, fitted, eval_cfg, n_any, skipped,
                                         worst, one_of_k=one_of_k)
                 for eval_set, df in predictions.items()}
    ood_sets = [e for e in predictions if e not in (FIT_SPLIT, ID_SPLIT)]
    unknown = [e for e in paired if e not in ood_sets]
    if unknown:
        raise ValueError(f"paired={list(paired)} names {unknown}, which are not OOD sets of predictions "
                         f"(OOD sets: {ood_sets})")
    shared = (_shift_rows(out, ood_sets, evaluable, predictions, set(paired), eval_cfg) if ID_SPLIT in predictions
              else {})
    pooled = _pooled_rows(out, predictions, labels, eval_cfg, n_any)
    out.add_macro(n_any)

    rows = pd.DataFrame(out.rows, columns=list(METRIC_COLUMNS))
    rows["n"] = rows["n"].astype(np.int64)
    info = {**_json_safe(fitted), "eval_sets": list(predictions), "in_sample": {FIT_SPLIT: list(IN_SAMPLE_METRICS)},
            "evaluable_labels": evaluable, "shift_labels": shared, "paired_shift": sorted(paired), "pooled": pooled,
            "skipped_attributes": skipped, "worst_groups": worst, "multiclass_sets": one_of_k,
            "n_boot": int(eval_cfg.n_boot), "alpha": float(eval_cfg.alpha),
            "bootstrap": "patient-level cluster bootstrap, percentile intervals",
            "min_group_size": int(eval_cfg.min_group_size), "min_group_patients": int(eval_cfg.min_group_patients),
            "ece_bins": int(eval_cfg.ece_bins)}
    return rows, info


def _subgroup_rows(out: _Rows, eval_set, lab, attribute, y, p, groups, patients, names, thr, boot,
                   eval_cfg) -> str | None:
    """Rows of one label split by one attribute; returns the worst group's name (None when undefined)."""
    res = analyse_subgroups(y, p, groups, thr, min_group_size=eval_cfg.min_group_size,
                            min_group_patients=eval_cfg.min_group_patients, patients=patients,
                            n_bins=eval_cfg.ece_bins,
                            alpha=eval_cfg.alpha, boot=boot, underdiagnosis=(lab == NO_FINDING), group_names=names)
    metrics = GROUP_METRICS + (("underdiagnosis_rate",) if lab == NO_FINDING else ())
    n_summarised = 0
    for row in res.groups:
        g = row["group"]
        n_summarised += row["n"] if g in res.info["groups_summarised"] else 0
        for m in metrics:
            out.add(eval_set, lab, attribute, g, m, row[m], row["n"], res.replicates.get((g, m)),
                    lo=row[f"{m}_lo"], hi=row[f"{m}_hi"])
    for m, row in res.summary.items():
        out.add(eval_set, lab, attribute, "all", m, row["value"], n_summarised, res.replicates.get(("all", m)),
                lo=row["lo"], hi=row["hi"])
    return res.info["worst_group"]


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

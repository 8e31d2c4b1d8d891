"""Subgroup fairness: per-group discrimination, calibration and error rates, and their gaps.

Metric set (as in MEDFAIR, Zong et al. 2023; CheXclusion, Seyyed-Kalantari et al. 2021):

* per group: n, prevalence, AUROC (with a cluster-bootstrap CI), ECE (equal-width bins), TPR and FPR at one
  threshold chosen on validation data (:func:`scaling.metrics.choose_threshold`);
* summary: worst-group AUROC and AUROC gap (max - min) (MEDFAIR's headline, Zong et al. 2023), the
  equalized-odds difference max(TPR gap, FPR gap) (Hardt et al. 2016; the definition of fairlearn's
  ``equalized_odds_difference``), and, for the "No Finding" label, the under-diagnosis rate = FPR of "No Finding"
  (a sick patient called healthy; Seyyed-Kalantari et al. 2021) and its gap.

Groups with fewer than ``min_group_size`` labelled samples or fewer than ``min_group_patients`` patients are reported
with their n and NaN metrics, never merged: a group of one patient with many images (MIMIC-CXR, EMBED) is one
person, and its prevalence and error rates would publish that person's findings.
Samples whose attribute is missing form the group ``"missing"``: reported like any group but left out of the
summary (it is not a population). Summaries use the groups whose metric is defined; a gap needs two groups.
Summary intervals come from the same replicates as the group intervals (e.g. the worst-group AUROC of each
replicate); a replicate in which any summarised group is undefined is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scaling.metrics.bootstrap import ClusterBootstrap, percentile_interval
from scaling.metrics.calibration import ece, ece_replicates, weighted_mean_replicates
from scaling.metrics.discrimination import auroc, auroc_replicates
from scaling.metrics.thresholds import rate_replicates, rates_at
from scaling.metrics.validation import check_groups, check_labels, check_same_length, check_scores

MISSING_GROUP = "missing"
GROUP_METRICS = ("prevalence", "auroc", "ece", "tpr", "fpr")


@dataclass(frozen=True)
class GroupAnalysis:
    """Per-group and summary results in plain Python containers (what :func:`subgroup_report` tabulates)."""

    groups: list[dict]
    """One dict per group, sorted by name: group, n, small, and each metric with ``<metric>_lo``/``_hi``."""
    summary: dict[str, dict]
    """Summary metric → {value, lo, hi}."""
    info: dict
    """threshold used, worst group name, groups summarised, min_group_size, min_group_patients."""
    replicates: dict = field(repr=False)
    """Bootstrap replicates: ``{(group, metric): array}`` and ``{("all", summary metric): array}``; empty
    without a bootstrap."""


@dataclass(frozen=True)
class SubgroupReport:
    """Fairness report of one label's predictions split by one attribute."""

    groups: pd.DataFrame
    """One row per group (index: group name): n, small, and for each metric in ``GROUP_METRICS`` (plus
    ``underdiagnosis_rate`` when requested) the value and its ``<metric>_lo`` / ``<metric>_hi`` interval."""
    summary: pd.DataFrame
    """Index: summary metric (worst_group_auroc, auroc_gap, tpr_gap, fpr_gap, eod[, underdiagnosis_gap]);
    columns value, lo, hi."""
    info: dict = field(default_factory=dict)
    """threshold used, worst group name, groups summarised, min_group_size, min_group_patients."""


def group_labels(groups) -> np.ndarray:
    """Group names as strings, missing values as ``"missing"``."""
    s = pd.Series(groups, dtype=object)
    return np.where(s.isna().to_numpy(), MISSING_GROUP, s.astype(str).to_numpy()).astype(object)


def _group_metrics(y, p, rows, threshold, n_bins, boot):
    """Point values and replicates of the per-group metrics on sample positions ``rows``."""
    yg, pg = y[rows], p[rows]
    values = {"prevalence": float(yg.mean()), "auroc": auroc(yg, pg), "ece": ece(yg, pg, n_bins=n_bins)}
    values["tpr"], values["fpr"] = rates_at(yg, pg, threshold)
    reps = {}
    if boot is not None:
        codes = boot.codes[rows]
        reps["prevalence"] = weighted_mean_replicates(yg.astype(np.float64), boot.counts, codes)
        reps["auroc"] = auroc_replicates(yg, pg, boot.counts, codes)
        reps["ece"] = ece_replicates(yg, pg, boot.counts, codes, n_bins=n_bins)
        reps["tpr"], reps["fpr"] = rate_replicates(yg, pg, threshold, boot.counts, codes)
    return values, reps


def analyse_subgroups(y: np.ndarray, p: np.ndarray, groups: np.ndarray, threshold: float, *,
                      min_group_size: int = 10, min_group_patients: int = 10, patients: np.ndarray | None = None,
                      n_bins: int = 10, alpha: float = 0.05, boot: ClusterBootstrap | None = None,
                      underdiagnosis: bool = False, group_names=None) -> GroupAnalysis:
    """The engine of :func:`subgroup_report` on already-validated, labelled rows (no pandas: it runs per label,
    attribute and evaluation set of every study run).

    ``y`` boolean, ``p`` probabilities, ``groups`` string names (see :func:`group_labels`), all of one length;
    ``boot`` (optional) is a :class:`ClusterBootstrap` whose ``codes`` are aligned with these rows.
    ``patients`` (optional, aligned with the rows) are counted against ``min_group_patients``; without them every
    sample counts as a patient of its own.
    ``group_names`` lists groups to report even when none of their samples is labelled (n = 0); default: the
    groups present in ``groups``.
    """
    metrics = GROUP_METRICS + (("underdiagnosis_rate",) if underdiagnosis else ())
    names = sorted(set(groups.tolist()) | set(group_names or ()))
    table, replicates = [], {}
    for g in names:
        rows = np.flatnonzero(groups == g)
        n_patients = rows.size if patients is None else len(set(patients[rows].tolist()))
        row = {"group": g, "n": int(rows.size),
               "small": bool(rows.size < max(min_group_size, 1) or n_patients < min_group_patients)}
        values, reps = ({}, {}) if row["small"] else _group_metrics(y, p, rows, threshold, n_bins, boot)
        if underdiagnosis and values:
            values["underdiagnosis_rate"] = values["fpr"]
            if reps:
                reps["underdiagnosis_rate"] = reps["fpr"]
        for m in metrics:
            row[m] = values.get(m, np.nan)
            row[f"{m}_lo"], row[f"{m}_hi"] = percentile_interval(reps[m], alpha) if m in reps else (np.nan, np.nan)
        table.append(row)
        replicates[g] = reps
    summary, summary_reps, info = _summary(table, replicates, alpha, underdiagnosis)
    info.update({"threshold": float(threshold), "min_group_size": int(min_group_size),
                 "min_group_patients": int(min_group_patients)})
    flat = {(g, m): r for g, reps in replicates.items() for m, r in reps.items()}
    if boot is not None:
        flat.update({("all", m): r for m, r in summary_reps.items()})
    return GroupAnalysis(table, summary, info, flat)


def _summary(table: list[dict], replicates: dict, alpha: float, underdiagnosis: bool):
    eligible = [row for row in table if not row["small"] and row["group"] != MISSING_GROUP]
    nan = np.full(1, np.nan)

    def spread(metric, reducer, need):
        ok = [row for row in eligible if np.isfinite(row[metric])]
        if len(ok) < need:
            return np.nan, nan
        value = reducer(np.array([row[metric] for row in ok]))
        reps = [replicates[row["group"]][metric] for row in ok if metric in replicates[row["group"]]]
        return float(value), reducer(np.vstack(reps), axis=0) if len(reps) == len(ok) else nan

    def gap(values, axis=None):
        return np.max(values, axis=axis) - np.min(values, axis=axis)

    rows = {"worst_group_auroc": spread("auroc", np.min, 1), "auroc_gap": spread("auroc", gap, 2),
            "tpr_gap": spread("tpr", gap, 2), "fpr_gap": spread("fpr", gap, 2)}
    (tg, tg_rep), (fg, fg_rep) = rows["tpr_gap"], rows["fpr_gap"]
    rows["eod"] = (max(tg, fg) if np.isfinite(tg) and np.isfinite(fg) else np.nan,
                   np.maximum(tg_rep, fg_rep) if tg_rep.shape == fg_rep.shape else nan)
    if underdiagnosis:
        rows["underdiagnosis_gap"] = rows["fpr_gap"]
    summary = {k: dict(zip(("value", "lo", "hi"), (v, *percentile_interval(r, alpha)))) for k, (v, r) in rows.items()}
    defined = [row for row in eligible if np.isfinite(row["auroc"])]
    info = {"worst_group": min(defined, key=lambda r: r["auroc"])["group"] if defined else None,
            "groups_summarised": [row["group"] for row in eligible]}
    return summary, {k: r for k, (_, r) in rows.items()}, info


def subgroup_report(y, p, groups, threshold: float, *, cluster=None, min_group_size: int = 10,
                    min_group_patients: int = 10, n_boot: int = 200, alpha: float = 0.05, seed: int = 0,
                    n_bins: int = 10, underdiagnosis: bool = False) -> SubgroupReport:
    """Fairness report of one label's probabilities ``p`` split by the attribute values ``groups``.

    ``threshold`` is the operating point chosen on validation data (:func:`scaling.metrics.choose_threshold`:
    max-F1, fixed sensitivity, fixed specificity or a fixed value); it is applied unchanged to every group.
    ``cluster`` (patient ids) makes the AUROC/rate intervals a patient-level bootstrap (``n_boot`` replicates,
    ``n_boot=0`` for no intervals). Rows whose label is NaN are masked; groups with fewer than ``min_group_size``
    labelled samples or fewer than ``min_group_patients`` patients (``cluster``; without it each sample is a patient
    of its own) get n and NaN metrics. Set ``underdiagnosis=True`` for the "No Finding" label to add the
    under-diagnosis rate (its FPR) and gap. Returns a :class:`SubgroupReport`.
    """
    y = check_labels(y, "y")
    p = check_scores(p, "p")
    n = check_same_length(y=y, p=p)
    g = check_groups(groups, "groups", n=n)
    ids = None if cluster is None else np.asarray(cluster, dtype=object)
    if ids is not None:
        check_same_length(y=y, cluster=ids)
    boot = ClusterBootstrap(ids, n=n, n_boot=n_boot, seed=seed) if n_boot else None
    mask = ~np.isnan(y)
    res = analyse_subgroups(y[mask] == 1.0, p[mask], group_labels(g[mask]), threshold,
                            min_group_size=min_group_size, min_group_patients=min_group_patients,
                            patients=None if ids is None else ids[mask], n_bins=n_bins, alpha=alpha,
                            boot=None if boot is None else boot.subset(mask), underdiagnosis=underdiagnosis)
    summary = pd.DataFrame.from_dict(res.summary, orient="index")
    summary.index.name = "metric"
    return SubgroupReport(pd.DataFrame(res.groups).set_index("group"), summary, res.info)

"""Views recomputed from stored per-sample predictions: selective-prediction curves, reliability diagrams and paired
model comparisons.

Metrics in the store are per run; these need the samples themselves — the retained subset at each referral rate,
or several models' scores on the same patients — which is why predictions are stored at all (``docs/design.md``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import numpy as np
import pandas as pd

from scaling.config import mean_var_source
from scaling.metrics import holm, or_test_brier, or_test_labels, or_test_macro, referral_curve, reliability_diagram
from scaling.metrics.bootstrap import cluster_codes
from scaling.metrics.fairness import MISSING_GROUP, group_labels
from scaling.metrics.run_metrics import calibrated_probabilities
from scaling.study.aggregate import cell_interval, plain_cells
from scaling.study.store import RunStore, common_samples
from scaling.study.threads import thread_map

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _zero_variance_summary(table: str):
    """One log line for the paired tests of ``table`` whose variance estimate is 0 (their p-value and interval are
    NaN, which Holm's adjustment counts as no test) instead of one warning per test, which says neither which
    comparison nor how many. Other warnings pass unchanged. Entered in the calling thread around the worker
    threads, whose warnings reach the same (process-wide) record."""
    from scaling.metrics.validation import MetricWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        yield
    zero = [w for w in caught if issubclass(w.category, MetricWarning)]
    for w in caught:
        if not issubclass(w.category, MetricWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if zero:
        log.warning("%s: %d paired test(s) had no variation to refer the difference to (variance estimate 0): "
                    "p_value and the interval are NaN in those rows, no test for Holm's adjustment; e.g. %s", table,
                    len(zero), zero[0].message)

REFERRAL = tuple(np.round(np.arange(0.0, 0.51, 0.05), 2))
"""Referral rates of the selective-prediction curves (0 = keep everything, 0.5 = refer half)."""


def _label_names(pred: pd.DataFrame) -> list[str]:
    return [c.split(":", 1)[1] for c in pred.columns if c.startswith("label:") and f"prob:{c[6:]}" in pred.columns]


def selective_curve(pred: pd.DataFrame, referral=REFERRAL, thresholds: dict | None = None) -> np.ndarray:
    """Macro AUROC of the retained samples at each referral rate (:func:`scaling.metrics.referral_curve` per label,
    least confident referred first), averaged over the labels where it is defined.

    Confidence is the distance from each label's decision threshold (``thresholds``, fitted on validation; 0.5
    where absent or undefined). With rare findings the operating point is far below 0.5, and ranking by distance
    from 0.5 would refer the most suspicious cases first — the opposite of referring the uncertain ones.
    """
    per_label = []
    thresholds = thresholds or {}
    for lab in _label_names(pred):
        y = pred[f"label:{lab}"].to_numpy(float)
        # A threshold is None (NaN in the run's JSON) where validation held one class of that label.
        thr = thresholds.get(lab)
        curve = referral_curve(y, pred[f"prob:{lab}"].to_numpy(float), referral_rates=list(referral),
                               threshold=0.5 if thr is None else float(thr))
        per_label.append(curve["value"].to_numpy(float))
    if not per_label:
        return np.full(len(referral), math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a rate where every label is undefined: NaN
        return np.nanmean(np.array(per_label), axis=0)


def _bootstrap_band(pred: pd.DataFrame, referral, thresholds: dict, n_boot: int, confidence: float, seed: int = 0):
    """Patient-level bootstrap interval of a single run's curve (used when a cell has one seed)."""
    rng = np.random.default_rng(seed)
    groups = pred.groupby("patient_id", sort=False).indices if "patient_id" in pred else {
        i: np.array([i]) for i in range(len(pred))}
    members = list(groups.values())
    reps = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        reps.append(selective_curve(pred.iloc[np.concatenate([members[i] for i in pick])], referral, thresholds))
    q = (50 * (1 - confidence), 50 * (1 + confidence))
    with warnings.catch_warnings():  # a rate undefined in every replicate: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(np.array(reps), q, axis=0)


def selective_curves(store_root, df: pd.DataFrame, models: dict[str, pd.Series], eval_set: str = "test",
                     referral=REFERRAL, confidence: float = 0.95, n_boot: int = 100) -> pd.DataFrame:
    """Selective-prediction curves of named cells (e.g. :func:`scaling.study.tables.headline_models`).

    One row per model × referral rate: ``mean`` over the cell's seeds and an interval at ``confidence``: each run's
    patient-level bootstrap band, and with several seeds those combined with the seeds' spread as a cell's
    interval is (:func:`scaling.study.aggregate.cell_interval`), clipped to [0, 1].
    """
    store = RunStore(store_root)
    rows = []
    for name, cell in models.items():
        run_ids = cell_runs(df, dict(cell))["run_id"].tolist()
        run_ids = [r for r in run_ids if eval_set in store.eval_sets(r)]
        thresholds = {r: store.read_meta(r).get("fitted_on_val", {}).get("thresholds", {}) for r in run_ids}
        curves = [selective_curve(store.read_predictions(r, eval_set), referral, thresholds[r]) for r in run_ids]
        if not curves:
            continue
        arr = np.array(curves)
        bands = np.array([_bootstrap_band(store.read_predictions(r, eval_set), referral, thresholds[r], n_boot,
                                          confidence, seed=j) for j, r in enumerate(run_ids)])  # [run, lo/hi, rate]
        with warnings.catch_warnings():  # a rate undefined in every run: NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(arr, axis=0)
        both = [cell_interval(arr[:, i], bands[:, 0, i], bands[:, 1, i], confidence) for i in range(arr.shape[1])]
        # AUROC lives in [0, 1]; a few seeds' interval can overshoot it, which would read as a bug, not as noise.
        lo, hi = np.clip([b[0] for b in both], 0, 1), np.clip([b[1] for b in both], 0, 1)
        label = f"{name}: {cell['backbone']} / {cell['pretrained']}"
        rows += [{"model": label, "referral": r, "mean": m, "lo": a, "hi": b, "n_seeds": len(arr)}
                 for r, m, a, b in zip(referral, mean, lo, hi)]
    return pd.DataFrame(rows, columns=["model", "referral", "mean", "lo", "hi", "n_seeds"])


def cell_runs(df: pd.DataFrame, cell: dict) -> pd.DataFrame:
    """Run ids and seeds of one grid cell, matched on the backbone / pretrained / fraction / protocol / shots /
    reinit / shuffle keys that ``cell`` and ``df`` have (so a probe run is never another seed of its fine-tuned cell; the
    derived axes, such as a NaN pretraining size, would never compare equal)."""
    keys = ("backbone", "pretrained", "fraction", "protocol", "shots", "reinit", "shuffle")
    m = np.logical_and.reduce([df[c] == cell[c] for c in keys if c in cell and c in df])
    return df[m][["run_id", "seed"]].drop_duplicates().sort_values("seed")


HOLM_FAMILIES = {"macro_auroc": "the macro-AUROC comparisons (the study's questions: the primary family)",
                 "label_auroc": "the per-label AUROC comparisons, which break the macro ones down",
                 "subgroup_auroc": "the macro-AUROC comparisons within each patient subgroup (full data)",
                 "brier": "the macro Brier-score comparisons, raw and temperature-scaled (full data)"}
"""The ``holm_family`` of a comparison row: the rows its ``p_holm`` was adjusted over (one family per value)."""

COMPARED_AXES = ("backbone", "pretrained")
"""The study axes the pairwise comparisons step along: bigger backbones, then more pretraining."""


def pairwise_comparisons(store_root, df: pd.DataFrame, eval_sets=("test",), fractions=None,
                         workers: int | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """The seed paper's two questions as paired tests, on each of ``eval_sets`` at each data fraction (``fractions``,
    default every fraction of ``df``, the full data first): each backbone against the smallest with the same
    pretraining (``axis = "backbone"``), and each pretraining source against the one with the fewest images
    (scratch first) on the same backbone (``axis = "pretrained"``) — does scale help at all? — and, from the third
    step on, each also against the step below it: does the next size, or more pretraining images, still help
    (BiT-M against BiT-S, not only both against scratch)? A Mean Var init (``meanvar:<source>``) is no step of that
    ladder: it is compared with the reference (what the scale of the weights alone gives) and its source with it
    (what the pretrained features add beyond their scale; Raghu et al. 2019). ``vs`` names the reference;
    ``backbone`` and ``pretrained`` the compared cell. A fraction below 1 asks the third question: does it still
    hold with few labels?

    Each comparison is on the macro AUROC (``label = "macro"``: the labels the set can score,
    :func:`scaling.metrics.or_test_macro`) and per label, over the seeds both cells have. The runs are joined on
    sample id, so every comparison is paired on the same samples, and tested by :func:`scaling.metrics.or_test`:
    with two or more shared seeds, Obuchowski–Rockette, seeds and patients both random (does the bigger backbone
    win whatever the seed?), with r − 1 degrees of freedom for 2–4 seeds and Hillis's from 5 on; with one seed,
    DeLong's test of that pair (``method`` says which: ``or``, ``or-hillis``, ``delong``). A test whose estimated
    variance is 0 has a NaN p-value, which Holm's adjustment counts as no test. Either way the patient variance is
    clustered by patient (Obuchowski 1997), so several images of one patient count as correlated, not as
    independent evidence. One row per comparison and label: seeds, images
    and patients, both seed-mean AUROCs, their difference with its interval, the degrees of freedom, the p-value and
    ``p_holm``, the p-value adjusted by Holm's step-down method (:func:`scaling.metrics.holm`) over its family —
    every macro row, or every per-label row: ``holm_family`` names it (:data:`HOLM_FAMILIES`) — which bounds the
    chance that any test of the family is a false
    positive. ``workers``: comparisons tested at once, on threads (:mod:`scaling.study.threads`; None: every usable
    core); the table does not depend on it. ``diff_lo``/``diff_hi`` bound a 1 − ``alpha`` interval (the report
    passes the study's ``eval.alpha``). Only plain fine-tuning cells of ``df`` are compared
    (:func:`scaling.study.aggregate.plain_cells`, as in the report; so in the other two comparison tables): a probe
    run of a cell is not another seed of its fine-tuned runs.
    """
    df = plain_cells(df)
    cols = ["axis", "eval_set", "fraction", "pretrained", "backbone", "vs", "label", "n_seeds", "n", "n_patients",
            "auroc", "auroc_vs", "diff", "diff_lo", "diff_hi", "df", "p_value", "p_holm", "method", "holm_family"]
    if fractions is None:
        fractions = sorted(df["fraction"].dropna().unique(), reverse=True)
    pairs = _compared_pairs(store_root, df, eval_sets, fractions)
    with _zero_variance_summary("pairwise comparisons"):
        rows = [row for got in thread_map(lambda pair: _compare_cell(pair[1], pair[0], pair[2], alpha), pairs,
                                          workers) for row in got]
    out = pd.DataFrame(rows, columns=cols)
    out["holm_family"] = np.where(out["label"] == "macro", "macro_auroc", "label_auroc")
    for family in out.groupby("holm_family").groups.values():  # the headline macro tests, the per-label ones
        out.loc[family, "p_holm"] = holm(out.loc[family, "p_value"].to_numpy(float))
    return out


def subgroup_comparisons(store_root, df: pd.DataFrame, eval_sets=("test",), fraction=None,
                         workers: int | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """The comparisons of :func:`pairwise_comparisons` within every patient subgroup, at full data (``fraction``,
    default the largest): does the bigger or better-pretrained model help each group — women and men, every age
    band — and not only on average?

    One row per comparison × attribute × group that the runs' metric rows summarise (a group of at least
    ``eval.min_group_size`` samples and ``eval.min_group_patients`` patients; the ``missing`` group is left out, as
    in the fairness summaries): the macro AUROC over the labels with both classes inside the group, paired on the
    group's samples, clustered by patient, tested by :func:`scaling.metrics.or_test_macro` over the shared seeds.
    ``p_holm`` is Holm's adjustment over this table alone (its own family: a finding about a group, read beside the
    overall comparison). ``workers`` as in :func:`pairwise_comparisons`.
    """
    df = plain_cells(df)
    cols = ["axis", "eval_set", "fraction", "pretrained", "backbone", "vs", "attribute", "group", "n_seeds", "n",
            "n_patients", "auroc", "auroc_vs", "diff", "diff_lo", "diff_hi", "df", "p_value", "p_holm", "method",
            "holm_family"]
    if fraction is None:
        fraction = df["fraction"].max()
    groups = df[(df["metric"] == "auroc") & (df["label"] == "macro") & (df["attribute"] != "all")
                & (df["group"] != MISSING_GROUP) & np.isfinite(df["value"].to_numpy(dtype=float))]
    summarised = {e: list(g[["attribute", "group"]].drop_duplicates().sort_values(["attribute", "group"])
                          .itertuples(index=False, name=None)) for e, g in groups.groupby("eval_set")}
    sets = [e for e in eval_sets if summarised.get(e)]

    def compare(pair) -> list[dict]:  # every summarised group of one comparison: on a thread of its own
        cell, preds, r, _ = pair
        labels, y_all, patients, scores, first = _paired_predictions(preds)
        rows = []
        for attribute, group in summarised[cell["eval_set"]]:
            if attribute not in first:
                continue
            inside = group_labels(first[attribute].to_numpy(dtype=object)) == group
            defined = [i for i in range(len(labels))
                       if {0.0, 1.0} <= set(y_all[inside, i][np.isfinite(y_all[inside, i])])]
            if not defined:
                continue
            ok = inside & np.isfinite(y_all[:, defined]).any(axis=1)
            res = or_test_macro(y_all[ok][:, defined], scores[:r][:, ok][..., defined],
                                scores[r:][:, ok][..., defined], alpha=alpha, cluster=patients[ok])
            rows.append({**cell, "attribute": attribute, "group": group, "n_seeds": r, **_counts(ok, patients),
                         **_test_fields(res)})
        return rows

    pairs = _compared_pairs(store_root, df, sets, [fraction])
    with _zero_variance_summary("subgroup comparisons"):
        out = pd.DataFrame([row for got in thread_map(compare, pairs, workers) for row in got], columns=cols)
    out["p_holm"] = holm(out["p_value"].to_numpy(float))
    out["holm_family"] = "subgroup_auroc"
    return out


def brier_comparisons(store_root, df: pd.DataFrame, eval_sets=("test",), fraction=None,
                      workers: int | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """The comparisons of :func:`pairwise_comparisons` on the macro Brier score, at full data (``fraction``, default
    the largest): are the bigger or better-pretrained model's probabilities better — under shift too — as they come
    out of the network (``scaling = "raw"``) and after each run's temperatures fitted on validation
    (``"temperature"``)?

    The Brier score (mean squared error of the probability; lower is better) is a proper scoring rule: it rewards
    calibration and discrimination together, and unlike ECE it has no binning and an unbiased mean, so two models
    can be tested on it (:func:`scaling.metrics.or_test_brier`: seeds and patients random, clustered by patient;
    one seed: the paired z-test). Over the labels the set can score (both classes), paired on the same samples.
    ``diff`` < 0: the compared cell's probabilities are better. ``p_holm`` is over this table alone. ``workers`` as
    in :func:`pairwise_comparisons`.
    """
    df = plain_cells(df)
    cols = ["axis", "eval_set", "fraction", "pretrained", "backbone", "vs", "scaling", "n_seeds", "n", "n_patients",
            "brier", "brier_vs", "diff", "diff_lo", "diff_hi", "df", "p_value", "p_holm", "method", "holm_family"]
    if fraction is None:
        fraction = df["fraction"].max()
    store = RunStore(store_root)
    fitted = {}

    def with_temperatures(pairs):  # in the calling thread: each run's fitted temperatures read once
        for cell, preds, r, ids in pairs:
            for rid in ids:
                if rid not in fitted:
                    fitted[rid] = store.read_meta(rid).get("fitted_on_val", {})
            yield cell, preds, r, [fitted[rid] for rid in ids]

    def compare(pair) -> list[dict]:  # raw and temperature-scaled test of one comparison: on a thread of its own
        cell, preds, r, temperatures = pair
        labels, y_all, patients, raw, first = _paired_predictions(preds)
        defined = [i for i in range(len(labels)) if {0.0, 1.0} <= set(y_all[:, i][np.isfinite(y_all[:, i])])]
        if not defined:
            return []
        # the temperature-scaled probabilities, aligned like the raw ones (on the first run's sample order)
        order = first["sample_id"]
        scaled = np.stack([calibrated_probabilities(p.set_index("sample_id").loc[order].reset_index(), labels,
                                                    fit).to_numpy(float) for p, fit in zip(preds, temperatures)])
        ok = np.isfinite(y_all[:, defined]).any(axis=1)
        rows = []
        for scaling, probs in (("raw", raw), ("temperature", scaled)):
            p = probs[:, ok][..., defined]
            res = or_test_brier(y_all[ok][:, defined], p[:r], p[r:], alpha=alpha, cluster=patients[ok])
            rows.append({**cell, "scaling": scaling, "n_seeds": r, **_counts(ok, patients), "brier": res.value_a,
                         "brier_vs": res.value_b, "diff": res.diff, **_diff_interval(res), "df": res.df,
                         "p_value": res.p_value, "method": res.method})
        return rows

    pairs = with_temperatures(_compared_pairs(store_root, df, eval_sets, [fraction]))
    with _zero_variance_summary("Brier comparisons"):
        out = pd.DataFrame([row for got in thread_map(compare, pairs, workers) for row in got], columns=cols)
    out["p_holm"] = holm(out["p_value"].to_numpy(float))
    out["holm_family"] = "brier"
    return out


def _compared_pairs(store_root, df: pd.DataFrame, eval_sets, fractions):
    """Every comparison of :func:`pairwise_comparisons`: its keys (a row's first columns), the predictions of the
    compared cell's runs then the reference's, seed by seed, the number of shared seeds, and the runs' ids."""
    store = RunStore(store_root)
    # one row per run and set is all the grouping below needs (the tidy table has one per metric and label)
    df = df.drop_duplicates(["run_id", "eval_set"])
    for axis in COMPARED_AXES:
        fixed = "pretrained" if axis == "backbone" else "backbone"
        for eval_set in eval_sets:
            for fraction in fractions:
                cells = df[(df["fraction"] == fraction) & (df["eval_set"] == eval_set)]
                for held, g in cells.groupby(fixed, sort=True):
                    read: dict[str, pd.DataFrame] = {}  # each run's predictions read once, however often compared
                    for value, vs in _axis_steps(_ordered_values(g, axis)):
                        runs = cell_runs(g, {axis: value}).set_index("seed")["run_id"]
                        ref_runs = cell_runs(g, {axis: vs}).set_index("seed")["run_id"]
                        seeds = sorted(set(runs.index) & set(ref_runs.index))
                        if not seeds:
                            continue
                        ids = [*runs[seeds], *ref_runs[seeds]]
                        for rid in ids:
                            if rid not in read:
                                read[rid] = store.read_predictions(rid, eval_set)
                        yield ({"axis": axis, "eval_set": eval_set, "fraction": float(fraction), fixed: held,
                                axis: value, "vs": vs}, [read[rid] for rid in ids], len(seeds), ids)


def _steps(values: list) -> list[tuple]:
    """The (compared, reference) pairs along one axis, ``values`` ordered from the reference on: each value against
    the first (does scale help at all?) and, from the third on, also against the one before it (does the next step
    still help, or has the gain saturated?)."""
    pairs = []
    for i, value in enumerate(values[1:], start=1):
        pairs.append((value, values[0]))
        if i >= 2:
            pairs.append((value, values[i - 1]))
    return pairs


def _axis_steps(values: list) -> list[tuple]:
    """:func:`_steps` over ``values`` (ordered from the reference on) but the Mean Var inits (``meanvar:<source>``,
    which have no pretraining images of their own), then two pairs for each of those: it against the reference, and
    its source against it."""
    plain = [v for v in values if mean_var_source(str(v)) is None]
    pairs = _steps(plain)
    for value in values:
        source = mean_var_source(str(value))
        if source is None:
            continue
        if plain:
            pairs.append((value, plain[0]))
        if source in plain:
            pairs.append((source, value))
    return pairs


def _ordered_values(g: pd.DataFrame, axis: str) -> list:
    """The values of ``axis`` in ``g`` from the reference on: backbones by parameter count, pretraining sources by
    image count (scratch = 0 first, an unknown count last), ties by name."""
    key = "n_params" if axis == "backbone" else "pretrain_images"
    cells = g.drop_duplicates(axis).assign(_key=g[key].fillna(np.inf) if key in g else 0.0)
    return list(cells.sort_values(["_key", axis])[axis])


def _compare_cell(preds: list[pd.DataFrame], cell: dict, r: int, alpha: float = 0.05) -> list[dict]:
    """The macro row and the per-label rows of one comparison: ``preds`` holds the compared cell's r runs, then the
    reference's, seed by seed."""
    labels, y_all, patients, scores, _ = _paired_predictions(preds)
    cell = {**cell, "n_seeds": r}
    defined = [i for i in range(len(labels)) if {0.0, 1.0} <= set(y_all[:, i][np.isfinite(y_all[:, i])])]
    rows, each = [], {}
    if defined:  # the macro over the labels this set can score, as in the run's own macro AUROC; each label's test
        ok = np.isfinite(y_all[:, defined]).any(axis=1)  # on its own labelled rows (a subset of these)
        res, tests = or_test_labels(y_all[ok][:, defined], scores[:r][:, ok][..., defined],
                                    scores[r:][:, ok][..., defined], alpha=alpha, cluster=patients[ok])
        rows.append({**cell, "label": "macro", **_counts(ok, patients), **_test_fields(res)})
        each = dict(zip(defined, tests))
    for i, lab in enumerate(labels):
        row = {**cell, "label": lab, **_counts(np.isfinite(y_all[:, i]), patients)}
        if i in each:  # else one class only in this label: no AUROC, no test (the NaN row says so)
            row.update(_test_fields(each[i]))
        rows.append(row)
    return rows


def _counts(rows: np.ndarray, patients: np.ndarray) -> dict:
    """Images and patients of the labelled rows of a comparison."""
    return {"n": int(rows.sum()), "n_patients": int(pd.unique(patients[rows]).size)}


def _diff_interval(res) -> dict:
    """``diff_lo``/``diff_hi`` of a test's difference, cut at ±1, the most two AUROCs (or Brier scores) can differ
    by — with two seeds (1 degree of freedom) the interval can run past it. NaN stays NaN."""
    return {"diff_lo": max(res.lo, -1.0), "diff_hi": min(res.hi, 1.0)}


def _test_fields(res) -> dict:
    """The columns of a comparison row from an :class:`scaling.metrics.ORTest`."""
    return {"auroc": res.auroc_a, "auroc_vs": res.auroc_b, "diff": res.diff, **_diff_interval(res), "df": res.df,
            "p_value": res.p_value, "method": res.method}


def _paired_predictions(preds: list[pd.DataFrame]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                                             pd.DataFrame]:
    """The samples every run scored, in the first run's order: its label names, labels (N, L) and patients (N,) as
    integer codes in sorted order of their ids (numbered once here, not again by every test of every label), every
    run's probabilities (runs, N, L), aligned on sample id, and the first run's rows of them (attributes)."""
    labels = _label_names(preds[0])
    ids = common_samples(preds)
    prob_cols = [f"prob:{lab}" for lab in labels]
    rows = [pd.Index(pred["sample_id"]).get_indexer(ids) for pred in preds]
    first = preds[0].iloc[rows[0]]
    scores = np.stack([pred[prob_cols].to_numpy(float)[at] for pred, at in zip(preds, rows)])
    return (labels, first[[f"label:{lab}" for lab in labels]].to_numpy(float),
            cluster_codes(first["patient_id"]), scores, first)


def reliability_curves(store_root, df: pd.DataFrame, eval_sets, n_bins: int = 10) -> pd.DataFrame:
    """Reliability-diagram bins per evaluation set × pretraining source × backbone at full data, before and after the
    temperature each run fitted on validation.

    Every labelled (sample, label) pair of every label and every seed of the cell is pooled into one diagram
    (:func:`scaling.metrics.reliability_diagram`, ``n_bins`` equal-width bins): the run's metric rows hold the
    per-label ECE and its macro; the diagram shows where, over the probability range, a model is over- or
    under-confident. One row per bin with ``scaling`` = ``raw`` or ``temperature``.
    """
    store = RunStore(store_root)
    cols = ["eval_set", "pretrained", "backbone", "n_params", "scaling", "lo", "hi", "n", "mean_predicted",
            "fraction_positive", "gap"]
    full = df[df["fraction"] == df["fraction"].max()].drop_duplicates("run_id")
    rows = []
    cells = full.groupby(["pretrained", "backbone", "n_params"], sort=True)
    for e in eval_sets:
        for (src, bb, n_params), g in cells:
            y, raw, cal = [], [], []
            for rid in g["run_id"]:
                if e not in store.eval_sets(rid):
                    continue
                pred = store.read_predictions(rid, e)
                labels = _label_names(pred)
                pt = calibrated_probabilities(pred, labels, store.read_meta(rid).get("fitted_on_val", {}))
                for lab in labels:
                    keep = pred[f"label:{lab}"].notna().to_numpy()
                    y.append(pred[f"label:{lab}"].to_numpy(float)[keep])
                    raw.append(pred[f"prob:{lab}"].to_numpy(float)[keep])
                    cal.append(pt[lab].to_numpy(float)[keep])
            if not y or not sum(len(v) for v in y):
                continue
            for scaling, p in (("raw", raw), ("temperature", cal)):
                d = reliability_diagram(np.concatenate(y), np.concatenate(p), n_bins=n_bins)
                rows += [{"eval_set": e, "pretrained": src, "backbone": bb, "n_params": n_params, "scaling": scaling,
                          **r} for r in d.to_dict("records")]
    return pd.DataFrame(rows, columns=cols)


def reliability_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Per curve of :func:`reliability_curves`: the pooled (sample, label) pairs and the ECE the diagram shows
    (sum over bins of n_k · |gap_k| / n), raw and after temperature scaling."""
    if curves.empty:
        return pd.DataFrame()
    keys = ["eval_set", "pretrained", "backbone", "n_params"]
    c = curves.assign(w=curves["n"] * curves["gap"].abs().fillna(0.0))
    agg = c.groupby([*keys, "scaling"], sort=False).agg(n=("n", "sum"), w=("w", "sum")).reset_index()
    agg["ece"] = agg["w"] / agg["n"]
    wide = agg.pivot_table(index=[*keys, "n"], columns="scaling", values="ece", aggfunc="first").reset_index()
    wide.columns.name = None
    order = {e: i for i, e in enumerate(pd.unique(curves["eval_set"]))}  # the order the sets were asked for
    wide = wide.assign(_o=wide["eval_set"].map(order)).sort_values(["_o", "pretrained", "n_params"]).drop(columns="_o")
    return wide.reset_index(drop=True).rename(
        columns={"n": "pairs", "raw": "pooled ECE", "temperature": "pooled ECE (temperature)"})

"""Derived study views computed from the tidy table and its summary: data efficiency, OOD drop and the labels it
uses, headline models.

Each function returns a pandas table the report prints and the plots draw, so a figure never shows a number that
is not also in a table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from scaling.metrics import data_efficiency as metrics_data_efficiency
from scaling.metrics import rescale_resample, satterthwaite_widening
from scaling.study.aggregate import CELL, full_fraction, plain_cells, select, summarise


def ood_sets(df: pd.DataFrame) -> list[str]:
    """Evaluation sets other than ``val`` and ``test`` (the distribution-shift sets)."""
    return sorted(e for e in df["eval_set"].dropna().unique() if e not in ("val", "test"))


def eval_set_order(df: pd.DataFrame) -> list[str]:
    """Every evaluation set of a results table in reading order: ``val``, ``test``, then the OOD sets."""
    present = set(df["eval_set"].dropna().unique())
    return [e for e in ("val", "test") if e in present] + ood_sets(df)


def baseline_cell(summary: pd.DataFrame, eval_set: str = "test") -> pd.Series | None:
    """The full-data reference for data efficiency: the smallest backbone with the least pretraining, at fraction 1.

    This is the seed paper's question — how much labelled data does a larger / better-pretrained model need to
    match what the modest default reaches with all of it. None when the summary has no such row.
    """
    s = select(summary, "auroc", eval_set)
    s = s[s["fraction"] == full_fraction(summary)] if len(s) else s
    if s.empty:
        return None
    least = s.assign(_pi=s["pretrain_images"].fillna(np.inf)).sort_values(["n_params", "_pi", "pretrained"])
    return least.iloc[0].drop(labels="_pi")


def data_efficiency(df: pd.DataFrame, summary: pd.DataFrame, eval_set: str = "test",
                    confidence: float = 0.95) -> pd.DataFrame:
    """Per backbone × pretraining source: the fraction of labels needed to match the full-data baseline AUROC.

    :func:`scaling.metrics.data_efficiency` on the cell's AUROC-vs-fraction curves, one column per seed (the
    seeds that completed every fraction), against the baseline's seeds at full data: log-linear interpolation of
    the mean curve to the baseline's mean, ``confidence`` interval from resampling the cell's seeds and the
    baseline's (its mean is a mean over seeds too); ``lo``/``hi`` are NaN with one seed (nothing to resample). The
    baseline (:func:`baseline_cell`) has no row: its own curve reaches its own full-data AUROC by definition.

    Censored crossings lie outside the grid: ``censored`` is ``below`` when even the smallest fraction reaches the
    baseline (``fraction_to_match`` is then that fraction, an upper bound: the true crossing may be lower) and
    ``above`` when the curve never reaches it (``fraction_to_match`` NaN: more than the largest fraction). ``lo`` at
    the smallest fraction is such a bound too, and ``hi = inf`` means that more than (1 − confidence)/2 of the
    replicates never reach the baseline. ``fraction_to_match_text`` writes the three as a reader should take them:
    ``0.41 [≤ 0.25, 0.78]``, ``≤ 0.25``, ``> 1``.
    """
    base = baseline_cell(summary, eval_set)
    cols = ["pretrained", "backbone", "n_params", "auroc_full", "fraction_to_match", "lo", "hi", "censored",
            "fraction_to_match_text", "n_seeds", "baseline", "baseline_auroc"]
    if base is None:
        return pd.DataFrame(columns=cols)
    target = float(base["mean"])
    runs = select(df, "auroc", eval_set)
    smallest, largest = float(runs["fraction"].min()), float(runs["fraction"].max())
    is_base = (runs["pretrained"] == base["pretrained"]) & (runs["backbone"] == base["backbone"])
    base_seeds = runs.loc[is_base & (runs["fraction"] == base["fraction"]), "value"].dropna().to_numpy(float)
    rows = []
    for (src, bb, n), g in runs[~is_base].groupby(["pretrained", "backbone", "n_params"], dropna=False, sort=True):
        curves = g.pivot_table(index="fraction", columns="seed", values="value", aggfunc="first").dropna(axis=1)
        row = {"pretrained": src, "backbone": bb, "n_params": n, "n_seeds": curves.shape[1],
               "auroc_full": float(g.loc[g["fraction"] == g["fraction"].max(), "value"].mean()),
               "baseline": f"{base['backbone']} / {base['pretrained']} / fraction {base['fraction']:g}",
               "baseline_auroc": target}
        if curves.shape[1]:
            # 200 seed resamples are plenty for 2.5/97.5 percentiles of a handful of seeds (1000 costs ~1 s/report).
            eff = metrics_data_efficiency(curves.index.to_numpy(float), curves.to_numpy(float), base_seeds,
                                          n_boot=200, alpha=1.0 - confidence, seed=0)
            row.update(fraction_to_match=eff.fraction, lo=eff.lo, hi=eff.hi, censored=eff.censored,
                       fraction_to_match_text=_efficiency_text(eff, smallest, largest))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols).sort_values(["pretrained", "n_params"]).reset_index(drop=True)


def _efficiency_text(eff, smallest: float, largest: float) -> str:
    """A crossing as it reads: ``0.41 [≤ 0.25, 0.78]``; a bound at the smallest fraction is ``≤ smallest``, one
    never reached ``> largest``; an interval wholly outside the grid is that bound alone (``≤ 0.25``, ``> 1``)."""
    def bound(x: float) -> str:
        return f"≤ {smallest:g}" if x <= smallest else (f"> {largest:g}" if not np.isfinite(x) else f"{x:.2g}")

    point = f"> {largest:g}" if eff.censored == "above" else bound(eff.fraction)
    if np.isnan(eff.lo) or bound(eff.lo) == bound(eff.hi) == point:
        return point
    return f"{point} [{bound(eff.lo)}, {bound(eff.hi)}]"


def ood_drop(df: pd.DataFrame, label: str = "macro") -> pd.DataFrame:
    """Per run and OOD set: the drop from in-distribution (test) to OOD AUROC on the labels both sets can score
    (``metric='auroc_drop'`` rows of :func:`scaling.metrics.compute_run_metrics`), ready for
    :func:`scaling.study.aggregate.summarise`. ``label='macro'`` is the mean over the shared labels."""
    return df[(df["metric"] == "auroc_drop") & (df["label"] == label) & (df["attribute"] == "all")
              & (df["group"] == "all")]


def ood_summary(df: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and ``confidence`` interval (seeds and patients, :func:`scaling.study.aggregate.summarise`) of the OOD
    drop (on shared labels) per cell and OOD set (see :func:`ood_drop`)."""
    drops = ood_drop(df)
    return summarise(drops, confidence) if len(drops) else drops


ROBUSTNESS_MIN_CELLS = 3
"""Cells (with distinct in-distribution AUROCs) a trend line needs before effective robustness is measured from it."""


def effective_robustness(summary: pd.DataFrame, eval_set: str, *, df: pd.DataFrame | None = None, store_root=None,
                         n_boot: int = 200, seed: int = 0, confidence: float = 0.95,
                         workers: int | None = None) -> tuple[pd.DataFrame, dict | None]:
    """Effective robustness on an OOD set (Taori et al., "Measuring robustness to natural distribution shifts in
    image classification", NeurIPS 2020): a cell's OOD AUROC minus the OOD AUROC that the study's own trend predicts
    from its in-distribution AUROC, both on the labels the set shares with test (``auroc_id`` / ``auroc_ood``).

    A bigger or better-pretrained model usually gains OOD because it gains in distribution; effective robustness is
    what it gains beyond that. The trend is the least-squares line through every cell's seed-mean AUROCs, every
    data fraction included (more points, a wider range), in probit space — Φ⁻¹(OOD) = a + b·Φ⁻¹(test), the scale
    on which such trends are linear (Miller et al., "Accuracy on the line", ICML 2021). Returns one row per cell at
    full data (``auroc_ood_trend`` and ``effective_robustness``) and the line (``intercept``, ``slope``, ``r2``,
    ``n_cells``), or an empty frame and None with fewer than :data:`ROBUSTNESS_MIN_CELLS` cells or no spread in
    the in-distribution AUROCs.

    With ``df`` (the tidy table the summary came from) each row also gets a ``confidence`` percentile interval
    (``er_lo``, ``er_hi``) from ``n_boot`` replicates of the whole measurement — every cell's seeds resampled, the
    line refitted, the residual taken again — and, with ``store_root``, the test and OOD patients resampled as
    well, one resample of each set shared by every run (the trend moves with the patients, so what is left is how
    far the cell sits off it on another sample); an OOD set that shares patients with test (``paired_shift`` in
    the runs' ``meta.json``) is resampled together with it, each patient drawn as often in both. A cell's drawn
    seeds are rescaled about its seed mean and the replicates widened to Student's tails (few seeds:
    ``docs/metrics.md``, "Statistics, and why"). ``ci`` says what was resampled: ``seeds+patients``, ``seeds``,
    or ``none`` (one seed per cell and no predictions: no interval). ``workers``: runs resampled at once
    (:func:`scaling.study.fits.patient_replicates`). Only plain fine-tuning cells of ``summary`` and ``df`` are
    used (:func:`scaling.study.aggregate.plain_cells`, as in the report): a probe or re-initialised cell is no point
    of the trend.
    """
    summary, df = plain_cells(summary), (None if df is None else plain_cells(df))
    keys = ["pretrained", "backbone", "n_params", "fraction"]
    cols = [*keys, "auroc_id", "auroc_ood", "auroc_ood_trend", "effective_robustness"]
    if df is not None:
        cols += ["er_lo", "er_hi", "ci"]
    pair = select(summary, "auroc_id", eval_set)[[*keys, "mean"]].merge(
        select(summary, "auroc_ood", eval_set)[[*keys, "mean"]], on=keys, suffixes=("_id", "_ood"))
    pair = pair[np.isfinite(pair["mean_id"]) & np.isfinite(pair["mean_ood"])].reset_index(drop=True)
    if len(pair) < ROBUSTNESS_MIN_CELLS or pair["mean_id"].nunique() < 2:
        return pd.DataFrame(columns=cols), None
    intercept, slope, r2 = _probit_line(pair["mean_id"].to_numpy(float), pair["mean_ood"].to_numpy(float))
    out = pair.rename(columns={"mean_id": "auroc_id", "mean_ood": "auroc_ood"})
    out["auroc_ood_trend"] = stats.norm.cdf(intercept + slope * _probit(out["auroc_id"]))
    out["effective_robustness"] = out["auroc_ood"] - out["auroc_ood_trend"]
    if df is not None:
        lo, hi, ci = _robustness_interval(df, eval_set, pair[keys], store_root, n_boot, seed, confidence, workers)
        out = out.assign(er_lo=lo, er_hi=hi, ci=ci)
    out = out[out["fraction"] == full_fraction(summary)][cols].sort_values(["pretrained", "n_params"])
    line = {"intercept": intercept, "slope": slope, "r2": r2, "n_cells": len(pair)}
    return out.reset_index(drop=True), line


def _probit(auroc) -> np.ndarray:
    """Φ⁻¹ of AUROCs; an AUROC of exactly 0 or 1 has none and is clipped 1e-6 inside."""
    return stats.norm.ppf(np.clip(np.asarray(auroc, dtype=float), 1e-6, 1 - 1e-6))


def _probit_line(auroc_id: np.ndarray, auroc_ood: np.ndarray) -> tuple[float, float, float]:
    """Least-squares Φ⁻¹(ood) = intercept + slope · Φ⁻¹(id): (intercept, slope, R²)."""
    x, y = _probit(auroc_id), _probit(auroc_ood)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    r2 = 1.0 - float((residual**2).sum() / ((y - y.mean()) ** 2).sum()) if np.ptp(y) > 0 else float("nan")
    return float(intercept), float(slope), r2


def _robustness_interval(df: pd.DataFrame, eval_set: str, cells: pd.DataFrame, store_root, n_boot: int, seed: int,
                         confidence: float, workers: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Percentile interval of every cell's effective robustness (see :func:`effective_robustness`)."""
    from scaling.study.fits import patient_replicates
    from scaling.study.store import RunStore

    keys = list(cells.columns)
    rows = df[(df["eval_set"] == eval_set) & (df["label"] == "macro") & (df["attribute"] == "all")
              & (df["group"] == "all") & df["metric"].isin(["auroc_id", "auroc_ood"])]
    runs = rows.pivot_table(index=[*keys, "seed", "run_id"], columns="metric", values="value").reset_index()
    runs = cells.reset_index().merge(runs, on=keys).sort_values(["index", "seed"])
    strata = [g.index.to_numpy() for _, g in runs.reset_index(drop=True).groupby("index", sort=True)]
    nan = np.full(len(cells), np.nan)
    if len(strata) != len(cells):  # a cell without its runs' rows (a summary from another table): nothing to resample
        return nan, nan, "none"
    values = runs[["auroc_id", "auroc_ood"]].to_numpy(float).T  # (2, runs)
    reps = None
    if store_root is not None:
        store, labels = RunStore(store_root), shift_labels(df).get(eval_set)
        wanted = None if labels is None else ["sample_id", "patient_id", *[f"{kind}:{lab}" for lab in labels
                                                                           for kind in ("label", "logit")]]
        # loaders, not frames: the replicates read one run at a time (a hundred runs of a large OOD set do not fit)
        preds = {e: [lambda cols, r=r, e=e: store.read_predictions(r, e, columns=cols or wanted)
                     for r in runs["run_id"]] for e in ("test", eval_set)}
        # A set of the test patients' other images (a paired shift) is resampled with test, patient by patient;
        # any other set on its own (different patients: independent samples).
        paired = any(eval_set in store.read_meta(r).get("fitted_on_val", {}).get("paired_shift", [])
                     for r in runs["run_id"])
        universe = (np.concatenate([preds[e][0](["patient_id"])["patient_id"].to_numpy(dtype=object)
                                    for e in ("test", eval_set)]) if paired else None)
        reps = [1.0 - patient_replicates(preds[e], n_boot=n_boot, seed=seed + (0 if paired else k), labels=labels,
                                         patients=universe, workers=workers)
                for k, e in enumerate(("test", eval_set))]
    method = "seeds+patients" if reps is not None else (
        "seeds" if any(len(s) > 1 for s in strata) else "none")
    if method == "none":
        return nan, nan, method
    # Every replicate at once: per cell, its seeds' draws (n_boot, seeds); per replicate, the line by least squares.
    rng = np.random.default_rng(seed)
    means = np.empty((2, n_boot, len(strata)))
    for c, s in enumerate(strata):
        pick = rng.integers(0, len(s), size=(n_boot, len(s)))
        for k in (0, 1):
            v = np.broadcast_to(values[k][s], (n_boot, len(s))) if reps is None else reps[k][:, s]
            means[k, :, c] = rescale_resample(np.take_along_axis(v, pick, axis=1).mean(axis=1), v.mean(axis=1),
                                              len(s))
    x, y = _probit(means[0]), _probit(means[1])
    xc, yc = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    sxx = (xc**2).sum(axis=1)
    ok = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1) & (sxx > 0)
    if not ok.any():
        return nan, nan, method
    slope = (xc * yc).sum(axis=1)[ok] / sxx[ok]
    intercept = y[ok].mean(axis=1) - slope * x[ok].mean(axis=1)
    boots = means[1][ok] - stats.norm.cdf(intercept[:, None] + slope[:, None] * x[ok])
    # Then widened about their median to Student's tails, with the degrees of freedom of the cells' seeds that each
    # cell's effective robustness rests on (mostly its own: ~5-17 with five seeds per cell; satterthwaite_widening).
    seed_means = np.array([[values[k][s].mean() for s in strata] for k in (0, 1)])
    jackknife = []
    for c, s in enumerate(strata):
        left_out = []
        for i in range(len(s) if len(s) > 1 else 0):
            m = seed_means.copy()
            m[:, c] = values[:, np.delete(s, i)].mean(axis=1)
            left_out.append(_residuals(m))
        jackknife.append(np.array(left_out))
    factor, _ = satterthwaite_widening(jackknife, confidence)
    centre = np.median(boots, axis=0)
    boots = centre + factor * (boots - centre)
    lo, hi = np.percentile(boots, (50 * (1 - confidence), 50 * (1 + confidence)), axis=0)
    return lo, hi, method


def _residuals(means: np.ndarray) -> np.ndarray:
    """Each cell's OOD AUROC minus the probit line's through every cell: ``means`` is (2, cells), test then OOD."""
    intercept, slope, _ = _probit_line(means[0], means[1])
    return means[1] - stats.norm.cdf(intercept + slope * _probit(means[0]))


def shift_labels(df: pd.DataFrame) -> dict[str, list[str]]:
    """Per OOD set, the labels its drop is computed on (both classes present there and in test), in label order."""
    rows = df[(df["metric"] == "auroc_drop") & (df["label"] != "macro") & (df["attribute"] == "all")]
    return {e: list(pd.unique(g["label"])) for e, g in rows.groupby("eval_set", sort=True)}


def evaluable_labels(df: pd.DataFrame) -> dict[str, list[str]]:
    """Per evaluation set, the labels with a defined AUROC in at least one run (both classes present)."""
    rows = df[(df["metric"] == "auroc") & (df["label"] != "macro") & (df["attribute"] == "all")
              & np.isfinite(df["value"].to_numpy(dtype=float))]
    return {e: list(pd.unique(g["label"])) for e, g in rows.groupby("eval_set", sort=True)}


def headline_models(summary: pd.DataFrame, eval_set: str = "test") -> dict[str, pd.Series]:
    """The ``best`` plain fine-tuning cell (highest mean AUROC on ``eval_set`` at full data) and the ``smallest``
    backbone with the same source; one entry, ``best, also the smallest``, when they are the same cell (a study
    where size does not help). Probe, k-shot and re-initialised cells are never picked."""
    s = select(plain_cells(summary), "auroc", eval_set)
    s = s[s["fraction"] == full_fraction(summary)] if len(s) else s
    s = s[np.isfinite(s["mean"].to_numpy(dtype=float))]  # a set too small to score (no label with both classes)
    if s.empty:
        return {}
    best = s.loc[s["mean"].idxmax()]
    same = s[s["pretrained"] == best["pretrained"]]
    smallest = same.loc[same["n_params"].idxmin()]
    cell = [c for c in CELL if c in s.columns]  # a summary made before an axis existed has no column for it
    if best[cell].equals(smallest[cell]):
        return {"best, also the smallest": best[cell]}
    return {"best": best[cell], "smallest": smallest[cell]}

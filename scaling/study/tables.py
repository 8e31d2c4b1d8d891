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
from scaling.study.aggregate import CELL, full_fraction, select, summarise


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


def data_efficiency(df: pd.DataFrame, summary: pd.DataFrame, eval_set: str = "test") -> pd.DataFrame:
    """Per backbone × pretraining source: the fraction of labels needed to match the full-data baseline AUROC.

    :func:`scaling.metrics.data_efficiency` on the cell's AUROC-vs-fraction curves, one column per seed (the
    seeds that completed every fraction): log-linear interpolation of the mean curve, interval from resampling
    seeds (degenerate with one seed). ``censored`` is ``below`` when even the smallest fraction beats the baseline
    (the true crossing may be lower) and ``above`` when the curve never reaches it. The baseline is
    :func:`baseline_cell`.
    """
    base = baseline_cell(summary, eval_set)
    cols = ["pretrained", "backbone", "n_params", "auroc_full", "fraction_to_match", "lo", "hi", "censored",
            "n_seeds", "baseline", "baseline_auroc"]
    if base is None:
        return pd.DataFrame(columns=cols)
    target = float(base["mean"])
    runs = select(df, "auroc", eval_set)
    rows = []
    for (src, bb, n), g in runs.groupby(["pretrained", "backbone", "n_params"], dropna=False, sort=True):
        curves = g.pivot_table(index="fraction", columns="seed", values="value", aggfunc="first").dropna(axis=1)
        row = {"pretrained": src, "backbone": bb, "n_params": n, "n_seeds": curves.shape[1],
               "auroc_full": float(g.loc[g["fraction"] == g["fraction"].max(), "value"].mean()),
               "baseline": f"{base['backbone']} / {base['pretrained']} / fraction {base['fraction']:g}",
               "baseline_auroc": target}
        if curves.shape[1]:
            # 200 seed resamples are plenty for 2.5/97.5 percentiles of a handful of seeds (1000 costs ~1 s/report).
            eff = metrics_data_efficiency(curves.index.to_numpy(float), curves.to_numpy(float), target, n_boot=200,
                                          seed=0)
            row.update(fraction_to_match=eff.fraction, lo=eff.lo, hi=eff.hi, censored=eff.censored)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols).sort_values(["pretrained", "n_params"]).reset_index(drop=True)


def ood_drop(df: pd.DataFrame, label: str = "macro") -> pd.DataFrame:
    """Per run and OOD set: the drop from in-distribution (test) to OOD AUROC on the labels both sets can score
    (``metric='auroc_drop'`` rows of :func:`scaling.metrics.compute_run_metrics`), ready for
    :func:`scaling.study.aggregate.summarise`. ``label='macro'`` is the mean over the shared labels."""
    return df[(df["metric"] == "auroc_drop") & (df["label"] == label) & (df["attribute"] == "all")
              & (df["group"] == "all")]


def ood_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and CI over seeds of the OOD drop (on shared labels) per cell and OOD set (see :func:`ood_drop`)."""
    drops = ood_drop(df)
    return summarise(drops) if len(drops) else drops


ROBUSTNESS_MIN_CELLS = 3
"""Cells (with distinct in-distribution AUROCs) a trend line needs before effective robustness is measured from it."""


def effective_robustness(summary: pd.DataFrame, eval_set: str) -> tuple[pd.DataFrame, dict | None]:
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
    """
    keys = ["pretrained", "backbone", "n_params", "fraction"]
    cols = [*keys, "auroc_id", "auroc_ood", "auroc_ood_trend", "effective_robustness"]
    pair = select(summary, "auroc_id", eval_set)[[*keys, "mean"]].merge(
        select(summary, "auroc_ood", eval_set)[[*keys, "mean"]], on=keys, suffixes=("_id", "_ood"))
    pair = pair[np.isfinite(pair["mean_id"]) & np.isfinite(pair["mean_ood"])]
    if len(pair) < ROBUSTNESS_MIN_CELLS or pair["mean_id"].nunique() < 2:
        return pd.DataFrame(columns=cols), None
    eps = 1e-6  # an AUROC of exactly 0 or 1 has no probit
    x, y = (stats.norm.ppf(pair[c].clip(eps, 1 - eps)) for c in ("mean_id", "mean_ood"))
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    r2 = 1.0 - float((residual**2).sum() / ((y - y.mean()) ** 2).sum()) if np.ptp(y) > 0 else float("nan")
    out = pair.rename(columns={"mean_id": "auroc_id", "mean_ood": "auroc_ood"})
    out["auroc_ood_trend"] = stats.norm.cdf(intercept + slope * x)
    out["effective_robustness"] = out["auroc_ood"] - out["auroc_ood_trend"]
    out = out[out["fraction"] == full_fraction(summary)][cols].sort_values(["pretrained", "n_params"])
    line = {"intercept": float(intercept), "slope": float(slope), "r2": r2, "n_cells": len(pair)}
    return out.reset_index(drop=True), line


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
    """The ``best`` cell (highest mean AUROC at full data) and the ``smallest`` backbone with the same source; one
    entry, ``best, also the smallest``, when they are the same cell (a study where size does not help)."""
    s = select(summary, "auroc", eval_set)
    s = s[s["fraction"] == full_fraction(summary)] if len(s) else s
    if s.empty:
        return {}
    best = s.loc[s["mean"].idxmax()]
    same = s[s["pretrained"] == best["pretrained"]]
    smallest = same.loc[same["n_params"].idxmin()]
    if best[list(CELL)].equals(smallest[list(CELL)]):
        return {"best, also the smallest": best[list(CELL)]}
    return {"best": best[list(CELL)], "smallest": smallest[list(CELL)]}

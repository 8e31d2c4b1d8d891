"""The study report: one self-contained HTML file (plots embedded as base64 PNG) built from the run store.

Sections: completion of the grid (and every failed or unfinished run with its reason), the headline AUROC table,
each of the seed paper's views as a plot next to the table it draws, the fitted scaling laws, pairwise DeLong
comparisons, and the (scrubbed) study config. Nothing identifying is written: predictions are only read to
recompute curves and tests, file paths in configs and error messages are redacted, and so are the study's sample
and patient ids in error messages (``FAILED.json``'s ``reason``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from scaling.io import atomic_write_text, read_yaml_file
from scaling.metrics.run_metrics import (FIT_SPLIT, IN_SAMPLE_METRICS, MULTICLASS_LABEL, MULTICLASS_METRICS,
                                         base_metric)
from scaling.study import plots
from scaling.study.aggregate import (LOW_DF, PLAIN, full_fraction, headline_table, interval_texts, level_text,
                                     load_study, plain_cells, read_study_config, summarise)
from scaling.study.compare import (brier_comparisons, pairwise_comparisons, reliability_curves,
                                   reliability_summary, selective_curves, subgroup_comparisons)
from scaling.study.fits import X_AXES, fit_table
from scaling.study.store import RunStore
from scaling.study.tables import (ROBUSTNESS_MIN_CELLS, data_efficiency, effective_robustness, eval_set_order,
                                  evaluable_labels, headline_models, ood_sets, ood_summary, shift_labels)
from scaling.tracking import Scrubber

log = logging.getLogger(__name__)

FIGURES = {
    "auroc_vs_params": "AUROC vs model size per pretraining source (fitted laws dashed)",
    "auroc_vs_fraction": "Data efficiency: AUROC vs fraction of labelled data per backbone",
    "id_vs_ood": "In-distribution vs OOD AUROC on shared labels, and the OOD drop vs model size",
    "fairness": "Worst-group AUROC and AUROC gap vs model size per attribute",
    "calibration": "ECE before and after temperature scaling vs model size, per evaluation set",
    "reliability": "Reliability diagrams per evaluation set and pretraining source, one line per backbone",
    "selective": "Selective prediction: best vs smallest model",
    "probe_gap": "Fine-tuned vs linear-probe AUROC, and the gap, vs model size per pretraining source",
    "fewshot": "Few-shot: AUROC vs k per pretraining source and backbone",
    "reinit": "Block re-initialisation: AUROC vs the units kept pretrained",
    "shuffle": "Block-shuffled images: AUROC vs block size, and pretrained − scratch",
    "basin": "Loss and AUROC along the line between two seeds' fine-tuned weights, per cell",
    "cka_blocks": "CKA between each fine-tuned model and its initialisation, block by block",
    "cka_scales": "CKA between backbone scales of one pretraining source, block by block",
}
"""Figure ids in the report and their captions; ``<id>:<evaluation set>`` is that figure for one set
(``fairness:test``)."""

FAIRNESS_METRICS = ["worst_group_auroc", "auroc_gap", "eod"]
"""Per-attribute summaries of the subgroup tables."""
CALIBRATION_METRICS = ["ece", "ece_temp", "brier", "brier_temp", "nll", "nll_temp"]
"""Calibration before and after the validation-fitted temperature."""


@dataclass
class StudyReport:
    """Everything the report shows, as tables and PNG bytes (the HTML is one rendering of it)."""

    name: str
    runs: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    config_yaml: str = ""
    evaluable_labels: dict[str, list[str]] = field(default_factory=dict)
    """Per evaluation set, the labels it can score (both classes present)."""
    shift_labels: dict[str, list[str]] = field(default_factory=dict)
    """Per OOD set, the labels shared with test that its drop is computed on."""
    ood_sets: list[str] = field(default_factory=list)
    """The study's OOD evaluation sets."""
    paired_sets: list[str] = field(default_factory=list)
    """OOD sets sharing patients with test in some run: their drop interval resamples both sets' patients."""
    eval_sets: list[str] = field(default_factory=list)
    """Every evaluation set: val, test, then the OOD sets."""
    confidence: float = 0.95
    """The confidence level of every interval, 1 − ``eval.alpha`` of the runs."""
    ece_bins: int = 10
    """``eval.ece_bins`` of the runs: the equal-width bins of ECE and of the reliability diagrams."""


def _bins(n_bins: int) -> str:
    """The ECE binning: ``10 equal-width bins``."""
    return f"{n_bins} equal-width bin{'' if n_bins == 1 else 's'}"


def interval_note(confidence: float) -> str:
    """How the intervals of the summary tables are made (:func:`scaling.study.aggregate.summarise`), at its level."""
    return (f"Intervals: {level_text(confidence)} confidence. With several seeds a cell's interval combines the "
            "seed-to-seed spread with each run's patient-level bootstrap uncertainty (the seeds share one test set: "
            "variance S²/k + mean patient variance, Welch–Satterthwaite degrees of freedom); with one seed it is the "
            "run's patient-level bootstrap interval; a t-interval across seeds alone only where no run has a "
            "bootstrap interval. Bounds are clipped to the metric's range ([0, 1] for AUROC, rates, ECE, Brier). An "
            f"interval on fewer than {LOW_DF} degrees of freedom (the seed term, estimated from few seeds, dominates) "
            "is marked with them, e.g. (df 1.5): its width is itself uncertain. (k seeds, 1 model): the cell's "
            "seeds gave identical runs (a linear probe of pretrained features on every training image), one model "
            "counted k times.")


def _view_table(summary: pd.DataFrame, metrics: list[str], *, eval_set="test", attribute="all",
                full_only=True, label="macro") -> pd.DataFrame:
    s = summary[(summary["eval_set"] == eval_set) & (summary["label"] == label) & (summary["group"] == "all")
                & summary["metric"].isin(metrics)]
    s = s[s["attribute"] != "all"] if attribute is None else s[s["attribute"] == attribute]
    if full_only and len(s):
        s = s[s["fraction"] == full_fraction(summary)]
    if s.empty:
        return pd.DataFrame()
    idx = ["pretrained", "backbone", "n_params", "fraction"] + (["attribute"] if attribute is None else [])
    wide = s.assign(v=interval_texts(s)).pivot_table(index=idx, columns="metric", values="v", aggfunc="first")
    wide = wide[[m for m in metrics if m in wide.columns]].reset_index()
    wide.columns.name = None
    return wide.sort_values(["pretrained", "n_params"]).reset_index(drop=True)


def _in_sample(table: pd.DataFrame, eval_set: str) -> pd.DataFrame:
    """On the fitting split, the columns of metrics that depend on the fitted threshold/temperature are marked."""
    if eval_set != FIT_SPLIT:
        return table
    return table.rename(columns={c: f"{c} (in-sample)" for c in table.columns if base_metric(c) in IN_SAMPLE_METRICS})


def _group_table(summary: pd.DataFrame, eval_set: str) -> pd.DataFrame:
    """Per cell at full data, per attribute value: macro AUROC [interval] (n) of that subgroup."""
    s = summary[(summary["eval_set"] == eval_set) & (summary["label"] == "macro") & (summary["metric"] == "auroc")
                & (summary["attribute"] != "all") & (summary["group"] != "all")]
    s = s[s["fraction"] == full_fraction(summary)] if len(s) else s
    if s.empty:
        return pd.DataFrame()
    s = s.assign(col=s["attribute"] + "=" + s["group"],
                 v=[f"{c} (n={n:.0f})" for c, n in zip(interval_texts(s), s["n"])])
    wide = s.pivot_table(index=["pretrained", "backbone", "n_params"], columns="col", values="v", aggfunc="first")
    wide.columns.name = None
    return wide.reset_index().sort_values(["pretrained", "n_params"]).reset_index(drop=True)


POOLED = {"": "image", "@breast_max": "breast (max)", "@breast_mean": "breast (mean)", "@exam_max": "exam (max)",
          "@exam_mean": "exam (mean)"}
"""Metric-name suffixes of the pooled levels (``eval.aggregate``) and their column names."""


def _pooled_tables(summary: pd.DataFrame, eval_sets) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Per evaluation set, per cell at full data: macro AUROC per image and pooled per breast / exam (max, mean);
    and how many labelled units each level has per set. Empty when the study pools nothing."""
    s = summary[(summary["label"] == "macro") & (summary["attribute"] == "all") & (summary["group"] == "all")
                & (summary["fraction"] == full_fraction(summary))]
    s = s[s["metric"].isin([f"auroc{k}" for k in POOLED])]
    if not s["metric"].str.contains("@").any():
        return {}, pd.DataFrame()
    keys = ["pretrained", "backbone", "n_params"]
    tables, units = {}, []
    for e in eval_sets:
        d = s[s["eval_set"] == e]
        if d.empty:
            continue
        d = d.assign(col=d["metric"].str.removeprefix("auroc").map(POOLED), v=interval_texts(d))
        wide = d.pivot_table(index=keys, columns="col", values="v", aggfunc="first")
        wide = wide[[c for c in POOLED.values() if c in wide.columns]].reset_index()
        wide.columns.name = None
        tables[e] = wide.sort_values(["pretrained", "n_params"]).reset_index(drop=True)
        n = d.drop_duplicates("col").set_index("col")["n"]
        units.append({"evaluation set": e, **{c: int(n[c]) for c in ("image", "breast (max)", "exam (max)")
                                              if c in n.index}})
    return tables, pd.DataFrame(units).rename(columns={"image": "images", "breast (max)": "breasts",
                                                       "exam (max)": "exams"})


def _completion(runs: pd.DataFrame) -> pd.DataFrame:
    """The grid as a matrix: one row per pretraining source × backbone (by size) (× protocol × re-initialisation
    where the study varies them), one column per data budget (fraction or k-shot), cells ``complete/seeds`` plus
    the count of any other status (e.g. ``1/2, 1 failed``); ``-`` where the grid has no such cell."""
    if runs.empty:
        return pd.DataFrame()
    runs = runs.assign(**{k: runs[k].fillna(v) if k in runs else v for k, v in PLAIN.items()})
    runs["shots"] = pd.to_numeric(runs["shots"]).astype(int)
    varied = [k for k in ("protocol", "reinit", "shuffle") if (runs[k] != PLAIN[k]).any()]
    analysis = bool(varied) or bool((runs["shots"] > 0).any())
    seeds = runs["seed"].nunique()
    size = runs.groupby("backbone")["n_params"].max()

    def cell(g: pd.DataFrame) -> str:
        counts = g["status"].value_counts()
        others = [f"{n} {s}" for s, n in counts.items() if s != "complete"]
        return ", ".join([f"{int(counts.get('complete', 0))}/{g['seed'].nunique() if analysis else seeds}", *others])

    order = runs[["fraction", "shots"]].drop_duplicates().sort_values(["shots", "fraction"])
    runs["budget"] = [f"{k}-shot" if k else f"fraction {f:g}" for f, k in zip(runs["fraction"], runs["shots"])]
    t = runs.groupby(["pretrained", "backbone", *varied, "budget"]).apply(cell, include_groups=False).unstack(
        "budget")
    names = [f"{k}-shot" if k else f"fraction {f:g}" for f, k in order.itertuples(index=False)]
    t = t[[c for c in names if c in t.columns]]
    t.columns.name = None
    t = t.fillna("-" if analysis else f"0/{seeds}").reset_index()
    t["_size"] = t["backbone"].map(size)
    return t.sort_values(["pretrained", "_size", "backbone", *varied]).drop(columns="_size").reset_index(drop=True)


class _Progress:
    """Logs each long section of a report as it ends, with its seconds: a report over a hundred runs of large OOD
    sets takes half an hour or more (benchmarks/README.md, ``report_speed.py``), and should say where it is."""

    def __init__(self):
        self.start = self.last = time.perf_counter()

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        log.info("report: %s (%.1f s; %.0f s in all)", what, now - self.last, now - self.start)
        self.last = now


def build_report(store_root: str | Path, *, allow_mixed: bool = False, config_hash: str | None = None,
                 n_boot_fit: int = 200, n_boot_curve: int = 100, workers: int | None = None) -> StudyReport:
    """Compute every table and figure of the report from the store (see module docstring); each long section is
    logged (INFO, logger ``scaling.study.report``) as it ends. ``config_hash`` reports the runs of that study
    config only, ``allow_mixed`` every config together (:func:`scaling.study.aggregate.load_study`). ``workers``:
    threads for the per-run patient replicates and the paired comparisons (:mod:`scaling.study.threads`; None:
    every usable core); the report does not depend on it."""
    store_root = Path(store_root)
    done = _Progress()
    study = load_study(store_root, allow_mixed=allow_mixed, config_hash=config_hash)
    done(f"read {len(study.runs)} runs")
    df, runs = study.results, study.runs
    study_yaml = store_root / "study.yaml"
    cfg = read_yaml_file(study_yaml) if study_yaml.is_file() else {}
    recorded = ((cfg or {}).get("_meta") or {}).get("config_hash")
    notes = {}
    if study.stale_scoring:
        notes["scoring"] = (f"{len(study.stale_scoring)} run(s) were scored under an older definition of their metric "
                            f"rows (e.g. metrics of subgroups of fewer than eval.min_group_patients patients, which "
                            f"disclose those patients' findings, or the worst-group AUROC and AUROC gap before they "
                            f"were taken over the groups' macro AUROCs): launch the study again to rescore them from "
                            f"their stored predictions (nothing is trained), then rebuild this report.")
    if study.left_out:
        notes["scope"] = (f"The runs of study config {config_hash}. The store also holds runs of other configs, "
                          f"left out here: {study.left_out}.")
    if config_hash is not None:
        if recorded != config_hash:  # study.yaml is the config of another launch: showing it would mislead
            cfg = {}
            notes["config"] = (f"study.yaml records config {recorded}, not {config_hash}: each run's own config is "
                               f"in runs/<run_id>/config.yaml")
    names = sorted(runs["study"].dropna().unique()) if len(runs) else []
    name = (cfg or {}).get("name") or (", ".join(names) if names else store_root.name)
    scrub = Scrubber()
    rep = StudyReport(name=name, runs=runs, notes=notes,
                      config_yaml=yaml.safe_dump(scrub.value(cfg), sort_keys=False) if cfg else "",
                      confidence=study.confidence, ece_bins=study.ece_bins)
    confidence = study.confidence
    rep.tables["completion"] = _completion(runs)
    shown = ["run_id", "backbone", "pretrained", "fraction", "seed", "status", "reason"]
    problems = runs[~runs["status"].isin(["complete", "not started"])][shown]
    rep.tables["problems"] = problems.reset_index(drop=True)
    if df.empty:
        rep.notes["results"] = "No complete run yet: nothing to aggregate."
        return rep

    every = summarise(df, confidence)
    rep.tables["headline"] = headline_table(every)
    _analysis_views(rep, store_root, df, every, n_boot_curve, confidence)
    done("what the pretrained features contribute (probes, few-shot, re-initialised, CKA)")
    # The scaling views compare plain fine-tuning cells; probe, k-shot and re-initialised cells have their own.
    df, summary = plain_cells(df), plain_cells(every)
    if df.empty:
        rep.notes["plain"] = "No complete plain fine-tuning cell (fraction budget, nothing re-initialised) yet."
        rep.figures = {k: plots.to_png(f) for k, f in rep.figures.items() if f is not None}
        return rep
    rep.ood_sets = ood_sets(df)
    store = RunStore(store_root)
    rep.paired_sets = sorted({e for rid in df["run_id"].unique()
                              for e in store.read_meta(rid).get("fitted_on_val", {}).get("paired_shift", [])})

    fits, laws = fit_table(df, n_boot=n_boot_fit, store_root=store_root, workers=workers, confidence=confidence)
    rep.tables["fits"] = fits
    rep.tables["fits_params"] = fits[fits["x_axis"] == "n_params"]
    rep.figures["auroc_vs_params"] = plots.auroc_vs_params(summary, laws)
    done(f"scaling-law fits ({n_boot_fit} patient replicates)")

    eff = data_efficiency(df, summary, confidence=confidence)
    rep.tables["data_efficiency"] = eff
    if len(eff):
        rep.notes["baseline"] = (f"Baseline: {eff['baseline'].iloc[0]}, test AUROC "
                                 f"{eff['baseline_auroc'].iloc[0]:.3f}.")
    rep.figures["auroc_vs_fraction"] = plots.auroc_vs_fraction(summary, eff)

    drops = ood_summary(df, confidence)
    shared = shift_labels(df)
    rep.shift_labels = shared
    rep.evaluable_labels = evaluable_labels(df)
    rep.tables.update({f"ood:{e}": t for e, t in _ood_tables(summary, shared).items()})
    trends = {}
    for e in shared:
        rep.tables[f"robustness:{e}"], trends[e] = effective_robustness(summary, e, df=df, store_root=store_root,
                                                                        n_boot=n_boot_fit, workers=workers,
                                                                        confidence=confidence)
        if trends[e] is not None:
            line = trends[e]
            rep.notes[f"robustness:{e}"] = (
                f"Trend: Φ⁻¹({e} AUROC) = {line['intercept']:.3f} + {line['slope']:.3f} · Φ⁻¹(test AUROC), fitted "
                f"to {line['n_cells']} cells (every data fraction), R² = {line['r2']:.2f}.")
    rep.figures["id_vs_ood"] = plots.id_vs_ood(summary, drops, trends)
    done(f"distribution shift and effective robustness ({', '.join(shared) or 'no OOD set'})")

    rep.eval_sets = eval_set_order(df)
    one_of_k = [m + t for m in MULTICLASS_METRICS for t in ("", "_temp") if m + t in set(summary["metric"])]
    for e in rep.eval_sets if one_of_k else ():
        table = _in_sample(_view_table(summary, one_of_k, eval_set=e, label=MULTICLASS_LABEL), e)
        if len(table):  # a set that knows only some classes (an OOD set's "melanoma or not") has no such rows
            rep.tables[f"multiclass:{e}"] = table
    for e in rep.eval_sets:
        rep.tables[f"fairness:{e}"] = _in_sample(_view_table(summary, FAIRNESS_METRICS, eval_set=e, attribute=None), e)
        rep.tables[f"groups:{e}"] = _group_table(summary, e)
        rep.figures[f"fairness:{e}"] = plots.fairness_vs_params(summary, eval_set=e)
        rep.tables[f"calibration:{e}"] = _in_sample(_view_table(summary, CALIBRATION_METRICS, eval_set=e), e)
    rep.figures["calibration"] = plots.calibration_vs_params(summary, rep.eval_sets)
    curves = reliability_curves(store_root, df, [e for e in rep.eval_sets if e != FIT_SPLIT], n_bins=rep.ece_bins)
    rep.tables["reliability"] = reliability_summary(curves)
    rep.tables["reliability_bins"] = curves
    rep.figures["reliability"] = plots.reliability(curves)
    done("subgroups and calibration")

    pooled, units = _pooled_tables(summary, rep.eval_sets)
    rep.tables.update({f"exam:{e}": _in_sample(t, e) for e, t in pooled.items()})
    if pooled:
        rep.tables["exam_units"] = units

    # chosen on validation, scored on test: the best cell by test AUROC would flatter itself on that test set
    models = headline_models(summary, "val") or headline_models(summary)
    curves = (selective_curves(store_root, df, models, n_boot=n_boot_curve, confidence=confidence) if models
              else pd.DataFrame())
    rep.tables["selective"] = _selective_table(curves)
    rep.figures["selective"] = plots.selective_curves(curves)
    done("exam-level pooling and selective prediction")

    alpha = 1 - confidence  # the runs' eval.alpha: the differences' intervals at the report's level
    rep.tables["comparisons"] = pairwise_comparisons(store_root, df, eval_sets=["test", *rep.ood_sets],
                                                     workers=workers, alpha=alpha)
    done(f"paired comparisons ({len(rep.tables['comparisons'])} rows)")
    rep.tables["subgroup_comparisons"] = subgroup_comparisons(store_root, df, eval_sets=["test", *rep.ood_sets],
                                                              workers=workers, alpha=alpha)
    rep.tables["brier_comparisons"] = brier_comparisons(store_root, df, eval_sets=["test", *rep.ood_sets],
                                                        workers=workers, alpha=alpha)
    done("comparisons per subgroup and on the Brier score")
    rep.figures = {k: plots.to_png(f) for k, f in rep.figures.items() if f is not None}
    done(f"{len(rep.figures)} figures drawn")
    return rep


def _analysis_views(rep: StudyReport, store_root: Path, df: pd.DataFrame, summary: pd.DataFrame,
                    n_boot: int, confidence: float = 0.95) -> None:
    """The tables and figures of "What the pretrained features contribute" (scaling.study.analysis_tables)."""
    from scaling.study import analysis_tables as at

    rep.tables["probe_gap"] = at.probe_gap(df, store_root, n_boot=n_boot, confidence=confidence)
    rep.figures["probe_gap"] = plots.probe_gap(rep.tables["probe_gap"])
    rep.tables["fewshot"] = at.fewshot_table(summary)
    rep.figures["fewshot"] = plots.fewshot_curves(rep.tables["fewshot"])
    rep.tables["reinit"] = at.reinit_table(summary, rep.runs)
    rep.figures["reinit"] = plots.reinit_curves(rep.tables["reinit"])
    study = read_study_config(store_root)
    rep.tables["shuffle"] = at.shuffle_table(df, store_root, image_size=study.data.image_size if study else None,
                                             n_boot=n_boot, confidence=confidence)
    rep.figures["shuffle"] = plots.shuffle_curves(rep.tables["shuffle"])
    curves = at.read_basin(store_root)  # written by `python -m scaling.study basin`, a command of its own
    if curves is not None and len(curves):
        rep.tables["basin"] = at.basin_side_by_side(at.basin_summary(curves))
        rep.tables["basin_curves"] = curves
        rep.figures["basin"] = plots.basin_curves(curves)
    rep.tables["cka_blocks"] = at.cka_blocks(store_root, rep.runs)
    rep.figures["cka_blocks"] = plots.cka_block_curves(rep.tables["cka_blocks"])
    rep.tables["cka_scales"] = at.cka_scales(store_root, rep.runs)
    rep.figures["cka_scales"] = plots.cka_scale_maps(rep.tables["cka_scales"])


OOD_COLUMNS = {"auroc_id": "test AUROC", "auroc_ood": "{set} AUROC", "auroc_drop": "drop"}
"""Columns of an OOD set's table: the shift metrics on the labels it shares with test (``{set}`` = its name)."""


def _ood_tables(summary: pd.DataFrame, labels: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
    """Per OOD set, per cell at full data: test and OOD AUROC on the labels both sets can score, the drop (macro
    over those labels) and each shared label's drop, all with intervals."""
    keys = ["pretrained", "backbone", "n_params", "fraction"]
    s = summary[(summary["attribute"] == "all") & (summary["group"] == "all")
                & (summary["fraction"] == full_fraction(summary))]
    out = {}
    for e, shared in labels.items():
        t = s[(s["eval_set"] == e) & (s["label"] == "macro")][keys].drop_duplicates()
        for metric, col in OOD_COLUMNS.items():
            m = s[(s["eval_set"] == e) & (s["label"] == "macro") & (s["metric"] == metric)]
            t = t.merge(m.assign(**{col.format(set=e): interval_texts(m)})[keys + [col.format(set=e)]], on=keys,
                        how="left")
        for lab in shared:
            m = s[(s["eval_set"] == e) & (s["label"] == lab) & (s["metric"] == "auroc_drop")]
            t = t.merge(m.assign(**{f"drop: {lab}": interval_texts(m)})[keys + [f"drop: {lab}"]], on=keys, how="left")
        out[e] = t.sort_values(["pretrained", "n_params"]).reset_index(drop=True)
    return out


def _selective_table(curves: pd.DataFrame) -> pd.DataFrame:
    if curves is None or curves.empty:
        return pd.DataFrame()
    c = curves[curves["referral"].isin([0.0, 0.1, 0.2, 0.3, 0.5])]
    t = c.assign(v=interval_texts(c)).pivot_table(index="model", columns="referral", values="v", aggfunc="first")
    t.columns = [f"AUROC, {r:.0%} referred" for r in t.columns]
    return t.reset_index()


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.4;padding:0 1em}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1em}th,td{border:1px solid #ddd;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f4f4f4}
img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:13px}.bad{color:#b00}
figure{margin:1em 0}figcaption{font-size:13px;color:#444}pre{background:#f7f7f7;padding:1em;overflow:auto;
font-size:12px}
"""


def _count(v) -> str:
    """Parameter / image counts as people write them (1.6M, 400k)."""
    if pd.isna(v):
        return "n/a"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def _table_html(df: pd.DataFrame, tid: str, empty: str = "nothing to show") -> str:
    if df is None or df.empty:
        return f'<p class="note" id="tbl-{tid}">{html.escape(empty)}</p>'
    counts = {c: _count for c in ("n_params", "pretrain_images", "n_train_images") if c in df.columns}
    return df.to_html(index=False, table_id=f"tbl-{tid}", na_rep="n/a", float_format=lambda v: f"{v:.4g}",
                      formatters=counts, border=0, escape=True)


def _comparisons_html(table: pd.DataFrame | None) -> list[str]:
    """The macro rows of the pairwise comparisons, the per-label rows collapsed under them."""
    if table is None or table.empty:
        return [_table_html(None, "comparisons", "no comparison (needs two cells that differ in one axis, with "
                                                 "stored predictions)")]
    macro = table["label"] == "macro"
    table = _without(table, ["holm_family"])  # one family per table shown, as its note says
    return [_table_html(table[macro].drop(columns="label"), "comparisons"),
            "<details><summary>per label</summary>", _table_html(table[~macro], "comparisons-labels"),
            "</details>"]


def _fits_html(fits: pd.DataFrame | None, tid: str) -> str:
    """Fitted laws as a table; refused fits summarised by axis and reason instead of rows of n/a."""
    if fits is None or fits.empty:
        return _table_html(None, tid, "no fit")
    ok = fits[fits["status"] == "ok"].drop(columns="status")
    out = [_table_html(ok, tid, "no law could be fitted (see the reasons below)")]
    refused = fits[fits["status"] != "ok"]
    if len(refused):
        by = refused.assign(reason=refused["status"].str.removeprefix("refused: ")).groupby(
            ["x_axis", "reason"], sort=False)
        summary = by.apply(lambda g: pd.Series({
            "refused fits": len(g),
            "for": "; ".join(sorted({" / ".join(v for v in (r.pretrained, r.backbone, r.eval_set) if v)
                                     for r in g.itertuples()}))}), include_groups=False).reset_index()
        out.append(_table_html(summary[["x_axis", "refused fits", "reason", "for"]], f"{tid}-refused"))
    return "\n".join(out)


def _efficiency_view(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """The data-efficiency table as a reader takes it: each crossing with its interval and censoring written out
    (``0.41 [≤ 0.25, 0.78]``, ``> 1``), not as numbers with infinite bounds."""
    if table is None or table.empty:
        return table
    view = _without(table, ["fraction_to_match", "lo", "hi", "baseline", "baseline_auroc"])
    return view.rename(columns={"fraction_to_match_text": "fraction_to_match [interval]"})


def _without(df: pd.DataFrame | None, cols: list[str]) -> pd.DataFrame | None:
    return df.drop(columns=[c for c in cols if c in df.columns]) if df is not None else None


def _caption(fid: str) -> str:
    base, _, eval_set = fid.partition(":")
    return FIGURES[base] + (f" ({eval_set})" if eval_set else "")


def _figure_html(rep: StudyReport, fid: str) -> str:
    if fid not in rep.figures:
        return (f'<p class="note" id="fig-{_anchor(fid)}">{html.escape(_caption(fid))}: not enough data in this '
                "study.</p>")
    b64 = base64.b64encode(rep.figures[fid]).decode("ascii")
    cap = html.escape(_caption(fid))
    return (f'<figure id="fig-{_anchor(fid)}"><img alt="{cap}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{cap}</figcaption></figure>")


def _anchor(name: str) -> str:
    """An HTML id fragment for an evaluation-set or attribute name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(name))


def _labels_html(rep: StudyReport) -> str:
    """Which labels each evaluation set can score (its macro AUROC averages those only)."""
    every = list(dict.fromkeys(lab for labs in rep.evaluable_labels.values() for lab in labs))
    rows = [{"evaluation set": e, "labels scored": ", ".join(labs) or "none",
             "not scored (a class absent)": ", ".join(lab for lab in every if lab not in labs) or "-"}
            for e, labs in rep.evaluable_labels.items()]
    return _table_html(pd.DataFrame(rows), "labels")


def _ood_html(rep: StudyReport) -> list[str]:
    """One subsection per OOD set: the labels compared, and test vs OOD AUROC and the drop on those labels."""
    if not rep.ood_sets:
        return ["<p class='note' id='tbl-ood'>the study has no OOD evaluation set</p>"]
    parts = ["<p class='note'>Each OOD set is compared with the in-distribution test set on the labels <i>both</i> "
             "can score (both classes present among the labelled images of each): test AUROC, OOD AUROC and their "
             "difference (drop) are macro-averaged over exactly those labels, so a set with few labels is not "
             "compared against a macro over many. Interval of the drop: as every cell's (the top of the report), "
             "its patient-level part from each run's bootstrap of both sets, resampled independently (different "
             "patients) or, for a set that shares patients with test, over the patients of both sets together.</p>"]
    for e in rep.ood_sets:
        shared = rep.shift_labels.get(e, [])
        own = rep.evaluable_labels.get(e, [])
        parts.append(f"<h3 id='ood-{_anchor(e)}'>{html.escape(e)}</h3>")
        if not shared:
            parts.append(f"<p class='bad' id='tbl-ood-{_anchor(e)}'>No label can be scored on both test and "
                         f"{html.escape(e)} (labels scored on {html.escape(e)}: "
                         f"{html.escape(', '.join(own) or 'none')}): no drop.</p>")
            continue
        test_only = [lab for lab in rep.evaluable_labels.get("test", []) if lab not in shared]
        ood_only = [lab for lab in own if lab not in shared]
        left_out = "".join(f"; scored on {html.escape(where)} only: {html.escape(', '.join(labs))}"
                           for where, labs in (("test", test_only), (e, ood_only)) if labs)
        paired = (" It shares patients with the test set (e.g. their other views): its drop compares images of "
                  "the same people, and its interval resamples the patients of both sets together."
                  if e in rep.paired_sets else "")
        parts.append(f"<p>Compared on {len(shared)} label(s): <b>{html.escape(', '.join(shared))}</b>{left_out}."
                     f"{paired}</p>")
        parts.append(_table_html(rep.tables.get(f"ood:{e}"), f"ood-{_anchor(e)}"))
        robust = rep.tables.get(f"robustness:{e}")
        if robust is not None and len(robust):
            parts += [f"<p><b>Effective robustness</b> (Taori et al. 2020): each cell's {html.escape(e)} AUROC minus "
                      "what the study's trend predicts from its test AUROC (the dotted curve in the figure above): "
                      "positive = more robust than its in-distribution accuracy alone would make it; er_lo, er_hi: "
                      f"{level_text(rep.confidence)} interval from refitting the trend on resampled seeds and test "
                      "and OOD patients (ci says which). "
                      f"{html.escape(rep.notes.get(f'robustness:{e}', ''))}</p>",
                      _table_html(robust, f"robustness-{_anchor(e)}")]
        else:
            parts.append(f"<p class='note' id='tbl-robustness-{_anchor(e)}'>No effective robustness: the trend "
                         f"needs {ROBUSTNESS_MIN_CELLS} cells with different test AUROCs.</p>")
    return parts


def _set_title(e: str) -> str:
    return html.escape(e) + (" <span class='note'>(fitting split: columns marked in-sample use the threshold and "
                             "temperature fitted on these very images)</span>" if e == FIT_SPLIT else "")


BIASED_NOTE = (" Gaps and extremes over groups (worst group, max − min) and ECE are biased in small samples, and "
               "their bootstrap replicates further in the same direction, so a value can lie outside its own "
               "interval: read such an interval as how variable the number is, and compare models on the same sets "
               "(docs/metrics.md, \"Biased statistics\").")
"""Said under the tables whose statistics are biased (fairness gaps, ECE): a point outside its interval is no bug."""


def _fairness_html(rep: StudyReport) -> list[str]:
    """One subsection per evaluation set: the summaries per attribute and every subgroup's AUROC."""
    parts = ["<p class='note'>Per evaluation set and attribute (attributes a set lacks are absent there; one only "
             "an OOD set has, such as skin type, appears there): worst-group AUROC and AUROC gap (in each run the "
             "smallest of the groups' macro AUROCs and their max − min, then averaged over seeds, so with several "
             "seeds the worst group can sit a little below the lowest seed-mean group below: the worst group may "
             "differ by seed) and equalized-odds difference (max of the TPR "
             "and FPR gaps) at the threshold fitted on validation; then each group's macro AUROC with its "
             "interval and size. Groups below eval.min_group_size images or eval.min_group_patients patients are "
             "n/a; samples without the attribute form the group <i>missing</i>, shown but not summarised."
             + BIASED_NOTE + "</p>"]
    for e in rep.eval_sets:
        parts += [f"<h3 id='fairness-{_anchor(e)}'>{_set_title(e)}</h3>", _figure_html(rep, f"fairness:{e}"),
                  _table_html(rep.tables.get(f"fairness:{e}"), f"fairness-{_anchor(e)}",
                              f"no subgroup attribute in {e}"),
                  _table_html(rep.tables.get(f"groups:{e}"), f"groups-{_anchor(e)}", f"no subgroup in {e}")]
    return parts


def _calibration_html(rep: StudyReport) -> list[str]:
    """The ECE figure, then one table per evaluation set (before / after temperature scaling)."""
    parts = [_figure_html(rep, "calibration"),
             f"<p class='note'>ECE ({_bins(rep.ece_bins)}), Brier score and NLL, macro over labels, before and after "
             "the temperature fitted per label on validation (<i>_temp</i>)." + BIASED_NOTE + "</p>"]
    for e in rep.eval_sets:
        parts += [f"<h3 id='calibration-{_anchor(e)}'>{_set_title(e)}</h3>",
                  _table_html(rep.tables.get(f"calibration:{e}"), f"calibration-{_anchor(e)}")]
    parts += ["<h3 id='reliability'>Reliability under shift</h3>",
              f"<p class='note'>Observed fraction positive vs mean predicted probability in {_bins(rep.ece_bins)}, "
              "for "
              "test and every OOD set, per backbone at full data (points on the diagonal are calibrated; below it, "
              "the predicted probability exceeds the observed frequency: risk over-estimated; above it, "
              "under-estimated). Every labelled (image, label) pair of every label and seed is pooled; left raw, "
              "right after each run's validation-fitted temperatures. The pooled ECE of each diagram is below, its "
              "bins in the collapsed table. It pools the labels' pairs into one set of bins, whereas the tables "
              "above average each label's own ECE: the two can move in opposite directions after temperature "
              "scaling (a label's temperature can help the pooled bins and hurt that label's own).</p>",
              _figure_html(rep, "reliability"), _table_html(rep.tables.get("reliability"), "reliability"),
              "<details><summary>reliability bins</summary>",
              _table_html(rep.tables.get("reliability_bins"), "reliability_bins"), "</details>"]
    return parts


def _multiclass_html(rep: StudyReport) -> list[str]:
    """The one-of-K metrics per evaluation set (studies whose task is multi-class)."""
    sets = [k.split(":", 1)[1] for k in rep.tables if k.startswith("multiclass:")]
    if not sets:
        return []
    parts = ["<h2 id='multiclass'>One-of-K classification</h2>",
             "<p class='note'>All classes together: top-1 accuracy, balanced accuracy (mean per-class recall), "
             "multi-class NLL and Brier score and top-label ECE, the last three also after the softmax temperature "
             "fitted on validation (<i>_temp</i>). AUROC elsewhere in the report is one-vs-rest per class and its "
             "macro. A set whose samples carry labels but no class (an OOD set that knows only some of the classes) "
             "has no row here. Derived binary labels (a group of classes, its probability the summed softmax) are "
             "scored on their own: outside the macro AUROC, inside the distribution-shift comparison.</p>"]
    for e in sets:
        parts += [f"<h3 id='multiclass-{_anchor(e)}'>{_set_title(e)}</h3>",
                  _table_html(rep.tables[f"multiclass:{e}"], f"multiclass-{_anchor(e)}")]
    return parts


def _exam_html(rep: StudyReport) -> list[str]:
    """Image-level AUROC beside breast- and exam-level AUROC per evaluation set (studies with eval.aggregate)."""
    sets = [k.split(":", 1)[1] for k in rep.tables if k.startswith("exam:")]
    if not sets:
        return []
    parts = ["<h2 id='exam'>Breast- and exam-level evaluation</h2>",
             "<p class='note'>Macro AUROC per image and pooled per breast (exam × laterality) and per exam: the "
             "image probabilities of a unit pooled by their max (the most suspicious view decides) or their mean; a "
             "unit is positive when any of its images is. Thresholds and temperatures are refitted on the pooled "
             "validation set; intervals come from the same patient-level bootstrap. Labelled units per set:</p>",
             _table_html(rep.tables.get("exam_units"), "exam-units")]
    for e in sets:
        parts += [f"<h3 id='exam-{_anchor(e)}'>{html.escape(e)}</h3>",
                  _table_html(rep.tables[f"exam:{e}"], f"exam-{_anchor(e)}")]
    return parts


def _ci_view(table: pd.DataFrame | None, names: list[str], drop=()) -> pd.DataFrame | None:
    """``table`` with each ``<name>, <name>_lo, <name>_hi`` triple shown as one ``m [lo, hi]`` column."""
    if table is None or table.empty:
        return table
    out = table.drop(columns=[c for c in drop if c in table.columns])
    for n in names:
        lo, hi = (f"{n}_lo", f"{n}_hi") if f"{n}_lo" in out.columns else ("lo", "hi")
        out[n] = interval_texts(out.rename(columns={n: "mean", lo: "lo", hi: "hi"})[["mean", "lo", "hi"]])
        out = out.drop(columns=[lo, hi])
    return out


def _figure_and_table(rep: StudyReport, key: str, view=None, empty: str = "") -> list[str]:
    """Figure ``key`` and table ``key`` (shown through ``view``), or the note ``empty`` when the table is empty."""
    table = rep.tables.get(key)
    if table is None or not len(table):
        return [f"<p class='note' id='tbl-{key}'>{empty}</p>"]
    return [_figure_html(rep, key), _table_html(view(table) if view else table, key)]


def _basin_html(rep: StudyReport) -> list[str]:
    """The loss-basin section, only when the store holds the table of ``python -m scaling.study basin``."""
    if rep.tables.get("basin") is None or not len(rep.tables["basin"]):
        return []
    return ["<h3 id='basin'>Loss basins</h3>",
            "<p class='note'>The two lowest seeds of each plain fine-tuned cell, their weights interpolated "
            "linearly, w(α) = (1 − α)·w1 + α·w2, and scored on a fixed sample of an evaluation set (Neyshabur, "
            "Sedghi &amp; Zhang 2020, §3.3). loss_barrier = the largest excess over α of the loss over the chord "
            "between the end points' losses (Frankle et al. 2020); error_barrier the same of 1 − macro AUROC. "
            "Sources side by side: a barrier near 0 for a pretrained source and above 0 for scratch means the "
            "fine-tuned models of that source stay in one basin. One pair per cell: no interval.</p>",
            _figure_html(rep, "basin"), _table_html(rep.tables["basin"], "basin")]


def _analysis_html(rep: StudyReport) -> list[str]:
    """What the pretrained features contribute: probe gap, few-shot, re-initialisation, CKA (docs/analysis.md)."""
    mean_ci = lambda t: _ci_view(t, ["mean"])  # noqa: E731
    parts = ["<h2 id='analysis'>What the pretrained features contribute</h2>",
             "<p class='note'>Cells beyond plain fine-tuning (docs/analysis.md): a linear probe on the frozen "
             "backbone's pooled features, k-shot training sets, blocks re-initialised before fine-tuning, and the "
             "block-by-block CKA of each fine-tuned model. AUROC is macro on test; intervals as above (seeds "
             "and patients, else the run's patient-level bootstrap).</p>",
             "<h3 id='probe-gap'>Fine-tuning vs linear probe</h3>",
             "<p class='note'>gap = fine-tuned − probe AUROC, paired by seed: each seed's difference has a paired "
             "patient-level bootstrap of the two runs' test predictions, combined over seeds with their spread as "
             "the cells' intervals are (gap_ci names how the interval was made). A gap that shrinks "
             "with scale means scale helps through better frozen features; a large gap, through a better starting "
             "point for fine-tuning; a negative gap, that fine-tuning did worse than the frozen features (too few "
             "steps, too high a learning rate, or over-fitting a small training set).</p>",
             *_figure_and_table(rep, "probe_gap",
                                lambda t: _ci_view(t, ["finetune", "probe", "gap"], drop=["fraction", "shots"]),
                                "no cell has both protocols (set grid.protocols: [finetune, linear_probe] to "
                                "compare them)"),
             "<h3 id='fewshot'>Few-shot</h3>",
             "<p class='note'>k positive and k negative patients per label (BiT's k-shot protocol; nested in k for "
             "one seed), with all their images (n_train_images).</p>",
             *_figure_and_table(rep, "fewshot", mean_ci, "no k-shot cell (set grid.shots to add some)"),
             "<h3 id='reinit'>Block re-initialisation</h3>",
             "<p class='note'>Units (stem, each block, neck) kept pretrained, the rest re-initialised before "
             "fine-tuning: kept = first for the lowest units (after:k, Raghu et al. 2019's weight transfusion; "
             "solid), last for the highest (first:k; dashed). auroc_lost = AUROC of the fully pretrained "
             "cell − this cell's: what the re-initialised blocks' pretrained weights were worth.</p>",
             *_figure_and_table(rep, "reinit", mean_ci, "no re-initialised cell (set grid.reinit to add some)"),
             "<h3 id='shuffle'>Block-shuffled images</h3>",
             "<p class='note'>Every image a cell trains and is evaluated on cut into block × block pixel blocks "
             "and the blocks permuted, one permutation per seed (Neyshabur, Sedghi &amp; Zhang 2020, §3): small "
             "blocks destroy the visual features and keep the low-level statistics. block = the image size is the "
             "unshuffled cell. gap = source − scratch AUROC on the same shuffled images, paired by seed as the "
             "probe gap is. A gap that stays positive at small blocks: part of what pretraining transfers is "
             "low-level statistics, not feature reuse.</p>",
             *_figure_and_table(rep, "shuffle", lambda t: _ci_view(
                 t.rename(columns={"mean": "auroc", "lo": "auroc_lo", "hi": "auroc_hi"}), ["auroc", "gap"],
                 drop=["fraction", "shots"]), "no block-shuffled cell (set grid.shuffle to add some)"),
             *_basin_html(rep),
             "<h3 id='cka'>Representation similarity (CKA)</h3>",
             "<p class='note'>Minibatch linear CKA (Nguyen, Raghu &amp; Kornblith 2021) of each block's output "
             "averaged over space, on a fixed sample of cka.eval_set in shuffled minibatches. Per block, between "
             "the initialisation and the fine-tuned model: near 1 the block was kept (reused), low it was "
             "rewritten. The band spans the seeds.</p>",
             *_figure_and_table(rep, "cka_blocks", empty="no CKA table in the store (cka.enabled)")]
    if rep.tables.get("cka_scales") is not None and len(rep.tables["cka_scales"]):
        parts += ["<p class='note'>Between the smallest backbone and each larger one of a source (fine-tuned, "
                  "largest fraction, paired by seed): a bright diagonal band means the larger model computes the "
                  "smaller one's features at the corresponding depth.</p>", _figure_html(rep, "cka_scales"),
                  "<details><summary>CKA between scales, every pair of blocks</summary>",
                  _table_html(rep.tables["cka_scales"], "cka_scales"), "</details>"]
    return parts


def render_html(rep: StudyReport) -> str:
    """The report as one self-contained HTML document."""
    t = rep.tables
    runs = rep.runs
    counts = runs["status"].value_counts().to_dict() if len(runs) else {}
    total = int(sum(counts.values()))
    done = int(counts.get("complete", 0))
    status_line = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    fits = t.get("fits", pd.DataFrame())
    ok_fits = fits[fits["status"] == "ok"] if len(fits) else fits
    refused = len(fits) - len(ok_fits)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Scaling study report: {html.escape(rep.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Scaling study: {html.escape(rep.name)}</h1>",
        f"<p class='note'>Generated {now} from the run store. {html.escape(interval_note(rep.confidence))} AUROC is "
        "macro-averaged over labels unless stated.</p>",
        *([f"<p class='note'>{html.escape(rep.notes['scope'])}</p>"] if "scope" in rep.notes else []),
        "<h2 id='completion'>Grid and completion</h2>",
        f"<p>{done} of {total} runs complete ({html.escape(status_line)}).</p>",
        _table_html(t.get("completion"), "completion", "no runs in the store"),
    ]
    problems = t.get("problems")
    if problems is not None and len(problems):
        parts += ["<h3 class='bad'>Runs not (yet) in the numbers</h3>",
                  "<p class='note'>Cells averaging fewer seeds than the study are marked in the tables with "
                  "(k/n seeds).</p>", _table_html(problems, "problems")]
    if "results" in rep.notes:
        parts.append(f"<p>{html.escape(rep.notes['results'])}</p>")
    elif "plain" in rep.notes:
        parts += [f"<p>{html.escape(rep.notes['plain'])}</p>", "<h2 id='headline'>AUROC by cell and evaluation set</h2>",
                  _table_html(t.get("headline"), "headline"), *_analysis_html(rep)]
    else:
        parts += [
            "<h2 id='headline'>AUROC by cell and evaluation set</h2>",
            "<p class='note'>Macro AUROC over the labels each set can score (below): sets with different labels "
            "are not directly comparable here; the distribution-shift section compares them on shared labels.</p>",
            _table_html(t.get("headline"), "headline"), _labels_html(rep), *_multiclass_html(rep),
            "<h2 id='scaling'>Scaling with model size</h2>", _figure_html(rep, "auroc_vs_params"),
            _fits_html(t.get("fits_params"), "fits_params"),
            "<h2 id='data-efficiency'>Data efficiency</h2>",
            f"<p class='note'>fraction_to_match: the smallest fraction of labelled data at which the cell's mean "
            f"AUROC reaches the full-data baseline's (log-linear interpolation between grid fractions), with its "
            f"{level_text(rep.confidence)} interval from resampling the cell's seeds and the baseline's (none with "
            "one seed: nothing to resample). Outside the grid a value is a bound: <i>≤ f</i> = already reached at the "
            "smallest fraction f (censored <i>below</i>: the true crossing may be lower), <i>&gt; f</i> = not reached "
            "even at the largest (censored <i>above</i>). The baseline itself has no row.</p>",
            f"<p>{html.escape(rep.notes.get('baseline', ''))}</p>", _figure_html(rep, "auroc_vs_fraction"),
            _table_html(_efficiency_view(t.get("data_efficiency")), "data_efficiency"),
            "<h2 id='ood'>Distribution shift</h2>", _figure_html(rep, "id_vs_ood"), *_ood_html(rep),
            "<h2 id='fairness'>Subgroups</h2>", *_fairness_html(rep),
            "<h2 id='calibration'>Calibration</h2>", *_calibration_html(rep),
            *_exam_html(rep),
            "<h2 id='selective'>Selective prediction</h2>",
            f"<p class='note'>Macro AUROC of the test images kept when the given share of the least confident "
            f"ones (nearest each label's validation-fitted threshold) is referred to a reader. <i>best</i>: the cell "
            f"with the highest validation macro AUROC at full data (chosen on validation, scored on test); "
            f"<i>smallest</i>: the smallest backbone with its pretraining. {level_text(rep.confidence)} intervals: "
            "each run's patient-level bootstrap, combined over seeds with their spread as the cells' intervals "
            "are.</p>",
            _figure_html(rep, "selective"),
            _table_html(t.get("selective"), "selective"),
            "<h2 id='fits'>Fitted scaling laws: error = a·x<sup>−b</sup> + c</h2>",
            f"<p class='note'>error = 1 − macro AUROC, one point per run; {level_text(rep.confidence)} intervals "
            f"resample the seeds within each x and the test patients (column ci says which; <i>none</i>: nothing "
            f"to resample, one run per x or identical runs within every x, and no stored predictions; at_bound names "
            f"a parameter that sits on its bound, b in [0, 5], c in [0, the lowest error], where the interval is cut "
            "off). "
            f"x axes: {html.escape(', '.join(f'{k} = {v}' for k, v in X_AXES.items()))}. {len(ok_fits)} fitted, "
            f"{refused} refused (too few distinct x values).</p>",
            _fits_html(fits, "fits"),
            "<h2 id='comparisons'>Pairwise comparisons</h2>",
            "<p class='note'>Each backbone against the smallest with the same pretraining (axis backbone), and "
            "each pretraining source against the one with the fewest images on the same backbone (axis "
            "pretrained); from the third step on each also against the step below it (vs): does the next size, or "
            "more pretraining, still help? A Mean Var init (meanvar:&lt;source&gt;: the source's weight statistics "
            "without its features) is compared with that reference, and its source with it: what the features add "
            "beyond the scale of the weights (docs/analysis.md). On the test set and on every OOD set at every "
            "data fraction (full data first), paired on the same samples, on the macro AUROC (below; per label in "
            "the collapsed table), over the seeds both cells have. "
            "With two or more seeds the test is Obuchowski–Rockette (df: r − 1 with 2–4 seeds, method or; "
            "Hillis's from 5 seeds, method or-hillis): seeds "
            "and patients both random, so a difference must hold whatever the seed; with one seed it is DeLong's "
            "test of that pair (method). The patient variance is clustered by patient (Obuchowski 1997): several "
            "images of one patient count as correlated, not as independent evidence (docs/metrics.md). p_holm: "
            "Holm's adjustment over every row of its table (family-wise error: the macro table is the primary "
            "family, the per-label table a second one), p_value: the comparison alone.</p>",
            *_comparisons_html(t.get("comparisons")),
            "<details><summary>per subgroup (full data)</summary><p class='note'>The same comparisons within each "
            "patient subgroup the fairness tables summarise: macro AUROC over the labels with both classes in the "
            "group, paired on its samples, clustered by patient; p_holm over this table alone.</p>",
            _table_html(_without(t.get("subgroup_comparisons"), ["holm_family"]), "comparisons-subgroups",
                        "no subgroup to compare"),
            "</details>",
            "<details><summary>probabilities: Brier score (full data)</summary><p class='note'>The same comparisons "
            "on the macro Brier score (lower is better; a proper scoring rule, so calibration and discrimination "
            "together), raw and after each run's validation-fitted temperatures: diff &lt; 0 means the compared "
            "cell's probabilities are better. Seeds and patients random (one seed: the paired z-test), clustered "
            "by patient; p_holm over this table alone.</p>",
            _table_html(_without(t.get("brier_comparisons"), ["holm_family"]), "comparisons-brier", "no comparison"),
            "</details>",
            *_analysis_html(rep),
        ]
    parts += ["<h2 id='config'>Study config</h2>",
              f"<details><summary>study.yaml (paths redacted)</summary><pre>{html.escape(rep.config_yaml)}</pre>"
              "</details>" if rep.config_yaml else
              f"<p class='note'>{html.escape(rep.notes.get('config', 'no study.yaml in the store'))}</p>",
              "</body></html>"]
    return "\n".join(parts)


def write_report(store_root: str | Path, out_path: str | Path | None = None, *, report: StudyReport | None = None,
                 allow_mixed: bool = False, config_hash: str | None = None, n_boot_fit: int = 200,
                 workers: int | None = None) -> Path:
    """Write the study's self-contained HTML report (default ``<store>/report.html``) and return its path.

    ``report`` is a :class:`StudyReport` already built (the runner builds it once and also hands it to
    :func:`scaling.study.wandb_report.publish_study`); when None it is built from the store.
    """
    store_root = Path(store_root)
    out = Path(out_path) if out_path is not None else store_root / "report.html"
    rep = report if report is not None else build_report(store_root, allow_mixed=allow_mixed, config_hash=config_hash,
                                                         n_boot_fit=n_boot_fit, workers=workers)
    atomic_write_text(out, render_html(rep))
    log.info("report written to %s", out)
    return out

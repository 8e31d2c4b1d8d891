"""The study's figures (matplotlib, Agg): the seed paper's views, each with error bars from the seed summary.

Every function takes the seed summary (:func:`scaling.study.aggregate.summarise`) or a derived table and returns a
matplotlib Figure, or None when the study has nothing to show for that view (e.g. no OOD set). Error bars are the
summary's intervals: across seeds when there are several, the run's patient-level bootstrap otherwise.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: the report is written on training nodes and in CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from scaling.study.aggregate import full_fraction, select

_MARKERS = "osD^vP*X"


def _palette(keys, ordered: bool = False) -> dict:
    cmap = plt.get_cmap("tab10")
    keys = list(keys) if ordered else sorted(keys, key=str)
    return {k: cmap(i % 10) for i, k in enumerate(keys)}


def _fraction_axis(ax, fractions) -> None:
    """Log x axis labelled with the grid's own fractions (0.01, 0.1, 1) rather than powers of ten."""
    ax.set_xscale("log")
    ticks = sorted(set(float(f) for f in fractions))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()


def _yerr(d: pd.DataFrame) -> np.ndarray:
    """Asymmetric error bars from mean/lo/hi (NaN bounds become zero-length bars rather than hiding the point)."""
    lo = np.nan_to_num((d["mean"] - d["lo"]).to_numpy(float), nan=0.0).clip(min=0)
    hi = np.nan_to_num((d["hi"] - d["mean"]).to_numpy(float), nan=0.0).clip(min=0)
    return np.vstack([lo, hi])


def _lines(ax, data: pd.DataFrame, x: str, by: str, colors: dict, *, linestyle="-", legend=True, marker=True):
    # Legend order follows the palette (sources alphabetically, backbones by size), not the groupby order.
    keys = [k for k in colors if k in set(data[by])]
    for i, key in enumerate(keys):
        g = data[data[by] == key].sort_values(x)
        ax.errorbar(g[x], g["mean"], yerr=_yerr(g), color=colors.get(key), linestyle=linestyle, capsize=3,
                    marker=_MARKERS[i % len(_MARKERS)] if marker else None, label=str(key) if legend else "_")


def _finish(fig, axes, extra=()) -> plt.Figure:
    """One shared legend under the panels (labels starting with ``fit:`` stay in their own panel's legend);
    ``extra`` are (handle, label) pairs to add, e.g. a line-style key."""
    handles, labels = [h for h, _ in extra], [lab for _, lab in extra]
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("fit:"):
                handles.append(h)
                labels.append(lab)
    if handles:
        # As many columns as fit the figure's width, so a narrow figure never clips its legend.
        ncol = max(1, min(len(labels), int(fig.get_figwidth() // 2.3)))
        rows = (len(labels) - 1) // ncol + 1
        fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=8)
        fig.tight_layout(rect=(0, min(0.4, 0.2 * rows / fig.get_figheight() + 0.01), 1, 1))
    else:
        fig.tight_layout()
    return fig


def _grid(n: int, ncols: int = 3, size=(4.2, 3.3), sharey=False):
    ncols = max(1, min(n, ncols))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows + 0.6), squeeze=False,
                             sharey=sharey)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def auroc_vs_params(summary: pd.DataFrame, laws: dict | None = None) -> plt.Figure | None:
    """Macro AUROC vs parameter count (log x), one line per pretraining source, one panel per test/OOD set, at
    full data; fitted laws (``fits.fit_table``'s second value) drawn dashed."""
    s = select(summary, "auroc")
    s = s[(s["eval_set"] != "val") & (s["fraction"] == full_fraction(summary))] if len(s) else s
    if s.empty:
        return None
    sets = sorted(s["eval_set"].unique(), key=lambda e: (e != "test", e))
    colors = _palette(s["pretrained"].unique())
    fig, axes = _grid(len(sets))
    for ax, es in zip(axes, sets):
        d = s[s["eval_set"] == es]
        _lines(ax, d, "n_params", "pretrained", colors)
        for src in d["pretrained"].unique():
            law = (laws or {}).get(("n_params", src, "", es))
            if law is not None:
                xs = np.geomspace(d["n_params"].min(), d["n_params"].max(), 50)
                ax.plot(xs, 1 - law.predict(xs), linestyle="--", color=colors[src], alpha=0.7,
                        label=f"fit: {src}, b={law.b:.2f}")
        fits = [(h, lab[5:]) for h, lab in zip(*ax.get_legend_handles_labels()) if lab.startswith("fit:")]
        if fits:
            ax.legend(*zip(*fits), fontsize=7, loc="lower right", title="error = a·x^−b + c", title_fontsize=7)
        ax.set_xscale("log")
        ax.set(title=f"{es}: AUROC vs model size", xlabel="parameters", ylabel="macro AUROC")
        ax.grid(alpha=0.3)
    return _finish(fig, axes)


def _source_panels(d: pd.DataFrame):
    """One panel per pretraining source and one colour per backbone, ordered by size: (sources, colours, fig, axes)."""
    srcs = sorted(d["pretrained"].unique(), key=str)
    order = d.drop_duplicates("backbone").sort_values("n_params")["backbone"].tolist()
    fig, axes = _grid(len(srcs), sharey=True)
    return srcs, _palette(order, ordered=True), fig, axes


def auroc_vs_fraction(summary: pd.DataFrame, efficiency: pd.DataFrame | None = None,
                      eval_set: str = "test") -> plt.Figure | None:
    """Data efficiency: AUROC vs labelled fraction (log x), one line per backbone, one panel per pretraining
    source; the full-data baseline as a horizontal line and each curve's fraction-to-match marked on it as the
    table reads it (``fraction_to_match_text``): a crossing inside the grid ``|``, one at most the smallest
    fraction ``<`` at that fraction, one never reached ``>`` at the largest."""
    s = select(summary, "auroc", eval_set)
    if s.empty or s["fraction"].nunique() < 2:
        return None
    srcs, colors, fig, axes = _source_panels(s)
    largest = float(s["fraction"].max())
    shown: set[str] = set()
    for ax, src in zip(axes, srcs):
        d = s[s["pretrained"] == src]
        _lines(ax, d, "fraction", "backbone", colors)
        if efficiency is not None and len(efficiency):
            base = float(efficiency["baseline_auroc"].iloc[0])
            ax.axhline(base, color="grey", linestyle=":", label=f"baseline: {efficiency['baseline'].iloc[0]}")
            for r in efficiency[efficiency["pretrained"] == src].itertuples(index=False):
                x, marker = (largest, ">") if r.censored == "above" else \
                    (r.fraction_to_match, "<" if r.censored == "below" else "|")
                if np.isfinite(x):
                    ax.plot([x], [base], marker=marker, markersize=14 if marker == "|" else 9, linestyle="none",
                            color=colors.get(r.backbone))
                    shown.add(marker)
        _fraction_axis(ax, d["fraction"])
        ax.set(title=f"{src}: AUROC vs data ({eval_set})", xlabel="fraction of labelled data", ylabel="macro AUROC")
        ax.grid(alpha=0.3)
    key = [(plt.Line2D([], [], color="black", marker=m, linestyle="none"), label) for m, label in
           (("|", "matches the baseline at this fraction"), ("<", "matches it at this fraction or less"),
            (">", "does not match it (more than the largest fraction)")) if m in shown]
    return _finish(fig, axes, extra=key)


def id_vs_ood(summary: pd.DataFrame, drop_summary: pd.DataFrame, trends: dict | None = None) -> plt.Figure | None:
    """Per OOD set, on the labels it shares with test: in-distribution vs OOD AUROC (every cell, both error bars,
    y = x dashed, the study's probit trend dotted where ``trends`` has it: see
    :func:`scaling.study.tables.effective_robustness`) and the OOD drop (test − OOD AUROC) vs parameter count per
    pretraining source, at full data."""
    sets = sorted(set(select(summary, "auroc_drop")["eval_set"]))
    if not sets:
        return None
    keys = ["backbone", "pretrained", "fraction"]
    colors = _palette(summary["pretrained"].unique())
    fig, axes = plt.subplots(len(sets), 2, figsize=(9, 3.6 * len(sets) + 0.6), squeeze=False)
    for row, es in zip(axes, sets):
        test = select(summary, "auroc_id", es).set_index(keys)
        ood = select(summary, "auroc_ood", es).set_index(keys)
        j = test.merge(ood, how="inner", left_index=True, right_index=True, suffixes=("_id", "_ood")).reset_index()
        for src, g in j.groupby("pretrained", sort=True):
            xerr = _yerr(g.rename(columns={"mean_id": "mean", "lo_id": "lo", "hi_id": "hi"}))
            yerr = _yerr(g.rename(columns={"mean_ood": "mean", "lo_ood": "lo", "hi_ood": "hi"}))
            row[0].errorbar(g["mean_id"], g["mean_ood"], xerr=xerr, yerr=yerr, fmt="o", color=colors[src],
                            capsize=2, alpha=0.8, label=src)
        lims = [np.nanmin(j[["lo_id", "lo_ood", "mean_id", "mean_ood"]].to_numpy()),
                np.nanmax(j[["hi_id", "hi_ood", "mean_id", "mean_ood"]].to_numpy())]
        row[0].plot(lims, lims, linestyle="--", color="grey", linewidth=1)
        line = (trends or {}).get(es)
        if line is not None and np.all(np.isfinite(lims)):
            grid = np.linspace(max(lims[0], 1e-3), min(lims[1], 1 - 1e-3), 50)
            trend = stats.norm.cdf(line["intercept"] + line["slope"] * stats.norm.ppf(grid))
            row[0].plot(grid, trend, linestyle=":", color="black", linewidth=1, label="trend (probit)")
        row[0].set(title=f"in-distribution vs {es} (shared labels)", xlabel="test AUROC", ylabel=f"{es} AUROC")
        d = drop_summary[(drop_summary["eval_set"] == es)] if len(drop_summary) else drop_summary
        d = d[d["fraction"] == full_fraction(summary)] if len(d) else d
        if len(d):
            _lines(row[1], d, "n_params", "pretrained", colors)
        row[1].set_xscale("log")
        row[1].set(title=f"OOD drop ({es}) vs model size", xlabel="parameters", ylabel="test − OOD AUROC")
        for ax in row:
            ax.grid(alpha=0.3)
    return _finish(fig, axes)


def fairness_vs_params(summary: pd.DataFrame, eval_set: str = "test") -> plt.Figure | None:
    """Per attribute of ``eval_set``: worst-group AUROC and AUROC gap (max − min over groups) vs parameter count per
    pretraining source, at full data."""
    s = summary[(summary["eval_set"] == eval_set) & (summary["label"] == "macro") & (summary["group"] == "all")
                & (summary["attribute"] != "all") & (summary["metric"].isin(["worst_group_auroc", "auroc_gap"]))]
    s = s[s["fraction"] == full_fraction(summary)] if len(s) else s
    if s.empty:
        return None
    attrs = sorted(s["attribute"].unique())
    colors = _palette(s["pretrained"].unique())
    fig, axes = plt.subplots(len(attrs), 2, figsize=(9, 3.4 * len(attrs) + 0.6), squeeze=False)
    for row, attr in zip(axes, attrs):
        for ax, metric, ylabel in ((row[0], "worst_group_auroc", "worst-group AUROC"),
                                   (row[1], "auroc_gap", "AUROC gap (max − min)")):
            d = s[(s["attribute"] == attr) & (s["metric"] == metric)]
            _lines(ax, d, "n_params", "pretrained", colors)
            ax.set_xscale("log")
            ax.set(title=f"{eval_set}, {attr}: {ylabel}", xlabel="parameters", ylabel=ylabel)
            ax.grid(alpha=0.3)
    return _finish(fig, axes)


def calibration_vs_params(summary: pd.DataFrame, eval_sets=("test",)) -> plt.Figure | None:
    """ECE before (solid) and after (dashed) temperature scaling on validation, vs parameter count per source, one
    panel per evaluation set (on ``val`` the temperature is fitted on the same images: in-sample)."""
    s = summary[(summary["label"] == "macro") & (summary["attribute"] == "all") & (summary["group"] == "all")
                & summary["metric"].isin(["ece", "ece_temp"]) & summary["eval_set"].isin(list(eval_sets))]
    s = s[s["fraction"] == full_fraction(summary)] if len(s) else s
    if s.empty:
        return None
    sets = [e for e in eval_sets if e in set(s["eval_set"])]
    colors = _palette(s["pretrained"].unique())
    fig, axes = _grid(len(sets))
    for ax, es in zip(axes, sets):
        d = s[s["eval_set"] == es]
        _lines(ax, d[d["metric"] == "ece"], "n_params", "pretrained", colors)
        # Same colours dashed; the legend explains the line styles once instead of doubling every source.
        _lines(ax, d[d["metric"] == "ece_temp"], "n_params", "pretrained", colors, linestyle="--", legend=False)
        ax.set_xscale("log")
        title = f"{es}: ECE vs model size" + (" (temperature in-sample)" if es == "val" else "")
        ax.set(title=title, xlabel="parameters", ylabel="ECE (macro)")
        ax.grid(alpha=0.3)
    key = [(plt.Line2D([], [], color="black"), "raw"),
           (plt.Line2D([], [], color="black", linestyle="--"), "temperature-scaled (validation)")]
    return _finish(fig, axes, extra=key)


def reliability(curves: pd.DataFrame) -> plt.Figure | None:
    """Reliability diagrams (:func:`scaling.study.compare.reliability_curves`): one row per evaluation set ×
    pretraining source, raw probabilities left and temperature-scaled right, one line per backbone (by size)."""
    if curves is None or curves.empty:
        return None
    panels = curves[["eval_set", "pretrained"]].drop_duplicates()
    order = {e: i for i, e in enumerate(pd.unique(curves["eval_set"]))}
    panels = panels.assign(_o=panels["eval_set"].map(order)).sort_values(["_o", "pretrained"])
    sizes = curves.drop_duplicates("backbone").sort_values("n_params")["backbone"].tolist()
    colors = _palette(sizes, ordered=True)
    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 3.8 * len(panels) + 0.6), squeeze=False)
    for row, (e, src) in zip(axes, panels[["eval_set", "pretrained"]].itertuples(index=False)):
        for ax, scaling in zip(row, ("raw", "temperature")):
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
            for i, bb in enumerate(sizes):
                d = curves[(curves["eval_set"] == e) & (curves["pretrained"] == src) & (curves["backbone"] == bb)
                           & (curves["scaling"] == scaling) & (curves["n"] > 0)]
                if len(d):
                    ax.plot(d["mean_predicted"], d["fraction_positive"], marker=_MARKERS[i % len(_MARKERS)],
                            markersize=4, color=colors[bb], label=bb)
            which = "raw" if scaling == "raw" else "temperature-scaled"
            ax.set(title=f"{e}, {src}: {which}", xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability",
                   ylabel="fraction positive")
            ax.grid(alpha=0.3)
    return _finish(fig, axes)


def selective_curves(curves: pd.DataFrame) -> plt.Figure | None:
    """Selective prediction: macro AUROC of the retained cases vs the fraction referred (most uncertain first),
    for the best and the smallest model, with the across-seed interval as a band."""
    if curves is None or curves.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    colors = _palette(curves["model"].unique())
    for model, g in curves.groupby("model", sort=True):
        g = g.sort_values("referral")
        ax.plot(g["referral"], g["mean"], marker="o", markersize=3, color=colors[model], label=model)
        ax.fill_between(g["referral"], g["lo"], g["hi"], color=colors[model], alpha=0.2)
    ax.set(title="Selective prediction (test)", xlabel="fraction referred (most uncertain first)",
           ylabel="macro AUROC on retained")
    ax.grid(alpha=0.3)
    return _finish(fig, np.array([ax]))


# --------------------------------------------------------------------------------------------------------------
# Analysis views (scaling.study.analysis_tables): each draws exactly the table it is given
# --------------------------------------------------------------------------------------------------------------


def _ci(d: pd.DataFrame, mean: str, lo: str, hi: str) -> pd.DataFrame:
    """A frame with the ``mean``/``lo``/``hi`` columns :func:`_lines` reads, taken from other column names."""
    return d.assign(mean=d[mean], lo=d[lo], hi=d[hi])


def probe_gap(table: pd.DataFrame) -> plt.Figure | None:
    """Fine-tuned (solid) and linear-probe (dashed) AUROC vs parameter count per pretraining source, one panel per
    data budget; a second row of panels draws the gap fine-tuned − probe."""
    if table is None or table.empty:
        return None
    budgets = list(dict.fromkeys(table.sort_values(["shots", "fraction"])["budget"]))
    colors = _palette(table["pretrained"].unique())
    fig, axes = plt.subplots(2, len(budgets), figsize=(4.4 * len(budgets), 7.0), squeeze=False)
    for j, b in enumerate(budgets):
        d = table[table["budget"] == b]
        top, bottom = axes[0, j], axes[1, j]
        _lines(top, _ci(d, "finetune", "finetune_lo", "finetune_hi"), "n_params", "pretrained", colors)
        _lines(top, _ci(d, "probe", "probe_lo", "probe_hi"), "n_params", "pretrained", colors, linestyle="--",
               legend=False)
        _lines(bottom, _ci(d, "gap", "gap_lo", "gap_hi"), "n_params", "pretrained", colors, legend=False)
        bottom.axhline(0, color="grey", linewidth=1)
        top.set(title=f"{b}: AUROC (test)", xlabel="parameters", ylabel="macro AUROC")
        bottom.set(title=f"{b}: fine-tuned − probe", xlabel="parameters", ylabel="AUROC gap")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    key = [(plt.Line2D([], [], color="black"), "fine-tuned"),
           (plt.Line2D([], [], color="black", linestyle="--"), "linear probe (frozen features)")]
    return _finish(fig, axes, extra=key)


def fewshot_curves(table: pd.DataFrame) -> plt.Figure | None:
    """AUROC vs k (log x) of the k-shot cells, one panel per pretraining source, one colour per backbone (by size),
    solid fine-tuned and dashed linear probe."""
    if table is None or table.empty:
        return None
    srcs, colors, fig, axes = _source_panels(table)
    for ax, src in zip(axes, srcs):
        d = table[table["pretrained"] == src]
        for proto, style in (("finetune", "-"), ("linear_probe", "--")):
            _lines(ax, d[d["protocol"] == proto], "shots", "backbone", colors, linestyle=style,
                   legend=proto == "finetune" or not (d["protocol"] == "finetune").any())
        _fraction_axis(ax, d["shots"])
        ax.set(title=f"{src}: AUROC vs k (test)", xlabel="k (patients per class and label)", ylabel="macro AUROC")
        ax.grid(alpha=0.3)
    key = [(plt.Line2D([], [], color="black"), "fine-tuned"),
           (plt.Line2D([], [], color="black", linestyle="--"), "linear probe")]
    return _finish(fig, axes, extra=key)


def reinit_curves(table: pd.DataFrame) -> plt.Figure | None:
    """AUROC vs the number of units kept pretrained (the rest re-initialised before fine-tuning), one panel per
    pretraining source and data budget, one colour per backbone (by size): solid when the lowest units are kept
    (``after:k``), dashed when the highest are (``first:k``), both ending at the fully pretrained cell."""
    if table is None or table.empty or table["units_kept"].isna().all():
        return None
    t = table.dropna(subset=["units_kept"]).assign(
        panel=lambda d: d["pretrained"] + ", " + np.where(d["shots"] > 0, d["shots"].astype(str) + "-shot",
                                                           "fraction " + d["fraction"].map("{:g}".format)))
    panels = list(dict.fromkeys(t["panel"]))
    order = t.drop_duplicates("backbone").sort_values("n_params")["backbone"].tolist()
    colors = _palette(order, ordered=True)
    fig, axes = _grid(len(panels), sharey=True)
    for ax, panel in zip(axes, panels):
        d = t[t["panel"] == panel]
        drawn = False
        for kept, style in (("first", "-"), ("last", "--")):
            if (d["kept"] == kept).any():
                _lines(ax, d[d["kept"].isin([kept, "all"])], "units_kept", "backbone", colors, linestyle=style,
                       legend=not drawn)
                drawn = True
        ax.set(title=f"{panel}: AUROC vs units kept", xlabel="units kept pretrained", ylabel="macro AUROC (test)")
        ax.grid(alpha=0.3)
    key = [(plt.Line2D([], [], color="black", linestyle=style), label)
           for kept, style, label in (("first", "-", "lowest units kept (after:k; stem = 1)"),
                                      ("last", "--", "highest units kept (first:k)")) if (t["kept"] == kept).any()]
    return _finish(fig, axes, extra=key)


def shuffle_curves(table: pd.DataFrame) -> plt.Figure | None:
    """Fine-tuned AUROC vs block size (log x; the unshuffled image at its own size, one block) per backbone and data
    budget, one colour per pretraining source; a second row draws each source's gap over scratch on the same
    shuffled images (Neyshabur et al. 2020's Figure 2, as a difference)."""
    if table is None or table.empty or table["block"].isna().all():
        return None
    t = table.dropna(subset=["block"]).assign(
        panel=lambda d: d["backbone"] + ", " + np.where(d["shots"] > 0, d["shots"].astype(str) + "-shot",
                                                         "fraction " + d["fraction"].map("{:g}".format)))
    panels = list(dict.fromkeys(t.sort_values(["n_params", "shots", "fraction"])["panel"]))
    colors = _palette(t["pretrained"].unique())
    fig, axes = plt.subplots(2, len(panels), figsize=(4.4 * len(panels), 7.0), squeeze=False)
    for j, panel in enumerate(panels):
        d = t[t["panel"] == panel]
        top, bottom = axes[0, j], axes[1, j]
        _lines(top, d, "block", "pretrained", colors)
        gap = d.dropna(subset=["gap"])
        if len(gap):
            _lines(bottom, _ci(gap, "gap", "gap_lo", "gap_hi"), "block", "pretrained", colors, legend=False)
        bottom.axhline(0, color="grey", linewidth=1)
        top.set(title=f"{panel}: AUROC (test)", xlabel="block size (pixels)", ylabel="macro AUROC")
        bottom.set(title=f"{panel}: pretrained − scratch", xlabel="block size (pixels)", ylabel="AUROC gap")
        whole = set(d.loc[d["shuffle"] == "none", "block"])  # the unshuffled images: one block
        for ax in (top, bottom):
            _fraction_axis(ax, d["block"])
            ax.set_xticklabels([f"{b:g}" + ("\n(unshuffled)" if b in whole else "") for b in ax.get_xticks()])
            ax.grid(alpha=0.3)
    return _finish(fig, axes)


def cka_block_curves(table: pd.DataFrame) -> plt.Figure | None:
    """CKA between each fine-tuned model and its initialisation per block (x: depth from the first block to
    ``pre_logits``), one panel per backbone, one line per pretraining source, the band spanning the seeds; plain
    cells at their largest fraction."""
    if table is None or table.empty:
        return None
    t = table[(table["reinit"] == "none") & (table["shots"] == 0)]
    if "shuffle" in t:
        t = t[t["shuffle"] == "none"]
    t = t[t["fraction"] == t["fraction"].max()] if len(t) else t
    if t.empty:
        return None
    order = t.drop_duplicates("backbone").sort_values("n_params")["backbone"].tolist()
    colors = _palette(t["pretrained"].unique())
    fig, axes = _grid(len(order), sharey=True)
    for ax, bb in zip(axes, order):
        d = t[t["backbone"] == bb]
        for src, g in d.groupby("pretrained", sort=True):
            g = g.sort_values("depth")
            ax.plot(g["depth"], g["mean"], marker="o", markersize=3, color=colors[src], label=src)
            ax.fill_between(g["depth"], g["min"], g["max"], color=colors[src], alpha=0.15)
        ax.set(title=f"{bb}: initialisation vs fine-tuned", xlabel="block depth (0 = first block, 1 = pre-logits)",
               ylabel="linear CKA", ylim=(0, 1.05))
        ax.grid(alpha=0.3)
    return _finish(fig, axes)


def cka_scale_maps(table: pd.DataFrame) -> plt.Figure | None:
    """Block-by-block CKA heat maps between the smallest backbone (rows) and a larger one (columns) per pretraining
    source (Nguyen et al. 2021's cross-model maps); values in the table beside it."""
    if table is None or table.empty:
        return None
    pairs = table[["pretrained", "backbone_a", "backbone_b"]].drop_duplicates().itertuples(index=False)
    pairs = list(pairs)
    fig, axes = _grid(len(pairs), size=(3.8, 3.6))
    for ax, (src, a, b) in zip(axes, pairs):
        d = table[(table["pretrained"] == src) & (table["backbone_a"] == a) & (table["backbone_b"] == b)]
        grid = d.pivot_table(index="index_a", columns="index_b", values="cka", aggfunc="first")
        im = ax.imshow(grid.to_numpy(float), origin="lower", vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set(title=f"{src}", xlabel=f"{b} block", ylabel=f"{a} block")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _finish(fig, axes)


def to_png(fig: plt.Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure (and close it: a report makes many figures)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def basin_curves(table: pd.DataFrame) -> plt.Figure | None:
    """Loss (top) and macro AUROC (bottom) along the line between two seeds' fine-tuned weights (x: α, 0 = the
    lower seed's model, 1 = the other's), one panel per backbone, one line per pretraining source × fraction
    (Neyshabur et al. 2020's Figure 5): a curve that bulges above its end points' chord is a barrier between
    basins. The rows of ``<store>/analysis/basin.parquet``."""
    if table is None or table.empty:
        return None
    backbones = list(dict.fromkeys(table.sort_values(["backbone"])["backbone"]))
    colors = _palette(table["pretrained"].unique())
    fractions = sorted(table["fraction"].unique(), reverse=True)
    styles = dict(zip(fractions, ["-", "--", ":", "-."] * len(fractions)))
    fig, axes = plt.subplots(2, len(backbones), figsize=(4.4 * len(backbones), 7.0), squeeze=False)
    for j, bb in enumerate(backbones):
        d = table[table["backbone"] == bb]
        for (src, f), g in d.groupby(["pretrained", "fraction"], sort=True):
            g = g.sort_values("alpha")
            label = f"{src}" + (f", fraction {f:g}" if len(fractions) > 1 else "")
            for ax, y in ((axes[0, j], "loss"), (axes[1, j], "auroc")):
                ax.plot(g["alpha"], g[y], styles[f], marker="o", markersize=3, color=colors[src], label=label)
        axes[0, j].set(title=f"{bb}: loss ({d['eval_set'].iloc[0]})", xlabel="α", ylabel="loss")
        axes[1, j].set(title=f"{bb}: macro AUROC", xlabel="α", ylabel="macro AUROC")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    return _finish(fig, axes)

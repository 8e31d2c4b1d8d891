"""The analysis views of a study as tables: what the pretrained features contribute (docs/analysis.md).

* :func:`probe_gap`: fine-tuned vs linear-probe AUROC per backbone × source × data budget, and their difference;
* :func:`fewshot_table`: AUROC vs k of the k-shot cells;
* :func:`reinit_table`: AUROC vs the number of units kept pretrained (Raghu et al. 2019's weight transfusion) and
  the AUROC lost by re-initialising, the measured feature reuse;
* :func:`shuffle_table`: fine-tuned AUROC vs the block size of block-shuffled images per source, and pretrained −
  scratch on the same shuffled images (Neyshabur, Sedghi & Zhang 2020, §3);
* :func:`cka_blocks`: per-block CKA between each fine-tuned run and its initialisation (the diagonal of
  ``runs/<id>/cka.parquet``), averaged over seeds;
* :func:`cka_scales`: block-by-block CKA between the smallest backbone and each larger one of the same source at
  full data, from the runs' stored Gram matrices;
* :func:`read_basin`, :func:`basin_summary`, :func:`basin_side_by_side`: the loss-basin table that
  ``python -m scaling.study basin`` (``scaling.study.basin``) writes to the store, per pair and with the sources
  side by side (Neyshabur, Sedghi & Zhang 2020, §3.3).

Each returns a numeric pandas table (``mean``/``lo``/``hi`` columns where there is an interval); the report prints
them and the plots draw them, so a figure never shows a number that is not in a table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from scaling.config import parse_reinit
from scaling.io import read_parquet
from scaling.metrics.bootstrap import ClusterBootstrap, percentile_interval
from scaling.study.aggregate import PLAIN, cell_interval, select
from scaling.study.store import RunStore, StoreError

log = logging.getLogger(__name__)

BUDGET = ["fraction", "shots"]
"""A cell's data budget: a fraction of the training patients (``shots`` 0) or a k-shot subset."""


def unshuffled(t: pd.DataFrame) -> pd.DataFrame:
    """The rows of cells whose images are not block-shuffled (all of a table made before the axis existed): the
    views other than :func:`shuffle_table` compare cells on the images as they are."""
    return t[t["shuffle"] == "none"] if "shuffle" in t else t


def budget_name(fraction: float, shots: int) -> str:
    """``fraction 0.2`` or ``5-shot``."""
    return f"{int(shots)}-shot" if shots else f"fraction {float(fraction):g}"


def paired_macro_gap(pred_a: pd.DataFrame, pred_b: pd.DataFrame, n_boot: int = 200, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, float, float]:
    """Macro AUROC of ``pred_a`` minus that of ``pred_b`` on the same samples, with a paired patient-level
    bootstrap interval: (difference, lo, hi).

    Predictions are the store's (``label:<L>``, ``logit:<L>``, ``patient_id``), joined on ``sample_id``. The macro
    is the mean over the labels whose AUROC is defined (both classes labelled), as in the stored metrics, so the
    difference equals the difference of the two runs' stored macro AUROCs; every replicate resamples the same
    patients for both runs (:class:`scaling.metrics.bootstrap.ClusterBootstrap`).
    """
    from scaling.metrics.discrimination import auroc

    j = pred_a.merge(pred_b, on="sample_id", suffixes=("", "@b"))
    labels = [c.split(":", 1)[1] for c in pred_a.columns if c.startswith("label:")]
    boot = ClusterBootstrap(j["patient_id"], n=len(j), n_boot=n_boot, seed=seed)
    est, reps = [], []
    for lab in labels:
        y = j[f"label:{lab}"].to_numpy(float)
        known = y[np.isfinite(y)]
        if known.size == 0 or known.min() == known.max():
            continue
        a, b = j[f"logit:{lab}"].to_numpy(float), j[f"logit:{lab}@b"].to_numpy(float)
        est.append(auroc(y, a) - auroc(y, b))
        reps.append(boot.replicates("auroc", y, a) - boot.replicates("auroc", y, b))
    if not est:
        return float("nan"), float("nan"), float("nan")
    with np.errstate(all="ignore"):
        lo, hi = percentile_interval(np.nanmean(np.array(reps), axis=0), alpha)
    return float(np.mean(est)), lo, hi


def probe_gap(df: pd.DataFrame, store_root, eval_set: str = "test", confidence: float = 0.95,
              n_boot: int = 200) -> pd.DataFrame:
    """Fine-tuned vs linear-probe macro AUROC on ``eval_set`` per backbone × source × data budget (cells without
    re-initialisation that have both protocols), and the gap fine-tuned − probe.

    ``finetune``/``probe`` with ``*_lo``/``*_hi`` are the cells' means over seeds with the summary's interval
    (:func:`scaling.study.aggregate.cell_interval`: seed spread and test patients together, or the run's bootstrap for
    one seed), clipped to [0, 1]. ``gap`` is the mean over seeds of the paired difference fine-tuned − probe of each
    seed; each seed's difference has a paired patient-level bootstrap interval of the pair's predictions, and with
    two or more seeds they are combined with the spread of the differences the same way (``gap_ci``:
    ``seeds+patients``, or ``bootstrap`` for one seed), clipped to [−1, 1]. Reading it: a gap that shrinks with
    scale means scale helps through better frozen features.
    """
    cols = ["pretrained", "backbone", "n_params", "fraction", "shots", "budget", "finetune", "finetune_lo",
            "finetune_hi", "probe", "probe_lo", "probe_hi", "gap", "gap_lo", "gap_hi", "gap_ci", "n_seeds"]
    runs = unshuffled(select(df, "auroc", eval_set))
    runs = runs[runs["reinit"] == "none"] if "reinit" in runs else runs.iloc[:0]
    if runs.empty or set(runs["protocol"]) < {"finetune", "linear_probe"}:
        return pd.DataFrame(columns=cols)
    store = RunStore(store_root)
    rows = []
    for (src, bb, n, f, k), g in runs.groupby(["pretrained", "backbone", "n_params", *BUDGET], sort=True):
        by = {p: g[g["protocol"] == p].set_index("seed") for p in ("finetune", "linear_probe")}
        if by["finetune"].empty or by["linear_probe"].empty:
            continue
        seeds = sorted(set(by["finetune"].index) & set(by["linear_probe"].index))
        row = {"pretrained": src, "backbone": bb, "n_params": n, "fraction": f, "shots": int(k),
               "budget": budget_name(f, k), "n_seeds": len(seeds)}
        for name, p in (("finetune", "finetune"), ("probe", "linear_probe")):
            v = by[p]["value"].to_numpy(float)
            lo, hi, _, _ = cell_interval(v, by[p]["lo"], by[p]["hi"], confidence)
            row.update({name: float(np.mean(v)), f"{name}_lo": max(lo, 0.0), f"{name}_hi": min(hi, 1.0)})
        if seeds:  # each seed's paired difference with its patient bootstrap, then the seeds combined
            gaps = np.array([paired_macro_gap(store.read_predictions(by["finetune"].loc[s, "run_id"], eval_set),
                                              store.read_predictions(by["linear_probe"].loc[s, "run_id"], eval_set),
                                              n_boot=n_boot, alpha=1 - confidence) for s in seeds], float)
            lo, hi, _, kind = cell_interval(gaps[:, 0], gaps[:, 1], gaps[:, 2], confidence)
            row.update(gap=float(gaps[:, 0].mean()), gap_lo=max(lo, -1.0), gap_hi=min(hi, 1.0), gap_ci=kind)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols).sort_values(["pretrained", "n_params", "shots", "fraction"]).reset_index(
        drop=True)


def fewshot_table(summary: pd.DataFrame, eval_set: str = "test") -> pd.DataFrame:
    """Macro AUROC on ``eval_set`` of every k-shot cell (without re-initialisation): one row per backbone ×
    source × protocol × k, with the labelled training images it had."""
    cols = ["pretrained", "backbone", "n_params", "protocol", "shots", "n_train_images", "mean", "lo", "hi",
            "n_seeds"]
    s = unshuffled(select(summary, "auroc", eval_set))
    if "shots" not in s or s.empty:
        return pd.DataFrame(columns=cols)
    s = s[(s["shots"] > 0) & (s["reinit"] == "none")]
    return s[cols].sort_values(["pretrained", "n_params", "protocol", "shots"]).reset_index(drop=True)


REINIT_KEPT = {"none": "all", "after": "first", "first": "last"}
"""Which units a re-initialisation keeps pretrained, by its kind (:func:`scaling.config.parse_reinit`)."""


def reinit_table(summary: pd.DataFrame, runs: pd.DataFrame, eval_set: str = "test") -> pd.DataFrame:
    """Fine-tuned macro AUROC on ``eval_set`` vs the units kept pretrained, per backbone × source × data budget
    that has re-initialised cells, with the fully pretrained cell (``reinit='none'``) as the reference.

    ``units_kept`` counts the pretrained units left as they were (``after:k`` keeps k; ``first:k`` keeps all but
    the first k; ``none`` keeps all ``n_units``) and ``kept`` says which end of the network they are: ``first``
    (the lowest units, ``after:k``), ``last`` (the highest, ``first:k``) or ``all``; ``after:4`` and ``first:2``
    of a 6-unit backbone both keep 4 units, but not the same ones. ``auroc_lost`` = reference AUROC − this cell's:
    what those re-initialised blocks' pretrained weights were worth, the feature reuse of Raghu et al. 2019.
    """
    cols = ["pretrained", "backbone", "n_params", "fraction", "shots", "reinit", "kept", "units_kept", "n_units",
            "mean", "lo", "hi", "auroc_lost", "n_seeds"]
    s = unshuffled(select(summary, "auroc", eval_set))
    if "reinit" not in s or not (s["reinit"] != "none").any():
        return pd.DataFrame(columns=cols)
    s = s[s["protocol"] == "finetune"]
    units = {}
    if "n_units" in runs:
        known = runs.dropna(subset=["n_units"])
        units = dict(zip(known["backbone"], known["n_units"].astype(int)))
    rows = []
    for key, g in s.groupby(["pretrained", "backbone", "n_params", *BUDGET], sort=True):
        if not (g["reinit"] != "none").any():
            continue
        ref = g[g["reinit"] == "none"]
        base = float(ref["mean"].iloc[0]) if len(ref) else float("nan")
        n_units = units.get(key[1])
        for r in g.itertuples(index=False):
            kind, k = parse_reinit(r.reinit)
            kept = {"none": n_units, "after": k, "first": None if n_units is None else n_units - k}[kind]
            rows.append({"pretrained": key[0], "backbone": key[1], "n_params": key[2], "fraction": key[3],
                         "shots": int(key[4]), "reinit": r.reinit, "kept": REINIT_KEPT[kind], "units_kept": kept,
                         "n_units": n_units,
                         "mean": r.mean, "lo": r.lo, "hi": r.hi, "auroc_lost": base - r.mean, "n_seeds": r.n_seeds})
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["pretrained", "n_params", "fraction", "shots", "kept", "units_kept"]).reset_index(
        drop=True)


def shuffle_table(df: pd.DataFrame, store_root, eval_set: str = "test", image_size: int | None = None,
                  confidence: float = 0.95, n_boot: int = 200) -> pd.DataFrame:
    """Fine-tuned macro AUROC on ``eval_set`` vs the block size of block-shuffled images, per pretraining source ×
    backbone × data budget that has block-shuffled cells (Neyshabur, Sedghi & Zhang 2020, §3), and for every
    source but ``scratch`` the gap source − scratch at the same block size.

    ``shuffle`` is the cell's axis (``none`` or the block size); ``block`` its block size in pixels, ``image_size``
    for the unshuffled cell (one block: the image as it is) when given, NaN otherwise. ``mean``/``lo``/``hi`` are
    the cell's mean over seeds with the summary's interval (:func:`scaling.study.aggregate.cell_interval`),
    clipped to [0, 1]. ``gap`` (with ``scratch``, the scratch cell's AUROC) is the mean over seeds of the paired
    difference source − scratch of each seed: a scratch and a pretrained cell of one seed see the same shuffled
    images (one permutation per seed), so each seed's difference has a paired patient-level bootstrap interval of
    the pair's predictions, combined over seeds with their spread as :func:`probe_gap` does (``gap_ci``), clipped to
    [−1, 1]. Reading it: a gap that stays positive as the blocks shrink (the images' visual features destroyed,
    their low-level statistics kept) is a benefit of pretraining that is not feature reuse.
    """
    cols = ["pretrained", "backbone", "n_params", "fraction", "shots", "budget", "shuffle", "block", "mean", "lo",
            "hi", "scratch", "gap", "gap_lo", "gap_hi", "gap_ci", "n_seeds"]
    runs = select(df, "auroc", eval_set)
    if "shuffle" not in runs or not (runs["shuffle"] != "none").any():
        return pd.DataFrame(columns=cols)
    runs = runs[(runs["protocol"] == "finetune") & (runs["reinit"] == "none")]
    shuffled = runs[runs["shuffle"] != "none"][["pretrained", "backbone", *BUDGET]].drop_duplicates()
    runs = runs.merge(shuffled, on=["pretrained", "backbone", *BUDGET])  # the cells with a shuffled counterpart
    store = RunStore(store_root)
    rows = []
    for (src, bb, n, f, k, sh), g in runs.groupby(["pretrained", "backbone", "n_params", *BUDGET, "shuffle"],
                                                 sort=True):
        g = g.set_index("seed")
        v = g["value"].to_numpy(float)
        lo, hi, _, _ = cell_interval(v, g["lo"], g["hi"], confidence)
        block = float(image_size) if sh == "none" and image_size else (float("nan") if sh == "none" else float(sh))
        row = {"pretrained": src, "backbone": bb, "n_params": n, "fraction": f, "shots": int(k),
               "budget": budget_name(f, k), "shuffle": sh, "block": block, "mean": float(np.mean(v)),
               "lo": max(lo, 0.0), "hi": min(hi, 1.0), "n_seeds": len(v)}
        base = runs[(runs["pretrained"] == "scratch") & (runs["backbone"] == bb) & (runs["fraction"] == f)
                    & (runs["shots"] == k) & (runs["shuffle"] == sh)].set_index("seed")
        seeds = sorted(set(g.index) & set(base.index))
        if src != "scratch" and seeds:
            gaps = np.array([paired_macro_gap(store.read_predictions(g.loc[s, "run_id"], eval_set),
                                              store.read_predictions(base.loc[s, "run_id"], eval_set),
                                              n_boot=n_boot, alpha=1 - confidence) for s in seeds], float)
            glo, ghi, _, kind = cell_interval(gaps[:, 0], gaps[:, 1], gaps[:, 2], confidence)
            row.update(scratch=float(base.loc[seeds, "value"].astype(float).mean()), gap=float(gaps[:, 0].mean()),
                       gap_lo=max(glo, -1.0), gap_hi=min(ghi, 1.0), gap_ci=kind)
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["pretrained", "n_params", "shots", "fraction", "block"], na_position="last").reset_index(
        drop=True)


CKA_KEYS = ["pretrained", "backbone", "n_params", "fraction", "shots", "reinit", "shuffle"]
"""The cell of a CKA curve (fine-tuned runs only), up to its seed."""


def cka_blocks(store_root, runs: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuned cell and layer: CKA between the initialisation and the fine-tuned model (the diagonal of each
    run's ``cka.parquet``), mean / min / max over the cell's seeds. ``depth`` is the layer's position from 0 (first
    block) to 1 (``pre_logits``), so backbones of different depth share an axis."""
    from scaling.study.protocols import CKA_FILE

    cols = [*CKA_KEYS, "index", "layer", "depth", "mean", "min", "max", "n_seeds", "n_examples"]
    done = runs[(runs["status"] == "complete")] if len(runs) else runs
    if "protocol" in done:
        done = done[done["protocol"] == "finetune"]
    store = RunStore(store_root)
    frames = []
    for r in done.to_dict("records"):
        path = store.run_dir(r["run_id"]) / CKA_FILE
        if not path.is_file():
            continue
        t = read_parquet(path)  # a damaged file is named (UnreadableFile), as a damaged predictions file is
        missing = sorted({"index_a", "index_b", "layer_a", "cka", "n_examples"} - set(t.columns))
        if missing:
            raise StoreError(f"{path}: not a CKA table (no column {missing})")
        t = t[t["index_a"] == t["index_b"]]
        frames.append(t.assign(**{k: r.get(k, PLAIN.get(k)) for k in (*CKA_KEYS, "seed")},
                               depth=t["index_a"] / max(int(t["index_a"].max()), 1)))
    if not frames:
        return pd.DataFrame(columns=cols)
    d = pd.concat(frames, ignore_index=True).rename(columns={"index_a": "index", "layer_a": "layer"})
    d["shots"] = pd.to_numeric(d["shots"]).astype(int)
    out = d.groupby([*CKA_KEYS, "index", "layer", "depth"], sort=True, dropna=False).agg(
        mean=("cka", "mean"), min=("cka", "min"), max=("cka", "max"), n_seeds=("seed", "nunique"),
        n_examples=("n_examples", "first")).reset_index()
    return out[cols].sort_values([*CKA_KEYS, "index"]).reset_index(drop=True)


def cka_scales(store_root, runs: pd.DataFrame) -> pd.DataFrame:
    """Block-by-block CKA between the smallest backbone and each larger one of the same source, at the largest
    fraction of the plain fine-tuned cells, paired by seed and averaged over seeds (Nguyen, Raghu & Kornblith 2021's
    cross-model maps). ``layer_a``/``index_a`` belong to ``backbone_a`` (the smaller)."""
    from scaling.study.protocols import scale_cka

    cols = ["pretrained", "backbone_a", "backbone_b", "index_a", "index_b", "layer_a", "layer_b", "cka", "n_seeds"]
    done = runs[runs["status"] == "complete"] if len(runs) else runs
    for k, v in PLAIN.items():
        if k in done:
            done = done[done[k] == v]
    if done.empty:
        return pd.DataFrame(columns=cols)
    done = done[pd.to_numeric(done["fraction"]) == pd.to_numeric(done["fraction"]).max()]
    store = RunStore(store_root)
    frames = []
    for (src, seed), g in done.groupby(["pretrained", "seed"], sort=True):
        g = g.sort_values("n_params")
        if g["backbone"].nunique() < 2:
            continue
        small = g.iloc[0]
        for large in g.iloc[1:].itertuples(index=False):
            t = scale_cka(store, small["run_id"], large.run_id)
            if t is not None:
                frames.append(t.assign(pretrained=src, backbone_a=small["backbone"], backbone_b=large.backbone,
                                       seed=seed))
    if not frames:
        return pd.DataFrame(columns=cols)
    d = pd.concat(frames, ignore_index=True)
    out = d.groupby(["pretrained", "backbone_a", "backbone_b", "index_a", "index_b", "layer_a", "layer_b"],
                    sort=True).agg(cka=("cka", "mean"), n_seeds=("seed", "nunique")).reset_index()
    return out[cols]


# -- the loss-basin table of `python -m scaling.study basin` (scaling.study.basin computes it) ----------------

BASIN_FILE = Path("analysis") / "basin.parquet"
"""The table of the command, under the store's root."""


def basin_path(store_root) -> Path:
    """Where a store keeps the basin table."""
    return Path(store_root) / BASIN_FILE


def read_basin(store_root) -> pd.DataFrame | None:
    """The store's basin table, or None when it has none."""
    path = basin_path(store_root)
    return read_parquet(path) if path.is_file() else None


BASIN_COLUMNS = ["backbone", "pretrained", "fraction", "seeds", "alpha", "loss", "auroc", "loss_barrier",
                 "error_barrier", "seed_1", "seed_2", "run_1", "run_2", "eval_set", "n_examples", "sample", "n_alphas",
                 "norm_stats"]
"""The table's columns, in order."""


def basin_side_by_side(summary: pd.DataFrame) -> pd.DataFrame:
    """The barriers of :func:`basin_summary` with the sources side by side: one row per backbone × fraction ×
    evaluation set, ``loss_barrier: <source>`` and ``error_barrier: <source>`` per source (scratch first)."""
    if summary is None or summary.empty:
        return pd.DataFrame()
    sources = sorted(summary["pretrained"].unique(), key=lambda s: (s != "scratch", s))
    out = summary[["backbone", "fraction", "eval_set"]].drop_duplicates().reset_index(drop=True)
    for src in sources:
        part = summary[summary["pretrained"] == src].rename(columns={
            "loss_barrier": f"loss_barrier: {src}", "error_barrier": f"error_barrier: {src}", "seeds": f"seeds: {src}"})
        out = out.merge(part[["backbone", "fraction", "eval_set", f"seeds: {src}", f"loss_barrier: {src}",
                              f"error_barrier: {src}"]], on=["backbone", "fraction", "eval_set"], how="left")
    return out


def basin_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per pair: the barriers and the end points' loss and AUROC (what the command prints and the report's
    table shows beside the curves)."""
    keys = ["backbone", "pretrained", "fraction", "seeds"]
    rows = []
    for key, g in table.groupby(keys, sort=True):
        g = g.sort_values("alpha")
        rows.append({**dict(zip(keys, key)), "loss_barrier": float(g["loss_barrier"].iloc[0]),
                     "error_barrier": float(g["error_barrier"].iloc[0]), "loss_0": float(g["loss"].iloc[0]),
                     "loss_1": float(g["loss"].iloc[-1]), "max_loss": float(g["loss"].max()),
                     "auroc_0": float(g["auroc"].iloc[0]), "auroc_1": float(g["auroc"].iloc[-1]),
                     "min_auroc": float(g["auroc"].min()), "eval_set": g["eval_set"].iloc[0],
                     "n_examples": int(g["n_examples"].iloc[0])})
    return pd.DataFrame(rows)

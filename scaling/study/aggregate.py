"""Aggregation: the run store → one tidy results table, and its summary over seeds.

The tidy table has one row per run × evaluation set × label × attribute × group × metric, with the study axes as
columns (backbone, parameter count, pretraining source and its image count, data fraction, labelled images, seed).
Only complete runs (DONE marker) contribute numbers; every other run directory is listed with the reason in
:func:`run_status`, so a study that is still running, or has failures, is reported rather than silently averaged
over fewer seeds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from scaling.io import UnreadableFile, read_yaml_file
from scaling.metrics.run_metrics import SCORING_VERSION, base_metric
from scaling.metrics.schema import METRIC_COLUMNS
from scaling.study.store import RunStore, StoreError
from scaling.tracking import redact_paths

log = logging.getLogger(__name__)

AXES = ("study", "config_hash", "backbone", "n_params", "pretrained", "pretrain_images", "fraction",
        "n_train_images", "seed", "protocol", "shots", "reinit", "shuffle")
"""Study axes carried as columns of the tidy table (from each run's spec.json)."""

CELL = ("backbone", "n_params", "pretrained", "pretrain_images", "fraction", "protocol", "shots", "reinit", "shuffle")
"""The axes that identify a grid cell up to its seed."""

PLAIN = {"protocol": "finetune", "shots": 0, "reinit": "none", "shuffle": "none"}
"""The analysis axes of a plain fine-tuning cell (and of runs stored before those axes existed)."""

GRID_KEYS = ("backbone", "pretrained", "fraction", "seed", "protocol", "shots", "reinit", "shuffle")
"""What a run's spec.json and a cell of study.yaml's grid are matched on."""

KEYS = ("eval_set", "label", "attribute", "group", "metric")
"""What one metric row measures."""


class MixedStudyError(StoreError):
    """The store holds runs of more than one study config; refused unless one is chosen (``config_hash``) or
    ``allow_mixed=True``."""


def read_study_config(store_root: str | Path):
    """The study config recorded in ``study.yaml`` (a ``StudyConfig``), or None when absent or unreadable."""
    from scaling.config import ConfigError, StudyConfig, from_dict

    p = Path(store_root) / "study.yaml"
    if not p.is_file():
        return None
    data = read_yaml_file(p) or {}
    data.pop("_meta", None)
    try:
        return from_dict(StudyConfig, data)
    except ConfigError as e:
        log.warning("%s cannot be read as a study config (%s); the grid is taken from the runs found", p, e)
        return None


def _expected_cells(store_root: Path) -> pd.DataFrame:
    """The grid of ``study.yaml`` as rows of axes, with each cell's run id; empty when the store has no readable
    study.yaml."""
    cfg = read_study_config(store_root)
    if cfg is None:
        return pd.DataFrame()
    from scaling.study.grid import expand_grid, run_id

    recorded = recorded_config_hash(store_root) or np.nan
    # Runs with a spec.json are matched on their axes; the recomputed run id only places a run that has none (one
    # that failed before writing it, in a store written by an older version).
    return pd.DataFrame([{"study": cfg.name, "config_hash": recorded, "backbone": s.backbone,
                          "pretrained": s.pretrained, "fraction": float(s.fraction), "seed": int(s.seed),
                          "protocol": s.protocol, "shots": int(s.shots), "reinit": s.reinit, "shuffle": s.shuffle,
                          "run_id": run_id(cfg, s)}
                         for s in expand_grid(cfg)])


def run_status(store_root: str | Path) -> pd.DataFrame:
    """One row per run of the study: its axes, ``status`` and, for every run that is not complete, the ``reason``.

    Status is ``complete``, ``failed`` (FAILED.json; reason = the error, the study's sample and patient ids and
    file paths redacted), ``partial`` (started,
    no DONE: still running or interrupted), ``invalid`` (DONE but its metrics are unreadable) or ``not started``
    (in the grid of study.yaml, no directory yet). A run without a readable spec.json takes the axes of the cell of
    study.yaml's grid whose run id it has, so it is counted once, as that cell.
    """
    store = RunStore(store_root)
    grid = _expected_cells(store.root)
    by_id = {r["run_id"]: r for r in grid.to_dict("records")} if len(grid) else {}
    rows = []
    for rid in store.run_ids():
        status = store.status(rid)
        row: dict = {"run_id": rid}
        try:
            row.update(store.read_spec(rid))
        except (StoreError, ValueError) as e:
            status, row["reason"] = ("failed" if status == "failed" else "partial"), f"no readable spec.json ({e})"
            row.update(by_id.get(rid, {}))
        row["run_id"] = rid
        if status == "failed":
            try:
                fail = store.read_failure(rid) or {}
            except (StoreError, ValueError) as e:  # one damaged record must not hide the rest of the study
                fail = {"error": f"FAILED.json unreadable ({e})"}
            # the error with the study's ids redacted when the run recorded it (FAILED.json "reason"), else paths
            error = str(fail.get("error", "FAILED.json without an error"))
            row["reason"] = str(fail.get("reason") or redact_paths(error))
        elif status == "partial" and "reason" not in row:
            row["reason"] = "started, no DONE marker (still running or interrupted)"
        elif status == "complete" and not (store.run_dir(rid) / "metrics.parquet").is_file():
            status, row["reason"] = "invalid", "DONE but metrics.parquet is missing"
        row["status"] = status
        rows.append({**PLAIN, **row} if "backbone" in row else row)
    df = pd.DataFrame(rows)
    if not grid.empty:
        cell = list(GRID_KEYS)
        seen = set(df[cell].itertuples(index=False, name=None)) if len(df) and set(cell) <= set(df.columns) else set()
        todo = [tuple(r) not in seen for r in grid[cell].itertuples(index=False, name=None)]
        missing = grid[todo].drop(columns="run_id").assign(status="not started",
                                                           reason="in the grid of study.yaml, no run directory yet")
        df = pd.concat([df, missing], ignore_index=True) if len(df) else missing.reset_index(drop=True)
    for c in ("run_id", *AXES, "status", "reason"):
        if c not in df.columns:
            df[c] = np.nan
    return df


def recorded_config_hash(store_root: str | Path) -> str | None:
    """The config hash that study.yaml records (that of the latest launch with work to do), or None."""
    p = Path(store_root) / "study.yaml"
    meta = ((read_yaml_file(p) or {}).get("_meta") or {}) if p.is_file() else {}
    return meta.get("config_hash")


def _configs(status: pd.DataFrame, store_root: Path) -> str:
    """Each study config of a run-status table, for messages: its hash, study name and how many of its runs have a
    directory and are complete; the one study.yaml records is marked."""
    specs = status.dropna(subset=["config_hash"])
    latest = recorded_config_hash(store_root)
    out = []
    for (h, name), g in specs.groupby(["config_hash", "study"], dropna=False, sort=True):
        started = g[g["status"] != "not started"]
        out.append(f"{h} ({name}: {len(started)} run{'' if len(started) == 1 else 's'}, "
                   f"{int((g['status'] == 'complete').sum())} complete"
                   + (", the config in study.yaml" if h == latest else "") + ")")
    return "; ".join(out)


def _check_mixed(status: pd.DataFrame, allow_mixed: bool, store_root: Path) -> None:
    configs = status.dropna(subset=["config_hash"]).groupby(["study", "config_hash"], dropna=False).ngroups
    if configs > 1 and not allow_mixed:
        raise MixedStudyError(
            f"{store_root} holds runs of {configs} study configs: {_configs(status, store_root)}. Their numbers "
            f"are not comparable: pass config_hash=<hash> (CLI: --config-hash HASH) to read the runs of one of "
            f"them, or allow_mixed=True (CLI: --allow-mixed) to aggregate them together, keeping study/config_hash "
            f"columns"
        )


def _select_config(status: pd.DataFrame, config_hash: str, store_root: Path) -> pd.DataFrame:
    """The runs of one study config; a run whose config is unknown (no readable spec.json and no cell of study.yaml,
    or a spec.json written before config hashes were recorded) is kept, so that nothing is hidden by the choice. A
    hash that no run has, in a store that records hashes, is refused (a mistyped one)."""
    if status["config_hash"].notna().any() and not (status["config_hash"] == config_hash).any():
        raise StoreError(f"{store_root} holds no run of config {config_hash!r}; its configs: "
                         f"{_configs(status, store_root) or 'none recorded'}")
    keep = (status["config_hash"] == config_hash) | status["config_hash"].isna()
    return status[keep].reset_index(drop=True)


def check_store(store_root: str | Path) -> None:
    """Refuse a path that is not a run store (a mistyped one) before anything reads or writes there."""
    root = Path(store_root)
    if not (root / "runs").is_dir() and not (root / "study.yaml").is_file():
        raise StoreError(f"{root} is not a run store (it has neither runs/ nor study.yaml): check the path")


@dataclass(frozen=True)
class StudyResults:
    """What a run store holds: the tidy table of its complete runs and the status of every run of its grid."""

    results: pd.DataFrame
    """The tidy results table (see :func:`load_results`)."""
    runs: pd.DataFrame
    """:func:`run_status`, with runs whose metrics could not be read marked ``invalid``."""
    left_out: str = ""
    """The study configs of the store that a ``config_hash`` choice left out (hash, name, run counts), or ""."""
    alpha: float = 0.05
    """``eval.alpha`` of the runs: their bootstrap intervals are at confidence 1 − alpha (:func:`eval_settings`)."""
    ece_bins: int = 10
    """``eval.ece_bins`` of the runs: the equal-width bins of their ECE rows (:func:`eval_settings`)."""
    stale_scoring: tuple[str, ...] = ()
    """Complete runs whose metric rows were written under an older definition
    (:data:`scaling.metrics.run_metrics.SCORING_VERSION`): a launch of the study rescores them from their stored
    predictions; until then their rows mean what they meant then (docs/run-store.md)."""

    @property
    def confidence(self) -> float:
        """The confidence level of the runs' intervals, 1 − ``eval.alpha``: what :func:`summarise` needs."""
        return 1.0 - self.alpha


def eval_settings(store_root: str | Path, metas: list[dict] | None = None) -> dict:
    """``{"alpha": ..., "ece_bins": ...}``: the ``eval`` settings the runs' metrics were computed with.

    Read from the runs' own record (``meta.json`` → ``fitted_on_val``, written with the metrics) in ``metas``;
    where the runs disagree or record none, from study.yaml's ``eval`` section (with a warning when they disagree),
    else the defaults of ``EvalConfig``."""
    from scaling.config import EvalConfig

    cfg = read_study_config(store_root)
    default = cfg.eval if cfg is not None else EvalConfig()
    out = {}
    for key in ("alpha", "ece_bins"):
        seen = {m["fitted_on_val"][key] for m in metas or () if key in (m.get("fitted_on_val") or {})}
        if len(seen) > 1:
            log.warning("the runs' metrics were computed with different eval.%s (%s): the report states %s, the "
                        "value of study.yaml", key, ", ".join(map(str, sorted(seen))), getattr(default, key))
        out[key] = seen.pop() if len(seen) == 1 else getattr(default, key)
    return {"alpha": float(out["alpha"]), "ece_bins": int(out["ece_bins"])}


def load_study(store_root: str | Path, *, allow_mixed: bool = False, config_hash: str | None = None) -> StudyResults:
    """The tidy results table of every complete run in the store, and the status of every run.

    ``results`` columns: ``run_id``, the study axes (:data:`AXES`) and the metric columns (eval_set, label, attribute,
    group, metric, value, lo, hi, n) and ``seeds_expected``, the seeds of the run's cell in the study (failed and
    unfinished runs included; a ``grid.also`` cell may have fewer than the grid), which :func:`summarise` needs to
    flag incomplete cells; ``results.attrs["n_seeds_expected"]`` is the number of seeds of the whole study. Problems are also
    logged. ``config_hash`` reads the runs of that study config only (a store also holds the runs of every earlier
    config a launch wrote there, e.g. another learning rate); without it a store holding runs of more than one
    config raises :class:`MixedStudyError`, unless ``allow_mixed``. ``alpha`` and ``ece_bins`` are the ``eval``
    settings the runs' metrics were computed with (:func:`eval_settings`): summarise with
    ``confidence=study.confidence``.
    """
    store = RunStore(store_root)
    check_store(store.root)
    status, left_out = run_status(store_root), ""
    if config_hash is not None:
        every, status = status, _select_config(status, config_hash, store.root)
        left_out = _configs(every[every["config_hash"] != config_hash], store.root)
    else:
        _check_mixed(status, allow_mixed, store.root)
    problems = status[~status["status"].isin(["complete", "not started"])]
    for r in problems.itertuples(index=False):
        log.warning("run %s is %s: %s", r.run_id, r.status, r.reason)
    frames, metas, stale = [], [], []
    for r in status[status["status"] == "complete"].to_dict("records"):
        try:
            m = store.read_metrics(r["run_id"])
        except Exception as e:  # an unreadable file must not hide the rest of the study
            status.loc[status["run_id"] == r["run_id"], ["status", "reason"]] = ["invalid", f"metrics unreadable: {e}"]
            log.warning("run %s: metrics unreadable (%s)", r["run_id"], e)
            continue
        try:  # the eval settings the metrics were computed with; an unreadable meta.json leaves the study's
            metas.append(store.read_meta(r["run_id"]))
        except Exception as e:
            log.warning("run %s: meta.json unreadable (%s)", r["run_id"], e)
        try:
            scoring = (store.read_evaluation(r["run_id"]).get("metrics") or {}).get("scoring", 1)
        except (UnreadableFile, AttributeError):  # unreadable, or not an object: a launch redoes its evaluation
            scoring = SCORING_VERSION
        if scoring != SCORING_VERSION:
            stale.append(r["run_id"])
        for c in METRIC_COLUMNS:
            if c not in m.columns:
                m[c] = np.nan
        for c in ("run_id", *AXES):
            m[c] = r.get(c, np.nan)
        frames.append(m)
    cols = ["run_id", *AXES, *METRIC_COLUMNS]
    df = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    for c in ("n_params", "pretrain_images", "fraction", "n_train_images", "value", "lo", "hi", "n"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    df["shots"] = pd.to_numeric(df["shots"], errors="coerce").fillna(0).astype(int)
    # Seeds per cell: a sub-grid (grid.also) may run fewer seeds than the main grid.
    per_cell = status.dropna(subset=["backbone"]).assign(
        shots=lambda t: pd.to_numeric(t["shots"], errors="coerce").fillna(0).astype(int),
        fraction=lambda t: pd.to_numeric(t["fraction"], errors="coerce"))
    keys = [k for k in GRID_KEYS if k != "seed"]
    seeds = per_cell.groupby(keys, dropna=False)["seed"].nunique().rename(SEEDS_COLUMN).reset_index()
    df = df.merge(seeds, on=keys, how="left") if len(df) else df.assign(**{SEEDS_COLUMN: pd.Series(dtype=int)})
    # Only a plain int goes into attrs: pandas compares the attrs of every frame it concatenates or merges, and a
    # DataFrame there makes that comparison raise ("The truth value of a DataFrame is ambiguous", pandas >= 2.1).
    df.attrs = {"n_seeds_expected": int(status["seed"].dropna().nunique())}
    if stale:
        log.warning("%d complete run(s) were scored under an older definition of their metric rows (this code "
                    "writes scoring version %d; e.g. run %s): launch the study again to rescore them from their "
                    "stored predictions (nothing is trained) before reading or sharing their subgroup rows",
                    len(stale), SCORING_VERSION, stale[0])
    return StudyResults(df, status, left_out, **eval_settings(store.root, metas), stale_scoring=tuple(stale))


def load_results(store_root: str | Path, *, allow_mixed: bool = False,
                 config_hash: str | None = None) -> pd.DataFrame:
    """The tidy results table of every complete run in the store (:func:`load_study` without the run status)."""
    return load_study(store_root, allow_mixed=allow_mixed, config_hash=config_hash).results


SEEDS_COLUMN = "seeds_expected"
"""Column of the tidy table: how many seeds the run's cell has in the study (failed and unfinished runs
included)."""


def _expected_seeds(df: pd.DataFrame) -> int:
    expected = df.attrs.get("n_seeds_expected")
    return int(expected) if expected is not None else int(df["seed"].dropna().nunique())


METRIC_RANGES = {
    **dict.fromkeys(("auroc", "auprc", "auroc_id", "auroc_ood", "worst_group_auroc", "auroc_gap", "ece", "mce",
                     "brier", "prevalence", "tpr", "fpr", "tpr_gap", "fpr_gap", "eod", "underdiagnosis_rate",
                     "underdiagnosis_gap", "aurc", "accuracy", "top3_accuracy", "balanced_accuracy",
                     "ece_top_label"), (0.0, 1.0)),
    "auroc_drop": (-1.0, 1.0),
    "brier_multiclass": (0.0, 2.0),
    "nll": (0.0, np.inf),
    "nll_multiclass": (0.0, np.inf),
}
"""The natural range of each metric a run stores (by base name), which :func:`summarise` clips intervals to.

Probabilities, rates, AUROC/AUPRC, ECE/MCE, the binary Brier score, AURC and accuracies lie in [0, 1]; so do gaps
between two of them taken as max − min over groups (``auroc_gap``, ``tpr_gap``, ``fpr_gap``, ``eod``,
``underdiagnosis_gap``: never negative). A signed difference of two AUROCs (``auroc_drop``) lies in [−1, 1], the
multi-class Brier score (Σ_k (p_k − y_k)²) in [0, 2] and an NLL in [0, ∞). A metric not listed here (a name a later
version adds) is not clipped."""


def metric_range(metric: str) -> tuple[float, float]:
    """The natural range of a metric row's value (:data:`METRIC_RANGES`), or (−∞, ∞) when it has none.

    The name is reduced to its base first: a pooled level's suffix (``auroc@exam_max``) and the temperature-scaled
    variant's ``_temp`` (``ece_temp``) share the range of the metric they are a version of."""
    return METRIC_RANGES.get(base_metric(str(metric)).removesuffix("_temp"), (-np.inf, np.inf))


def cell_interval(values, lo, hi, confidence: float = 0.95) -> tuple[float, float, float, str]:
    """Confidence interval of the mean over the seeds of one cell, from the seed spread *and* the test patients.

    ``values`` are the cell's runs' values (one per seed, every seed scored on the same test patients), ``lo`` and
    ``hi`` each run's patient-level bootstrap interval at the same ``confidence``. Returns ``(lo, hi, df, kind)``:

    * two or more seeds, at least one with a finite bootstrap interval (``kind='seeds+patients'``): the mean of k
      seeds has variance ``V = S²/k + P`` — S the standard deviation across seeds (retraining), P the mean over the
      runs of ``se_j²``, each run's patient standard error read off its interval as ``se_j = (hi_j − lo_j)/(2·z)``
      with z the normal quantile at (1 + confidence)/2. The test set is shared by every seed, so the patient term
      does not shrink with k. The interval is ``mean ± t(df)·√V`` with Welch–Satterthwaite degrees of freedom
      (Satterthwaite, "An approximate distribution of estimates of variance components", Biometrics Bulletin 2,
      1946), the patient term counted with infinite degrees of freedom: ``df = V²·(k − 1)/(S²/k)²``, ∞ when S = 0
      (the normal interval of the patient term alone).
    * two or more seeds, no finite bootstrap interval (``kind='seeds'``): the t-interval across seeds,
      ``mean ± t(k − 1)·S/√k``, df = k − 1.
    * one seed: that run's bootstrap interval (``kind='bootstrap'``, df = NaN), or NaN (``kind='none'``) when it
      has none; no value at all: NaN, ``kind='none'``.

    The bounds are not clipped here (:func:`summarise` clips them to the metric's range).
    """
    v = np.asarray(values, dtype=float)
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    ok = np.isfinite(v)
    v, lo, hi = v[ok], lo[ok], hi[ok]
    boot = np.isfinite(lo) & np.isfinite(hi)
    se2 = ((hi[boot] - lo[boot]) / (2.0 * stats.norm.ppf(0.5 + confidence / 2.0))) ** 2
    first = np.flatnonzero(boot)[:1]
    out = _intervals(np.array([v.size]), np.array([v.mean() if v.size else np.nan]),
                     np.array([v.std(ddof=1) if v.size > 1 else np.nan]),
                     np.array([se2.mean() if se2.size else np.nan]),
                     lo[first] if v.size == 1 and first.size else np.array([np.nan]),
                     hi[first] if v.size == 1 and first.size else np.array([np.nan]), confidence)
    return float(out[0][0]), float(out[1][0]), float(out[2][0]), str(out[3][0])


def _intervals(k, mean, sd, patient_var, lo1, hi1, confidence: float):
    """:func:`cell_interval` for many cells at once, from each cell's number of seeds ``k``, ``mean``, ``sd``
    across seeds, mean squared patient standard error ``patient_var`` (NaN: no run with a bootstrap interval) and,
    for one seed, its bootstrap bounds ``lo1``/``hi1``: arrays ``(lo, hi, df, kind)``."""
    k = np.asarray(k, dtype=float)
    mean, sd, patient_var = (np.asarray(x, dtype=float) for x in (mean, sd, patient_var))
    q = 0.5 + confidence / 2.0
    many = k > 1
    seed_var = np.where(many, sd**2 / np.maximum(k, 1), np.nan)
    pooled = many & np.isfinite(patient_var)
    total = np.where(pooled, seed_var + np.where(pooled, patient_var, 0.0), seed_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        satterthwaite = np.where(seed_var > 0, total**2 * (k - 1) / seed_var**2, np.inf)
    dof = np.select([pooled, many], [satterthwaite, k - 1], np.nan)
    finite_df = np.isfinite(dof)
    quantile = np.where(finite_df, stats.t.ppf(q, np.where(finite_df, dof, 1.0)), stats.norm.ppf(q))
    half = quantile * np.sqrt(total)
    single = (k == 1) & np.isfinite(lo1) & np.isfinite(hi1)
    lo = np.where(many, mean - half, np.where(single, lo1, np.nan))
    hi = np.where(many, mean + half, np.where(single, hi1, np.nan))
    kind = np.select([pooled, many, single], ["seeds+patients", "seeds", "bootstrap"], "none").astype(object)
    return lo, hi, dof, kind


def summarise(df: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and confidence interval of every metric over seeds, one row per grid cell × metric row.

    ``confidence`` must be the level the runs' bootstrap intervals were computed at, 1 − ``eval.alpha``
    (:attr:`StudyResults.confidence` reads it from the store). The interval of a cell (:func:`cell_interval`,
    ``ci_kind`` says which) combines the seed-to-seed spread with each run's patient-level bootstrap uncertainty
    (``seeds+patients``); it is the t-interval across seeds alone (``seeds``) where no run of the cell has a bootstrap
    interval, the single run's bootstrap interval with one seed (``bootstrap``), NaN where there is none (``none``).
    ``ci_df`` holds its degrees of freedom (∞: the patient term alone; NaN: a bootstrap interval). The bounds are
    clipped to the metric's natural range (:func:`metric_range`: [0, 1] for AUROC, rates, ECE, Brier, ...), so a
    cell near a bound gets an interval that stops there rather than one running past it.

    ``n_seeds`` counts the finite values that contributed, ``n_runs`` the complete runs of the cell and
    ``n_seeds_expected`` the seeds of the study (failed and running runs included): ``complete`` is False where a
    cell has fewer complete runs than the study has seeds, so a mean over fewer seeds is never mistaken for a full
    one. ``n_models`` counts the distinct models among the cell's runs (:func:`model_fingerprints`): a seed that
    changes nothing (a linear probe of pretrained features on every training image: the same features, the same
    deterministic fit) gives a run identical to the others, and ``n_models < n_seeds`` says so. The interval is
    unchanged by it: identical seeds have no spread, so it is the patient term alone, as it should be.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    group = [c for c in ("study", "config_hash") if c in df and df[c].nunique(dropna=False) > 1]
    cell = [c for c in CELL if c in df.columns]
    group += [*cell, *KEYS]
    finite = np.isfinite(df["value"].to_numpy(dtype=float))
    # A run's bootstrap interval counts only beside a value.
    d = df.assign(lo=df["lo"].where(finite), hi=df["hi"].where(finite))
    # Each run's patient variance, read off its bootstrap interval (the normal quantile at the same level).
    both = np.isfinite(d["lo"].to_numpy(dtype=float)) & np.isfinite(d["hi"].to_numpy(dtype=float))
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    d["_se2"] = np.where(both, ((d["hi"] - d["lo"]).to_numpy(dtype=float) / (2.0 * z)) ** 2, np.nan)
    d["_model"] = d["run_id"].map(model_fingerprints(df))
    out = d.groupby(group, dropna=False, sort=True).agg(
        mean=("value", "mean"), sd=("value", "std"), n_seeds=("value", "count"), n_runs=("run_id", "nunique"),
        n_models=("_model", "nunique"),
        lo1=("lo", "first"), hi1=("hi", "first"), patient_var=("_se2", "mean"),
        n_train_images=("n_train_images", "mean"), n=("n", "mean"),
        **({"expected": (SEEDS_COLUMN, "max")} if SEEDS_COLUMN in d.columns else {})).reset_index()
    lo, hi, dof, kind = _intervals(out["n_seeds"], out["mean"], out["sd"], out["patient_var"], out["lo1"],
                                   out["hi1"], confidence)
    bounds = np.array([metric_range(m) for m in out["metric"]], dtype=float).reshape(-1, 2)
    out["lo"] = np.clip(lo, bounds[:, 0], bounds[:, 1])
    out["hi"] = np.clip(hi, bounds[:, 0], bounds[:, 1])
    out["ci_kind"] = kind
    out["ci_df"] = dof
    fallback = _expected_seeds(df)
    out["n_seeds_expected"] = (out.pop("expected").fillna(fallback).astype(int) if "expected" in out.columns
                               else fallback)
    expected = out["n_seeds_expected"]
    # Completeness is about runs, not values: a subgroup too small to score is NaN in every seed, not missing.
    out["complete"] = out["n_runs"] >= expected
    out = out[[*group, "mean", "sd", "lo", "hi", "ci_kind", "ci_df", "n_seeds", "n_runs", "n_seeds_expected",
               "complete", "n_models", "n_train_images", "n"]]
    short = out[~out["complete"]].drop_duplicates(subset=cell)
    for r in short.itertuples(index=False):
        log.warning("cell %s/%s/fraction %g has %d of %d seeds complete", r.backbone, r.pretrained, r.fraction,
                    r.n_runs, r.n_seeds_expected)
    out.attrs = {}
    return out


def model_fingerprints(df: pd.DataFrame) -> pd.Series:
    """Per run of a tidy table, a fingerprint of every metric value it has there (rounded to 12 decimals, which
    absorbs summation order only): runs with equal fingerprints computed the same numbers on the same rows, i.e.
    are one model counted as several seeds (:func:`summarise`'s ``n_models``)."""
    ordered = df.sort_values(["run_id", *KEYS])
    rows = pd.util.hash_pandas_object(ordered[list(KEYS)].assign(value=ordered["value"].astype(float).round(12)),
                                      index=False).to_numpy()
    return pd.Series({rid: hash(rows[at].tobytes())
                      for rid, at in ordered.groupby("run_id", sort=False).indices.items()}, dtype=object)


LOW_DF = 10
"""Degrees of freedom below which a cell's interval is flagged with its df where it is printed (``(df 1.5)``).

With few seeds, the seed-to-seed term of an interval is estimated from a handful of values: at df 10 Student's
quantile is 2.23 against the normal 1.96, at df 2 it is 4.30, and the interval's own width is uncertain. A
patient-dominated interval (df in the hundreds or ∞) is printed without a flag."""


def level_text(confidence: float) -> str:
    """A confidence level as people write it: 0.95 → ``95%``, 0.995 → ``99.5%``."""
    return f"{100 * confidence:.4g}%"


def interval_text(mean: float, lo: float, hi: float, df: float = np.nan, digits: int = 3) -> str:
    """``mean [lo, hi]`` as every table of the report and the CLI prints a cell, with `` (df 1.5)`` appended where
    the interval rests on fewer than :data:`LOW_DF` degrees of freedom; ``n/a`` without a mean."""
    if pd.isna(mean):
        return "n/a"
    text = f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    # rounded down to a tenth: 9.96 prints 9.9, never a "10" that is flagged as below 10
    return text + (f" (df {np.floor(df * 10) / 10:g})" if np.isfinite(df) and df < LOW_DF else "")


def interval_texts(summary: pd.DataFrame, digits: int = 3) -> list[str]:
    """:func:`interval_text` of every row of a table with ``mean``, ``lo``, ``hi`` and, if it has them, the columns
    of :func:`summarise` that qualify a cell: ``ci_df``, `` (1/2 seeds)`` where it has fewer complete runs than the
    study has seeds (``complete``) and `` (2 seeds, 1 model)`` where its seeds gave identical runs (``n_models``)."""
    n = len(summary)

    def column(name, default):
        return summary[name].to_numpy() if name in summary.columns else np.full(n, default, dtype=object)

    seeds = column("n_seeds", 0)
    out = []
    for m, lo, hi, dof, complete, k, expected, models in zip(
            summary["mean"], summary["lo"], summary["hi"], column("ci_df", np.nan), column("complete", True), seeds,
            column("n_seeds_expected", 0), column("n_models", 0)):
        text = interval_text(m, lo, hi, float(dof), digits)
        text += "" if complete else f" ({k}/{expected} seeds)"
        text += f" ({k} seeds, {models} model{'' if models == 1 else 's'})" if 0 < models < k else ""
        out.append(text)
    return out


def plain_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of plain fine-tuning cells (fraction budget, whole model fine-tuned, nothing re-initialised or
    block-shuffled): what the scaling views (size, data, shift, subgroups, calibration, fits) are drawn from. The
    analysis views read the other cells (docs/analysis.md). A table without one of the axes' columns (made before
    that axis existed) is plain along it."""
    keep = np.ones(len(df), dtype=bool)
    for k, v in PLAIN.items():
        if k in df.columns:
            keep &= (df[k] == v).to_numpy()
    return df[keep]


def select(summary: pd.DataFrame, metric: str, eval_set: str | None = None, label: str = "macro",
           attribute: str = "all", group: str | None = "all") -> pd.DataFrame:
    """Rows of a summary (or tidy table) for one metric; ``eval_set=None`` keeps every evaluation set and
    ``group=None`` every group of the attribute."""
    m = (summary["metric"] == metric) & (summary["label"] == label) & (summary["attribute"] == attribute)
    if group is not None:
        m &= summary["group"] == group
    if eval_set is not None:
        m &= summary["eval_set"] == eval_set
    return summary[m]


def full_fraction(df: pd.DataFrame) -> float:
    """The largest data fraction in a table (the 'full data' setting of the scaling-with-size views)."""
    return float(df["fraction"].max())


def headline_table(summary: pd.DataFrame, metric: str = "auroc", label: str = "macro",
                   attribute: str = "all") -> pd.DataFrame:
    """Wide view: one row per cell, one column per evaluation set, ``mean [lo, hi]`` strings (:func:`interval_texts`:
    `` (df 1.5)`` on an interval of few degrees of freedom, `` (k/n seeds)`` on a cell with fewer complete runs
    than the study has seeds, `` (2 seeds, 1 model)`` on one whose seeds gave identical runs). With an
    ``attribute`` (``sex``), one row per cell and subgroup: its groups' values and the per-attribute summaries
    (``worst_group_auroc``, group ``all``). Empty when the summary has no such rows."""
    subgroups = attribute != "all"
    s = select(summary, metric, label=label, attribute=attribute, group=None if subgroups else "all")
    if s.empty:
        return pd.DataFrame()
    fmt = s.assign(cell=interval_texts(s))
    mixed = [c for c in ("study", "config_hash") if c in s.columns]  # present only for an allow_mixed summary
    # A study with probe, k-shot or re-initialised cells shows those axes; a plain one keeps its four.
    varied = [c for c in PLAIN if c in s.columns and (s[c] != PLAIN[c]).any()]
    by_group = ["group"] if subgroups else []
    wide = fmt.pivot_table(index=[*mixed, "pretrained", "backbone", "n_params", "fraction", *varied, *by_group],
                           columns="eval_set", values="cell", aggfunc="first")
    first = [c for c in ("test", "val") if c in wide.columns]
    order = first + sorted(c for c in wide.columns if c not in first)
    wide = wide[order].reset_index()
    wide.columns.name = None
    wide["n_params"] = wide["n_params"].round().astype("Int64")  # a count: 216640, not 216640.0
    return wide.sort_values(["pretrained", "n_params", "fraction", *varied, *by_group]).reset_index(drop=True)

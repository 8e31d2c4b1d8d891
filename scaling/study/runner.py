"""Run a study: expand the grid, train and evaluate every run not yet in the store, then summarise.

Data flow (``docs/design.md``): config → grid of RunSpec → for each run not complete in the store: dataset tables →
patient split + nested fraction subset → datasets → backbone + head → Trainer.fit → Trainer.predict on every
evaluation set → per-sample predictions written to the store → metrics computed from the stored predictions →
tracker. After the grid: the results table (printed + results.csv) and the HTML report.

Every process of an ``accelerate launch`` runs this same code; only the main process writes to the store.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from scaling.config import ConfigError, StudyConfig, UpstreamConfig, to_dict
from scaling.data.table import DataError, add_age_group, apply_filters
from scaling.engine.ranks import barrier, init_distributed, is_main_process, main_process_first, process_group
from scaling.io import atomic_write_text, read_yaml_file
from scaling.study.grid import RunSpec, config_hash, expand_grid, run_config, run_id
from scaling.study.store import RunStore, StoreError

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
"""``data.root`` value selecting the offline demo data; ``synthetic:b`` is the second (OOD) acquisition site."""


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StudyData:
    """The sample tables of a study, split once and shared by every run."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    ood: dict[str, pd.DataFrame] = field(default_factory=dict)
    labels: tuple[str, ...] = ()

    def eval_sets(self) -> dict[str, pd.DataFrame]:
        """Every evaluation set by name: ``val`` (thresholds/temperature), ``test`` and the OOD sets."""
        return {"val": self.val, "test": self.test, **self.ood}


def _synthetic_root(store_root: Path, root: str, seed: int) -> Path:
    """Resolve ``synthetic[:site]`` to a generated CheXpert-layout dataset under the store (generated once)."""
    from scaling.demo.synthetic import write_synthetic_chexpert

    site = root.split(":", 1)[1] if ":" in root else "a"
    out = store_root / "data" / f"site_{site}"
    if is_main_process() and not (out / "DONE").is_file():
        n_patients = 700 if site == "a" else 300
        # site b draws other patients (another seed) with another acquisition: the OOD test set.
        write_synthetic_chexpert(out, n_patients=n_patients, seed=seed + (0 if site == "a" else 1000), site=site)
        atomic_write_text(out / "DONE", "")
    barrier()
    return out


def _resolve_root(cfg: StudyConfig, root: str) -> Path:
    if root == SYNTHETIC or root.startswith(SYNTHETIC + ":"):
        return _synthetic_root(Path(cfg.output_dir), root, seed=0)
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"dataset root does not exist: {p}")
    return p


def _prepare(df: pd.DataFrame, labels: tuple[str, ...], age_bins) -> pd.DataFrame:
    """Select the study's labels (NaN where a dataset lacks one) and derive the age groups."""
    from scaling.data.labels import select_labels

    return add_age_group(select_labels(df, list(labels)), age_bins).reset_index(drop=True)


def load_study_data(cfg: StudyConfig) -> StudyData:
    """Load and split every table the study needs (patient-level; official splits where configured)."""
    from scaling.data import load_table
    from scaling.data.splits import patient_split

    d = cfg.data
    root = _resolve_root(cfg, d.root)
    full = load_table(d.dataset, root, d.train_split, **d.options)
    # Validation and in-distribution test come from official splits when named, else from train patients.
    # The split seed is fixed (not the run seed): every run of the study sees the same val/test patients.
    carve = {}
    if not d.test_split:
        carve["test"] = d.test_fraction
    if not d.val_split:
        carve["val"] = d.val_fraction
    parts = patient_split(full, carve, seed=0) if carve else {"train": full}
    train = parts["train"]
    val = load_table(d.dataset, root, d.val_split, **d.options) if d.val_split else parts["val"]
    test = load_table(d.dataset, root, d.test_split, **d.options) if d.test_split else parts["test"]
    ood = {}
    for e in d.ood:
        eroot = _resolve_root(cfg, e.root) if e.root else root
        t = load_table(e.dataset or d.dataset, eroot, e.split, **{**(d.options if not e.dataset else {}), **e.options})
        ood[e.name] = apply_filters(t, e.filters, f"eval set {e.name!r}")
        if ood[e.name].empty:
            raise DataError(f"eval set {e.name!r} is empty after filters {e.filters}")
    prep = lambda t: _prepare(t, d.labels, d.age_bins)  # noqa: E731
    return StudyData(
        train=prep(train), val=prep(val), test=prep(test), ood={k: prep(v) for k, v in ood.items()}, labels=d.labels
    )


# ----------------------------------------------------------------------------------------------------------------
# Upstream pretraining (the demo's pretraining-scale axis)
# ----------------------------------------------------------------------------------------------------------------


def _upstream_path(store: RunStore, up: UpstreamConfig, backbone: str) -> Path:
    return store.upstream_dir(up.name) / f"{backbone}.safetensors"


def ensure_upstream(cfg: StudyConfig, store: RunStore, up: UpstreamConfig, backbone: str) -> Path:
    """Pretrain ``backbone`` on generated formula-driven images (``up.num_images``) once; return the weight file."""
    from scaling.demo.synthetic import write_fractal_imagefolder
    from scaling.study.upstream import pretrain

    out = _upstream_path(store, up, backbone)
    if out.is_file():
        return out
    images = store.root / "data" / f"fractal_{up.num_images}_{up.num_classes}_{up.image_size}"
    if is_main_process() and not (images / "DONE").is_file():
        write_fractal_imagefolder(images, num_images=up.num_images, num_classes=up.num_classes,
                                  image_size=up.image_size, seed=0)
        atomic_write_text(images / "DONE", "")
    barrier()
    t0 = time.perf_counter()
    pretrain(up, backbone, images, out, sharding_cfg=cfg.sharding)
    barrier()
    log.info("upstream %s for %s: %.1f s", up.name, backbone, time.perf_counter() - t0)
    return out


def resolve_pretrained(cfg: StudyConfig, store: RunStore, spec: RunSpec) -> str:
    """Turn ``upstream:<name>`` into the local weight file it produced; other sources pass through."""
    if not spec.pretrained.startswith("upstream:"):
        return spec.pretrained
    name = spec.pretrained.split(":", 1)[1]
    up = next(u for u in cfg.upstream if u.name == name)
    return str(ensure_upstream(cfg, store, up, spec.backbone))


def pretrain_images(cfg: StudyConfig, backbone: str, source: str) -> float:
    """Number of upstream pretraining images behind a weight source (0 for scratch, NaN when unknown)."""
    from scaling.models import model_info

    if source == "scratch":
        return 0.0
    if source.startswith("upstream:"):
        return float(next(u.num_images for u in cfg.upstream if u.name == source.split(":", 1)[1]))
    known = model_info(backbone).get("sources", {}).get(source.split(":", 1)[0], {})
    return float(known.get("n_images") or math.nan)


def study_cells(cfg: StudyConfig) -> list[RunSpec]:
    """The grid cells to run: every backbone is validated first (an unknown name fails before anything is written),
    and cells whose pretraining source has no public weights (e.g. ViT-L × ImageNet-1k) are dropped and logged."""
    from scaling.models.presets import has_source, resolve_backbone

    for b in cfg.grid.backbones:
        try:
            resolve_backbone(b)
        except ValueError as e:
            raise ConfigError(f"grid.backbones: {e}") from None
    cells = []
    for spec in expand_grid(cfg):
        if has_source(spec.backbone, spec.pretrained):
            cells.append(spec)
        else:
            log.warning("skipping %s x %s: no public weights for that pair (give a file as '%s:<path>')",
                        spec.backbone, spec.pretrained, spec.pretrained)
    return cells


# ----------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------


def _prediction_frame(table: pd.DataFrame, labels, index: np.ndarray, logits: np.ndarray) -> pd.DataFrame:
    """Per-sample predictions joined with the rows they belong to (file paths are never stored)."""
    rows = table.iloc[index].drop(columns=["path"], errors="ignore").reset_index(drop=True)
    for j, name in enumerate(labels):
        rows[f"logit:{name}"] = logits[:, j].astype(np.float64)
        rows[f"prob:{name}"] = 1.0 / (1.0 + np.exp(-logits[:, j].astype(np.float64)))
    return rows


def run_one(cfg: StudyConfig, spec: RunSpec, data: StudyData, store: RunStore) -> dict:
    """Fine-tune one grid cell and evaluate it on every evaluation set; write everything to the store."""
    from scaling.data.dataset import TableDataset
    from scaling.data.splits import fraction_subset
    from scaling.engine import Trainer
    from scaling.metrics.run_metrics import compute_run_metrics
    from scaling.models import build_model, model_info
    from scaling.tracking import Tracker

    rcfg = run_config(cfg, spec)
    rid = run_id(cfg, spec)
    run_dir = store.run_dir(rid)
    labels = list(data.labels)

    # -- data: nested, seeded, patient-level fraction of the training patients -----------------------------------
    train_table = fraction_subset(data.train, spec.fraction, seed=spec.seed)
    cache = Path(cfg.output_dir) / "cache" if cfg.data.cache else None

    def datasets():
        kw = dict(cache_dir=cache, on_bad_image=cfg.data.on_bad_image, num_workers=cfg.data.num_workers)
        train_ds = TableDataset(train_table, labels, cfg.data.image_size, train=True, flip=cfg.data.flip, **kw)
        return train_ds, {name: TableDataset(t, labels, cfg.data.image_size, train=False, **kw)
                          for name, t in data.eval_sets().items()}

    # The main process fills the shared image cache first; the other ranks then only read it.
    train_ds, eval_ds = main_process_first(datasets)

    # -- model: the main process fetches hub/npz weights first, the other ranks then read the local copy ---------
    source = resolve_pretrained(cfg, store, spec)
    model = main_process_first(lambda: build_model(dataclasses.replace(rcfg.model, pretrained=source),
                                            num_outputs=len(labels), image_size=cfg.data.image_size))
    info = model_info(spec.backbone)
    axes = {
        "run_id": rid, "study": cfg.name, "config_hash": config_hash(cfg),
        "backbone": spec.backbone, "pretrained": spec.pretrained, "fraction": spec.fraction, "seed": spec.seed,
        "n_params": int(info.get("n_params") or sum(p.numel() for p in model.parameters())),
        "pretrain_images": pretrain_images(cfg, spec.backbone, spec.pretrained),
        "n_train_images": len(train_table), "n_train_patients": int(train_table["patient_id"].nunique()),
        "family": info.get("family", ""),
    }
    if is_main_process():
        store.write_spec(rid, axes, yaml.safe_dump(to_dict(rcfg), sort_keys=False))
    barrier()

    # -- train ----------------------------------------------------------------------------------------------------
    tracker = Tracker.create(cfg.tracking, study_name=cfg.name, run_id=rid, axes=axes, run_dir=run_dir,
                             is_main_process=is_main_process())
    if tracker.active:  # identifiers must never reach W&B, whatever key or string carries them
        tracker.protect(pd.concat([t[["sample_id", "patient_id"]] for t in [data.train, *data.eval_sets().values()]])
                        .to_numpy().ravel().tolist())
    trainer = None
    try:
        trainer = Trainer(model, rcfg.train, rcfg.sharding, loss="multilabel", output_dir=run_dir, tracker=tracker)
        summary = trainer.fit(train_ds, val_dataset=eval_ds["val"])

        # -- predict on every evaluation set; metrics are computed from the stored predictions only -------------
        preds = {}
        for name, ds in eval_ds.items():
            out = trainer.predict(ds, batch_size=cfg.eval.batch_size)
            if is_main_process():
                preds[name] = _prediction_frame(ds.table, labels, out["index"], out["logits"])
                store.write_predictions(rid, name, preds[name])
        if is_main_process():
            stored = {name: store.read_predictions(rid, name) for name in preds}
            rows, fitted = compute_run_metrics(stored, labels, list(cfg.data.subgroups), cfg.eval)
            store.write_metrics(rid, rows)
            skipped = int(sum(getattr(ds, "n_skipped", 0) for ds in [train_ds, *eval_ds.values()]))
            store.write_meta(rid, {**summary, "fitted_on_val": fitted, "skipped_images": skipped})
            tracker.log_metrics_table(rows)
            store.mark_complete(rid)
        barrier()
    finally:
        if trainer is not None:
            trainer.close()
        tracker.finish()
    return axes


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------


def _check_store(cfg: StudyConfig, store: RunStore) -> None:
    """Refuse to mix two different studies in one store; record the study config on first use."""
    path = store.root / "study.yaml"
    if path.is_file():
        old = read_yaml_file(path) or {}
        old_hash = (old.get("_meta") or {}).get("config_hash")
        if old_hash and old_hash != config_hash(cfg):
            raise StoreError(
                f"{store.root} holds a study with another config (hash {old_hash} != {config_hash(cfg)}); "
                f"use another output_dir, or delete {path} to mix studies on purpose"
            )
    if is_main_process():
        atomic_write_text(path, yaml.safe_dump({**to_dict(cfg), "_meta": {"config_hash": config_hash(cfg)}},
                                               sort_keys=False))


def results_table(cfg: StudyConfig, store: RunStore) -> pd.DataFrame:
    """One row per run: axes, macro AUROC in-distribution and on each OOD set, worst-subgroup AUROC, status."""
    rows = []
    ood_names = [e.name for e in cfg.data.ood]
    for spec in study_cells(cfg):
        rid = run_id(cfg, spec)
        row = {"backbone": spec.backbone, "pretrained": spec.pretrained, "fraction": spec.fraction,
               "seed": spec.seed, "status": store.status(rid)}
        if row["status"] == "complete":
            m = store.read_metrics(rid)
            macro = m[(m.label == "macro") & (m.attribute == "all") & (m.group == "all") & (m.metric == "auroc")]
            val = dict(zip(macro.eval_set, macro.value))
            row["auroc_test"] = val.get("test", math.nan)
            for name in ood_names:
                row[f"auroc_{name}"] = val.get(name, math.nan)
            worst = m[(m.eval_set == "test") & (m.label == "macro") & (m.metric == "worst_group_auroc")]
            row["worst_subgroup_auroc"] = float(worst.value.min()) if len(worst) else math.nan
            row["params"] = store.read_spec(rid).get("n_params")
        row["run_id"] = rid
        rows.append(row)
    return pd.DataFrame(rows)


def plan(cfg: StudyConfig) -> pd.DataFrame:
    """The runs of a study, which are done, and what each costs — without training.

    Reads the dataset metadata only (no image is decoded; the synthetic demo data is generated if absent) to size
    every run: training patients/images after the data fraction, optimizer steps, images processed (train + eval)
    and, where a finished run of the same backbone recorded its speed, an estimated time.
    """
    from scaling.data.splits import fraction_subset
    from scaling.engine.schedule import total_steps
    from scaling.models import model_info

    store = RunStore(cfg.output_dir)
    data = load_study_data(cfg)
    n_eval = sum(len(t) for t in data.eval_sets().values())
    speed: dict[str, float] = {}
    for rid in store.run_ids():
        if store.is_complete(rid):
            spec, meta = store.read_spec(rid), store.read_meta(rid)
            if meta.get("images_per_s"):
                speed.setdefault(spec.get("backbone", ""), float(meta["images_per_s"]))
    rows = []
    for spec in study_cells(cfg):
        rid = run_id(cfg, spec)
        train = fraction_subset(data.train, spec.fraction, seed=spec.seed)
        steps = total_steps(cfg.train, len(train))
        images = steps * cfg.train.batch_size
        ips = speed.get(spec.backbone)
        rows.append({
            "backbone": spec.backbone, "params_M": round(model_info(spec.backbone)["n_params"] / 1e6, 2),
            "pretrained": spec.pretrained, "fraction": spec.fraction, "seed": spec.seed,
            "status": store.status(rid), "train_patients": int(train["patient_id"].nunique()),
            "train_images": len(train), "steps": steps, "images_processed": images + n_eval,
            "est_minutes": round((images + n_eval) / ips / 60, 1) if ips else math.nan, "run_id": rid,
        })
    return pd.DataFrame(rows)


def run_study(cfg: StudyConfig, *, report: bool = True) -> pd.DataFrame:
    """Run every grid cell not yet complete in the store, then write results.csv (and the HTML report)."""
    from scaling.engine.distributed import check_launch
    from scaling.study.wandb_report import check_available

    check_launch(cfg.sharding, cfg.train)  # a strategy this launch cannot run fails before anything is built
    check_available(cfg.tracking)  # an online study needs wandb-workspaces at its end: refuse now, not after training
    specs = study_cells(cfg)
    init_distributed()
    store = RunStore(cfg.output_dir)
    _check_store(cfg, store)
    todo = [s for s in specs if not store.is_complete(run_id(cfg, s))]
    log.info("study %s: %d runs, %d complete, %d to run", cfg.name, len(specs), len(specs) - len(todo), len(todo))
    failures = []
    if todo:
        data = load_study_data(cfg)
        for i, spec in enumerate(todo, 1):
            rid = run_id(cfg, spec)
            log.info("[%d/%d] %s", i, len(todo), rid)
            try:
                run_one(cfg, spec, data, store)
            except Exception as exc:
                if is_main_process():
                    store.mark_failed(rid, exc)
                if process_group() is not None:  # ranks cannot safely continue after one of them raised
                    raise
                log.exception("run %s failed; continuing with the next run", rid)
                failures.append((rid, exc))
    table = results_table(cfg, store)
    if is_main_process():
        atomic_write_text(store.root / "results.csv", table.to_csv(index=False))
        if report:
            from scaling.study.report import build_report, write_report
            from scaling.study.wandb_report import publish_study

            rep = build_report(store.root)
            write_report(store.root, report=rep)
            publish_study(store.root, cfg.tracking, report=rep)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed: " + "; ".join(f"{r}: {e}" for r, e in failures))
    return table

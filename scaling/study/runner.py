"""Run a study: expand the grid, do for every run what the store lacks, then summarise.

Data flow (``docs/design.md``): config → grid of RunSpec → for each run: dataset tables → patient split + nested
fraction subset → datasets → backbone + head → Trainer.fit → fine-tuned weights and per-sample predictions on every
evaluation set written to the store → metrics computed from the stored predictions → tracker. After the grid: the
results table (printed + results.csv) and the HTML report.

What a run lacks (docs/run-store.md, "Growing a study"): a run not in the store is trained; a finished run without
predictions for an evaluation set of the config is predicted on it from its stored weights, without retraining; a
finished run whose metric settings changed has its metrics recomputed from its stored predictions.

Many launches can share one store (docs/run-store.md, "Many jobs on one store"): each claims a run before working on
it (``scaling.study.claims``) and takes the next unclaimed one; shared preparation is built once under a lock.
Every process of an ``accelerate launch`` runs this same code; rank 0 claims, decides and writes to the store, and
broadcasts its decisions to the other ranks (``scaling.study.coordination``). The sample tables come from
``scaling.study.data``, loaded and split once per launch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import yaml

from scaling.config import (MEAN_VAR_PREFIX, ConfigError, DataConfig, StudyConfig, UpstreamConfig, mean_var_source,
                            to_dict, upstream_name)
from scaling.data.table import add_age_group
from scaling.engine.ranks import broadcast, init_distributed, is_main_process, main_process_first, process_group
from scaling.io import UnreadableFile, atomic_write_text, read_json, write_error
from scaling.metrics.validation import MetricWarning
from scaling.study import protocols
from scaling.study.claims import file_lock, live_owner, try_claim
from scaling.study.coordination import on_main, once, run_errors
from scaling.study.data import (StudyData, check_image_files, check_roots, check_subgroups, load_study_data,
                                same_source, stored_columns)
from scaling.study.grid import (
    PROBE,
    RunSpec,
    config_hash,
    eval_set_identity,
    expand_grid,
    result_settings,
    run_config,
    run_id,
    settings_diff,
)
from scaling.study.store import RunStore, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")


class StudyFailed(RuntimeError):
    """Some runs of a study failed (each has its FAILED.json); the message lists them."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device) before a run draws anything random: the weights of a new
    backbone and head are drawn when it is built, before the Trainer seeds its loop."""
    from accelerate.utils import set_seed

    set_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Upstream pretraining (the demo's pretraining-scale axis)
# ----------------------------------------------------------------------------------------------------------------


def _upstream_path(store: RunStore, up: UpstreamConfig, backbone: str) -> Path:
    return store.upstream_dir(up.name) / f"{backbone}.safetensors"


def _check_upstream(store: RunStore, up: UpstreamConfig) -> None:
    """Refuse an upstream entry whose name the store already holds with other settings: its weights are found by
    name, so they would silently stand for another pretraining run."""
    import json

    p = store.upstream_dir(up.name) / "settings.json"
    if p.is_file():
        diff = settings_diff(read_json(p), json.loads(json.dumps(to_dict(up))))
        if diff:
            raise StoreError(f"upstream {up.name!r} in {store.root} was pretrained with other settings "
                             f"({'; '.join(diff)}); give the changed entry another name")


def ensure_upstream(cfg: StudyConfig, store: RunStore, up: UpstreamConfig, backbone: str) -> Path:
    """Pretrain ``backbone`` on generated formula-driven images (``up.num_images``) once; return the weight file."""
    from scaling.demo.synthetic import write_fractal_imagefolder
    from scaling.io import atomic_write_json
    from scaling.study.upstream import pretrain

    out = _upstream_path(store, up, backbone)
    _check_upstream(store, up)
    images = store.root / "data" / f"fractal_{up.num_images}_{up.num_classes}_{up.image_size}"

    def make_images():
        if is_main_process():
            write_fractal_imagefolder(images, num_images=up.num_images, num_classes=up.num_classes,
                                      image_size=up.image_size, seed=0)
            atomic_write_text(images / "DONE", "")

    def make_weights():
        once(store, f"data-{images.name}", (images / "DONE").is_file, make_images)
        t0 = time.perf_counter()
        pretrain(up, backbone, images, out, sharding_cfg=cfg.sharding)
        if is_main_process():
            atomic_write_json(store.upstream_dir(up.name) / "settings.json", to_dict(up))
        log.info("upstream %s for %s: %.1f s", up.name, backbone, time.perf_counter() - t0)

    once(store, f"upstream-{up.name}-{backbone}", out.is_file, make_weights)
    return out


def resolve_pretrained(cfg: StudyConfig, store: RunStore, spec: RunSpec) -> str:
    """Turn ``upstream:<name>`` into the local weight file it produced (``meanvar:upstream:<name>`` into
    ``meanvar:<file>``); other sources pass through (as given in ``grid.pretrained``, not as labelled)."""
    name = upstream_name(spec.source)
    if name is None:
        return spec.source
    up = next(u for u in cfg.upstream if u.name == name)
    path = str(ensure_upstream(cfg, store, up, spec.backbone))
    return path if mean_var_source(spec.source) is None else MEAN_VAR_PREFIX + path


def pretrain_images(cfg: StudyConfig, backbone: str, source: str) -> float:
    """Number of upstream pretraining images behind a weight source (0 for scratch, NaN when unknown). A Mean Var
    init (``meanvar:<source>``) is NaN: it keeps the scale of its source's weights and none of what the images taught
    them, so it is no point of a curve over pretraining images."""
    from scaling.models import model_info

    if source == "scratch":
        return 0.0
    if mean_var_source(source) is not None:
        return math.nan
    if upstream_name(source) is not None:
        return float(next(u.num_images for u in cfg.upstream if u.name == upstream_name(source)))
    known = model_info(backbone).get("sources", {}).get(source.split(":", 1)[0], {})
    return float(known.get("n_images") or math.nan)


def study_cells(cfg: StudyConfig) -> list[RunSpec]:
    """The grid cells to run: every backbone is validated first (an unknown name fails before anything is written),
    and cells whose pretraining source has no public weights (e.g. ViT-L × ImageNet-1k) are dropped and logged. A
    grid with no cell left is a ConfigError saying why."""
    from scaling.models.presets import has_source, missing_source_hint, resolve_backbone

    for b in cfg.grid.backbones:
        try:
            resolve_backbone(b)
        except ValueError as e:
            raise ConfigError(f"grid.backbones: {e}") from None
    cells, dropped, hints = [], [], set()
    grid = expand_grid(cfg)
    check_source_labels(grid)
    for spec in grid:
        if has_source(spec.backbone, spec.source):
            cells.append(spec)
        else:
            # A named source takes a file; a Hugging Face pair does not (its checkpoint is its architecture).
            hint = missing_source_hint(spec.backbone, spec.source)
            dropped.append(f"{spec.backbone} x {spec.pretrained}")
            hints.add(", or give a file as '<source>:<path>'" if hint.startswith("give a file") else f"; {hint}")
            log.warning("skipping %s x %s: no public weights for that pair (%s)", spec.backbone, spec.pretrained,
                        hint)
    protocols.check_cka(cfg, eval_identities(cfg))
    if not cells:
        pairs = sorted(set(dropped))
        raise ConfigError(f"every cell of the grid was dropped: no public weights for {', '.join(pairs)}; change "
                          f"grid.backbones or grid.pretrained{''.join(sorted(hints))}")
    return cells


def check_source_labels(cells: list[RunSpec]) -> None:
    """Refuse a grid in which two weight sources share a label (:func:`~scaling.study.grid.source_label`):
    ``/a/weights`` and ``/b/weights`` are both ``file:weights``, and their runs could not be told apart in a table.
    The message names both and the fix (a label of one's own, ``<label>:<path>``)."""
    by_label: dict[str, str] = {}
    for spec in cells:
        other = by_label.setdefault(spec.pretrained, spec.source)
        if other != spec.source:
            raise ConfigError(f"grid.pretrained {other!r} and {spec.source!r} would both be labelled "
                              f"{spec.pretrained!r} in tables and plots; name them apart as '<label>:<path>' "
                              f"(e.g. 'mimic:/weights/mimic')")


# ----------------------------------------------------------------------------------------------------------------
# What a run lacks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What one run lacks in the store."""

    kind: str
    """``train`` (not finished), ``evaluate`` (finished, evaluation sets missing), ``metrics`` (finished, metric
    settings changed) or ``cka`` (a finished fine-tuned run without its CKA table, or one made with other
    settings)."""
    eval_sets: tuple[str, ...] = ()
    """The evaluation sets to predict (``evaluate``)."""
    cka: bool = False
    """Also (re)compute the run's CKA table after ``evaluate`` or ``metrics``."""
    why: str = ""
    """Why, where the kind alone does not say (``metrics`` for a run whose metrics.parquet is lost or damaged)."""

    def describe(self) -> str:
        """One word or phrase for logs and the plan."""
        what = f"evaluate {', '.join(self.eval_sets)}" if self.kind == "evaluate" else self.kind
        return what + (f" ({self.why})" if self.why else "") + (", cka" if self.cka and self.kind != "cka" else "")


def eval_identities(cfg: StudyConfig) -> dict[str, Any]:
    """Each evaluation set of the config by name → what it is (``val``/``test`` are fixed by the run id)."""
    return {"val": "run", "test": "run", **{e.name: eval_set_identity(e, cfg.data) for e in cfg.data.ood}}


def metric_settings(cfg: StudyConfig) -> dict[str, Any]:
    """Everything the metrics of stored predictions depend on: the eval section (without the prediction batch
    size), the subgroup attributes, the age bins and the definitions of the stored rows
    (:data:`scaling.metrics.run_metrics.SCORING_VERSION`: a run scored under another is rescored)."""
    from scaling.metrics.run_metrics import SCORING_VERSION

    ev = to_dict(cfg.eval)
    ev.pop("batch_size")
    out = {"eval": ev, "subgroups": list(cfg.data.subgroups), "age_bins": [float(b) for b in cfg.data.age_bins],
           "scoring": SCORING_VERSION}
    if any(same_source(e, cfg.data) for e in cfg.data.ood):
        # Added later: the drop of a set sharing test patients is resampled jointly (metrics scored before are redone).
        out["shift_bootstrap"] = "paired on shared patients"
    return out


def pending_work(cfg: StudyConfig, store: RunStore, spec: RunSpec, since: float | None = None) -> Work | None:
    """What the run of ``spec`` lacks, or None. A run that failed after ``since`` (in a launch running beside this
    one) is left alone; one that failed before is retried: trained if it never finished, or if it finished and a
    later evaluation of it failed, that evaluation again (nothing is trained). A finished run whose metrics.parquet
    is missing or unreadable is rescored: metrics are a function of the stored predictions."""
    rid = run_id(cfg, spec)
    status = store.status(rid)
    if status == "failed" and since is not None:
        failed_at = (store.run_dir(rid) / "FAILED.json").stat().st_mtime
        if failed_at >= since:
            return None
    if not store.is_complete(rid):
        return Work("train")
    cka = protocols.cka_pending(cfg, store, rid, spec)
    wanted, stored = eval_identities(cfg), store.eval_sets(rid)
    missing = tuple(n for n in wanted if n not in stored)
    if missing:
        return Work("evaluate", missing, cka)
    evaluation = store.read_evaluation(rid)
    # Scored before "scored" was recorded: every stored set was.
    if evaluation.get("metrics") != metric_settings(cfg) or \
            sorted(evaluation.get("scored", stored)) != sorted(wanted):
        return Work("metrics", cka=cka)
    try:
        store.read_metrics(rid)
    except (StoreError, UnreadableFile) as e:
        # Lost or damaged after the run finished (atomic writes never leave half a file): rescoring restores it.
        path = store.run_dir(rid) / "metrics.parquet"
        return Work("metrics", cka=cka, why=f"{path.name} {str(e).removeprefix(f'{path}: ')}" if path.is_file()
                    else f"{path.name} is missing")
    if cka:
        return Work("cka")
    if status == "failed":
        # Its last work failed under a config since changed back; rescoring confirms what it stores (not failed).
        return Work("metrics", why="its last evaluation failed")
    return None


INPUTS_KEY = "input_normalisation"
"""meta.json's record of the ``mean`` / ``std`` a run's images were normalised with (``_inputs``)."""


AUGMENT_KEY = "augmentation"
"""meta.json's record of the training views a fine-tuned run was trained on (:func:`augmentation_record`)."""


def augmentation_record(d: DataConfig) -> dict:
    """The training views of ``data``: ``augment`` (``light`` or ``bit``), the ``crop`` (``data.image_size``), for
    ``bit`` the ``resize`` the crop is taken from (``data.bit_resize`` resolved), and ``flip``. A fine-tuned run
    records it in meta.json (``augmentation``) and ``--dry-run`` prints it (:func:`describe_augmentation`)."""
    out = {"augment": d.augment, "crop": d.image_size}
    if d.augment == "bit":
        out["resize"] = d.train_resize
    return {**out, "flip": d.flip}


def shuffle_axes(cfg: StudyConfig, spec: RunSpec) -> dict[str, Any]:
    """spec.json's record of a block-shuffled cell (none for another): the block size in pixels, the number of
    blocks an image is cut into and the seed their permutation is drawn from (the run's,
    ``scaling.data.images.block_permutation``)."""
    if not spec.block:
        return {}
    return {"shuffle_block": spec.block, "shuffle_n_blocks": (cfg.data.image_size // spec.block) ** 2,
            "shuffle_seed": spec.seed}


def describe_augmentation(d: DataConfig) -> str:
    """One line for ``--dry-run``: the training views and the evaluation view of ``data``."""
    flip = "horizontal flips" if d.flip else "no flip (data.flip: false)"
    if d.augment == "bit":
        views = (f"bit: resized to {d.train_resize}x{d.train_resize}, a random {d.image_size}x{d.image_size} crop, "
                 f"{flip}")
    else:
        views = (f"light: a random resized crop of 75-100 % to {d.image_size}x{d.image_size}, rotation up to 7 "
                 f"degrees, {flip}")
    return f"training views: {views}; evaluation: resized to {d.image_size}x{d.image_size}"


def _inputs(*datasets) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` that datasets built by ``_datasets`` for one model normalise with."""
    ds = next(d for d in datasets if d is not None)
    return tuple(ds.mean), tuple(ds.std)


def check_inputs(cfg: StudyConfig, store: RunStore, cells: list[RunSpec]) -> None:
    """Refuse finished runs whose backbone now gets other inputs than it was trained on. Runs record their input
    normalisation (meta.json ``input_normalisation``); runs trained before every backbone was normalised as its
    weights expect (``scaling.models.input_normalisation``) got BiT's 0.5 / 0.5 and record nothing. For a backbone
    whose statistics are BiT's they are what a run trained now would be; for any other (an ImageNet-trained CNN, a
    hub tag trained with ImageNet statistics, an ``hf:`` encoder) their results are of another input, and a relaunch
    would keep them under their run ids and pool them with new seeds. Reads only (the models are built on the meta
    device, once per backbone x source)."""
    suits_bit: dict[tuple[str, str], bool] = {}
    stale = []
    for spec in cells:
        rid = run_id(cfg, spec)
        if not store.is_complete(rid) or INPUTS_KEY in store.read_meta(rid):
            continue
        key = (spec.backbone, spec.source)
        if key not in suits_bit:
            from scaling.models import input_normalisation

            mean, std = input_normalisation(_starting_model_on_meta(run_config(cfg, spec), spec))
            suits_bit[key] = all(v == 0.5 for v in (*mean, *std))
        if not suits_bit[key]:
            stale.append(store.run_dir(rid))
    if stale:
        shown = ", ".join(str(d) for d in stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise ConfigError(
            f"{len(stale)} finished run(s) were trained on BiT's [-1, 1] inputs, before each backbone was normalised "
            f"as its weights expect, and their backbones now get other statistics: {shown}. Their results are not "
            f"comparable with runs trained now; move them (and the store's features/ directory, for linear probes) "
            f"out of {store.root} and relaunch to retrain them (docs/models.md, 'Input normalisation')")


def check_weights(cfg: StudyConfig, store: RunStore, cells: list[RunSpec]) -> None:
    """Every weight source a run still to be trained needs resolves (``resolve_source``: a local file given as a
    path or ``<source>:<path>`` must exist): a missing one is named now, by ``--dry-run`` too, not when its runs
    start. Finished runs need no pretrained weights (they are evaluated from their own), so a study that grows on a
    machine without them is not refused. Hub, URL and Hugging Face sources are fetched when a run needs them, so
    online they are not checked here; offline (``HF_HUB_OFFLINE=1`` / ``SCALING_OFFLINE=1``, as the SLURM scripts
    set) each must already be in the weights directory or the Hugging Face cache, and one that is not is named now
    (``check_offline``, ``check_cached``). ``upstream:`` sources (also as ``meanvar:upstream:``) are made by the
    study. Reads only."""
    from scaling.models.hf import check_cached
    from scaling.models.presets import resolve_backbone
    from scaling.models.weights import WeightsUnavailable, check_offline, offline, resolve_source

    needed = {(s.backbone, s.source) for s in cells if not store.is_complete(run_id(cfg, s))}
    for backbone, source in sorted(needed):
        if upstream_name(source) is not None:
            continue
        try:
            spec = resolve_source(resolve_backbone(backbone), source)
            if spec.kind == "hf" and offline():
                check_cached(spec.location)
            check_offline(spec)
        except WeightsUnavailable as e:
            raise WeightsUnavailable(f"grid.pretrained {source!r} (backbone {backbone}): {e}") from None
        except ValueError as e:
            raise ConfigError(f"grid.pretrained {source!r} (backbone {backbone}): {e}") from None


def check_model_kwargs(cfg: StudyConfig, cells: list[RunSpec]) -> None:
    """Build each backbone of the grid with ``model.kwargs`` on the meta device (no memory, no weights read), so
    that a misspelled or unsupported keyword, or a backbone the library cannot fine-tune (a distilled DeiT's two
    heads), is a ConfigError naming the field and the backbone now, by ``--dry-run`` too, not a failure in every
    run."""
    from scaling.models import resolve_backbone

    for backbone in dict.fromkeys(s.backbone for s in cells):
        if not cfg.model.kwargs and resolve_backbone(backbone).family == "hf":
            continue  # its head is ours, and its config may need a download
        try:
            protocols.meta_model(cfg, backbone)
        except (TypeError, ValueError) as e:
            field = f"model.kwargs {dict(cfg.model.kwargs)} do not build" if cfg.model.kwargs else \
                "grid.backbones: cannot build"
            raise ConfigError(f"{field} backbone {backbone}: {e}") from None


def check_conflicts(cfg: StudyConfig, store: RunStore, cells: list[RunSpec]) -> None:
    """Refuse a config that contradicts the store: a run id recorded with other result settings, an evaluation
    set name that the store holds for another set, an upstream name pretrained with other settings. Each error
    names the run and the key that differs. Reads only."""
    import json

    wanted = eval_identities(cfg)
    for spec in cells:
        rid = run_id(cfg, spec)
        old = store.read_settings(rid)
        if old is not None:
            new = json.loads(json.dumps(result_settings(run_config(cfg, spec)), default=str))
            diff = settings_diff(old, new)
            if diff:
                raise StoreError(f"run {rid} in {store.root} was recorded with other settings ({'; '.join(diff)}); "
                                 f"its id should differ: move {store.run_dir(rid)} away to keep both")
        recorded = store.read_evaluation(rid).get("eval_sets", {})
        for name, ident in wanted.items():
            if name in recorded and json.loads(json.dumps(ident, default=str)) != recorded[name]:
                diff = settings_diff(recorded[name], json.loads(json.dumps(ident, default=str)), f"data.ood[{name}]")
                raise StoreError(f"evaluation set {name!r} of run {rid} was predicted on another set "
                                 f"({'; '.join(diff)}); give the new set another name")
    for up in cfg.upstream:
        if any(upstream_name(s.source) == up.name for s in cells):
            _check_upstream(store, up)


# ----------------------------------------------------------------------------------------------------------------
# One run: train, evaluate from stored weights, score
# ----------------------------------------------------------------------------------------------------------------


def _prediction_frame(table: pd.DataFrame, d: DataConfig, index: np.ndarray,
                      logits: np.ndarray) -> pd.DataFrame:
    """Per-sample predictions joined with the rows they belong to (file paths are never stored): ``logit:<label>``
    and ``prob:<label>``, a sigmoid per label or, for a one-of-K task, the softmax over the classes and each derived
    label's summed probability and log-odds (``scaling.metrics.multiclass.group_scores``)."""
    from scipy.special import expit

    from scaling.metrics.multiclass import group_scores, softmax_probabilities

    rows = table.iloc[index].drop(columns=["path"], errors="ignore").reset_index(drop=True)
    z = logits.astype(np.float64)
    prob = softmax_probabilities(z) if d.task == "multiclass" else expit(z)  # no overflow warning at z << 0
    for j, name in enumerate(d.labels):
        rows[f"logit:{name}"] = z[:, j]
        rows[f"prob:{name}"] = prob[:, j]
    for name, group in d.derived_labels.items():
        rows[f"prob:{name}"], rows[f"logit:{name}"] = group_scores(z, [d.labels.index(c) for c in group])
    return rows


def _datasets(cfg: StudyConfig, model, tables: dict[str, pd.DataFrame], labels: list[str], train_table=None,
              spec: RunSpec | None = None):
    """TableDatasets for ``tables`` (evaluation) and ``train_table``, normalised as ``model``'s weights were trained
    (``scaling.models.input_normalisation``) and, for a block-shuffled ``spec``, every image shuffled with the
    permutation of its seed (the training views and every evaluation set alike); the main process fills the shared
    image cache first, the other ranks then only read it."""
    from scaling.data.dataset import TableDataset
    from scaling.models import input_normalisation

    cache = Path(cfg.output_dir) / "cache" if cfg.data.cache else None
    mean, std = input_normalisation(model)
    kw = dict(cache_dir=cache, on_bad_image=cfg.data.on_bad_image, num_workers=cfg.data.num_workers,
              task=cfg.data.task, keep_labels=list(cfg.data.derived_labels), mean=mean, std=std)
    if spec is not None and spec.block:
        kw.update(shuffle=spec.block, shuffle_seed=spec.seed)

    def build():
        train = None if train_table is None else TableDataset(train_table, labels, cfg.data.image_size, train=True,
                                                              flip=cfg.data.flip, augment=cfg.data.augment,
                                                              resize=cfg.data.train_resize, **kw)
        return train, {n: TableDataset(t, labels, cfg.data.image_size, train=False, **kw) for n, t in tables.items()}

    return main_process_first(build)


def _predict(cfg: StudyConfig, store: RunStore, rid: str, trainer, eval_ds: dict) -> None:
    """Predict every evaluation set (every rank) and store the predictions (main process)."""
    for name, ds in eval_ds.items():
        out = trainer.predict(ds, batch_size=cfg.eval.batch_size)
        on_main(lambda: store.write_predictions(rid, name, _prediction_frame(ds.table, cfg.data, out["index"],
                                                                              out["logits"])))


def _summarise_warnings(rid: str, caught: list[warnings.WarningMessage]) -> None:
    """One log line per run for its metric warnings — values undefined on its sets (a subgroup or an OOD set without
    both classes of a label: stored as NaN, as the metric rows document), a temperature at its search bound —
    instead of one console warning each, which
    buried everything else in a real study's log; the messages themselves go to the debug log. Other warnings are
    passed on unchanged."""
    undefined = [w for w in caught if issubclass(w.category, MetricWarning)]
    for w in caught:
        if not issubclass(w.category, MetricWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if undefined:
        messages = list(dict.fromkeys(str(w.message) for w in undefined))
        new = [m for m in messages if m not in _UNDEFINED_SEEN]
        _UNDEFINED_SEEN.update(messages)
        # The evaluation sets are the same for every run, so the same gaps recur: a warning once, then info.
        log.log(logging.WARNING if new else logging.INFO, "run %s: %d metric warnings (an undefined value is stored "
                "as NaN; all of them in the debug log), e.g. %s", rid, len(undefined), (new or messages)[0])
        for m in messages:
            log.debug("run %s: %s", rid, m)


_UNDEFINED_SEEN: set[str] = set()
"""Messages of undefined metrics already logged as a warning by this process (see :func:`_summarise_warnings`)."""


def paired_with_test(cfg: StudyConfig, preds: dict[str, pd.DataFrame]) -> list[str]:
    """The OOD sets among ``preds`` that read the training dataset and share patients with its test set: their AUROC
    drop is resampled over both sets' patients together (``compute_run_metrics(paired=...)``)."""
    if "test" not in preds:
        return []
    test_patients = set(preds["test"]["patient_id"])
    return [e.name for e in cfg.data.ood if e.name in preds and same_source(e, cfg.data)
            and not test_patients.isdisjoint(preds[e.name]["patient_id"])]


def score_run(cfg: StudyConfig, store: RunStore, rid: str, meta: dict | None = None) -> pd.DataFrame:
    """Compute a run's metrics from its stored predictions of the config's evaluation sets with the config's metric
    settings and store them (main process). Predictions of a set no longer in the config (removed or renamed) stay
    on disk but are not scored, so the results show exactly the configured sets. ``age_group`` is re-derived from
    the stored ages with the config's bins. Returns the rows."""
    from scaling.metrics.run_metrics import compute_run_metrics

    labels = list(cfg.data.labels)
    wanted = eval_identities(cfg)
    preds = {}
    for name in (n for n in store.eval_sets(rid) if n in wanted):
        df = store.read_predictions(rid, name)
        if "age" in df.columns:
            regrouped = add_age_group(df, cfg.data.age_bins)
            # Compared as strings: Parquet reads text back as pandas' str dtype, add_age_group makes objects.
            if "age_group" not in df or not regrouped["age_group"].astype("string").equals(
                    df["age_group"].astype("string")):
                store.write_predictions(rid, name, regrouped)
            df = regrouped
        preds[name] = df
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetricWarning)
        rows, fitted = compute_run_metrics(preds, labels, list(cfg.data.subgroups), cfg.eval, task=cfg.data.task,
                                           derived=list(cfg.data.derived_labels), paired=paired_with_test(cfg, preds),
                                           sources={n: store.predictions_path(rid, n) for n in preds})
    _summarise_warnings(rid, caught)
    store.write_metrics(rid, rows)
    store.write_meta(rid, {**store.read_meta(rid), **(meta or {}), "fitted_on_val": fitted})
    recorded = store.read_evaluation(rid).get("eval_sets", {})
    current = {k: v for k, v in wanted.items() if k in preds}
    store.write_evaluation(rid, {**store.read_evaluation(rid), "eval_sets": {**recorded, **current},
                                 "metrics": metric_settings(cfg), "scored": sorted(preds)})
    return rows


def _build(rcfg: StudyConfig, spec: RunSpec, source: str, n_outputs: int):
    """The cell's model as it starts: the backbone with its pretrained weights (or their Mean Var init, drawn from
    the run's seed) and a new head, seeded, with the cell's blocks re-initialised (before any Trainer shards it)."""
    from scaling.models import build_model

    seed_everything(spec.seed)

    def build():
        model = build_model(dataclasses.replace(rcfg.model, pretrained=source), num_outputs=n_outputs,
                            image_size=rcfg.data.image_size, seed=spec.seed)
        protocols.apply_reinit(model, spec)
        return model

    return main_process_first(build)


def run_one(cfg: StudyConfig, spec: RunSpec, data: StudyData, store: RunStore) -> dict:
    """Do one grid cell: fine-tune it (keeping its weights) or fit its linear probe, evaluate it on every evaluation
    set and, for a fine-tuned cell, compare its blocks with its initialisation (CKA); write it all to the store."""
    from scaling.engine import Trainer
    from scaling.models import model_info
    from scaling.tracking import Tracker

    rcfg = run_config(cfg, spec)
    rid = run_id(cfg, spec)
    run_dir = store.run_dir(rid)
    labels = list(data.labels)
    probe = spec.protocol == PROBE
    axes = {"run_id": rid, "study": cfg.name, "config_hash": config_hash(cfg), "backbone": spec.backbone,
            "pretrained": spec.pretrained, "fraction": spec.fraction, "seed": spec.seed, "protocol": spec.protocol,
            "shots": spec.shots, "reinit": spec.reinit, "shuffle": spec.shuffle,
            **shuffle_axes(cfg, spec)}

    def start():
        # Before anything that can fail (data, weights, model, tracker): a failed run is always its cell's, with its
        # FAILED.json beside its spec.json; the axes that need the model are added once it is built.
        store.write_spec(rid, axes, yaml.safe_dump(to_dict(rcfg), sort_keys=False))
        store.write_settings(rid, result_settings(rcfg))
        store.log_event("train", rid)

    on_main(start)

    # -- data: nested, seeded, patient-level fraction (or k-shot subset) of the training patients ----------------
    train_table = protocols.train_subset(data.train, spec)
    # A probe reads features of the whole training set once (shared by every subset), never augmented.
    fit_table = None if probe else protocols.repeat_to_batch(train_table, cfg.train.batch_size)

    # -- model: seeded, so that a run id means one initialisation (the Trainer seeds its loop itself) ------------
    source = resolve_pretrained(cfg, store, spec)
    model = _build(rcfg, spec, source, len(labels))
    train_ds, eval_ds = _datasets(cfg, model, data.eval_sets(), labels, fit_table, spec)
    info = model_info(spec.backbone)
    axes = {
        **axes, "n_params": int(info.get("n_params") or sum(p.numel() for p in model.parameters())),
        "pretrain_images": pretrain_images(cfg, spec.backbone, spec.source),
        "n_train_images": len(train_table), "n_train_patients": int(train_table["patient_id"].nunique()),
        "family": info.get("family", ""), **protocols.reinit_axes(model, spec), **protocols.mean_var_axes(model, spec),
    }
    on_main(lambda: store.update_spec(rid, axes))

    # -- train (or fit the probe) ---------------------------------------------------------------------------------
    tracker = Tracker.create(cfg.tracking, study_name=cfg.name, run_id=rid, axes=axes, run_dir=run_dir,
                             is_main_process=is_main_process())
    if tracker.active:  # identifiers must never reach W&B, whatever key or string carries them
        tracker.protect(data.identifiers())
    trainer = None
    try:
        # A probe trains nothing: no checkpoint to resume (its features are cached instead).
        trainer = Trainer(model, rcfg.train, rcfg.sharding, loss=rcfg.data.task,
                          output_dir=None if probe else run_dir, tracker=tracker)
        if probe:
            summary = _probe_cell(cfg, store, spec, rid, model, trainer, data, train_table, eval_ds, labels)
        else:
            cka_ds = _cka_dataset(cfg, model, data, labels, spec) if protocols.cka_wanted(cfg, spec) else None
            # The initialisation's features are read before fit: on a resumed run too, fit loads the checkpoint.
            init = _block_features(cfg, trainer, cka_ds)
            summary = trainer.fit(train_ds, val_dataset=eval_ds["val"])

            # -- predict on every evaluation set; metrics are computed from the stored predictions only ---------
            _predict(cfg, store, rid, trainer, eval_ds)
            if cka_ds is not None:
                tuned = _block_features(cfg, trainer, cka_ds)
                on_main(lambda: protocols.write_cka(store, rid, init, tuned, cfg.cka,
                                                     protocols.sample_key(cka_ds.table, spec)))

        def finish():
            skipped = int(sum(getattr(ds, "n_skipped", 0) for ds in [train_ds, *eval_ds.values()] if ds is not None))
            views = {} if probe else {AUGMENT_KEY: augmentation_record(rcfg.data)}  # a probe sees no training view
            rows = score_run(cfg, store, rid, {**summary, "skipped_images": skipped, **views,
                                               INPUTS_KEY: dict(zip(("mean", "std"), _inputs(*eval_ds.values())))})
            tracker.log_metrics_table(rows)
            store.mark_complete(rid)
            store.log_event("done", rid)

        on_main(finish)
    finally:
        if trainer is not None:
            trainer.close()
        tracker.finish()
    return axes


def _probe_cell(cfg: StudyConfig, store: RunStore, spec: RunSpec, rid: str, model, trainer, data: StudyData,
                train_table: pd.DataFrame, eval_ds: dict, labels: list[str]) -> dict | None:
    """Fit the cell's linear probe on the frozen backbone (every rank extracts features; the main process fits)
    and store its predictions on every evaluation set and the probe itself. Returns the summary (main process)."""
    from scaling.analysis.probe import linear_probe

    t0 = time.perf_counter()
    _, features_ds = _datasets(cfg, model, {"train": data.train}, labels)
    sets = {n: ds for n, ds in eval_ds.items() if n != "val"}
    result = linear_probe(trainer, features_ds["train"], eval_ds["val"], sets, labels=labels, cfg=cfg.probe,
                          key=protocols.feature_keys(cfg, ["train", "val", *sets], _inputs(eval_ds["val"])),
                          train_positions=protocols.positions_in(data.train, train_table),
                          cache_dir=protocols.feature_cache(cfg, store, spec))

    def write():
        for name, out in result.predictions.items():
            store.write_predictions(rid, name, _prediction_frame(eval_ds[name].table, cfg.data, out["index"],
                                                                 out["logits"]))
        result.probe.save(store.run_dir(rid) / protocols.PROBE_FILE)
        return protocols.probe_summary(result.probe, int(result.probe.coef.shape[1]), time.perf_counter() - t0,
                                       trainer.world_size)

    return on_main(write)


def _cka_dataset(cfg: StudyConfig, model, data: StudyData, labels: list[str], spec: RunSpec):
    """The fixed sample of ``cka.eval_set`` that every run's blocks are compared on, normalised for ``model``; a
    block-shuffled cell's shuffled as every image it is trained and evaluated on (its own input distribution)."""
    table = protocols.cka_sample(data.eval_sets()[cfg.cka.eval_set], cfg.cka)
    return _datasets(cfg, model, {"cka": table}, labels, spec=spec)[1]["cka"]


def _block_features(cfg: StudyConfig, trainer, dataset) -> dict | None:
    """Every block's pooled features of ``dataset`` on the main process (every rank calls); None without one."""
    from scaling.analysis.features import block_features

    return None if dataset is None else block_features(trainer, dataset, batch_size=cfg.eval.batch_size)


def _trained_model(rcfg: StudyConfig, store: RunStore, rid: str, n_outputs: int):
    """Rebuild a finished run's model from its stored weights (every tensor, the fine-tuned head included); a
    damaged weights file is a CheckpointError naming it."""
    from scaling.engine.checkpoint import read_final_weights
    from scaling.models import build_model

    path = store.model_path(rid)
    if not path.is_file():
        raise StoreError(f"{path} not found: run {rid} was stored without its fine-tuned weights, so a new "
                         f"evaluation set needs it retrained (move {store.run_dir(rid)} away to retrain it)")
    # Built from scratch, then every tensor is replaced: loading the file as a pretrained source would drop its
    # head and zero-initialise a new one.
    model = build_model(dataclasses.replace(rcfg.model, pretrained="scratch"), num_outputs=n_outputs,
                        image_size=rcfg.data.image_size)
    model.load_state_dict(read_final_weights(path.parent), strict=True)
    return model


def _starting_model_on_meta(rcfg: StudyConfig, spec: RunSpec):
    """The run's starting model on the meta device (:func:`protocols.meta_model`), for what depends on its source
    but not on its weights: a model rebuilt from stored weights is built as ``scratch``, and a hub source's tag
    decides the input normalisation (``scaling.models.input_normalisation``). An upstream source is a local file,
    normalised as its architecture, like ``scratch``; a Mean Var init as its source (the same inputs as the
    pretrained cell it is compared with)."""
    source = "scratch" if upstream_name(spec.source) is not None else spec.source
    return protocols.meta_model(rcfg, spec.backbone, source)


def _with_trainer(rcfg: StudyConfig, model, work: Callable[[Any], T]) -> T:
    """``work(trainer)`` with a Trainer around ``model`` under the run's sharding (no run directory), closed after."""
    from scaling.engine import Trainer

    trainer = None
    try:
        trainer = Trainer(model, rcfg.train, rcfg.sharding, loss=rcfg.data.task, output_dir=None)
        return work(trainer)
    finally:
        if trainer is not None:
            trainer.close()


def evaluate_run(cfg: StudyConfig, spec: RunSpec, data: StudyData, store: RunStore, names: tuple[str, ...]) -> None:
    """Predict a finished run on the evaluation sets ``names`` without training, under the run's sharding: from its
    stored weights, or for a probe cell from its stored probe on the pretrained backbone's features. Then recompute
    its metrics."""
    rcfg = run_config(cfg, spec)
    rid = run_id(cfg, spec)
    labels = list(data.labels)
    tables = {n: t for n, t in data.eval_sets().items() if n in names}
    if spec.protocol == PROBE:
        model = _build(rcfg, spec, resolve_pretrained(cfg, store, spec), len(labels))
        _, eval_ds = _datasets(cfg, model, tables, labels, spec=spec)
        _with_trainer(rcfg, model, lambda t: _probe_predict(cfg, store, spec, rid, t, eval_ds, labels))
    else:
        seed_everything(spec.seed)
        model = _trained_model(rcfg, store, rid, len(labels))
        _, eval_ds = _datasets(cfg, _starting_model_on_meta(rcfg, spec), tables, labels, spec=spec)
        _with_trainer(rcfg, model, lambda t: _predict(cfg, store, rid, t, eval_ds))

    def finish():
        score_run(cfg, store, rid)
        store.log_event("evaluate", rid, eval_sets=list(names))

    on_main(finish)


def _probe_predict(cfg: StudyConfig, store: RunStore, spec: RunSpec, rid: str, trainer, eval_ds: dict,
                   labels: list[str]) -> None:
    """Predict evaluation sets with a probe cell's stored probe on the frozen backbone's (cached) features."""
    from scaling.analysis.probe import LinearProbe, extract_features, probe_predictions

    path = store.run_dir(rid) / protocols.PROBE_FILE
    if not broadcast(path.is_file() if is_main_process() else None):
        raise StoreError(f"{path} not found: probe run {rid} was stored without its probe, so a new evaluation set "
                         f"needs it refitted (move {store.run_dir(rid)} away to refit it)")
    feats = extract_features(trainer, eval_ds, protocols.feature_cache(cfg, store, spec),
                             key=protocols.feature_keys(cfg, eval_ds, _inputs(*eval_ds.values())),
                             batch_size=cfg.probe.batch_size)

    def write():
        for name, out in probe_predictions(LinearProbe.load(path), feats).items():
            store.write_predictions(rid, name, _prediction_frame(eval_ds[name].table, cfg.data, out["index"],
                                                                 out["logits"]))

    on_main(write)


def analyse_run(cfg: StudyConfig, spec: RunSpec, data: StudyData, store: RunStore) -> None:
    """CKA of a finished fine-tuned run without training: its initialisation is rebuilt (source, seed,
    re-initialisation), its fine-tuned model read from its stored weights; both run under the run's sharding."""
    rcfg = run_config(cfg, spec)
    rid = run_id(cfg, spec)
    labels = list(data.labels)
    init_model = _build(rcfg, spec, resolve_pretrained(cfg, store, spec), len(labels))
    cka_ds = _cka_dataset(cfg, init_model, data, labels, spec)
    init = _with_trainer(rcfg, init_model, lambda t: _block_features(cfg, t, cka_ds))
    del init_model
    tuned = _with_trainer(rcfg, _trained_model(rcfg, store, rid, len(labels)),
                          lambda t: _block_features(cfg, t, cka_ds))
    on_main(lambda: (protocols.write_cka(store, rid, init, tuned, cfg.cka, protocols.sample_key(cka_ds.table, spec)),
                      store.log_event("cka", rid)))


def _do(work: Work, cfg: StudyConfig, spec: RunSpec, store: RunStore, data: Callable[[], StudyData]) -> None:
    """Carry out ``work`` for the run of ``spec`` (every rank)."""
    if work.kind == "train":
        run_one(cfg, spec, data(), store)
    elif work.kind == "evaluate":
        evaluate_run(cfg, spec, data(), store, work.eval_sets)
    elif work.kind == "metrics":
        rid = run_id(cfg, spec)
        on_main(lambda: (score_run(cfg, store, rid), store.log_event("metrics", rid)))
    if work.kind == "cka" or work.cka:
        analyse_run(cfg, spec, data(), store)
    if work.kind != "train":  # a finished run's later work succeeded: an earlier failure of it is over
        on_main(lambda: store.clear_failure(run_id(cfg, spec)))


def _record_failure(store: RunStore, rid: str, exc: BaseException, identifiers: Iterable[str]) -> None:
    """FAILED.json and an event for a run that raised, best effort: on a full disk even these may not fit. A
    saver's BaseException (a sharded checkpoint's) is recorded with the run directory and its free space. The
    report shows the error with ``identifiers`` (the study's sample and patient ids) and paths redacted: an
    unreadable image's error names its sample id, and report.html is meant to be sent as it is."""
    from scaling.tracking import Scrubber

    if not is_main_process():
        return
    if not isinstance(exc, Exception):
        exc = write_error(store.run_dir(rid), exc, what="writing under")
    try:
        store.mark_failed(rid, exc, reason=Scrubber(protected=identifiers).message(f"{type(exc).__name__}: {exc}"))
        store.log_event("failed", rid, error=f"{type(exc).__name__}: {exc}")
    except OSError as e:
        log.error("run %s failed (%s) and its failure could not be recorded: %s", rid, exc, e)


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------


def record_study(cfg: StudyConfig, store: RunStore) -> None:
    """Write study.yaml (the config of this launch and the hash of the settings its runs share) unless the store
    already holds exactly that (a finished study on a read-only store is then never written to). Compared as bytes:
    a damaged study.yaml is simply replaced."""
    text = yaml.safe_dump({**to_dict(cfg), "_meta": {"config_hash": config_hash(cfg)}}, sort_keys=False)
    path = store.root / "study.yaml"
    if path.is_file() and path.read_bytes() == text.encode():
        return
    with file_lock(store.lock_path("study")):
        atomic_write_text(path, text)


ANALYSIS_AXES = ("protocol", "shots", "reinit", "shuffle")
"""Cell axes beyond backbone × source × fraction × seed; a results table has their columns when the grid varies
them."""


def _analysis_axes(cfg: StudyConfig, spec: RunSpec) -> dict[str, Any]:
    """The cell's protocol, k-shot size, re-initialisation and block shuffling, for each of them the study's grid
    varies."""
    plain = RunSpec(spec.backbone, spec.pretrained, spec.fraction, spec.seed)
    cells = expand_grid(cfg)
    return {k: getattr(spec, k) for k in ANALYSIS_AXES if any(getattr(c, k) != getattr(plain, k) for c in cells)}


DEPRECATED_PARAMS = "params"
"""results.csv's old name of ``n_params``, written as its last column until scripts have moved to ``n_params``
(docs/run-store.md); the printed table leaves it out."""


def results_table(cfg: StudyConfig, store: RunStore) -> pd.DataFrame:
    """One row per run: axes, status, macro AUROC in-distribution and on each OOD set, ``worst_subgroup_auroc`` (on
    test, the smallest ``worst_group_auroc`` over the subgroup attributes) and ``n_params``; for a one-of-K task also
    the test accuracy, top-3 accuracy and balanced accuracy. A finished run whose metrics cannot
    be read (one that a launch beside this one is rescoring, or that failed to rescore) is ``invalid``, without
    numbers, as in the aggregation: the table of the other runs is still written."""
    from scaling.metrics.run_metrics import MULTICLASS_LABEL, MULTICLASS_METRICS

    rows = []
    ood_names = [e.name for e in cfg.data.ood]
    for spec in study_cells(cfg):
        rid = run_id(cfg, spec)
        row = {"backbone": spec.backbone, "pretrained": spec.pretrained, "fraction": spec.fraction,
               "seed": spec.seed, **_analysis_axes(cfg, spec), "status": store.status(rid)}
        if row["status"] == "complete":
            try:
                m = store.read_metrics(rid)
            except (StoreError, UnreadableFile) as e:
                log.warning("run %s is left out of the results table: %s", rid, e)
                row["status"] = "invalid"
        if row["status"] == "complete":
            macro = m[(m.label == "macro") & (m.attribute == "all") & (m.group == "all") & (m.metric == "auroc")]
            val = dict(zip(macro.eval_set, macro.value))
            row["auroc_test"] = val.get("test", math.nan)
            for name in ood_names:
                row[f"auroc_{name}"] = val.get(name, math.nan)
            worst = m[(m.eval_set == "test") & (m.label == "macro") & (m.metric == "worst_group_auroc")]
            row["worst_subgroup_auroc"] = float(worst.value.min()) if len(worst) else math.nan
            if cfg.data.task == "multiclass":
                k = m[(m.eval_set == "test") & (m.label == MULTICLASS_LABEL) & (m.attribute == "all")]
                for metric in MULTICLASS_METRICS[:3]:  # top-1, top-k and balanced accuracy
                    value = k[k.metric == metric].value
                    row[f"{metric}_test"] = float(value.iloc[0]) if len(value) else math.nan
            row["n_params"] = store.read_spec(rid).get("n_params")
        row["run_id"] = rid
        rows.append(row)
    table = pd.DataFrame(rows)
    if "n_params" in table:  # the column's name before it was named as everywhere else: kept for existing scripts
        table[DEPRECATED_PARAMS] = table["n_params"]
    return table


def _images_todo(work: Work | None, cost: int, sets: dict[str, pd.DataFrame]) -> int:
    """Images the next launch reads for a run: its whole ``cost`` (training and every evaluation set) when it
    trains, the missing ``sets`` when it only evaluates, none to rescore stored predictions (CKA's few not counted)."""
    if work is None:
        return 0
    if work.kind == "train":
        return cost
    if work.kind == "evaluate":
        return sum(len(sets[name]) for name in work.eval_sets if name in sets)
    return 0


def check_before_training(cfg: StudyConfig, store: RunStore, cells: list[RunSpec]) -> None:
    """What a launch and ``--dry-run`` alike refuse before any data is read or model trained (each check says
    what it refuses), then a warning for each optimizer setting that departs from the BiT-HyperRule. Reads only."""
    check_conflicts(cfg, store, cells)
    check_weights(cfg, store, cells)
    check_inputs(cfg, store, cells)
    check_model_kwargs(cfg, cells)
    protocols.check_reinit(cfg, cells)
    _warn_hyperrule_deviations(cfg)


def _warn_hyperrule_deviations(cfg: StudyConfig) -> None:
    """A warning for each optimizer setting that departs from the BiT-HyperRule the config asks for: the rule sets
    length, warmup and MixUp, not the learning rate, so a batch other than 512 needs ``train.lr`` scaled by hand."""
    from scaling.engine.schedule import hyperrule_deviations

    for line in hyperrule_deviations(cfg.train):
        log.warning("train.hyperrule=%s: %s", cfg.train.hyperrule, line)


def plan(cfg: StudyConfig) -> pd.DataFrame:
    """The runs of a study, what each lacks and what it costs — without training.

    Reads the dataset metadata and checks that every image file exists (no image is decoded; the synthetic demo
    data is generated if absent) to size every run: training patients/images after the data fraction, optimizer
    steps, images processed (train + eval), ``images_todo`` (what the next launch reads for it: a finished run that
    only lacks an evaluation set needs no training image) and, where a finished run of the same backbone recorded
    its speed, an estimated time. ``todo`` is what the next launch would do for the run (``train``, ``evaluate
    <sets>``, ``metrics`` or empty) and ``claimed_by`` the host and pid of a launch working on it now.
    """
    from scaling.engine.schedule import total_steps
    from scaling.models import model_info

    cells = study_cells(cfg)
    check_roots(cfg.data)
    store = RunStore(cfg.output_dir)
    check_before_training(cfg, store, cells)
    data = load_study_data(cfg)
    check_image_files(data, cfg.data.dataset)
    n_eval = sum(len(t) for t in data.eval_sets().values())
    speed: dict[str, float] = {}
    for rid in store.run_ids():
        if store.is_complete(rid):
            spec, meta = store.read_spec(rid), store.read_meta(rid)
            if meta.get("images_per_s"):
                speed.setdefault(spec.get("backbone", ""), float(meta["images_per_s"]))
    rows = []
    for spec in cells:
        rid = run_id(cfg, spec)
        train = protocols.train_subset(data.train, spec)
        steps = 0 if spec.protocol == PROBE else total_steps(cfg.train, len(train))
        # A probe cell reads the whole training set's features once, shared by its fractions and k-shot subsets.
        images = steps * cfg.train.batch_size if spec.protocol != PROBE else len(data.train)
        ips = speed.get(spec.backbone)
        work = pending_work(cfg, store, spec)
        owner = live_owner(store.lock_path(rid))
        rows.append({
            "backbone": spec.backbone, "params_M": round(model_info(spec.backbone)["n_params"] / 1e6, 2),
            "pretrained": spec.pretrained, "fraction": spec.fraction, "seed": spec.seed, **_analysis_axes(cfg, spec),
            "status": store.status(rid), "todo": work.describe() if work else "",
            "claimed_by": f"{owner['host']}:{owner['pid']}" if owner else "",
            "train_patients": int(train["patient_id"].nunique()), "train_images": len(train), "steps": steps,
            "images_processed": images + n_eval,
            "images_todo": _images_todo(work, images + n_eval, data.eval_sets()),
            "est_minutes": round((images + n_eval) / ips / 60, 1) if ips else math.nan, "run_id": rid,
        })
    return pd.DataFrame(rows)


COMPARISON_FILES = {"comparisons": "comparisons.csv", "subgroup_comparisons": "comparisons_subgroups.csv",
                    "brier_comparisons": "comparisons_brier.csv"}
"""The report's comparison tables written beside it as CSV (for pandas/R and the launch's summary), by table."""


def _write_report_files(store: RunStore, rep) -> None:
    """report.html and its comparison tables as CSV (:data:`COMPARISON_FILES`) of a built report, each written
    atomically; the caller holds the store's report lock."""
    from scaling.study.report import write_report

    write_report(store.root, report=rep)
    for key, name in COMPARISON_FILES.items():
        table = rep.tables.get(key)
        atomic_write_text(store.root / name, "" if table is None else table.to_csv(index=False))


def write_outputs(cfg: StudyConfig, store: RunStore, table: pd.DataFrame, *, report: bool = True,
                  changed: bool = True) -> None:
    """Write results.csv and rebuild the report, its comparison CSVs and the study's W&B view when
    this launch ``changed`` the store, the results differ or the report is missing; under a lock, because launches
    beside this one write them too. A finished study whose outputs are current is not written to (a read-only store
    stays readable). The report covers the runs of this launch's config (its ``config_hash``): a store may also
    hold the runs of earlier configs (another learning rate), which are not comparable with them."""
    csv = table.to_csv(index=False)
    path = store.root / "results.csv"
    current = path.is_file() and path.read_text() == csv and (
        not report or all((store.root / f).is_file() for f in ("report.html", *COMPARISON_FILES.values())))
    if current and not changed:
        return
    with file_lock(store.lock_path("report")):
        atomic_write_text(path, csv)
        if report:
            from scaling.study.report import build_report
            from scaling.study.wandb_report import publish_study

            rep = build_report(store.root, config_hash=config_hash(cfg))
            _write_report_files(store, rep)
            publish_study(store.root, cfg.tracking, report=rep, config_hash=config_hash(cfg))


def rebuild_outputs(store_root: str | Path, *, config_hash: str | None = None, allow_mixed: bool = False,
                    n_boot_fit: int = 200, workers: int | None = None) -> list[Path]:
    """Rebuild in the store what a launch writes at its end (``python -m scaling.study report``): report.html and
    its comparison CSVs (:data:`COMPARISON_FILES`) of the runs chosen (``config_hash``, ``allow_mixed``:
    :func:`scaling.study.aggregate.load_study`)
    and results.csv, the table of the grid of study.yaml (left as it is, with a warning, when study.yaml cannot be
    read or its grid no longer resolves here). Each file is written atomically under the report lock, after
    everything is computed, so an error leaves the store as it was. Returns the paths written."""
    from scaling.study.aggregate import check_store, read_study_config
    from scaling.study.report import build_report

    check_store(store_root)  # before the lock, which would create a mistyped store's directory
    store = RunStore(store_root)
    with file_lock(store.lock_path("report")):
        cfg, table = read_study_config(store.root), None
        try:
            table = results_table(cfg, store) if cfg is not None else None
        except (ConfigError, StoreError, ValueError) as e:
            log.warning("results.csv is left as it is: the grid of study.yaml cannot be tabulated here (%s)", e)
        if cfg is None:
            log.warning("results.csv is left as it is: %s has no readable study.yaml", store.root)
        rep = build_report(store.root, config_hash=config_hash, allow_mixed=allow_mixed, n_boot_fit=n_boot_fit,
                           workers=workers)
        _write_report_files(store, rep)
        if table is not None:
            atomic_write_text(store.root / "results.csv", table.to_csv(index=False))
    return [store.root / f for f in ("report.html", *COMPARISON_FILES.values(), "results.csv")
            if f != "results.csv" or table is not None]


def _work_through(cfg: StudyConfig, store: RunStore, cells: list[RunSpec], data: Callable[[], StudyData],
                  identifiers: Callable[[], Iterable[str]]) -> list[tuple[str, BaseException]]:
    """Claim and do, cell after cell, what each run lacks, until a pass over the grid finds nothing this launch can
    take (done, or claimed by a live launch beside this one). Returns the runs that failed here. ``identifiers``:
    the sample and patient ids of the tables read so far, redacted from a failure's reason."""
    since = time.time()
    attempted: set[str] = set()
    failures: list[tuple[str, BaseException]] = []

    progress = True
    while progress:
        progress = False
        for spec in cells:
            rid = run_id(cfg, spec)
            if rid in attempted or broadcast(pending_work(cfg, store, spec, since) if is_main_process() else None) \
                    is None:
                continue
            claim = try_claim(store.lock_path(rid)) if is_main_process() else None
            if not broadcast(claim is not None):
                continue
            try:
                # Decided again under the claim: a launch beside this one may have finished the run meanwhile.
                work = broadcast(pending_work(cfg, store, spec, since) if is_main_process() else None)
                if work is None:
                    continue
                attempted.add(rid)
                progress = True
                log.info("%s: %s", rid, work.describe())
                _do(work, cfg, spec, store, data)
            except run_errors() as exc:  # preemption (SystemExit), interrupts pass: the run resumes next launch
                _record_failure(store, rid, exc, identifiers())
                if process_group() is not None:  # ranks cannot safely continue after one of them raised
                    raise
                log.exception("run %s failed; continuing with the next run", rid)
                failures.append((rid, exc))
            finally:
                if claim is not None:
                    claim.release()
    return failures


def run_study(cfg: StudyConfig, *, report: bool = True) -> pd.DataFrame:
    """Do for every run of the grid what the store lacks, then write results.csv (and the HTML report).

    Raises :class:`StudyFailed` after the whole grid when some runs failed (each has its FAILED.json) or the outputs
    could not be written (after training, so never as bad input); under a multi-rank launch the first failure of a
    run stops the launch.
    """
    from scaling.engine.distributed import check_launch
    from scaling.study.wandb_report import check_available

    check_launch(cfg.sharding, cfg.train)  # a strategy this launch cannot run fails before anything is built
    check_available(cfg.tracking)  # an online study needs wandb-workspaces at its end: refuse now, not after training
    cells = study_cells(cfg)
    check_roots(cfg.data)
    init_distributed()
    store = RunStore(cfg.output_dir)
    on_main(lambda: check_before_training(cfg, store, cells))
    todo = [w for w in (pending_work(cfg, store, s) for s in cells) if w is not None] if is_main_process() else []
    log.info("study %s: %d runs, %d with nothing to do, %d to work on", cfg.name, len(cells), len(cells) - len(todo),
             len(todo))
    todo = broadcast([w.kind for w in todo])
    failures = []
    if todo:
        # Tables are read (and checked) before anything is written: a bad row stops the launch with the store as
        # it was. Rescoring alone needs none.
        loaded = [load_study_data(cfg)] if set(todo) - {"metrics"} else []
        if loaded and cfg.data.on_bad_image == "error":  # a missing image, named now, not in each run that reads it
            on_main(lambda: check_image_files(loaded[0], cfg.data.dataset))
        if not loaded:  # rescoring only: the attributes are those of the stored predictions
            on_main(lambda: check_subgroups(cfg.data, stored_columns(store, [run_id(cfg, s) for s in cells])))

        def data() -> StudyData:
            if not loaded:
                loaded.append(load_study_data(cfg))
            return loaded[0]

        def identifiers() -> list[str]:  # a rescoring-only launch reads no table: the failure names none
            return loaded[0].identifiers() if loaded else []

        on_main(lambda: record_study(cfg, store))
        failures = _work_through(cfg, store, cells, data, identifiers)
    table = results_table(cfg, store)
    problems = [f"{len(failures)} run(s) failed (see FAILED.json in each): "
                + "; ".join(f"{r}: {type(e).__name__}: {e}" for r, e in failures)] if failures else []
    if is_main_process():
        try:
            write_outputs(cfg, store, table, report=report, changed=bool(todo))
        except Exception as e:  # the runs are in the store: a view that cannot be built is not bad input
            log.exception("the study's outputs could not be written")
            problems.append(f"the runs are stored, but the study's outputs (results.csv, report.html, comparisons.csv) "
                            f"could not all be written ({type(e).__name__}: {e}); those not rewritten are as an "
                            f"earlier launch left them. Rebuild them with: python -m scaling.study report "
                            f"{store.root} --config-hash {config_hash(cfg)}")
    if problems:
        raise StudyFailed("; ".join(problems))
    return table

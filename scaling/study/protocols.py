"""What a grid cell does beyond plain fine-tuning: its training subset (a fraction or k-shot), block
re-initialisation, the linear-probe protocol's shared feature cache, and block-by-block CKA of fine-tuned runs.

The study runner calls these in a few lines per cell (docs/analysis.md, "The analysis axes of a study"); everything
model- or statistics-related lives in :mod:`scaling.analysis` and :mod:`scaling.models.reinit`, everything here is about
which data, which files and which runs.

Files a cell writes besides the usual ones (docs/run-store.md):

* ``runs/<id>/probe.safetensors``: a ``linear_probe`` cell's fitted probe (weights, labels and the C search), from
  which a new evaluation set is predicted without refitting;
* ``runs/<id>/cka.parquet``: a fine-tuned run's CKA between its initialisation and its fine-tuned blocks (every
  pair of layers; the diagonal is the per-block curve);
* ``runs/<id>/cka_grams.safetensors`` (with ``cka.scales``): the fine-tuned model's per-minibatch Gram matrices on
  the CKA sample, which is all that minibatch CKA needs to compare two runs later (the report compares backbone
  scales with them);
* ``features/<id of the cell's full-data probe>/<set>.safetensors``: pooled pre-logit features shared by every
  probe cell of one backbone × source (every seed, fraction and k-shot subset is a row subset of the cached
  training set; a scratch backbone's or a Mean Var init's features are its seed's, cached per seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scaling.config import CKAConfig, StudyConfig, parse_reinit, to_dict
from scaling.io import UnreadableFile, atomic_write, atomic_write_parquet, read_safetensors
from scaling.study.grid import FINETUNE, RunSpec, eval_set_identity, run_id
from scaling.study.store import RunStore, StoreError

log = logging.getLogger(__name__)

CKA_FILE, GRAMS_FILE, PROBE_FILE = "cka.parquet", "cka_grams.safetensors", "probe.safetensors"
"""Per-run files of the analyses (see the module docstring)."""

CKA_SAMPLE_SEED = 0
"""Seed of the CKA sample: the same images for every run of a study, so that any two runs can be compared."""

CKA_SAMPLE_ORDER = "shuffled"
"""How the CKA sample's rows are ordered into minibatches (:func:`cka_sample`), recorded with every run's CKA so
that a table made from minibatches in another order is computed again."""


# --------------------------------------------------------------------------------------------------------------
# Training subset and re-initialisation
# --------------------------------------------------------------------------------------------------------------


def train_subset(train: pd.DataFrame, spec: RunSpec) -> pd.DataFrame:
    """The cell's training rows: the nested fraction of the training patients, or its k-shot subset."""
    from scaling.data.splits import fraction_subset, kshot_subset

    if spec.shots:
        return kshot_subset(train, spec.shots, seed=spec.seed)
    return fraction_subset(train, spec.fraction, seed=spec.seed)


def repeat_to_batch(table: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """The training rows repeated until they fill one global batch (a k-shot set can be smaller than a batch).

    BiT samples such a set with replacement up to the batch size (google-research/big_transfer,
    ``bit_pytorch/train.py``: "in the few-shot cases, the total dataset size might be smaller than the
    batch-size"); repeating the rows is the deterministic equivalent, and each copy still gets its own
    augmentation (it is another position of the training set). A table that fills a batch is returned as is.
    """
    if len(table) >= batch_size or table.empty:
        return table
    copies = -(-batch_size // len(table))
    return pd.concat([table] * copies, ignore_index=True)


def apply_reinit(model, spec: RunSpec) -> list[str]:
    """Re-initialise the cell's units before the Trainer shards the model (Raghu et al. 2019, arXiv 1902.07208);
    the fresh weights are those of a scratch model of the run's seed. Returns the units reset (none for ``none``)."""
    from scaling.models.reinit import reinit_after, reinit_first

    kind, k = parse_reinit(spec.reinit)
    if kind == "none":
        return []
    chosen = (reinit_after if kind == "after" else reinit_first)(model, k, seed=spec.seed)
    log.info("%s: re-initialised %d unit(s) (%s)", spec.reinit, len(chosen), ", ".join(chosen) or "none")
    return chosen


def meta_model(cfg: StudyConfig, backbone: str, source: str = "scratch"):
    """``backbone`` as the study builds it (``model.kwargs``, the data's image size) for ``source``, on the meta
    device: no memory allocated, no weights read or fetched. What the checks made before anything runs inspect, and
    what decides a run's input normalisation (a hub source is built under its own tag)."""
    from scaling.models import build_model

    with torch.device("meta"):
        return build_model(dataclasses.replace(cfg.model, backbone=backbone, pretrained=source), num_outputs=1,
                           image_size=cfg.data.image_size)


def check_reinit(cfg: StudyConfig, cells: list[RunSpec]) -> None:
    """Refuse, before anything runs, a re-initialisation that asks for more units than its backbone has
    (``after:9`` of a 6-unit backbone): each backbone with such cells is built on the meta device
    (:func:`meta_model`) and its units counted, so the error names the value, the backbone and its units instead
    of failing that run after the others trained."""
    from scaling.config import ConfigError
    from scaling.models.reinit import units

    asked: dict[str, set[str]] = {}
    for spec in cells:
        if parse_reinit(spec.reinit)[0] != "none":
            asked.setdefault(spec.backbone, set()).add(spec.reinit)
    for backbone, values in asked.items():
        names = list(units(meta_model(cfg, backbone)))
        too_many = sorted(v for v in values if parse_reinit(v)[1] > len(names))
        if too_many:
            raise ConfigError(f"grid.reinit {too_many}: backbone {backbone} has {len(names)} units ({names[0]}, "
                              f"{names[1]} .. {names[-1]}), so k must be at most {len(names)}")


def reinit_axes(model, spec: RunSpec) -> dict[str, Any]:
    """What a re-initialised cell records in spec.json: the backbone's number of units and the units reset (the
    report's x axis, units kept pretrained, needs the first); nothing for other cells."""
    from scaling.models.reinit import units

    kind, k = parse_reinit(spec.reinit)
    if kind == "none":
        return {}
    names = list(units(model))
    return {"n_units": len(names), "units_reinitialised": names[k:] if kind == "after" else names[:k]}


def mean_var_axes(model, spec: RunSpec) -> dict[str, Any]:
    """What a Mean Var cell (``meanvar:<source>``) records in spec.json: the source whose tensors' statistics it drew
    with, the seed of the draw and how many backbone tensors were drawn; nothing for other cells."""
    from scaling.config import mean_var_source
    from scaling.study.grid import source_label

    inner = mean_var_source(spec.source)
    if inner is None:
        return {}
    return {"mean_var_of": source_label(inner), "mean_var_seed": spec.seed,
            "mean_var_tensors": len(model.mean_var_tensors)}


# --------------------------------------------------------------------------------------------------------------
# Linear probe: the feature cache shared by the probe cells of one backbone x source x seed
# --------------------------------------------------------------------------------------------------------------


def feature_cache(cfg: StudyConfig, store: RunStore, spec: RunSpec) -> Path:
    """Where the probe features of ``spec``'s backbone × source are cached: named by the run id of that
    combination's full-data probe cell of seed 0, so the cache follows every setting the run id follows.

    A loaded backbone is the same for every seed (every tensor but the head, which the pooled features precede,
    comes from the weights), so its features are extracted once for all seeds; a scratch backbone is its seed's
    random initialisation, and a Mean Var init its seed's draw: their features are cached per seed."""
    from scaling.config import mean_var_source
    from scaling.models.weights import is_scratch

    per_seed = is_scratch(spec.source) or mean_var_source(spec.source) is not None
    full = dataclasses.replace(spec, fraction=1.0, shots=0, seed=spec.seed if per_seed else 0)
    return store.root / "features" / run_id(cfg, full)


def feature_keys(cfg: StudyConfig, names, inputs: tuple) -> dict[str, str]:
    """The cache key of each named set: ``run`` for the training, validation and test sets (fixed by the run id),
    a hash of an OOD set's identity otherwise (another set under the same name is extracted again).

    ``inputs`` is the ``(mean, std)`` the sets are normalised with (``scaling.models.input_normalisation``): the
    same images normalised otherwise give other features, so the key names statistics other than BiT's 0.5 / 0.5.
    BiT's add nothing, so a cache written when every backbone got them stays valid for the backbones they suit."""
    mean, std = inputs
    norm = "" if all(v == 0.5 for v in (*mean, *std)) else f" inputs mean={list(mean)} std={list(std)}"
    ood = {e.name: e for e in cfg.data.ood}
    out = {}
    for name in names:
        ident = eval_set_identity(ood[name], cfg.data) if name in ood else "run"
        out[name] = ("run" if ident == "run" else hashlib.sha256(
            json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]) + norm
    return out


def positions_in(table: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Positions in ``table`` of the samples of ``rows`` (a subset of it), in ``table``'s order."""
    return np.flatnonzero(table["sample_id"].isin(set(rows["sample_id"])).to_numpy())


def probe_summary(probe, n_features: int, seconds: float, world_size: int) -> dict[str, Any]:
    """What a probe cell records in meta.json: the protocol, the chosen C and its validation AUROC per label."""
    chosen = probe.chosen()
    return {"protocol": "linear_probe", "seconds": seconds, "world_size": world_size, "n_features": n_features,
            "probe_C": dict(zip(chosen["label"], chosen["C"].astype(float))),
            "probe_val_auroc": dict(zip(chosen["label"], chosen["val_auroc"].astype(float)))}


# --------------------------------------------------------------------------------------------------------------
# CKA of a fine-tuned run: its initialisation against its fine-tuned blocks, and its Gram matrices
# --------------------------------------------------------------------------------------------------------------


def cka_wanted(cfg: StudyConfig, spec: RunSpec) -> bool:
    """Whether the run of ``spec`` gets a CKA table: fine-tuned cells, when ``cka.enabled``."""
    return cfg.cka.enabled and spec.protocol == FINETUNE


def cka_settings(cka: CKAConfig) -> dict[str, Any]:
    """What a run's CKA table depends on beyond the run itself (recorded in evaluation.json under ``cka``)."""
    d = to_dict(cka)
    return {**{k: d[k] for k in ("eval_set", "max_examples", "batch_size")}, "order": CKA_SAMPLE_ORDER}


def cka_sample(table: pd.DataFrame, cka: CKAConfig) -> pd.DataFrame:
    """At most ``cka.max_examples`` rows of an evaluation set, a fixed seeded sample in a seeded random order.

    Minibatch CKA averages HSIC over minibatches of consecutive rows, which estimates the CKA of the whole sample
    only when each minibatch is a random draw from it (Nguyen et al. 2021 use shuffled minibatches). In table order
    a set sorted by label, site or date (or one that keeps a patient's images together, as every table here does)
    fills a minibatch with one kind of image, whose HSIC misses the differences between the kinds: two classes
    sorted into two 256-image minibatches read a CKA of 0.99 as 0.00."""
    keep = np.random.default_rng(CKA_SAMPLE_SEED).permutation(len(table))[: cka.max_examples]
    return table.iloc[keep].reset_index(drop=True)


def check_cka(cfg: StudyConfig, eval_sets) -> None:
    """Refuse, before anything runs, a ``cka.eval_set`` that names no evaluation set of the study."""
    from scaling.config import ConfigError

    if cfg.cka.enabled and cfg.cka.eval_set not in eval_sets:
        raise ConfigError(f"cka.eval_set={cfg.cka.eval_set!r} is not an evaluation set of the study; choose one of "
                          f"{list(eval_sets)}")


def sample_key(table: pd.DataFrame, spec: RunSpec | None = None) -> str:
    """A short hash of the sample ids of a CKA sample, in order: two runs' Gram matrices compare only under one key.
    A block-shuffled cell's sample is other images (its shuffled ones): its key says so (``/shuffle-8-s0``), so its
    Gram matrices are never compared with another cell's."""
    key = hashlib.sha256("\n".join(map(str, table["sample_id"])).encode()).hexdigest()[:16]
    return key + (f"/shuffle-{spec.block}-s{spec.seed}" if spec is not None and spec.block else "")


def write_cka(store: RunStore, rid: str, init: dict, tuned: dict, cka: CKAConfig, samples: str) -> pd.DataFrame:
    """Store the run's CKA table (initialisation vs fine-tuned, every pair of layers) and, when ``cka.scales``, its
    fine-tuned Gram matrices (for the report's comparison of backbone scales); record the CKA settings in
    evaluation.json. Main process; returns the table."""
    from safetensors.torch import save_file

    from scaling.analysis.cka import cka_from_grams, gram_batches

    names = list(tuned["features"])
    ga = gram_batches(init["features"], names, cka.batch_size)
    gb = gram_batches(tuned["features"], names, cka.batch_size)
    table = cka_from_grams(ga, names, gb, names)
    atomic_write_parquet(store.run_dir(rid) / CKA_FILE, table)
    if cka.scales:
        # float32: a quarter of a megabyte per layer per 256-example batch; CKA from them agrees with float64 to 1e-5.
        tensors = {f"{i}": g.to(torch.float32).contiguous() for i, g in enumerate(gb)}
        meta = {"layers": json.dumps(names), "samples": samples}
        atomic_write(store.run_dir(rid) / GRAMS_FILE, lambda p: save_file(tensors, str(p), metadata=meta))
    record = store.read_evaluation(rid)
    store.write_evaluation(rid, {**record, "cka": cka_settings(cka)})
    return table


def read_grams(store: RunStore, rid: str) -> tuple[list[str], list[torch.Tensor], str] | None:
    """A run's stored Gram matrices: (layers, one ``[layers, m, m]`` stack per minibatch, the :func:`sample_key`),
    or None when it has none."""
    path = store.run_dir(rid) / GRAMS_FILE
    if not path.is_file():
        return None
    try:
        t, meta = read_safetensors(path)
        return json.loads(meta["layers"]), [t[str(i)] for i in range(len(t))], meta["samples"]
    except (ValueError, KeyError) as e:  # UnreadableFile (a damaged file) is a ValueError; name what it wraps
        cause = e.__cause__ if isinstance(e, UnreadableFile) else e
        raise StoreError(f"{path} is not a readable Gram-matrix file ({type(cause).__name__}: {cause})") from None


def scale_cka(store: RunStore, small: str, large: str) -> pd.DataFrame | None:
    """Minibatch CKA between two runs' fine-tuned blocks from their stored Gram matrices (``layer_a``: the run
    ``small``, ``layer_b``: ``large``), or None when either lacks them or they were taken on other examples."""
    from scaling.analysis.cka import cka_from_grams

    a, b = read_grams(store, small), read_grams(store, large)
    if a is None or b is None:
        return None
    if a[2] != b[2] or [g.shape[-1] for g in a[1]] != [g.shape[-1] for g in b[1]]:
        log.warning("runs %s and %s were compared with their initialisation on other examples; no CKA between them",
                    small, large)
        return None
    return cka_from_grams(a[1], a[0], b[1], b[0])


def cka_pending(cfg: StudyConfig, store: RunStore, rid: str, spec: RunSpec) -> bool:
    """A finished fine-tuned run whose CKA table is missing or was made with other CKA settings, or that lacks the
    Gram matrices ``cka.scales`` asks for (a store made with ``scales: false``). Files made with ``scales: true``
    stay when a later run turns it off."""
    if not cka_wanted(cfg, spec):
        return False
    run_dir = store.run_dir(rid)
    return (not (run_dir / CKA_FILE).is_file()
            or store.read_evaluation(rid).get("cka") != cka_settings(cfg.cka)
            or (cfg.cka.scales and not (run_dir / GRAMS_FILE).is_file()))

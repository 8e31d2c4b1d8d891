"""A hand-made run store with known numbers, shared by the study tests (this module holds no tests itself).

Metric values follow closed-form laws of the axes (so tests can assert exact aggregates and fitted exponents);
predictions are Gaussian scores whose AUROC matches the stored test AUROC, so pairwise DeLong comparisons and
selective-prediction curves have something real to work on.
"""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from scaling.config import DataConfig, EvalSetConfig, GridConfig, StudyConfig, UpstreamConfig, to_dict
from scaling.io import atomic_write_text
from scaling.study.grid import config_hash, expand_grid, run_id
from scaling.study.runner import metric_settings
from scaling.study.store import RunStore

BACKBONES = {"bb_tiny": 1e5, "bb_small": 4e5, "bb_base": 1.6e6, "bb_large": 6.4e6}
SOURCES = {"scratch": 0.0, "upstream:small": 1000.0, "upstream:big": 10000.0}
SOURCE_FACTOR = {"scratch": 1.0, "upstream:small": 0.8, "upstream:big": 0.6}
FRACTIONS = (0.25, 0.5, 1.0)
SEEDS = (0, 1)
SEED_SHIFT = {0: -0.004, 1: 0.004}
LABELS = ("L1", "L2")
EVAL_SETS = ("val", "test", "ood_site_b")
N_TRAIN_FULL = 400
PATIENTS = [f"pzq{80000 + i}" for i in range(60)]
SAMPLES = [f"smx{550000 + i}" for i in range(120)]
TEMPERATURES = {"L1": 2.0, "L2": None}
"""The validation-fitted temperatures recorded with every run (L2: none could be fitted)."""
B_PARAMS, B_FRACTION = 0.3, 0.25
"""Exponents of the error law in parameter count and in labelled fraction."""


def expected_error(backbone: str, source: str, fraction: float, seed: int) -> float:
    """1 − macro test AUROC of a cell: 0.08 + 0.25·(n/1e5)^−0.3·f^−0.25·source factor, shifted by seed."""
    n = BACKBONES[backbone]
    return 0.08 + 0.25 * (n / 1e5) ** -B_PARAMS * fraction ** -B_FRACTION * SOURCE_FACTOR[source] + SEED_SHIFT[seed]


def ood_drop(backbone: str) -> float:
    """Test − OOD AUROC: shrinks with scale."""
    return 0.10 * (BACKBONES[backbone] / 1e5) ** -0.2


def auroc_gap(backbone: str) -> float:
    """Subgroup AUROC gap (sex): shrinks with scale."""
    return 0.06 * (BACKBONES[backbone] / 1e5) ** -0.15


def ece(backbone: str) -> float:
    """ECE before temperature scaling: grows with scale (bigger models are more over-confident)."""
    return 0.02 + 0.01 * np.log10(BACKBONES[backbone] / 1e5)


def _auroc(backbone, source, fraction, seed, eval_set) -> float:
    a = 1 - expected_error(backbone, source, fraction, seed)
    return a - ood_drop(backbone) if eval_set == "ood_site_b" else a


def _metric_rows(backbone, source, fraction, seed) -> list[dict]:
    rows = []

    def add(es, label, attr, group, metric, value, n=120):
        rows.append(dict(eval_set=es, label=label, attribute=attr, group=group, metric=metric, value=float(value),
                         lo=float(value) - 0.03, hi=float(value) + 0.03, n=n))

    for es in EVAL_SETS:
        a = _auroc(backbone, source, fraction, seed, es)
        gap = auroc_gap(backbone)
        e = ece(backbone)
        for label in (*LABELS, "macro"):
            add(es, label, "all", "all", "auroc", a)
            overall = dict(auprc=a - 0.2, ece=e, ece_temp=0.015, mce=2 * e, brier=0.2 - 0.1 * a,
                           brier_temp=0.19 - 0.1 * a, nll=0.6 - 0.2 * a, nll_temp=0.55 - 0.2 * a, prevalence=0.3,
                           tpr=a - 0.1, fpr=1.1 - a, aurc=0.3 - 0.2 * a)
            for m, v in overall.items():
                add(es, label, "all", "all", m, v)
            for g, sign in (("F", -1), ("M", 1)):
                add(es, label, "sex", g, "auroc", a + sign * gap / 2, n=60)
                add(es, label, "sex", g, "ece", e, n=60)
                add(es, label, "sex", g, "tpr", a - 0.1 + sign * 0.01, n=60)
                add(es, label, "sex", g, "fpr", 1.1 - a, n=60)
                add(es, label, "sex", g, "prevalence", 0.3, n=60)
            add(es, label, "sex", "all", "worst_group_auroc", a - gap / 2)
            add(es, label, "sex", "all", "auroc_gap", gap)
            add(es, label, "sex", "all", "eod", 0.02)
            if es == "ood_site_b":  # the shift rows: both labels are scored on test and on the OOD set
                a_id = _auroc(backbone, source, fraction, seed, "test")
                add(es, label, "all", "all", "auroc_id", a_id)
                add(es, label, "all", "all", "auroc_ood", a)
                add(es, label, "all", "all", "auroc_drop", a_id - a)
    return rows


def _predictions(auroc: float, seed: int, eval_set: str) -> pd.DataFrame:
    """Binary-Gaussian scores with the given AUROC; targets fixed per eval set so runs pair on the same samples."""
    rng_y = np.random.default_rng(EVAL_SETS.index(eval_set))
    rng = np.random.default_rng(1000 + seed)
    d = np.sqrt(2) * stats.norm.ppf(min(auroc, 0.999))
    df = pd.DataFrame({"sample_id": SAMPLES, "patient_id": np.repeat(PATIENTS, 2),
                       "sex": np.tile(["F", "M"], 60), "age_group": np.repeat(["<60", ">=60"], 60)})
    for label in LABELS:
        y = (rng_y.random(len(df)) < 0.3).astype(float)
        logit = y * d - d / 2 + rng.normal(size=len(df))
        df[f"label:{label}"] = y
        df[f"logit:{label}"] = logit
        df[f"prob:{label}"] = 1 / (1 + np.exp(-logit))
    return df


def study_config(root: Path, name: str = "handmade", seeds=SEEDS) -> StudyConfig:
    """The study config whose grid the hand-made store fills."""
    return StudyConfig(
        name=name, output_dir=str(root),
        data=DataConfig(root="synthetic", labels=LABELS, ood=(EvalSetConfig(name="ood_site_b", root="synthetic:b"),)),
        upstream=(UpstreamConfig(name="small", num_images=1000), UpstreamConfig(name="big", num_images=10000)),
        grid=GridConfig(backbones=tuple(BACKBONES), pretrained=tuple(SOURCES), fractions=FRACTIONS, seeds=tuple(seeds)),
    )


def make_store(root: Path, *, name: str = "handmade", skip: set | None = None, only: set | None = None,
               predictions: bool = True) -> StudyConfig:
    """Fill ``root`` with a hand-made study: every (backbone, source, fraction, seed) cell, or those in ``only``,
    minus those in ``skip``; ``predictions=False`` writes metrics only (faster)."""
    cfg = study_config(root, name)
    store = RunStore(root)
    atomic_write_text(root / "study.yaml", yaml.safe_dump({**to_dict(cfg), "_meta": {"config_hash": config_hash(cfg)}},
                                                          sort_keys=False))
    for spec in expand_grid(cfg):
        key = (spec.backbone, spec.pretrained, spec.fraction, spec.seed)
        if (skip and key in skip) or (only is not None and key not in only):
            continue
        rid = run_id(cfg, spec)
        spec_json = {"run_id": rid, "study": name, "config_hash": config_hash(cfg), "backbone": spec.backbone,
                     "pretrained": spec.pretrained, "fraction": spec.fraction, "seed": spec.seed,
                     "n_params": int(BACKBONES[spec.backbone]), "pretrain_images": SOURCES[spec.pretrained],
                     "n_train_images": int(N_TRAIN_FULL * spec.fraction), "n_train_patients": 0, "family": "test"}
        store.write_spec(rid, spec_json, "{}\n")
        if predictions:
            for es in EVAL_SETS:
                store.write_predictions(rid, es, _predictions(_auroc(*key, es), spec.seed, es))
            # what the runner stores: the temperatures fitted on val (None = one class there: none fitted)
            store.write_meta(rid, {"fitted_on_val": {"temperatures": dict(TEMPERATURES)}})
        # what the runner records with its metrics: without it every run reads as scored under an older definition
        store.write_evaluation(rid, {"metrics": metric_settings(cfg), "scored": list(EVAL_SETS) if predictions else []})
        store.write_metrics(rid, _metric_rows(*key))
        store.mark_complete(rid)
    return cfg


_SHARED: dict[str, tuple[Path, StudyConfig]] = {}


def shared_store(tmp_path_factory) -> tuple[Path, StudyConfig]:
    """The complete hand-made store (with predictions), written once per test session; tests must not modify it
    (copy it with :func:`copy_store` first)."""
    if "full" not in _SHARED:
        root = tmp_path_factory.mktemp("shared_study")
        _SHARED["full"] = (root, make_store(root))
    return _SHARED["full"]


def copy_store(tmp_path_factory, dst: Path) -> tuple[Path, StudyConfig]:
    """A private copy of the shared store at ``dst`` (to add, fail or delete runs in)."""
    src, cfg = shared_store(tmp_path_factory)
    shutil.copytree(src, dst)
    return dst, cfg


def run_dir_of(root: Path, cfg: StudyConfig, backbone, source, fraction, seed) -> tuple[str, Path]:
    """Run id and directory of one cell of the hand-made store."""
    spec = next(s for s in expand_grid(cfg) if (s.backbone, s.pretrained, s.fraction, s.seed) ==
                (backbone, source, fraction, seed))
    rid = run_id(cfg, spec)
    return rid, RunStore(root).run_dir(rid)


class _TableParser(HTMLParser):
    """Collects the header and body cells of one ``<table id=...>`` of an HTML page."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_table(text: str, table_id: str) -> pd.DataFrame:
    """The table with ``id=table_id`` of an HTML page as a DataFrame of strings (first row = header)."""
    parser = _TableParser(table_id)
    parser.feed(text)
    if not parser.rows:
        raise AssertionError(f"no table with id {table_id!r} in the page")
    return pd.DataFrame(parser.rows[1:], columns=parser.rows[0])

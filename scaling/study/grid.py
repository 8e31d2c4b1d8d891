"""The study grid: backbone × pretraining source × data fraction × seed → runs with stable, content-derived ids."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass

from scaling.config import GridConfig, StudyConfig, to_dict


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid."""

    backbone: str
    """Backbone preset or timm name."""
    pretrained: str
    """Weight source (``scratch``, ``upstream:<name>``, ``hub``, a file, ...)."""
    fraction: float
    """Fraction of training patients."""
    seed: int
    """Seed for init, data order and the fraction subset."""


def expand_grid(study: StudyConfig) -> list[RunSpec]:
    """All cells of the study grid in a stable order (backbone-major)."""
    g = study.grid
    return [RunSpec(b, p, float(f), int(s)) for b, p, f, s in itertools.product(g.backbones, g.pretrained, g.fractions, g.seeds)]


def run_config(study: StudyConfig, spec: RunSpec) -> StudyConfig:
    """The fully resolved config of one run: the study config with the grid collapsed onto ``spec``."""
    model = dataclasses.replace(study.model, backbone=spec.backbone, pretrained=spec.pretrained)
    train = dataclasses.replace(study.train, seed=spec.seed)
    grid = GridConfig(backbones=(spec.backbone,), pretrained=(spec.pretrained,), fractions=(spec.fraction,), seeds=(spec.seed,))
    upstream = tuple(u for u in study.upstream if spec.pretrained == f"upstream:{u.name}")
    return dataclasses.replace(study, model=model, train=train, grid=grid, upstream=upstream)


def _identity(cfg: StudyConfig) -> dict:
    """The parts of a config that change results (not where they are written or how they are tracked)."""
    d = to_dict(cfg)
    for k in ("name", "output_dir", "tracking"):
        d.pop(k, None)
    return d


def config_hash(cfg: StudyConfig) -> str:
    """Hash of everything in a config that changes results."""
    blob = json.dumps(_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40] or "x"


def run_id(study: StudyConfig, spec: RunSpec) -> str:
    """Stable id of a run: readable axes plus a hash of its resolved config (any setting change → new id)."""
    h = config_hash(run_config(study, spec))[:8]
    src = spec.pretrained if not spec.pretrained.startswith(("/", ".")) else "file-" + spec.pretrained.rsplit("/", 1)[-1]
    return f"{_slug(spec.backbone)}__{_slug(src)}__f{spec.fraction:g}__s{spec.seed}__{h}"

"""The study grid: backbone × pretraining source × data budget × seed × protocol × re-initialisation × block
shuffling → runs with stable, content-derived ids.

A data budget is a fraction of the training patients or a k-shot subset; the protocol fine-tunes the model or fits
a linear probe on its frozen features; re-initialisation resets the blocks above (or below) a unit before
fine-tuning; block shuffling permutes ``b x b`` pixel blocks of every image the cell sees. The last four default
to the plain fine-tuning cell, whose ids they leave unchanged.

A run id names one result. It is the cell's axes (readable) plus a short hash of :func:`result_settings`, the one
rule that says which settings change what a run trains and predicts (docs/run-store.md, "What a run id means").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from scaling.config import (
    MEAN_VAR_PREFIX,
    DataConfig,
    EvalSetConfig,
    GridConfig,
    StudyConfig,
    SubGridConfig,
    mean_var_source,
    parse_shuffle,
    to_dict,
    upstream_name,
)

SYNTHETIC = "synthetic"
"""``data.root`` value selecting the offline demo data; ``synthetic:b`` is the second (OOD) acquisition site."""


FINETUNE, PROBE, NO_REINIT, NO_SHUFFLE = "finetune", "linear_probe", "none", "none"
"""The default protocol, re-initialisation and block shuffling (the plain fine-tuning cell)."""


def shuffle_name(value) -> str:
    """A ``grid.shuffle`` value as a cell holds it: ``none`` or the block size in decimal (``8`` of ``"08"``)."""
    b = parse_shuffle(value)
    return str(b) if b else NO_SHUFFLE


def _pathlike(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith("~")


def source_label(pretrained: str) -> str:
    """The short, path-free name of a weight source, as results tables, the report, plots and W&B show it.

    * a plain path (``/weights/mimic``, ``~/w/r50.npz``, ``r50.safetensors``): ``file:<its last part>``
      (``file:mimic``, ``file:r50.npz``);
    * ``<name>:<path>`` (a preset source standing for a file, ``bit-l:/weights/jft``, or a label of your own,
      ``mimic:/weights/mimic``): ``<name>``;
    * anything else (``scratch``, ``bit-m``, ``hub:<tag>``, ``upstream:<name>``): itself;
    * ``meanvar:<source>``: ``meanvar:`` and the label of ``<source>`` (``meanvar:bit-l`` of
      ``meanvar:bit-l:/weights/jft``).

    Parent directories, which often carry user, site or project names, never reach a table. The label is a
    function of the source string alone and applying it twice changes nothing; two sources of one grid with the
    same label are refused (``scaling.study.runner.study_cells``). Run ids are not derived from it.
    """
    from scaling.models.weights import FILE_SUFFIXES, LABEL

    inner = mean_var_source(pretrained)
    if inner is not None:
        return MEAN_VAR_PREFIX + source_label(inner)
    text = pretrained.strip()
    name, sep, rest = text.partition(":")
    if sep and LABEL.fullmatch(name):
        return name if _pathlike(rest) else text
    if _pathlike(text) or text.lower().endswith(FILE_SUFFIXES):
        return "file:" + re.split(r"[\\/]", text.rstrip("/\\"))[-1]
    return text


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid.

    ``pretrained`` is the source's label (:func:`source_label`), the axis every table and plot shows; ``source`` the
    source as the config gives it, from which weights are loaded and the run id is derived. Built with one string
    (``RunSpec("bit_r50x1", "/weights/jft", 1.0, 0)``), that string is the source and its label the axis.
    """

    backbone: str
    """Backbone preset or timm name."""
    pretrained: str
    """Label of the weight source (``scratch``, ``upstream:<name>``, ``hub``, ``bit-l``, ``file:<name>``, ...)."""
    fraction: float
    """Fraction of training patients (1.0 for a k-shot cell: its k-shot subset is drawn from all of them)."""
    seed: int
    """Seed for init, data order and the fraction or k-shot subset."""
    protocol: str = FINETUNE
    """``finetune`` or ``linear_probe``."""
    shots: int = 0
    """k of a k-shot cell (k positive and k negative patients per label); 0 for a fraction cell."""
    reinit: str = NO_REINIT
    """``none``, ``after:k`` or ``first:k`` (``scaling.config.parse_reinit``)."""
    source: str = ""
    """The weight source as written in ``grid.pretrained`` (a path included); set from ``pretrained`` when empty."""
    shuffle: str = NO_SHUFFLE
    """``none`` or the side in pixels of the blocks every image of the cell is shuffled in (``grid.shuffle``)."""

    def __post_init__(self):
        if not self.source:
            object.__setattr__(self, "source", self.pretrained)
        object.__setattr__(self, "pretrained", source_label(self.pretrained))
        object.__setattr__(self, "shuffle", shuffle_name(self.shuffle))

    @property
    def block(self) -> int:
        """The block size of a block-shuffled cell, 0 for any other."""
        return parse_shuffle(self.shuffle)

    @property
    def budget(self) -> str:
        """The data budget, readable: ``f0.2`` or ``k5``."""
        return f"k{self.shots}" if self.shots else f"f{self.fraction:g}"


def _cells(g: GridConfig, sub: SubGridConfig | None = None) -> list[RunSpec]:
    """The product of one grid's axes (``sub``'s where set, the grid's otherwise), minus the combinations that are
    not cells: a re-initialised probe (a probe trains nothing), a re-initialised scratch backbone or Mean Var init
    (neither has pretrained units to keep), and a block-shuffled probe, Mean Var init or re-initialised cell
    (block shuffling asks pretrained against scratch on the same shuffled images, Neyshabur et al. 2020; it is
    not crossed with the other analyses)."""
    def axis(name):
        value = getattr(sub, name) if sub is not None else None
        return value if value is not None else getattr(g, name)

    budgets = [(float(f), 0) for f in axis("fractions")] + [(1.0, int(k)) for k in axis("shots")]
    out = []
    for b, p, (f, k), s, proto, r, sh in itertools.product(axis("backbones"), axis("pretrained"), budgets,
                                                         axis("seeds"), axis("protocols"), axis("reinit"),
                                                         axis("shuffle")):
        if r != NO_REINIT and (proto != FINETUNE or p == "scratch" or mean_var_source(p) is not None):
            continue
        if shuffle_name(sh) != NO_SHUFFLE and (proto != FINETUNE or r != NO_REINIT or mean_var_source(p) is not None):
            continue
        out.append(RunSpec(b, p, f, int(s), proto, k, r, shuffle=sh))
    return out


def expand_grid(study: StudyConfig) -> list[RunSpec]:
    """All cells of the study grid in a stable order (backbone-major), then those of ``grid.also`` not already
    there."""
    g = study.grid
    cells = _cells(g) + [c for sub in g.also for c in _cells(g, sub)]
    return list(dict.fromkeys(cells))


def run_config(study: StudyConfig, spec: RunSpec) -> StudyConfig:
    """The fully resolved config of one run: the study config with the grid collapsed onto ``spec``."""
    model = dataclasses.replace(study.model, backbone=spec.backbone, pretrained=spec.source)
    train = dataclasses.replace(study.train, seed=spec.seed)
    grid = GridConfig(backbones=(spec.backbone,), pretrained=(spec.source,),
                      fractions=() if spec.shots else (spec.fraction,), shots=(spec.shots,) if spec.shots else (),
                      seeds=(spec.seed,), protocols=(spec.protocol,), reinit=(spec.reinit,),
                      shuffle=(spec.shuffle,))
    upstream = tuple(u for u in study.upstream if upstream_name(spec.source) == u.name)
    return dataclasses.replace(study, model=model, train=train, grid=grid, upstream=upstream)


# ----------------------------------------------------------------------------------------------------------------
# What a run id means
# ----------------------------------------------------------------------------------------------------------------

NEUTRAL: dict[str, str] = {
    "name": "a label of the study (report title, W&B group)",
    "output_dir": "where the store is, not what is in it",
    "tracking": "W&B is a view of the store",
    "data.root": "the mount path of the dataset; its identity is data.dataset (the demo data keeps 'synthetic')",
    "data.num_workers": "how fast images are decoded, not which",
    "data.cache": "decoded once or every time, the pixels are the same (8-bit sources exactly; 16-bit and DICOM "
                  "ones to 1/65535 of their range, far below the images' noise)",
    "data.on_bad_image": "a run that succeeds under 'error' has no bad image, so 'skip' trains the same run",
    "data.ood": "evaluation sets: predictions of the trained model, added to finished runs without retraining",
    "data.subgroups": "evaluation only: metrics are recomputed from the stored predictions",
    "data.age_bins": "evaluation only: age_group is re-derived from the stored age column",
    "train.log_every": "how often the loss is printed",
    "train.checkpoint_every": "how often resumable state is saved (saving draws no random number)",
    "train.eval_every": "validation passes draw no random number: the global RNGs are re-seeded at every step and "
                        "every loader owns its generator (tests/test_augmentation.py); it counts again under "
                        "train.select other than last, where the validation points are the candidate weights",
    "train.compile": "compiled blocks compute the same function as eager ones (equal to 1e-5, tests/test_trainer.py)",
    "train.deterministic": "selects deterministic GPU kernels for the same computation",
    "sharding.strategy": "how the model is distributed; one process and N ranks take the same steps "
                         "(tests/test_sharding.py)",
    "sharding.offload_params": "where parameters live between steps",
    "sharding.offload_optimizer": "where optimizer state lives between steps",
    "sharding.activation_checkpointing": "recomputes activations instead of storing them",
    "sharding.sync_each_micro_batch": "when gradients are reduced, not their sum",
    "sharding.blocks_per_unit": "how many blocks FSDP2 gathers at once; every parameter is sharded and its gradient "
                                "reduced the same way (tests/test_sharding.py)",
    "eval": "statistics of the stored predictions (and the prediction batch size); recomputed when they change",
    "probe.batch_size": "how many images a feature-extraction forward pass takes, not what it computes",
    "cka": "an analysis of the trained model, stored beside its predictions and recomputed when it changes",
    "grid": "collapsed into the cell (backbone, pretrained, fraction or shots, seed, protocol, reinit, shuffle)",
}
"""Settings that never change a run's trained model or predictions, with the reason. Every other setting does,
including any setting added to the config later: a new field changes ids until it is listed here."""

LATER_DEFAULTS: dict[str, Any] = {
    "data.task": "multilabel",
    "data.derived_labels": {},
    "data.filters": {},
    "train.select": "last",
    "train.early_stopping_patience": 0,
    "data.augment": "light",
}
"""Settings added after run ids were first written, with the value that reproduces what runs did before them. At
that value the setting is left out of the hash, so a store written before it existed keeps its ids (its runs
trained exactly this way); any other value is hashed like every setting."""

CELL = ("model.backbone", "model.pretrained", "train.seed", "upstream")
"""Settings that vary from cell to cell of one study (the upstream entry follows ``model.pretrained``)."""


def _drop(d: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in d:
        return
    if rest:
        if isinstance(d[head], dict):
            _drop(d[head], rest)
    else:
        del d[head]


def _root_identity(root: str) -> str | None:
    """The identity of a dataset root: the demo data's name, never a mount path."""
    return root if root == SYNTHETIC or root.startswith(SYNTHETIC + ":") else None


def result_settings(cfg: StudyConfig) -> dict[str, Any]:
    """Every setting that changes what a run trains and predicts, as a plain dict; the run id hashes exactly this.

    ``cfg`` is a run's config (:func:`run_config`); the ``probe`` section counts for linear-probe cells only, and a
    setting of :data:`LATER_DEFAULTS` only away from its default (``data.bit_resize`` only under ``data.augment:
    bit``, and then as the size it resolves to). Its data budget is ``cell.fraction`` or ``cell.shots``, and a
    protocol, re-initialisation or block shuffling other than the default is ``cell.protocol`` / ``cell.reinit`` /
    ``cell.shuffle`` (absent for the plain fine-tuning cell, so its id is what it was before these axes existed); a
    ``train.select`` other than ``last`` brings ``train.eval_every`` in (the validation points are the candidate
    weights). Settings in :data:`NEUTRAL` are left out (each with its reason); everything else is in, so an unknown
    or new setting is never silently ignored. The dataset root counts only as its identity (``synthetic``), not as
    a path: moving a dataset to another mount keeps the ids.
    """
    d = to_dict(cfg)
    root = cfg.data.root
    for key in NEUTRAL:
        _drop(d, key)
    for key, value in LATER_DEFAULTS.items():
        head, _, rest = key.partition(".")
        if d.get(head, {}).get(rest) == value:
            _drop(d, key)
    if cfg.data.augment == "light":
        _drop(d, "data.bit_resize")  # 0 under light (the config refuses another value), as before it existed
    else:  # the size actually used: 0 and the size it stands for train the same run
        d["data"]["bit_resize"] = cfg.data.train_resize
    if tuple(cfg.grid.protocols) != (PROBE,):
        d.pop("probe")  # only a probe cell fits a probe: its settings cannot change a fine-tuned run
    if cfg.train.select != "last":  # the weights kept are chosen among the validation points: their spacing counts
        d["train"]["eval_every"] = cfg.train.eval_every
    d["data"]["root"] = _root_identity(root)
    d["cell"] = _cell(cfg.grid)
    return d


def _cell(g: GridConfig) -> dict[str, Any]:
    """The cell axes of a run config's collapsed grid that are not settings elsewhere in the config."""
    cell: dict[str, Any] = {"shots": list(g.shots)} if g.shots else {"fraction": [float(f) for f in g.fractions]}
    if tuple(g.protocols) != (FINETUNE,):
        cell["protocol"] = list(g.protocols)
    if tuple(g.reinit) != (NO_REINIT,):
        cell["reinit"] = list(g.reinit)
    if tuple(g.shuffle) != (NO_SHUFFLE,):
        cell["shuffle"] = [shuffle_name(b) for b in g.shuffle]
    return cell


def study_settings(cfg: StudyConfig) -> dict[str, Any]:
    """What every run of a study shares: :func:`result_settings` without the cell axes (backbone, source, data budget,
    seed, protocol, re-initialisation, block shuffling, upstream entry). Two runs are comparable cells of one study
    exactly when these agree."""
    d = result_settings(cfg)
    d.pop("cell")
    d.pop("probe", None)  # in a probe cell's id, not the study's: fine-tuned cells never read it
    for key in CELL:
        _drop(d, key)
    return d


def eval_set_identity(eval_set: EvalSetConfig, data: DataConfig) -> dict[str, Any]:
    """What an evaluation set is, by the rule of :func:`result_settings`: its dataset, split, filters and the loader
    options in effect (the training dataset's when it has none of its own), and its root only as the demo data's
    name. Two configs that agree here predict the same samples under that name."""
    return {
        "dataset": eval_set.dataset or data.dataset,
        "root": _root_identity(eval_set.root or data.root),
        "split": eval_set.split,
        "filters": to_dict(eval_set.filters),
        "options": to_dict({**(data.options if not eval_set.dataset else {}), **eval_set.options}),
        # Added later: "all" (every row) is what a set was before the field existed.
        **({"patients": eval_set.patients} if eval_set.patients != "all" else {}),
    }


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def config_hash(cfg: StudyConfig) -> str:
    """Hash of :func:`study_settings`: equal for every run of a study, whatever grid it grows to."""
    return _hash(study_settings(cfg))[:12]


def settings_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two settings dicts differ, with both values (``train.lr: 0.1 != 0.05``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(f"{key}: {old.get(k, '<absent>')!r} != {new.get(k, '<absent>')!r}")
            else:
                out += settings_diff(old[k], new[k], key)
        return out
    return [] if old == new else [f"{prefix or '<root>'}: {old!r} != {new!r}"]


def _is_user_label(name: str) -> bool:
    """True when ``name`` (of ``<name>:<path>``) is no preset source or alias (``bit-l``, ``in21k``...) nor a reserved
    prefix: a label of the user's own."""
    from scaling.models.presets import PRESETS
    from scaling.models.weights import RESERVED_LABELS

    known = set(RESERVED_LABELS)
    for preset in PRESETS.values():
        known |= set(preset.sources) | set(preset.aliases)
    return name.lower() not in known


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40] or "x"


def run_id(study: StudyConfig, spec: RunSpec) -> str:
    """Stable id of a run: readable axes plus a hash of its :func:`result_settings`.

    The readable part of the source is the source as given (a path starting with ``/`` or ``.`` by its last part,
    ``file-<name>``), as it always was, so stores keep their ids; a ``<label>:<path>`` with a label of the user's
    own (one no preset source has: that form was refused before labels existed) by its label alone; a Mean Var init
    by ``meanvar-`` and its source's label (:func:`source_label`). A block-shuffled cell ends in ``__shuffle-<b>``
    before the hash."""
    h = _hash(result_settings(run_config(study, spec)))[:8]
    extra = ("__probe" if spec.protocol == PROBE else "") + (
        f"__reinit-{_slug(spec.reinit)}" if spec.reinit != NO_REINIT else "") + (
        f"__shuffle-{spec.shuffle}" if spec.shuffle != NO_SHUFFLE else "")
    return f"{_slug(spec.backbone)}__{_slug(_readable_source(spec.source))}__{spec.budget}__s{spec.seed}{extra}__{h}"


def _readable_source(given: str) -> str:
    """The source's part of a run id (:func:`run_id`), before it is slugged."""
    inner = mean_var_source(given)
    if inner is not None:  # a new form: named by its label, which has no directories
        return "meanvar-" + source_label(inner)
    if ":" in given and _is_user_label(given.partition(":")[0]) and _pathlike(given.partition(":")[2]):
        return given.partition(":")[0]
    return given if not given.startswith(("/", ".")) else "file-" + given.rsplit("/", 1)[-1]

"""Typed, frozen configuration for every setting of a study.

One dataclass per concern (data, model, training, sharding, evaluation, tracking, study grid). Configs are
built from YAML plus dotted command-line overrides (``train.lr=0.01``) by :func:`load_config`; every value is
type-checked and every unknown key is rejected with the closest valid name, so a typo never silently falls back
to a default. Validation of allowed values happens in ``__post_init__`` and names the field.

We use plain dataclasses + PyYAML rather than a config framework: the schema is the code, the errors are ours,
and a resolved config round-trips through :func:`to_dict` / :func:`from_dict` exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names the field."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping sets one key twice (YAML says keys are unique; PyYAML would keep the last silently)."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false. YAML 1.1 reads ``off``/``no``/``on``/``yes``
    as booleans, which silently turns ``wandb: off`` or ``mixed_precision: no`` into False. Floats such as ``1e-4``
    are floats, as in YAML 1.2 (YAML 1.1 reads them as strings). A key repeated in one
    mapping, at any depth, is a :class:`DuplicateKeyError` (PyYAML would keep the last value and drop the rest)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: its keys may be overridden here
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if first is not key_node:
                    raise DuplicateKeyError(
                        None, None, f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first set at "
                        f"line {first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2 exponent floats: YAML 1.1 reads ``lr: 1e-4`` and ``1.5e3`` as strings (it wants ``1.0e-4``, ``1.5e+3``).
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789.")
)


def read_yaml(text: str):
    """Parse YAML text with YAML 1.2 booleans (see :class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_filters(name: str, filters: dict) -> None:
    """Attribute filters are ``{column: value or [values]}`` with scalar values (what a table cell can equal)."""
    for column, want in filters.items():
        values = want if isinstance(want, (list, tuple)) else [want]
        bad = [v for v in values if isinstance(v, (dict, list, tuple, set))]
        if bad or not values:
            raise ConfigError(f"{name}.{column}={want!r} must be a value or a non-empty list of values")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number {bound}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {bound}")


def _at_least_one(name: str, value: int) -> None:
    """A count that must be >= 1 (a size, a number of bins, a logging interval)."""
    if value < 1:
        raise ConfigError(f"{name}={value} must be >= 1")


def _unique_names(field_name: str, names: list[str]) -> None:
    """Each entry of a list section needs its own name (``data.ood``, ``upstream``): the first repeat is named."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        j = first.setdefault(name, i)
        if j != i:
            raise ConfigError(f"{field_name}[{i}].name={name!r} repeats {field_name}[{j}].name; each entry needs its "
                              f"own name")


def _file_name(name: str, value: str) -> None:
    """``value`` names files and directories in the run store: non-empty, no path separators, not ``.``/``..``."""
    if not value.strip() or value in (".", "..") or "/" in value or "\\" in value:
        raise ConfigError(f"{name}={value!r} must be a non-empty name without '/' or '\\' (it names files in the "
                          f"run store)")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSetConfig:
    """An evaluation set: a dataset split, optionally filtered by attribute values (e.g. another site)."""

    name: str
    """Name used in the run store and reports (e.g. ``ood_site_b``, ``nih``); unique among ``data.ood`` and none of
    ``train``, ``val``, ``test`` (the study's own splits)."""
    dataset: str = ""
    """Dataset name in ``scaling.data`` or the dotted import path of a loader module of your own; empty = the
    training dataset."""
    root: str = ""
    """Dataset root; empty = the training dataset's root."""
    split: str = "test"
    """Split of that dataset to evaluate on."""
    filters: dict[str, Any] = field(default_factory=dict)
    """Attribute filters: ``{column: value or [values]}``; rows not matching are dropped (logged)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword options for the dataset's loader."""
    patients: str = "all"
    """Which patients of a set drawn from the training dataset (same dataset and root) it keeps. ``all``: every
    row; a patient or image the study trains or validates on is then an error (the set would score training
    data). ``unseen``: drops those rows (logged). ``test``: keeps only the in-distribution test set's patients,
    e.g. their lateral films, a shift on the same patients (its AUROC drop resamples both sets' patients
    together). An image id that is also a training or validation image id is refused (``all``) or dropped
    (``unseen``) whatever the set's source: ISIC 2019 contains the HAM10000 images under the same ids."""

    def __post_init__(self):
        _file_name("data.ood[].name", self.name)
        _choice("data.ood[].patients", self.patients, OOD_PATIENTS)
        _check_filters("data.ood[].filters", self.filters)


OOD_PATIENTS = ("all", "unseen", "test")
"""Values of ``EvalSetConfig.patients``."""

RESERVED_EVAL_SETS = ("train", "val", "test")
"""Split names of the study's own data (``scaling.study.runner``): an OOD set may not take one."""


BIT_RESIZE_RATIO = (448, 384)
"""The paper's resize : crop (Kolesnikov et al. 2020 §3.3), the ratio :func:`bit_resize` scales a crop by."""


def bit_resize(crop: int) -> int:
    """The square size BiT resizes training images to before a random ``crop x crop`` window is taken, for any
    crop: the paper's 448 : 384 (7 : 6) rounded to the nearest pixel, so 384 → 448, 224 → 261, 48 → 56.

    ``data.augment: bit`` uses it when ``data.bit_resize`` is 0 (:attr:`DataConfig.train_resize`). The released
    code's 512 : 480 and 160 : 128 are not this ratio (16 : 15 and 5 : 4); set ``data.bit_resize`` to follow them.
    """
    if crop < 1:
        raise ValueError(f"crop={crop} must be >= 1")
    return int(math.floor(crop * BIT_RESIZE_RATIO[0] / BIT_RESIZE_RATIO[1] + 0.5))


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to fine-tune on, which labels, and how images are prepared."""

    dataset: str = "chexpert"
    """Dataset name in the ``scaling.data`` registry."""
    root: str = ""
    """Dataset root on disk (required: an empty root is an error). ``synthetic`` = the offline demo data, generated
    under the study directory (``synthetic:b``: its second acquisition site)."""
    labels: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    """Canonical label names to train on (see ``scaling.data.labels``); under ``task: multiclass`` the K classes."""
    task: str = "multilabel"
    """``multilabel``: independent findings, one sigmoid and a masked BCE per label. ``multiclass``: ``labels`` are
    K mutually exclusive classes, a softmax head and cross-entropy; a sample's target is its one positive class
    (none: unlabelled, excluded from loss and class metrics; two or more: a DataError naming the sample)."""
    derived_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``multiclass`` only: binary labels scored as the summed probability of a group of classes, e.g.
    ``{Malignant: [Melanoma, Basal Cell Carcinoma, ...]}``; the label itself (``label:<name>``) comes from the data."""
    options: dict[str, Any] = field(default_factory=dict)
    """Dataset-specific loader options (uncertainty policy, views, demographics file, ...)."""
    filters: dict[str, Any] = field(default_factory=dict)
    """Attribute filters on the training dataset, ``{column: value or [values]}`` as an OOD set's: rows not matching
    are dropped (logged) before the patient split, and from official val/test splits too. Holds a site, scanner or
    skin type out of training: HAM10000 with ``{site: [vidir_modern, rosendahl, vienna_dias]}`` and an OOD set
    ``{name: molemax, split: all, filters: {site: vidir_molemax}}``."""
    train_split: str = "train"
    """Split used for training (and, by patient, for validation when ``val_split`` is empty)."""
    val_split: str = ""
    """Official validation split; empty = carve ``val_fraction`` of train patients."""
    val_fraction: float = 0.1
    """Fraction of training patients held out for validation when there is no official split."""
    test_split: str = ""
    """Official test split; empty = carve ``test_fraction`` of train patients for the in-distribution test."""
    test_fraction: float = 0.2
    """Fraction of training patients held out as in-distribution test when there is no test split."""
    image_size: int = 64
    """Training/eval resolution in pixels (square)."""
    num_workers: int = 0
    """DataLoader workers per process (0 = load in the main process)."""
    cache: bool = True
    """Decode + resize each image once into a memory-mapped cache keyed by sample id."""
    on_bad_image: str = "error"
    """``error`` stops at the first unreadable image, ``skip`` drops it and counts it in the run's metadata."""
    flip: bool = False
    """Random horizontal flips in training (dermatology: yes; chest X-ray: no, laterality carries meaning), under
    either ``augment``."""
    augment: str = "light"
    """Training views. ``light``: a random resized crop of 75-100 % of the area (aspect 0.9-1.1) back to
    ``image_size`` and a rotation of up to 7 degrees. ``bit``: BiT's fine-tuning views (big_transfer
    ``bit_pytorch/train.py``): the image resized to ``bit_resize`` and a uniformly random ``image_size`` crop of it,
    no rescaling, no rotation. Flips follow ``flip`` under both; evaluation resizes to ``image_size`` under both."""
    bit_resize: int = 0
    """``augment: bit`` only: the square size training images are resized (and cached) at before the random
    ``image_size`` crop; 0 = the paper's 448 : 384 ratio (:func:`bit_resize`: 384 → 448).
    Must be >= ``image_size`` (equal: flips only)."""
    ood: tuple[EvalSetConfig, ...] = ()
    """Out-of-distribution evaluation sets, each with its own name (not ``train``, ``val`` or ``test``)."""
    subgroups: tuple[str, ...] = ("sex", "age_group")
    """Attribute columns to report metrics per subgroup (``age_group`` is derived from ``age_bins``)."""
    age_bins: tuple[float, ...] = (0.0, 40.0, 60.0, 80.0, 200.0)
    """Edges of the age bins for ``age_group`` (left-closed): at least two strictly increasing whole numbers of
    years, which name the groups (``40-60``; ``80+`` for a last edge >= 120)."""

    def __post_init__(self):
        _choice("data.on_bad_image", self.on_bad_image, ("error", "skip"))
        _check_filters("data.filters", self.filters)
        _positive("data.image_size", self.image_size)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        self._check_augment()
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction={self.test_fraction} must be in [0, 1)")
        _choice("data.task", self.task, ("multilabel", "multiclass"))
        if not self.labels:
            raise ConfigError("data.labels must name at least one label")
        repeated = sorted({n for n in self.labels if self.labels.count(n) > 1})
        if repeated:
            raise ConfigError(f"data.labels names {repeated} more than once")
        if self.task == "multiclass" and len(self.labels) < 2:
            raise ConfigError(f"data.task='multiclass' needs at least two classes in data.labels, got {list(self.labels)}")
        self._check_derived_labels()
        self._check_age_bins()
        self._check_ood_names()

    def _check_augment(self) -> None:
        _choice("data.augment", self.augment, ("light", "bit"))
        _positive("data.bit_resize", self.bit_resize, allow_zero=True)
        if self.bit_resize and self.augment != "bit":
            raise ConfigError(f"data.bit_resize={self.bit_resize} applies only to data.augment='bit' (data.augment="
                              f"{self.augment!r} resizes nothing before its crop): set data.augment=bit or drop it")
        if self.bit_resize and self.bit_resize < self.image_size:
            raise ConfigError(f"data.bit_resize={self.bit_resize} is smaller than data.image_size={self.image_size}: "
                              f"BiT crops data.image_size out of the resized image, so data.bit_resize must be at "
                              f"least data.image_size")

    @property
    def train_resize(self) -> int:
        """The square size training images are decoded and cached at: ``bit_resize`` (its default resolved) under
        ``augment: bit``, ``image_size`` otherwise. Evaluation images are always at ``image_size``."""
        if self.augment != "bit":
            return self.image_size
        return self.bit_resize or bit_resize(self.image_size)

    def _check_age_bins(self) -> None:
        edges = list(self.age_bins)
        if len(edges) < 2:
            raise ConfigError(f"data.age_bins={edges} needs at least two edges (one age group)")
        if not all(math.isfinite(e) and float(e).is_integer() for e in edges):
            raise ConfigError(f"data.age_bins={edges} must be finite whole numbers of years (they name the groups, "
                              f"e.g. '40-60')")
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ConfigError(f"data.age_bins={edges} must be strictly increasing")

    def _check_ood_names(self) -> None:
        for i, eval_set in enumerate(self.ood):
            if eval_set.name in RESERVED_EVAL_SETS:
                raise ConfigError(f"data.ood[{i}].name={eval_set.name!r} is reserved for the study's own split; "
                                  f"name OOD sets otherwise (reserved: {list(RESERVED_EVAL_SETS)})")
        _unique_names("data.ood", [e.name for e in self.ood])

    def _check_derived_labels(self) -> None:
        if self.derived_labels and self.task != "multiclass":
            raise ConfigError("data.derived_labels needs data.task='multiclass' (a sum of independent sigmoids is not "
                              "a probability)")
        for name, group in self.derived_labels.items():
            where = f"data.derived_labels.{name}"
            if name in self.labels:
                raise ConfigError(f"{where}: {name!r} is one of data.labels; a derived label needs its own name")
            if not group:
                raise ConfigError(f"{where} must name at least one class")
            unknown = [c for c in group if c not in self.labels]
            if unknown:
                raise ConfigError(f"{where} names {unknown}, which are not classes in data.labels {list(self.labels)}")
            if len(set(group)) != len(group):
                raise ConfigError(f"{where} names a class twice: {list(group)}")
            if len(group) == len(self.labels):
                # The summed softmax would be 1 for every sample: a label that cannot discriminate.
                raise ConfigError(f"{where} groups every class; its probability would always be 1")


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The backbone (a timm model name or a ``scaling.models`` preset) and its classification head."""

    backbone: str = "resnetv2_tiny"
    """Preset or timm model name; always built through ``timm.create_model``."""
    pretrained: str = "scratch"
    """Weight source: ``scratch``, ``hub`` (timm/HF hub tag of the preset), ``hub:<timm tag>``, a local file
    (``.safetensors``, ``.pt``/``.pth``/``.bin``, BiT ``.npz``), or ``upstream:<name>`` (a demo pretraining run);
    ``meanvar:<source>`` for the Mean Var init of any of these but scratch (docs/analysis.md)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate passed to timm, in [0, 1)."""
    zero_init_head: bool = True
    """Zero-initialise the new head, as BiT does."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``)."""

    def __post_init__(self):
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"model.drop_path_rate={self.drop_path_rate!r} must be in [0, 1)")


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


SELECT = ("last", "val_loss", "val_auroc")
"""The ``train.select`` values: which weights a fine-tuned run keeps (``scaling.engine.selection``)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: optimizer, schedule, batch, precision, duration."""

    batch_size: int = 32
    """Global batch size (all processes, all accumulation micro-steps)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (owned by DeepSpeed under ZeRO, by the trainer otherwise)."""
    optimizer: str = "sgd"
    """``sgd`` (momentum, BiT) or ``adamw``."""
    lr: float = 0.003
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1) (AdamW does not use it)."""
    weight_decay: float = 0.0
    """Weight decay (BiT-HyperRule: none). Never applied to the model's ``no_weight_decay()`` set or to norms/biases."""
    layer_decay: float = 1.0
    """Layer-wise LR decay factor in (0, 1] (1.0 = off); groups come from timm's ``group_matcher``."""
    schedule: str = "cosine"
    """``bit`` (warmup then x0.1 at 30/60/90 %), ``cosine`` (warmup then cosine), ``constant``."""
    warmup_steps: int = 10
    """Linear warmup steps (0 = none)."""
    steps: int = 0
    """Training length in optimizer steps (0 = unset). At most one of steps / epochs / examples may be > 0; with
    none set, the BiT-HyperRule length for the run's training-set size (``scaling.engine.schedule.total_steps``)."""
    epochs: float = 0.0
    """Training length in epochs of the (fraction-subset) training set."""
    examples: int = 0
    """Training length in examples seen (keeps compute equal across data fractions)."""
    mixup_alpha: float = 0.0
    """Multi-label MixUp alpha (0 = off); one lambda per optimizer step."""
    clip_grad_norm: float = 0.0
    """Gradient clipping max norm (0 = off)."""
    mixed_precision: str = "no"
    """``no`` (fp32), ``bf16`` or ``fp16``."""
    compile: str = "off"
    """``torch.compile``: ``off``, ``blocks`` (each backbone block, before sharding; the recommended setting on
    GPUs) or ``model`` (the whole model; under ZeRO DeepSpeed's ``engine.compile``). See docs/scaling-out.md."""
    seed: int = 0
    """Seed for init, data order and augmentation."""
    deterministic: bool = False
    """Deterministic GPU kernels (``torch.use_deterministic_algorithms``, cuDNN autotuning off, cuBLAS workspace
    ``:4096:8``): bit-identical reruns on GPU at a speed cost (docs/scaling-out.md); CPU runs are bit-identical
    anyway. Process-wide while a Trainer with it lives."""
    log_every: int = 10
    """Log throughput and loss every N optimizer steps (>= 1)."""
    eval_every: int = 0
    """Validate every N steps (0 = only at the end): validation loss and macro AUROC (``torchmetrics``)."""
    checkpoint_every: int = 0
    """Save resumable state every N steps (0 = only on SIGTERM/SIGUSR1)."""
    select: str = "last"
    """Which weights a run keeps and predicts with: ``last`` (the last step), ``val_loss`` (lowest validation loss)
    or ``val_auroc`` (highest validation macro AUROC) over the validation points (every ``eval_every`` steps and the
    last step; ties go to the earlier step). Chosen on the validation split only, never on test (docs/design.md)."""
    early_stopping_patience: int = 0
    """Stop training when ``select``'s metric has not improved for this many validation points (0 = off); needs
    ``select`` other than ``last`` and ``eval_every > 0``. The LR schedule stays that of the full length."""
    hyperrule: str = "off"
    """``off``, ``code`` or ``paper``: the BiT-HyperRule sets length, warmup and MixUp alpha from the size of each
    run's (fraction) training set, overriding steps/epochs/examples, warmup_steps and mixup_alpha; with
    ``schedule: bit`` also its decay points."""

    def __post_init__(self):
        _choice("train.optimizer", self.optimizer, ("sgd", "adamw"))
        _choice("train.schedule", self.schedule, ("bit", "cosine", "constant"))
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _choice("train.hyperrule", self.hyperrule, ("off", "code", "paper"))
        _choice("train.compile", self.compile, ("off", "blocks", "model"))
        _choice("train.select", self.select, SELECT)
        _check_seeds("train.seed", (self.seed,))
        _positive("train.early_stopping_patience", self.early_stopping_patience, allow_zero=True)
        _positive("train.eval_every", self.eval_every, allow_zero=True)
        if self.select != "last" and not self.eval_every:
            raise ConfigError(f"train.select={self.select!r} chooses among validation points: set train.eval_every "
                              f"> 0 (with train.eval_every=0 the last step is the only one)")
        if self.early_stopping_patience and self.select == "last":
            raise ConfigError(f"train.early_stopping_patience={self.early_stopping_patience} needs a metric to "
                              f"watch: set train.select to val_loss or val_auroc")
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum={self.momentum!r} must be in [0, 1)")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"train.layer_decay={self.layer_decay!r} must be in (0, 1] (1 = off)")
        for name in ("weight_decay", "warmup_steps", "steps", "epochs", "examples", "mixup_alpha", "clip_grad_norm",
                     "checkpoint_every"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _at_least_one("train.log_every", self.log_every)
        if sum(x > 0 for x in (self.steps, self.epochs, self.examples)) > 1:
            raise ConfigError("set only one of train.steps, train.epochs, train.examples")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum}")


# --------------------------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------------------------


SHARDING_STRATEGIES = ("none", "ddp", "fsdp", "fsdp_grad_op", "hsdp", "zero1", "zero2", "zero3")


@dataclass(frozen=True)
class ShardingConfig:
    """How the model is distributed over processes (see ``docs/scaling-out.md``)."""

    strategy: str = "ddp"
    """``none``/``ddp`` (replicate), ``fsdp``/``fsdp_grad_op``/``hsdp`` (FSDP2, applied by scaling), ``zero1..3``
    (DeepSpeed through Accelerate)."""
    param_dtype: str = "fp32"
    """Parameter dtype for compute under sharding: ``fp32``, ``bf16``, ``fp16`` (master weights stay fp32)."""
    reduce_dtype: str = "fp32"
    """Gradient reduction dtype."""
    offload_params: bool = False
    """Offload parameters to CPU (FSDP2 CPUOffloadPolicy / ZeRO-3 offload_param)."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU (ZeRO offload_optimizer)."""
    activation_checkpointing: str = "none"
    """``none``, ``timm`` (model.set_grad_checkpointing) or ``fsdp`` (composable checkpoint of each block); never
    both."""
    sync_each_micro_batch: bool = True
    """Reduce gradients at every micro-batch under FSDP (lower memory) instead of only at the last."""
    blocks_per_unit: int = 1
    """FSDP2 only: consecutive backbone blocks gathered and reduced together as one unit. Fewer, larger
    all-gathers and reduce-scatters and fewer hooks per step, for backbones whose blocks are small next to the
    per-unit cost; each rank then holds up to two units of gathered parameters at a time (the one computing and the
    one prefetched) instead of two blocks (docs/scaling-out.md, "How many blocks per FSDP unit")."""

    def __post_init__(self):
        _choice("sharding.strategy", self.strategy, SHARDING_STRATEGIES)
        if isinstance(self.blocks_per_unit, bool) or not isinstance(self.blocks_per_unit, int) \
                or self.blocks_per_unit < 1:
            raise ConfigError(f"sharding.blocks_per_unit must be an integer >= 1, got {self.blocks_per_unit!r}")
        if self.blocks_per_unit > 1 and self.strategy not in ("fsdp", "fsdp_grad_op", "hsdp"):
            raise ConfigError(
                f"sharding.blocks_per_unit={self.blocks_per_unit} groups FSDP2 units; strategy {self.strategy!r} "
                f"has none (ZeRO-3 gathers one leaf block at a time); leave it at 1 or use an FSDP strategy"
            )
        for f in ("param_dtype", "reduce_dtype"):
            _choice(f"sharding.{f}", getattr(self, f), ("fp32", "bf16", "fp16"))
        _choice("sharding.activation_checkpointing", self.activation_checkpointing, ("none", "timm", "fsdp"))
        if self.activation_checkpointing == "fsdp" and self.strategy not in ("fsdp", "fsdp_grad_op", "hsdp"):
            raise ConfigError(
                f"sharding.activation_checkpointing='fsdp' needs an FSDP strategy, not {self.strategy!r}; use 'timm'"
            )


# --------------------------------------------------------------------------------------------------------------
# Evaluation, tracking
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """Statistics computed from stored predictions."""

    n_boot: int = 200
    """Cluster-bootstrap replicates (resampled by patient) for confidence intervals; 0 = no bootstrap (every
    ``lo``/``hi`` is NaN)."""
    alpha: float = 0.05
    """1 - confidence level of every interval."""
    min_group_size: int = 10
    """Subgroups with fewer labelled images than this are reported with n and NaN metrics (0 = report every group)."""
    min_group_patients: int = 10
    """Subgroups with fewer patients than this are reported with n and NaN metrics, however many images they have:
    a group of a few patients is no evidence, and its prevalence and error rates disclose those patients' findings
    (0 = no patient minimum)."""
    ece_bins: int = 10
    """Equal-width bins for ECE (>= 1)."""
    threshold: str = "max_f1"
    """Operating point chosen on validation: ``max_f1``, ``sens90`` (sensitivity 0.9), ``spec90``, ``fixed``."""
    fixed_threshold: float = 0.5
    """Threshold when ``threshold: fixed``, a probability in [0, 1]."""
    bootstrap_seed: int = 0
    """Seed of the patient resampling; the same seed gives every run the same replicates (paired comparisons)."""
    batch_size: int = 64
    """Per-process batch size for prediction (>= 1)."""
    aggregate: tuple[str, ...] = ()
    """Also evaluate per ``breast`` and/or per ``exam`` (mammography): image probabilities pooled by max and by
    mean over the views, beside the image-level numbers (``scaling.metrics.exam``; docs/metrics.md)."""

    def __post_init__(self):
        _choice("eval.threshold", self.threshold, ("max_f1", "sens90", "spec90", "fixed"))
        if not 0 < self.alpha < 1:
            raise ConfigError(f"eval.alpha={self.alpha} must be in (0, 1)")
        _positive("eval.n_boot", self.n_boot, allow_zero=True)
        _positive("eval.min_group_size", self.min_group_size, allow_zero=True)
        _positive("eval.min_group_patients", self.min_group_patients, allow_zero=True)
        for name in ("ece_bins", "batch_size"):
            _at_least_one(f"eval.{name}", getattr(self, name))
        if not 0 <= self.fixed_threshold <= 1:
            raise ConfigError(f"eval.fixed_threshold={self.fixed_threshold!r} must be a probability in [0, 1]")
        for level in self.aggregate:
            _choice("eval.aggregate", level, ("breast", "exam"))
        if len(set(self.aggregate)) != len(self.aggregate):
            raise ConfigError(f"eval.aggregate={list(self.aggregate)} names a level twice")


@dataclass(frozen=True)
class TrackingConfig:
    """Weights & Biases (a view; the run store on disk is the source of truth)."""

    wandb: str = "off"
    """``off`` (no import, no files), ``offline`` (sync later with ``wandb sync``), ``online``."""
    project: str = "scaling"
    """W&B project."""
    entity: str = ""
    """W&B entity (team); empty = the user's default."""
    log_identifiers: bool = False
    """Opt in to sending patient/sample ids and paths to W&B. Off by default (PHI safety)."""

    def __post_init__(self):
        _choice("tracking.wandb", self.wandb, ("off", "offline", "online"))


# --------------------------------------------------------------------------------------------------------------
# Analysis: linear probe and CKA
# --------------------------------------------------------------------------------------------------------------


PROBE_SELECT = ("auroc", "log_loss")


@dataclass(frozen=True)
class ProbeConfig:
    """How the linear probe of a ``linear_probe`` cell is fitted and its L2 penalty chosen (docs/analysis.md)."""

    cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    """Inverse L2 strengths ``C`` tried per label (scikit-learn's convention: smaller = stronger penalty)."""
    select: str = "auroc"
    """Validation criterion that picks ``C``: ``auroc`` (higher is better) or ``log_loss`` (lower is better)."""
    standardize: bool = True
    """Scale features to zero mean and unit variance with training-set statistics before fitting."""
    max_iter: int = 2000
    """L-BFGS iteration limit per fit."""
    batch_size: int = 64
    """Per-process batch size of the feature extraction forward passes."""

    def __post_init__(self):
        if not self.cs or any(not (c > 0 and math.isfinite(c)) for c in self.cs):
            raise ConfigError(f"probe.cs={list(self.cs)} must be a non-empty list of positive numbers")
        _choice("probe.select", self.select, PROBE_SELECT)
        if self.max_iter < 1:
            raise ConfigError(f"probe.max_iter={self.max_iter} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"probe.batch_size={self.batch_size} must be >= 1")


@dataclass(frozen=True)
class CKAConfig:
    """Block-by-block minibatch CKA (Nguyen et al. 2021) of each fine-tuned run against its initialisation, and of
    backbone scales against each other (docs/analysis.md)."""

    enabled: bool = True
    """Compute ``runs/<id>/cka.parquet`` for every fine-tuned run (two forward passes over ``max_examples``)."""
    eval_set: str = "test"
    """Evaluation set whose images the representations are compared on (``val``, ``test`` or an OOD set name)."""
    max_examples: int = 512
    """At most this many images of that set (a fixed seeded sample, the same for every run)."""
    batch_size: int = 256
    """Examples per CKA minibatch (Nguyen et al. use 256; the unbiased estimator needs at least 4)."""
    scales: bool = True
    """Also compare each larger backbone's fine-tuned blocks with the smallest backbone's of the same source and
    seed at the largest fraction (the report's ``cka_scales``): every fine-tuned run keeps its per-minibatch Gram
    matrices (``runs/<id>/cka_grams.safetensors``, ~0.25 MB per layer per ``batch_size`` images). ``false`` stores
    none, and the report has no cross-scale map."""

    def __post_init__(self):
        _positive("cka.max_examples", self.max_examples)
        if self.batch_size < 4:
            raise ConfigError(f"cka.batch_size={self.batch_size} must be >= 4 (the unbiased HSIC estimator's minimum)")


# --------------------------------------------------------------------------------------------------------------
# Upstream pretraining and the study grid
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamConfig:
    """A small supervised pretraining run on generated natural-image-like data (the demo's pretraining axis)."""

    name: str
    """Referenced from the grid as ``upstream:<name>``."""
    num_images: int = 2000
    """Size of the generated pretraining set (the pretraining-scale axis)."""
    num_classes: int = 20
    """Number of generating formulas (classes)."""
    image_size: int = 64
    """Resolution of the generated images."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 64
    """Batch size."""
    lr: float = 0.05
    """Peak learning rate (SGD, cosine)."""

    def __post_init__(self):
        _file_name("upstream[].name", self.name)
        for name in ("num_images", "image_size", "steps", "batch_size"):
            _at_least_one(f"upstream[].{name}", getattr(self, name))
        if self.num_classes < 2:
            raise ConfigError(f"upstream[].num_classes={self.num_classes} must be >= 2")
        _positive("upstream[].lr", self.lr)


PROTOCOLS = ("finetune", "linear_probe")
"""How a cell turns the pretrained backbone into a classifier: fine-tune it all, or fit a linear probe on its frozen
pooled features (docs/analysis.md)."""


def parse_reinit(value: str, where: str = "grid.reinit") -> tuple[str, int]:
    """``none`` → ``("none", 0)``; ``after:k`` / ``first:k`` → ``("after", k)`` / ``("first", k)``.

    ``after:k`` keeps units ``0..k-1`` pretrained and re-initialises the rest (Raghu et al. 2019's weight
    transfusion); ``first:k`` re-initialises units ``0..k-1`` (``scaling.models.reinit``). Raises ConfigError naming
    ``where`` otherwise.
    """
    if value == "none":
        return "none", 0
    kind, sep, k = value.partition(":")
    if not sep or kind not in ("after", "first") or not k.isdigit():
        raise ConfigError(f"{where} contains {value!r}; use 'none', 'after:<k>' or 'first:<k>' (k = number of units)")
    return kind, int(k)


def parse_shuffle(value: str, where: str = "grid.shuffle") -> int:
    """``none`` → 0; ``<b>`` (a positive integer) → ``b``, the side in pixels of the square blocks a block-shuffled
    cell permutes (Neyshabur, Sedghi & Zhang 2020, §3; docs/analysis.md). Raises ConfigError naming ``where``
    otherwise; that ``b`` divides ``data.image_size`` is checked with the whole config (:class:`StudyConfig`)."""
    text = str(value).strip()
    if text == "none":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{where} contains {value!r}; use 'none' or a block size in pixels (a positive integer "
                          f"that divides data.image_size)")
    return int(text)


MEAN_VAR_PREFIX = "meanvar:"
"""Prefix of a Mean Var source: ``meanvar:<source>`` loads ``<source>`` and draws each tensor i.i.d. with that
tensor's mean and variance (Raghu et al. 2019; ``scaling.models.reinit.mean_var_init``)."""


def mean_var_source(pretrained: str) -> str | None:
    """The source whose tensors' mean and variance a ``meanvar:<source>`` draws with, or None for any other source."""
    text = pretrained.strip()
    return text[len(MEAN_VAR_PREFIX):].strip() if text.lower().startswith(MEAN_VAR_PREFIX) else None


def upstream_name(pretrained: str) -> str | None:
    """The ``upstream`` entry a weight source is made from: ``<name>`` of ``upstream:<name>``, also as the source of a
    Mean Var init (``meanvar:upstream:<name>``); None for any other source."""
    text = (mean_var_source(pretrained) or pretrained).strip()
    return text.split(":", 1)[1] if text.startswith("upstream:") else None


def _check_seeds(where: str, seeds) -> None:
    """Seeds seed numpy's and Accelerate's generators, which take [0, 2**32): refuse others when the config is read,
    not when each run seeds itself."""
    for s in seeds or ():
        if not 0 <= s < 2**32:
            raise ConfigError(f"{where}: seed {s} is out of range; seeds must be integers in [0, 2**32)")


def _check_axes(where: str, protocols, shots, reinit, shuffle=None) -> None:
    """Validate the analysis axes of a grid or a sub-grid (None = not set there)."""
    for p in protocols or ():
        _choice(f"{where}.protocols", p, PROTOCOLS)
    for k in shots or ():
        if k < 1:
            raise ConfigError(f"{where}.shots contains {k}; k-shot sizes must be >= 1")
    for r in reinit or ():
        parse_reinit(r, f"{where}.reinit")
    for b in shuffle or ():
        parse_shuffle(b, f"{where}.shuffle")
    for name, values in (("protocols", protocols), ("shots", shots), ("reinit", reinit),
                         ("shuffle", None if shuffle is None else [parse_shuffle(b) for b in shuffle])):
        if values is not None and len(set(values)) != len(values):
            raise ConfigError(f"{where}.{name}={list(values)} names a value twice")


@dataclass(frozen=True)
class SubGridConfig:
    """More cells beside the main grid: the product of these axes, each left unset (null) taken from the grid."""

    backbones: tuple[str, ...] | None = None
    """Backbone presets or timm names (null: the grid's)."""
    pretrained: tuple[str, ...] | None = None
    """Weight sources (null: the grid's)."""
    fractions: tuple[float, ...] | None = None
    """Fractions of training patients (null: the grid's; ``[]``: k-shot cells only)."""
    shots: tuple[int, ...] | None = None
    """k-shot sizes (null: the grid's)."""
    seeds: tuple[int, ...] | None = None
    """Seeds (null: the grid's)."""
    protocols: tuple[str, ...] | None = None
    """``finetune`` and/or ``linear_probe`` (null: the grid's)."""
    reinit: tuple[str, ...] | None = None
    """Block re-initialisations (null: the grid's)."""
    shuffle: tuple[str, ...] | None = None
    """Block-shuffle sizes (null: the grid's)."""

    def __post_init__(self):
        for f in self.fractions or ():
            if not 0 < f <= 1:
                raise ConfigError(f"grid.also.fractions contains {f}; fractions must be in (0, 1]")
        _check_seeds("grid.also.seeds", self.seeds)
        _check_axes("grid.also", self.protocols, self.shots, self.reinit, self.shuffle)


@dataclass(frozen=True)
class GridConfig:
    """The study axes; the grid is their Cartesian product (plus the cells of ``also``).

    A cell's training data is either a fraction of the training patients or a k-shot subset: ``fractions`` and
    ``shots`` are two lists of data budgets, and each budget is one cell per backbone × source × seed × protocol ×
    re-initialisation. Re-initialisation applies to fine-tuned cells of a pretrained source only (a probe trains
    nothing, and a scratch backbone or a Mean Var init has nothing pretrained to keep): other combinations are not
    cells.
    """

    backbones: tuple[str, ...] = ("resnetv2_tiny",)
    """Backbone presets or timm names."""
    pretrained: tuple[str, ...] = ("scratch",)
    """Weight sources (see ``model.pretrained``)."""
    fractions: tuple[float, ...] = (1.0,)
    """Fractions of training patients (nested, patient-level, seeded); may be empty when ``shots`` is not."""
    seeds: tuple[int, ...] = (0,)
    """Seeds (init, order and the data-fraction or k-shot subset)."""
    shots: tuple[int, ...] = ()
    """k-shot data budgets: k positive and k negative patients per label (BiT's 1/5/10/25-shot protocol,
    ``scaling.data.splits.kshot_subset``; nested in k for one seed), drawn from all training patients."""
    protocols: tuple[str, ...] = ("finetune",)
    """``finetune`` (train the whole model) and/or ``linear_probe`` (logistic regression on the frozen pretrained
    backbone's pooled features; the ``probe`` section)."""
    reinit: tuple[str, ...] = ("none",)
    """Block re-initialisation before fine-tuning: ``none``, ``after:k`` (keep units 0..k-1 pretrained, Raghu et al.
    2019's weight transfusion) or ``first:k`` (re-initialise units 0..k-1); units are the stem, each block, the
    neck (``scaling.models.reinit``)."""
    shuffle: tuple[str, ...] = ("none",)
    """Block shuffling of every image a cell trains and is evaluated on (Neyshabur, Sedghi & Zhang 2020, §3):
    ``none``, or a block size ``b`` in pixels that divides ``data.image_size``: each image is cut into ``b x b``
    blocks and the blocks are permuted, by one permutation per run drawn from its seed. Fine-tuned cells of any
    source except a Mean Var init, without re-initialisation; other combinations are not cells."""
    also: tuple[SubGridConfig, ...] = ()
    """Further cells: each entry's product, its unset axes taken from this grid (e.g. one re-initialisation or
    few-shot sweep at one source, without multiplying the whole grid)."""

    def __post_init__(self):
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ConfigError(f"grid.fractions contains {f}; fractions must be in (0, 1]")
        for name in ("backbones", "pretrained", "seeds", "protocols", "reinit", "shuffle"):
            if not getattr(self, name):
                raise ConfigError(f"grid.{name} must not be empty")
        if not self.fractions and not self.shots:
            raise ConfigError("grid.fractions and grid.shots are both empty: give at least one data budget")
        _check_seeds("grid.seeds", self.seeds)
        _check_axes("grid", self.protocols, self.shots, self.reinit, self.shuffle)


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: the grid of runs and the settings shared by every run."""

    name: str = "demo"
    """Study name (W&B group, report title)."""
    output_dir: str = "runs/demo"
    """Run store directory (required: an empty path is an error)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data settings."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model settings shared by every run (the grid overrides backbone and pretrained)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings."""
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    """Sharding settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Tracking settings."""
    upstream: tuple[UpstreamConfig, ...] = ()
    """Upstream pretraining runs referenced by ``upstream:<name>`` sources, each with its own name."""
    grid: GridConfig = field(default_factory=GridConfig)
    """Study axes."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Linear-probe settings (cells with protocol ``linear_probe``)."""
    cka: CKAConfig = field(default_factory=CKAConfig)
    """Representation-similarity analysis of fine-tuned runs."""

    def __post_init__(self):
        if not self.output_dir.strip():
            raise ConfigError(f"output_dir={self.output_dir!r} is empty; name the run store directory")
        _unique_names("upstream", [u.name for u in self.upstream])
        known = {u.name for u in self.upstream}
        sources = [*self.grid.pretrained, *(s for g in self.grid.also for s in g.pretrained or ())]
        for src in sources:
            if upstream_name(src) is not None and upstream_name(src) not in known:
                raise ConfigError(
                    f"grid.pretrained names {src!r} but no upstream entry has that name; known: {sorted(known)}"
                )
        for where, values in (("grid.shuffle", self.grid.shuffle),
                              *(("grid.also.shuffle", g.shuffle or ()) for g in self.grid.also)):
            for b in values:
                if parse_shuffle(b, where) and self.data.image_size % parse_shuffle(b, where):
                    raise ConfigError(f"{where} contains {b!r}, which does not divide data.image_size="
                                      f"{self.data.image_size}: the {self.data.image_size}x{self.data.image_size} "
                                      f"images must cut into whole {b}x{b} blocks")
        protocols = [*self.grid.protocols, *(p for g in self.grid.also for p in g.protocols or ())]
        if self.data.task == "multiclass" and "linear_probe" in protocols:
            raise ConfigError("grid.protocols: linear_probe fits one logistic regression per label (multi-label "
                              "findings); data.task='multiclass' is fine-tuned only (protocols: [finetune])")


# --------------------------------------------------------------------------------------------------------------
# Building configs from dicts / YAML / overrides
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, prefix=where)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _convert(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {k: _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys (with the closest valid name)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {where!r}{hint} (valid: {names})")
        kwargs[key] = _convert(value, hints[key], where)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    except ConfigError as e:  # a list item's check names ``section[].field``: say which item
        m = re.fullmatch(r"(.+)\[(\d+)\]", prefix)
        if m and str(e).startswith(f"{m.group(1)}[]"):
            raise ConfigError(f"{prefix}{str(e)[len(m.group(1)) + 2:]}") from None
        raise


def to_dict(cfg: Any) -> Any:
    """Plain-Python (YAML/JSON-safe) view of a config; tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply dotted ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, returning a new dict.

    List items are addressed by index (``data.ood.0.root=/data/nih``)."""
    import copy

    out = copy.deepcopy(data)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.path=value")
        key, raw = ov.split("=", 1)
        if "" in key.strip().split("."):
            raise ConfigError(f"override {ov!r}: the key {key.strip()!r} has an empty part (a leading, trailing or "
                              f"double dot)")
        try:
            value = read_yaml(raw) if raw != "" else ""
        except DuplicateKeyError as e:
            raise ConfigError(f"override {ov!r}: {e.problem}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: value is not valid YAML ({e})") from None
        node: Any = out
        parts = key.strip().split(".")
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # list items by index: data.ood.0.root=/data/nih
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {ov!r}: {p!r} is not an index of a list of {len(node)} item(s)")
                if last:
                    node[int(p)] = value
                else:
                    node = node[int(p)]
            elif isinstance(node, dict):
                if last:
                    node[p] = value
                else:
                    node = node.setdefault(p, {})
            else:
                raise ConfigError(f"override {ov!r}: {parts[i - 1]!r} is not a section")
    return out


DEFAULTS_KEY = "defaults"
"""Top-level key of a config file listing fragment files (paths relative to that file) merged underneath it."""


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: mappings merge key by key, everything else (lists included) in ``top`` replaces ``base``."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}); is it a YAML "
                          f"file?") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        data = read_yaml(text) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"config file {path}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def config_layers(path: str | Path, _chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The files a config is composed of, bottom first: ``[(file, mapping), ...]``.

    A file may start with ``defaults: [fragment.yaml, ...]`` (paths relative to it; fragments may have defaults
    of their own). Fragments are merged in order and the file's own keys on top (:func:`_merge`), so shared
    sections (a dataset's data block, a launch recipe) live in one place.
    """
    path = Path(path)
    data = _read_mapping(path)
    entries = data.pop(DEFAULTS_KEY, [])
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"config file {path}: '{DEFAULTS_KEY}' must be a list of file paths, got {entries!r}")
    layers: list[tuple[str, dict]] = []
    for entry in entries:
        frag = (path.parent / entry).resolve()
        if not frag.is_file():
            raise ConfigError(f"config file {path}: {DEFAULTS_KEY} entry {entry!r} not found (looked for {frag})")
        if frag in _chain or frag == path.resolve():
            raise ConfigError(f"config file {path}: {DEFAULTS_KEY} entry {entry!r} includes itself")
        layers += config_layers(frag, (*_chain, path.resolve()))
    layers.append((str(path), data))
    return layers


def compose(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The plain mapping a config file (with its ``defaults``) and dotted overrides resolve to, before validation."""
    data: dict = {}
    for _, layer in config_layers(path) if path is not None else []:
        data = _merge(data, layer)
    return apply_overrides(data, overrides)


_KEY = re.compile(r"[A-Za-z_]\w*(?:\.\w+|\[\d+\])*")


def _has_path(data: Any, parts: list[str]) -> bool:
    for p in parts:
        if isinstance(data, dict) and p in data:
            data = data[p]
        elif isinstance(data, list) and p.isdigit() and int(p) < len(data):
            data = data[int(p)]
        else:
            return False
    return True


def _keys(message: str) -> list[str]:
    """The config keys an error message may name, in order: dotted ones (``train.lr``, ``data.ood[1].name``)
    anywhere, a single word (``train``) only where a key stands: at the start or quoted after ``key``."""
    keys = []
    for m in _KEY.finditer(message):
        word = m.group(0)
        single = "." not in word and "[" not in word
        if single and m.start() > 0 and not message[:m.start()].endswith("key '"):
            continue
        keys.append(re.sub(r"\[(\d+)\]", r".\1", word))
    return keys


def _source(message: str, layers: list[tuple[str, dict]], overrides) -> tuple[str, str] | None:
    """``(key, where)`` for the first config key ``message`` names that an override (``in override `k=v` ``) or a
    file of ``layers`` (``in <file>``) sets; None when none does."""
    for key in _keys(message):
        for ov in reversed(list(overrides)):
            k = ov.split("=", 1)[0].strip()
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return key, f"in override `{ov}`"
        for src, data in reversed(layers):
            if _has_path(data, key.split(".")):
                return key, f"in {src}"
    return None


def _blame(message: str, layers: list[tuple[str, dict]], overrides) -> str:
    """Where the key an error names was set: ``in override `k=v` ``, ``in <file>``, or the top file."""
    found = _source(message, layers, overrides)
    if found:
        return found[1]
    return f"in {layers[-1][0]}" if layers else ""


def where_set(message: str, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """For an error found after the config was read (an unknown label or split, a loader option the dataset does
    not take, a missing dataset root): `` [data.labels is set in override `data.labels=[Foo]`]`` naming the first
    config key the message names and the file or override of ``path`` + ``overrides`` that set it; ``""`` when
    the message names no key they set (defaults)."""
    layers = config_layers(path) if path is not None else []
    found = _source(message, layers, overrides)
    return f" [{found[0]} is set {found[1]}]" if found else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = StudyConfig):
    """Load a study config from YAML (with its ``defaults`` fragments; the defaults when ``path`` is None) plus
    dotted overrides. An invalid value or key is a :class:`ConfigError` naming the file or override that set it."""
    layers = config_layers(path) if path is not None else []
    data = compose(path, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        where = _blame(str(e), layers, overrides)
        raise ConfigError(f"{e} {where}".rstrip()) from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a resolved config as YAML (atomically)."""
    from scaling.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))

"""The per-family table: what sharding, activation checkpointing and the optimizer need from a backbone.

One row per timm family (plus one per Hugging Face encoder type, :data:`scaling.models.hf.HF_FAMILIES`, built
on first use). The sharding code applies ``fully_shard`` to every module whose class is in
``block_classes`` (then to the root), and the block features (CKA) and block re-initialisation hook the same
modules. Everything else goes through timm's model interface (``set_grad_checkpointing``, ``group_matcher``,
``no_weight_decay``, ``get_classifier``), which every timm model implements (timm 1.0 ``timm/models``); FSDP's
auto-wrap policies silently do nothing for timm models (https://github.com/huggingface/accelerate/issues/1943),
which is why the block classes are named explicitly.

Any other timm model gets a row by :func:`generic_family`'s rule (its blocks are the modules of the stages timm
lists in ``model.feature_info``); :func:`register_family` adds a row of your own, which takes precedence over that
rule (and over a row of a parent class).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.convnext import checkpoint_filter_fn as _convnext_filter
from timm.models.resnetv2 import PreActBasic, PreActBottleneck, ResNetV2
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter

from scaling.models.hf import HFBackbone, family_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilySpec:
    """How one backbone family is sharded, checkpointed and grouped for the optimizer.

    Add one for your own architecture with :func:`register_family`; the model must speak timm's interface
    (``get_classifier``, ``set_grad_checkpointing``, ``group_matcher``), as every timm model does.
    """

    name: str
    """Family key (``resnetv2``, ``vit``, ``convnext``; ``timm:<class>`` for :func:`generic_family`'s rows)."""
    model_class: type
    """timm model class that identifies the family."""
    block_classes: tuple[type, ...]
    """Classes that each become one FSDP unit (and one activation-checkpointing unit under ``fsdp``)."""
    filter_fn: Callable[[dict, torch.nn.Module], dict] | None
    """timm checkpoint filter applied before loading (ViT: resamples position embeddings to a new resolution)."""
    channels_last: bool = False
    """Convolutional family: on GPUs the model and its inputs use ``torch.channels_last`` (NHWC), the layout
    cuDNN's tensor-core convolutions run in without transposing every activation (PyTorch channels-last tutorial,
    https://pytorch.org/tutorials/intermediate/memory_format_tutorial.html)."""

    def set_grad_checkpointing(self, model: torch.nn.Module, enable: bool = True) -> None:
        """Switch timm's own activation checkpointing (per stage / per block via ``checkpoint_seq``)."""
        timm_model(model).set_grad_checkpointing(enable)

    def group_matcher(self, model: torch.nn.Module, coarse: bool = False) -> dict[str, Any]:
        """timm's layer-group regexes (names relative to the timm model), which drive layer-wise LR decay."""
        return timm_model(model).group_matcher(coarse)

    def no_weight_decay(self, model: torch.nn.Module) -> set[str]:
        """Full parameter names (as ``model.named_parameters()`` spells them) that get no weight decay.

        timm's rule: the model's ``no_weight_decay()`` set (ViT ``pos_embed``, ``cls_token``...) plus every
        tensor with fewer than 2 dimensions (norm scales/shifts, biases).
        """
        inner = timm_model(model)
        explicit = set(inner.no_weight_decay()) if hasattr(inner, "no_weight_decay") else set()
        prefix = _prefix_of(model, inner)
        return {
            prefix + n
            for n, p in inner.named_parameters()
            if p.ndim <= 1 or n in explicit or n.split(".")[0] in explicit
        }


FAMILIES: dict[str, FamilySpec] = {
    f.name: f
    for f in [
        FamilySpec("resnetv2", ResNetV2, (PreActBottleneck, PreActBasic), None, channels_last=True),
        FamilySpec("vit", VisionTransformer, (Block,), _vit_filter),
        FamilySpec("convnext", ConvNeXt, (ConvNeXtBlock,), _convnext_filter, channels_last=True),
    ]
}


@functools.lru_cache(maxsize=None)
def _hf_family(model_type: str) -> FamilySpec:
    """The row of a Hugging Face encoder type (:data:`scaling.models.hf.HF_FAMILIES`), built when first needed so
    that ``transformers`` is imported only by runs that use it. Its ``model_class`` is the wrapper; the blocks are
    the encoder's layers."""
    _, layer = family_row(model_type)
    return FamilySpec(f"hf_{model_type}", HFBackbone, (layer,), None)


def timm_model(model: torch.nn.Module) -> torch.nn.Module:
    """The timm model inside ``model`` (``model`` itself, or the ``backbone`` of a TransferModel)."""
    return getattr(model, "backbone", model)


def input_channels(model: torch.nn.Module) -> int:
    """Number of image channels ``model`` takes (1 for ``model.kwargs: {in_chans: 1}``), from its first layer.

    What the first convolution was built with is what the images must have: the first layer named by timm's
    ``pretrained_cfg["first_conv"]``, else the model's first ``Conv2d``. ``pretrained_cfg["input_size"]`` is only
    the last resort (timm keeps the checkpoint's 3 there when a model is built with ``in_chans=1``; a Hugging Face
    backbone sets it from its config). Reads module attributes, never weights, so a sharded or meta-device model
    answers the same; 3 when nothing says otherwise.
    """
    inner = timm_model(model)
    cfg = getattr(inner, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    if isinstance(first, str) and first:
        try:
            channels = getattr(inner.get_submodule(first), "in_channels", None)
        except AttributeError:  # a pretrained_cfg that names a layer this model does not have
            channels = None
        if isinstance(channels, int):
            return channels
    conv = next((m for m in inner.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is not None:
        return conv.in_channels
    size = cfg.get("input_size")
    return int(size[0]) if size else 3


def input_normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` on [0, 1] pixels that ``model``'s weights were trained with, from timm's ``pretrained_cfg``.

    BiT and the AugReg / original ViTs: 0.5 and 0.5, i.e. inputs in [-1, 1] (big_transfer ``bit_pytorch/train.py``);
    ImageNet-trained CNNs (``resnet18``, ``convnext_tiny``...): ImageNet's mean and std; a Hugging Face encoder: its
    ``preprocessor_config.json``. BiT's 0.5 when the config names none. A model that takes one channel gets one
    value each, the mean over the three: timm sums a 3-channel checkpoint's first-layer filters for it.
    """
    cfg = getattr(timm_model(model), "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean") or (0.5, 0.5, 0.5))
    std = tuple(float(v) for v in cfg.get("std") or (0.5, 0.5, 0.5))
    if input_channels(model) == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std


def _prefix_of(model: torch.nn.Module, inner: torch.nn.Module) -> str:
    return "" if inner is model else "backbone."


def register_family(spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
    """Add ``spec`` to the family table, so that every model whose class is (a subclass of) ``spec.model_class``
    is sharded, checkpointed, probed (CKA) and re-initialised by its ``block_classes``; returns ``spec``.

    A name already in the table is refused unless ``replace=True``. The most specific row wins: a row for a subclass
    of ``VisionTransformer`` takes precedence over the built-in ``vit`` row, and any row over :func:`generic_family`.
    Register in the process that builds the model (every rank of a launch runs the recipe, so a registration at
    the top of the recipe is enough)::

        from scaling.models.families import FamilySpec, register_family
        from timm.models.resnet import BasicBlock, Bottleneck, ResNet

        register_family(FamilySpec("resnet", ResNet, (BasicBlock, Bottleneck), None, channels_last=True))
    """
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register_family takes a FamilySpec, got {type(spec).__name__}")
    if not isinstance(spec.model_class, type) or not all(isinstance(c, type) for c in spec.block_classes):
        raise TypeError("FamilySpec.model_class and every entry of block_classes must be classes")
    if spec.name in FAMILIES and FAMILIES[spec.name] != spec and not replace:
        raise ValueError(f"family {spec.name!r} is already registered ({FAMILIES[spec.name].model_class.__name__}); "
                         "pass replace=True to replace it")
    FAMILIES[spec.name] = spec
    return spec


def find_family(model: torch.nn.Module) -> FamilySpec | None:
    """The family row of a built model (by its timm class or Hugging Face encoder type), or None outside the table.

    When several rows match (a registered row for a subclass of a built-in family), the one whose ``model_class``
    is nearest in the model's class hierarchy wins."""
    inner = timm_model(model)
    mro = type(inner).__mro__
    matches = [spec for spec in FAMILIES.values() if isinstance(inner, spec.model_class)]
    if matches:
        return min(matches, key=lambda spec: mro.index(spec.model_class) if spec.model_class in mro else len(mro))
    if isinstance(inner, HFBackbone):
        return _hf_family(inner.model_type)
    return None


def is_timm_model(module: torch.nn.Module) -> bool:
    """True for a model built by ``timm.create_model`` (it has timm's ``pretrained_cfg`` and ``get_classifier``)."""
    return isinstance(getattr(module, "pretrained_cfg", None), dict) and callable(getattr(module, "get_classifier", None))


def generic_blocks(inner: torch.nn.Module) -> tuple[type, ...]:
    """Block classes of a timm model outside the table, by one rule: the stages timm lists in ``feature_info`` (the
    modules its feature maps come from). A stage that is an ``nn.Sequential`` contributes the classes of its
    children (ResNet's ``BasicBlock`` / ``Bottleneck``, EfficientNet's ``InvertedResidual``), any other stage its own
    class (a Swin or RegNet stage, a DeiT ``Block``); an entry without parameters or without submodules (a lone
    activation or norm layer, such as ResNet's ``act1`` or DenseNet's ``norm0``) is no stage. A class with an
    instance inside a module of another of these classes is no block class: RegNet lists its stem, a
    ``ConvNormAct``, beside its ``RegStage`` stages, whose every convolution is a ``ConvNormAct`` too, which would
    make each of them a block of its own (likewise Inception-v3, DLA, CSPNet, VoVNet, MobileViT). Empty when the
    model lists no ``feature_info``."""
    classes: dict[type, None] = {}
    for info in getattr(inner, "feature_info", None) or []:
        name = info.get("module") if isinstance(info, dict) else None
        if not name:
            continue
        try:
            stage = inner.get_submodule(name)
        except AttributeError:
            continue
        children = list(stage.children())
        if not children or next(stage.parameters(), None) is None or isinstance(stage, _NORMS):
            continue
        for m in (children if isinstance(stage, torch.nn.Sequential) else [stage]):
            if next(m.parameters(), None) is not None:
                classes.setdefault(type(m))
    nested = _nested_classes(inner, tuple(classes))
    return tuple(c for c in classes if c not in nested)


def _nested_classes(inner: torch.nn.Module, classes: tuple[type, ...]) -> set[type]:
    """The classes of ``classes`` with an instance inside a module of another class of ``classes``."""
    modules = dict(inner.named_modules())
    nested = set()
    for name, module in modules.items():
        if type(module) not in classes:
            continue
        parts = name.split(".")
        outer = {type(modules[".".join(parts[:i])]) for i in range(1, len(parts))}
        if outer & (set(classes) - {type(module)}):
            nested.add(type(module))
    return nested


_NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
"""Layers that are no stage even with submodules (timm's ``BatchNormAct2d`` holds its activation)."""

_NOTED: set[tuple[str, tuple[str, ...]]] = set()


def generic_family(model: torch.nn.Module) -> FamilySpec | None:
    """The row of a timm model outside the table (resnet18, efficientnet_b0, ...), or None when ``model`` is not a
    timm model.

    Its blocks follow :func:`generic_blocks`; its checkpoint filter is None (the classifier is still recognised
    by timm's ``pretrained_cfg["classifier"]`` and dropped on load); gradient checkpointing, layer groups and
    no-weight-decay sets come from timm's model interface as for every family; ``channels_last`` is False. The row
    is logged once per architecture, so a run says which rule it used; :func:`register_family` replaces it.
    """
    inner = timm_model(model)
    if not is_timm_model(inner):
        return None
    blocks = generic_blocks(inner)
    key = (type(inner).__name__, tuple(c.__name__ for c in blocks))
    if key not in _NOTED:
        _NOTED.add(key)
        log.info("%s is not in the family table (scaling.models.families): generic rule, blocks %s%s",
                 key[0], list(key[1]) or "none (no feature_info; features are pre_logits only)",
                 " (register_family() to choose others)")
    return FamilySpec(f"timm:{type(inner).__name__}", type(inner), blocks, None)


def family_spec(model: torch.nn.Module | str) -> FamilySpec:
    """The family row for a built model (by its class; :func:`generic_family` for a timm model outside the table)
    or a family name; raises listing the families for anything else."""
    if isinstance(model, str):
        if model not in FAMILIES:
            raise ValueError(f"unknown backbone family {model!r}; supported: {sorted(FAMILIES)}")
        return FAMILIES[model]
    spec = find_family(model) or generic_family(model)
    if spec is not None:
        return spec
    inner = timm_model(model)
    raise ValueError(
        f"no family table for {type(inner).__name__} (not a timm model); supported families: "
        f"{ {k: v.model_class.__name__ for k, v in FAMILIES.items()} }. Register one with "
        f"scaling.models.families.register_family(FamilySpec(...)), or, in a Trainer, pass "
        f"Trainer(..., block_classes=(YourBlock,))"
    )

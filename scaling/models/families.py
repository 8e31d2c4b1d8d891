"""The per-family table: what sharding, activation checkpointing and the optimizer need from a backbone.

One row per timm family (plus one per Hugging Face encoder type, :data:`scaling.models.hf.HF_FAMILIES`, built
on first use). The sharding code applies ``fully_shard`` to every module whose class is in
``block_classes`` (then to the root), so a new family needs only a row here. Everything else goes through
timm's model interface (``set_grad_checkpointing``, ``group_matcher``, ``no_weight_decay``), which every timm
model implements (timm 1.0 ``timm/models``); FSDP's auto-wrap policies silently do nothing for timm
models (https://github.com/huggingface/accelerate/issues/1943), which is why the block classes are named explicitly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.convnext import checkpoint_filter_fn as _convnext_filter
from timm.models.resnetv2 import PreActBasic, PreActBottleneck, ResNetV2
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter

from scaling.models.hf import HFBackbone, family_row


@dataclass(frozen=True)
class FamilySpec:
    """How one backbone family is sharded, checkpointed and grouped for the optimizer."""

    name: str
    """Family key (``resnetv2``, ``vit``, ``convnext``)."""
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


def _prefix_of(model: torch.nn.Module, inner: torch.nn.Module) -> str:
    return "" if inner is model else "backbone."


def find_family(model: torch.nn.Module) -> FamilySpec | None:
    """The family row of a built model (by its timm class or Hugging Face encoder type), or None outside the table."""
    inner = timm_model(model)
    for spec in FAMILIES.values():
        if isinstance(inner, spec.model_class):
            return spec
    if isinstance(inner, HFBackbone):
        return _hf_family(inner.model_type)
    return None


def family_spec(model: torch.nn.Module | str) -> FamilySpec:
    """The family row for a built model (by its timm class) or a family name; raises listing the families."""
    if isinstance(model, str):
        if model not in FAMILIES:
            raise ValueError(f"unknown backbone family {model!r}; supported: {sorted(FAMILIES)}")
        return FAMILIES[model]
    spec = find_family(model)
    if spec is not None:
        return spec
    inner = timm_model(model)
    raise ValueError(
        f"no family table for {type(inner).__name__}; supported families: "
        f"{ {k: v.model_class.__name__ for k, v in FAMILIES.items()} } (add a row to scaling.models.families)"
    )

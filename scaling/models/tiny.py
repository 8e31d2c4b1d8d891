"""Tiny BiT- and ViT-style backbones registered in timm, for the offline demo and the tests.

They are real ``timm.models.resnetv2.ResNetV2`` / ``timm.models.vision_transformer.VisionTransformer``
instances built with ``timm.create_model``, so every code path (weight loading, the per-family table,
FSDP units, layer-wise LR decay) is the one the full-size presets take. Sizes were chosen so one fine-tune
of the demo (64 px, a few hundred steps) takes 10-30 s on a 2-core CPU; ``docs/models.md`` ("Presets") lists their
exact parameter counts.

The BiT-style models keep the three things that make BiT transfer well (Kolesnikov et al. 2020, §3.1):
pre-activation bottlenecks, GroupNorm instead of BatchNorm, and weight-standardised convolutions
(``StdConv2d`` with BiT's eps 1e-8, as timm's ``_create_resnetv2_bit``). GroupNorm uses 8 groups instead
of 32 because the narrowest tiny bottleneck has only 16 channels.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.layers import GroupNormAct, StdConv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

# BiT normalises inputs to [-1, 1] (bit_pytorch/train.py: mean = std = 0.5).
_BIT_MEAN = (0.5, 0.5, 0.5)
_BIT_STD = (0.5, 0.5, 0.5)


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 64, 64),
        "pool_size": (2, 2),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": _BIT_MEAN,
        "std": _BIT_STD,
        "license": "apache-2.0",
        **kwargs,
    }


# timm's register_model reads ``default_cfgs`` from the defining module; no hub weights exist for these.
default_cfgs = generate_default_cfgs(
    {
        "resnetv2_tiny.untrained": _cfg(first_conv="stem.conv", classifier="head.fc"),
        "resnetv2_small.untrained": _cfg(first_conv="stem.conv", classifier="head.fc"),
        "vit_micro.untrained": _cfg(first_conv="patch_embed.proj", classifier="head", pool_size=None),
        "vit_mini.untrained": _cfg(first_conv="patch_embed.proj", classifier="head", pool_size=None),
    }
)


def _bit_resnetv2(variant: str, pretrained: bool, **kwargs: Any) -> ResNetV2:
    kwargs.setdefault("stem_type", "fixed")
    kwargs.setdefault("conv_layer", partial(StdConv2d, eps=1e-8))
    kwargs.setdefault("norm_layer", partial(GroupNormAct, num_groups=8))
    return build_model_with_cfg(ResNetV2, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


def _vit(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    # Position embeddings are interpolated per forward, so the demo can change resolution without rebuilding.
    kwargs.setdefault("dynamic_img_size", True)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


@register_model
def resnetv2_tiny(pretrained: bool = False, **kwargs: Any) -> ResNetV2:
    """BiT-style ResNetV2, one pre-activation bottleneck per stage, stem 16 (about 0.5M parameters)."""
    args = dict(layers=[1, 1, 1, 1], channels=(64, 128, 256, 512), stem_chs=16)
    return _bit_resnetv2("resnetv2_tiny", pretrained, **dict(args, **kwargs))


@register_model
def resnetv2_small(pretrained: bool = False, **kwargs: Any) -> ResNetV2:
    """BiT-style ResNetV2, two bottlenecks per stage at 1.5x width of ``resnetv2_tiny`` (about 2M parameters)."""
    args = dict(layers=[2, 2, 2, 2], channels=(96, 192, 384, 768), stem_chs=24)
    return _bit_resnetv2("resnetv2_small", pretrained, **dict(args, **kwargs))


@register_model
def vit_micro(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT at 64 px, patch 8, width 64, depth 4, 2 heads (about 0.2M parameters)."""
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0)
    return _vit("vit_micro", pretrained, **dict(args, **kwargs))


@register_model
def vit_mini(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT at 64 px, patch 8, width 128, depth 6, 4 heads (about 1.2M parameters)."""
    args = dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0)
    return _vit("vit_mini", pretrained, **dict(args, **kwargs))

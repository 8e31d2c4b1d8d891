"""Backbones (through ``timm.create_model`` only), weight sources and the per-family table.

Public API:

* :func:`build_model` ``(model_cfg, num_outputs) -> TransferModel``: preset, timm name or ``hf:<repo or dir>``
  (a Hugging Face encoder, :mod:`scaling.models.hf`), weights from
  ``model_cfg.pretrained`` (one code path, see :mod:`scaling.models.weights`), new head (zero-initialised as
  in BiT when ``model_cfg.zero_init_head``). ``forward(images) -> logits[B, num_outputs]`` is the only entry
  point; never call ``forward_features`` on a sharded module.
* :func:`has_source` ``(backbone, pretrained) -> bool``: whether a grid cell has public weights (skip it if not).
* :func:`input_channels` ``(model) -> int``: the image channels the built model takes (its first layer's).
* :func:`model_info` ``(backbone) -> dict``: parameter count, family, native resolution, sources with their
  pretraining dataset and its size. :func:`count_params` ``(model) -> int``.
* :mod:`scaling.models.families` (``family_spec``), :mod:`scaling.models.optim` (``param_groups``,
  ``build_optimizer``), :mod:`scaling.models.presets` (``PRESETS``).
"""

from __future__ import annotations

import functools
import logging

import timm
import torch
from torch import nn

from scaling.models import tiny  # noqa: F401  (registers resnetv2_tiny/small, vit_micro/mini with timm)
from scaling.models.families import FAMILIES, family_spec, input_channels, input_normalisation, timm_model
from scaling.models.presets import PRESETS, Preset, has_source, resolve_backbone
from scaling.models.weights import (
    CheckpointMismatch,
    WeightSpec,
    WeightsUnavailable,
    fetch,
    load_into,
    read_state_dict,
    resolve_source,
)

__all__ = [
    "PRESETS",
    "FAMILIES",
    "CheckpointMismatch",
    "TransferModel",
    "WeightsUnavailable",
    "build_model",
    "count_params",
    "family_spec",
    "has_source",
    "input_channels",
    "input_normalisation",
    "timm_model",
    "model_info",
    "resolve_backbone",
    "resolve_source",
]

log = logging.getLogger(__name__)


class TransferModel(nn.Module):
    """A timm backbone with its downstream head, as one module whose ``forward`` is the only entry point.

    Under FSDP2 only the root ``forward`` gathers and frees the sharded blocks in the right order, so
    callers must not reach into ``backbone.forward_features`` (https://github.com/pytorch/pytorch/issues/109385).
    """

    def __init__(self, backbone: nn.Module, preset: Preset, weights: WeightSpec, create_kwargs: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.preset_name = preset.name
        self.timm_name = preset.timm_name
        self.weights = weights
        # What the backbone was built with (num_classes, img_size...), so fresh_backbone rebuilds the same shape.
        self.create_kwargs = dict(create_kwargs or {})
        # The backbone tensors build_model drew for a Mean Var init (meanvar:<source>), in module order; else empty.
        self.mean_var_tensors: list[str] = []

    def fresh_backbone(self, seed: int) -> nn.Module:
        """A newly initialised backbone of the same architecture, built with the library's own init under ``seed``.

        timm backbones are rebuilt with ``timm.create_model`` (each family's ``init_weights``); backbones with a
        ``fresh(seed)`` method of their own (Hugging Face wrappers) use it. The global RNG is left as it was.
        """
        if hasattr(self.backbone, "fresh"):
            return self.backbone.fresh(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(self.timm_name, pretrained=False, **self.create_kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_outputs]`` for a batch of images ``[B, C, H, W]``."""
        return self.backbone(images)

    @property
    def num_outputs(self) -> int:
        """Width of the head."""
        return self.backbone.num_classes

    @property
    def data_config(self) -> dict:
        """timm's input config (mean, std, input size) for the backbone's weights."""
        return timm.data.resolve_data_config({}, model=self.backbone)


def build_model(model_cfg, num_outputs: int, image_size: int | None = None, seed: int = 0) -> TransferModel:
    """Build ``model_cfg.backbone`` with ``timm.create_model``, load ``model_cfg.pretrained``, attach a new head.

    Sources (``scaling.models.weights``): ``scratch``; ``hub`` / ``hub:<timm tag>`` / a named preset source
    (``bit-s``, ``bit-m``, ``in1k``, ``in21k``); ``<source>:<path>`` or a path to ``.safetensors``,
    ``.pt``/``.pth``/``.bin`` or BiT ``.npz``; ``meanvar:<source>`` (below). The upstream head is discarded; the
    new head has ``num_outputs`` outputs and is zero-initialised when ``model_cfg.zero_init_head`` (BiT
    ``zero_head=True``: the first steps then train the head on the pretrained features without sending noise into
    them).

    Raises ValueError (unknown backbone/source, listing the valid ones), WeightsUnavailable (weights not on
    disk and no network; says how to provide a file) or CheckpointMismatch (names the first bad tensor).

    Built under ``torch.device("meta")`` the model has no storage and no weights are read; the caller
    materialises it (``scaling.engine.sharding.materialize_from_safetensors``).

    ``image_size`` (the data resolution) is passed to ViT-family backbones as ``img_size`` unless
    ``model_cfg.kwargs`` sets it: their patch grid and position embeddings are fixed at build time (pretrained
    224 px embeddings are resampled on load). Convolutional backbones accept any size and ignore it.

    A ``meanvar:<source>`` loads ``<source>`` as above, then draws every backbone tensor with that tensor's mean and
    variance (:func:`scaling.models.reinit.mean_var_init`) from ``seed`` (the study passes the run's seed); ``seed``
    changes nothing else.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs={num_outputs} must be >= 1")
    preset = resolve_backbone(model_cfg.backbone)
    spec = resolve_source(preset, model_cfg.pretrained)
    model = _build_hf(model_cfg, preset, spec, num_outputs) if preset.family == "hf" else \
        _build_timm(model_cfg, preset, spec, num_outputs, image_size)
    if spec.mean_var and not torch.empty(()).is_meta:
        from scaling.models.reinit import mean_var_init

        model.mean_var_tensors = mean_var_init(model, seed)
        log.info("%s: Mean Var init of %d tensors, %s, seed %d", preset.name, len(model.mean_var_tensors), spec.label,
                 seed)
    return model


def _build_timm(model_cfg, preset: Preset, spec: WeightSpec, num_outputs: int, image_size: int | None) -> TransferModel:
    """A timm backbone (every preset and timm name): built, its weights loaded, a new head attached."""
    kwargs = dict(model_cfg.kwargs)
    if model_cfg.drop_path_rate:
        kwargs["drop_path_rate"] = model_cfg.drop_path_rate
    if image_size and preset.family == "vit":
        kwargs.setdefault("img_size", image_size)
    # pretrained=False always: weights come through our loader so every source shares one code path and one
    # set of error messages (timm's own loader silently re-initialises a head it cannot match when
    # the overlay lacks num_classes; timm 1.0.31 ``_builder.load_pretrained``).
    # On the meta device (sharding.build_on_meta: ranks that will receive their shard from a file) there is
    # nothing to copy weights into, so none are fetched or read.
    on_meta = torch.empty(()).is_meta
    # Fetch before building: a missing file then fails in seconds, not after allocating a 900M-parameter model.
    path = fetch(spec) if spec.kind != "scratch" and not on_meta else None
    kwargs["num_classes"] = num_outputs
    # A hub source is built under its own tag, so that pretrained_cfg (the input normalisation above all) is that of
    # the weights loaded: vit_base_patch16_224.mae expects ImageNet's mean and std, its augreg tags 0.5.
    name = spec.location if spec.kind == "hub" else preset.timm_name
    backbone = timm.create_model(name, pretrained=False, **kwargs)
    if isinstance(backbone.get_classifier(), tuple):
        raise ValueError(f"backbone {model_cfg.backbone!r} has {len(backbone.get_classifier())} classifier heads (a "
                         f"distilled DeiT's class and distillation tokens); transfer studies fine-tune one head: use "
                         f"its plain variant (e.g. {preset.timm_name.replace('_distilled', '')!r})")
    if path is not None:
        load_into(backbone, read_state_dict(path), family_spec(backbone).filter_fn, origin=str(path))
        log.info("%s: loaded %s from %s", preset.name, spec.label, path)
    head = backbone.get_classifier()
    if model_cfg.zero_init_head:
        for p in head.parameters():
            nn.init.zeros_(p)
    return TransferModel(backbone, preset, spec, create_kwargs=kwargs)


def _build_hf(model_cfg, preset: Preset, spec: WeightSpec, num_outputs: int) -> TransferModel:
    """An ``hf:`` backbone (:mod:`scaling.models.hf`): transformers builds it, the head is ours as for timm."""
    from scaling.models.hf import build_hf_backbone

    overrides = dict(model_cfg.kwargs)
    if model_cfg.drop_path_rate:
        overrides["drop_path_rate"] = model_cfg.drop_path_rate
    backbone = build_hf_backbone(spec.location, num_outputs, pretrained=spec.kind == "hf", **overrides)
    log.info("%s: %s", preset.name, "loaded its weights" if spec.kind == "hf" else "built from its config (scratch)")
    if model_cfg.zero_init_head:
        for p in backbone.get_classifier().parameters():
            nn.init.zeros_(p)
    return TransferModel(backbone, preset, spec)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@functools.lru_cache(maxsize=None)
def _backbone_params(timm_name: str) -> int:
    # Built on the meta device: exact counts without allocating (an R152x4 has ~930M parameters).
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    return count_params(model)


def model_info(backbone: str) -> dict:
    """Metadata of a preset or timm architecture, for the run store and the scaling plots.

    Returns ``name``, ``timm_name``, ``family``, ``n_params`` (backbone without head), ``native_resolution``,
    ``default_hub`` and ``sources``: ``{source: {dataset, n_images, num_classes, hub, url, user_file}}``
    (``scratch`` included with 0 images).
    """
    preset = resolve_backbone(backbone)
    sources = {"scratch": dict(dataset="none", n_images=0, num_classes=0, hub="", url="", user_file=False)}
    if preset.family == "hf":
        from scaling.models.hf import count_hf_params, hf_location

        # The pretraining set of a Hugging Face checkpoint is not machine-readable: its size is unknown (NaN).
        sources["hf"] = dict(dataset="see the model card", n_images=float("nan"), num_classes=0,
                             hub=hf_location(preset.name), url="", user_file=False)
        return dict(name=preset.name, timm_name=preset.timm_name, family="hf",
                    n_params=count_hf_params(hf_location(preset.name)), native_resolution=0, default_hub="",
                    description=preset.description, sources=sources)
    for name, s in preset.sources.items():
        sources[name] = dict(dataset=s.dataset, n_images=s.n_images, num_classes=s.num_classes, hub=s.hub,
                             url=s.url, user_file=s.user_file)
    return dict(
        name=preset.name,
        timm_name=preset.timm_name,
        family=preset.family,
        n_params=_backbone_params(preset.timm_name),
        native_resolution=preset.native_resolution,
        default_hub=preset.default_hub,
        description=preset.description,
        sources=sources,
    )

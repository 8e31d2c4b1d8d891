"""Hugging Face vision encoders as backbones: ``model.backbone: hf:<hub repo or local directory>``.

In-domain pretraining sources (e.g. a self-supervised chest-X-ray ViT such as ``microsoft/rad-dino``, a DINOv2
model; Pérez-García et al. 2025, "Exploring scalable medical image encoders beyond text supervision", Nature
Machine Intelligence, arXiv 2401.10815) are published as ``transformers`` checkpoints (``config.json`` + ``model.safetensors``),
not timm ones. :func:`build_hf_backbone` builds one with ``transformers.AutoModel`` and wraps it in
:class:`HFBackbone`, which presents the timm interface the rest of the library relies on (``num_classes``,
``get_classifier``, ``group_matcher``, ``no_weight_decay``, ``set_grad_checkpointing``, ``pretrained_cfg``), so
``TransferModel.forward(images)`` stays the only entry point and sharding, layer-wise LR decay, features and
re-initialisation work unchanged. Its family row (:data:`HF_FAMILIES`, used by :mod:`scaling.models.families`)
names the encoder's layer class, which FSDP2 shards as one unit per layer.

Sources for an ``hf:`` backbone: ``hf`` (or ``hub``, or the same ``hf:<...>`` string) loads the checkpoint's
weights; ``scratch`` builds the same architecture from its ``config.json`` with transformers' own init (the
no-pretraining control). Pooled output: the final-layer-normed class token (``last_hidden_state[:, 0]``, which
is DINOv2's ``pooler_output`` and RAD-DINO's image embedding) feeds a new linear head. ``transformers`` is
imported only when such a backbone is built.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from scaling.models.presets import hf_location, is_hf  # noqa: F401  (re-exported: the hf: string helpers)
from scaling.models.weights import WeightsUnavailable

log = logging.getLogger(__name__)

# ImageNet statistics, what ViT/DINOv2 image processors use when a checkpoint ships no preprocessor config.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

HF_FAMILIES: dict[str, dict] = {
    "vit": dict(module="transformers.models.vit.modeling_vit", model="ViTModel", layer="ViTLayer",
                # ViTModel's default tanh pooler is absent from most checkpoints (randomly initialised) and unused
                # here: not building it keeps every parameter trained (DDP refuses parameters without gradients).
                init_kwargs={"add_pooling_layer": False}, unused=()),
    "dinov2": dict(module="transformers.models.dinov2.modeling_dinov2", model="Dinov2Model", layer="Dinov2Layer",
                   # The mask token only enters masked-image-modelling pretraining (bool_masked_pos); frozen so DDP
                   # does not wait for its gradient.
                   init_kwargs={}, unused=("embeddings.mask_token",)),
}
"""Supported ``config.model_type`` values: transformers module, encoder class, layer class (one FSDP unit each)."""


def family_row(model_type: str) -> tuple[type, type]:
    """``(encoder class, layer class)`` of a supported model type; raises listing the supported ones."""
    if model_type not in HF_FAMILIES:
        raise ValueError(f"Hugging Face model type {model_type!r} has no family row; supported: {sorted(HF_FAMILIES)} "
                         "(add one to scaling.models.hf.HF_FAMILIES with its encoder-layer class)")
    row = HF_FAMILIES[model_type]
    module = importlib.import_module(row["module"])
    return getattr(module, row["model"]), getattr(module, row["layer"])


class HFBackbone(nn.Module):
    """A Hugging Face vision encoder plus a linear head on its class token, with timm's model interface."""

    def __init__(self, encoder: nn.Module, num_classes: int, location: str, mean=_IMAGENET_MEAN, std=_IMAGENET_STD):
        super().__init__()
        model_type = encoder.config.model_type
        family_row(model_type)  # refuse unsupported types before anything else
        self.encoder = encoder
        self.location = location
        self.num_classes = num_classes
        self.num_features = encoder.config.hidden_size
        self.head = nn.Linear(self.num_features, num_classes)
        for name in HF_FAMILIES[model_type]["unused"]:
            encoder.get_parameter(name).requires_grad_(False)
        size = encoder.config.image_size
        size = size if isinstance(size, int) else size[0]
        # What timm.data.resolve_data_config reads (TransferModel.data_config).
        self.pretrained_cfg = dict(input_size=(encoder.config.num_channels, size, size), mean=tuple(mean),
                                   std=tuple(std), interpolation="bicubic", crop_pct=1.0, classifier="head",
                                   first_conv="")
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(encoder.forward).parameters

    @property
    def model_type(self) -> str:
        """The encoder's ``config.model_type`` (its row in :data:`HF_FAMILIES`)."""
        return self.encoder.config.model_type

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from the class token of the last (layer-normed) hidden state."""
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        hidden = self.encoder(pixel_values=images, **kwargs).last_hidden_state
        return self.head(hidden[:, 0])

    def get_classifier(self) -> nn.Module:
        """The downstream head (timm interface)."""
        return self.head

    def layer_prefix(self) -> str:
        """Module name of the encoder's layer list (``encoder.layers`` for ViT, ``encoder.encoder.layer`` for
        DINOv2 in transformers 5): found from the family's layer class, not assumed."""
        _, layer = family_row(self.model_type)
        names = [n for n, m in self.named_modules() if isinstance(m, layer)]
        return names[0].rsplit(".", 1)[0]

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style layer groups (drive layer-wise LR decay): embeddings, one group per encoder layer, with the
        final norm joining the last layer (timm's ``(99999,)`` suffix = previous group); the head is last."""
        layers = re.escape(self.layer_prefix())
        return dict(stem=r"^encoder\.embeddings", blocks=[(rf"^{layers}\.(\d+)", None), (r"^encoder\.", (99999,))])

    def no_weight_decay(self) -> set[str]:
        """Token and position embeddings (timm's ViT rule; norms and biases are excluded by dimension anyway)."""
        tokens = ("cls_token", "position_embeddings", "mask_token", "register_tokens")
        return {n for n, _ in self.named_parameters() if n.startswith("encoder.embeddings.") and n.endswith(tokens)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """transformers' own activation checkpointing of the encoder layers."""
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn and go
        # away in 6); 4.x has only the old ones.
        verb = "enable" if enable else "disable"
        switch = getattr(self.encoder, f"activation_checkpointing_{verb}", None) or \
            getattr(self.encoder, f"gradient_checkpointing_{verb}")
        switch()

    def fresh(self, seed: int) -> HFBackbone:
        """The same architecture initialised by transformers under ``seed`` (global RNG left as it was)."""
        from transformers import AutoModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = AutoModel.from_config(self.encoder.config, **HF_FAMILIES[self.model_type]["init_kwargs"])
            return HFBackbone(encoder, self.num_classes, self.location, self.pretrained_cfg["mean"],
                              self.pretrained_cfg["std"])


def _weights_error(location: str, error: Exception | str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"cannot load Hugging Face model {location!r}: {error}. Provide it as a local directory holding "
        f"config.json and model.safetensors (e.g. `hf download {location} --local-dir /weights/name` where the hub "
        f"is reachable) and set model.backbone to 'hf:/weights/name'; models already in the Hugging Face cache are "
        f"used offline with HF_HUB_OFFLINE=1"
    )


_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)


def check_cached(location: str) -> None:
    """WeightsUnavailable unless the encoder's weights are on disk: in the directory ``location`` or, for a hub
    repo, in the Hugging Face cache (``transformers``' file names, sharded checkpoints by their index). Reads
    only the file system: what an offline run would find."""
    from huggingface_hub import try_to_load_from_cache

    check_local(location)
    path = Path(location).expanduser()
    if path.is_dir():
        found = any((path / name).is_file() for name in _WEIGHT_FILES)
        reason = f"directory {path} holds none of {list(_WEIGHT_FILES)}"
    else:
        found = any(isinstance(try_to_load_from_cache(location, name), str) for name in _WEIGHT_FILES)
        reason = "offline mode (HF_HUB_OFFLINE/SCALING_OFFLINE) and its weights are not in the Hugging Face cache"
    if not found:
        raise _weights_error(location, reason)


LOCAL_PREFIXES = ("/", "./", "../", "~")
"""An ``hf:`` location starting with one of these is a local directory, never a hub repo id."""


def check_local(location: str) -> None:
    """Refuse at once a location that is written as a local path but is not a directory on this machine.

    Otherwise transformers takes it for a hub repo id and, seconds later, says the repo id is malformed, never that
    the directory does not exist."""
    if not (location.startswith(LOCAL_PREFIXES) or location in (".", "..")):
        return
    path = Path(location).expanduser()
    if not path.is_dir():
        what = "not a directory" if path.exists() else "directory not found"
        raise WeightsUnavailable(f"{what}: {location} (model.backbone 'hf:{location}' names a local directory "
                                 f"holding config.json and model.safetensors)")


def load_config(location: str):
    """The ``transformers`` config of ``location`` (hub repo or directory); WeightsUnavailable when absent."""
    check_local(location)
    config_file = Path(location).expanduser() / "config.json"
    if config_file.parent.is_dir() and not config_file.is_file():
        # transformers 4.x otherwise guesses a model type from the directory's name ("empty" -> "mpt")
        raise _weights_error(location, f"no config.json in directory {config_file.parent}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise _weights_error(location, e) from e


@functools.lru_cache(maxsize=None)  # one lookup and at most one warning per model and process
def _normalisation(location: str) -> tuple[tuple, tuple]:
    """Image mean/std from the model's ``preprocessor_config.json``: in its directory, or for a hub repo in the
    Hugging Face cache (looked up, never downloaded: ``AutoModel`` does not fetch it). Else ImageNet's, with a
    warning, since an encoder fed other statistics than its own still trains, only worse."""
    from huggingface_hub import try_to_load_from_cache

    local = Path(location).expanduser()
    path = local / "preprocessor_config.json"
    if not local.is_dir():
        cached = try_to_load_from_cache(location, "preprocessor_config.json")
        path = Path(cached) if isinstance(cached, str) else path
    if path.is_file():
        cfg = json.loads(path.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    log.warning("hf:%s has no preprocessor_config.json with image_mean/image_std on disk: its inputs are normalised "
                "with ImageNet's mean and std; download the model into a directory (hf download %s --local-dir "
                "<dir>) and use hf:<dir> to normalise with its own", location, location)
    return _IMAGENET_MEAN, _IMAGENET_STD


def build_hf_backbone(location: str, num_classes: int, pretrained: bool, **config_overrides) -> HFBackbone:
    """Build the encoder at ``location`` with ``transformers.AutoModel`` (its weights if ``pretrained``).

    ``config_overrides`` (``model.kwargs``) update the config, e.g. ``drop_path_rate``. On the meta device nothing
    is read but the config. Raises ValueError for an unsupported ``model_type`` and WeightsUnavailable when the
    checkpoint is not on disk and cannot be downloaded.
    """
    from transformers import AutoModel

    config = load_config(location)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model.kwargs: {config.model_type} config has no field {key!r}")
        setattr(config, key, value)
    family_row(config.model_type)
    init_kwargs = HF_FAMILIES[config.model_type]["init_kwargs"]
    if pretrained and not torch.empty(()).is_meta:
        try:
            encoder = AutoModel.from_pretrained(location, config=config, **init_kwargs)
        except OSError as e:
            raise _weights_error(location, e) from e
    else:
        encoder = AutoModel.from_config(config, **init_kwargs)
    mean, std = _normalisation(location)
    return HFBackbone(encoder, num_classes, location, mean, std)


def count_hf_params(location: str) -> int:
    """Parameters of the encoder at ``location`` (built on the meta device from its config; no weights read)."""
    from transformers import AutoModel

    config = load_config(location)
    family_row(config.model_type)
    with torch.device("meta"):
        encoder = AutoModel.from_config(config, **HF_FAMILIES[config.model_type]["init_kwargs"])
    return sum(p.numel() for p in encoder.parameters())

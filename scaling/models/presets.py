"""Backbone presets: names users write in configs, resolved to timm architectures and weight sources.

A preset is a timm architecture plus the pretraining sources the seed paper's axes need (Mustafa et al. 2021,
after BiT, Kolesnikov et al. 2020): BiT-S (ImageNet-1k), BiT-M (ImageNet-21k) and BiT-L (JFT-class, never
released, so only a user-supplied file), and the ViT equivalents (AugReg ImageNet-1k / ImageNet-21k). Facts
and their sources: Kolesnikov et al. 2020 (arXiv 1912.11370) Table 1 and github.com/google-research/big_transfer;
Steiner et al. 2021 (arXiv 2106.10270) for the AugReg ViTs; timm's model cards for the hub tags.

Names are matched case-insensitively with ``-`` and ``_`` equivalent (``BiT-R50x1`` = ``bit_r50x1``). Any timm
architecture name is accepted as well (scratch, ``hub:<tag>`` or a local file), so a preset is a convenience,
never a restriction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaling.config import mean_var_source

# Upstream datasets: (name, number of images, number of classes of the released head).
IMAGENET_1K = ("ImageNet-1k (ILSVRC-2012)", 1_281_167, 1000)
IMAGENET_21K = ("ImageNet-21k", 14_197_122, 21843)
# BiT-L's JFT-300M: ~300M images, 18,291 classes (BiT §3.1). Weights were never released.
JFT_300M = ("JFT-300M-class (user-supplied)", 300_000_000, 18291)

_BIT_S_URL = "https://storage.googleapis.com/bit_models/BiT-S-{arch}.npz"


@dataclass(frozen=True)
class Source:
    """One pretraining source of a preset: where its weights come from and what they were trained on."""

    name: str
    """Source name as written in ``model.pretrained`` (``bit-s``, ``in21k``, ...)."""
    dataset: str
    """Upstream dataset."""
    n_images: int
    """Upstream dataset size in images (the pretraining-scale axis)."""
    num_classes: int
    """Classes of the released upstream head (0 = released without a head)."""
    hub: str = ""
    """timm ``arch.tag`` served from the Hugging Face hub (``timm/<arch.tag>``)."""
    url: str = ""
    """Official download URL (BiT ``.npz``), cached under the weights directory."""
    user_file: bool = False
    """Only available as a file the user supplies (``<source>:<path>``), e.g. BiT-L."""


@dataclass(frozen=True)
class Preset:
    """A named backbone: timm architecture, family, resolutions and its pretraining sources."""

    name: str
    """Canonical preset name."""
    timm_name: str
    """timm architecture passed to ``timm.create_model``."""
    family: str
    """Family key of ``scaling.models.families`` (``resnetv2``, ``vit``)."""
    native_resolution: int
    """Resolution the upstream weights were trained at."""
    sources: dict[str, Source] = field(default_factory=dict)
    """Pretraining sources by name (``scratch`` is always valid and not listed)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Alternative source names (``in21k`` -> ``bit-m``) so one grid axis fits BiT and ViT presets."""
    default_hub: str = ""
    """Source used for ``pretrained: hub``."""
    description: str = ""
    """One line for the presets table."""
    bit_arch: str = ""
    """BiT architecture tag as in the official file names (``R50x1`` in ``BiT-M-R50x1.npz``); empty if not BiT."""

    def source(self, name: str) -> Source:
        """Return the source called ``name`` (or an alias of it); raise listing the valid names otherwise."""
        key = self.aliases.get(name.lower(), name.lower())
        if key not in self.sources:
            valid = sorted(["scratch", "hub", "hub:<timm tag>", "<path>", *self.sources, *self.aliases])
            raise ValueError(f"preset {self.name!r} has no pretraining source {name!r}; valid: {valid}")
        return self.sources[key]


def _bit(arch: str, timm_name: str, description: str) -> Preset:
    sources = {
        "bit-s": Source("bit-s", *IMAGENET_1K, url=_BIT_S_URL.format(arch=arch)),
        "bit-m": Source("bit-m", *IMAGENET_21K, hub=f"{timm_name}.goog_in21k"),
        "bit-l": Source("bit-l", *JFT_300M, user_file=True),
    }
    aliases = {"in1k": "bit-s", "in21k": "bit-m", "jft": "bit-l"}
    return Preset(f"bit_{arch.lower()}", timm_name, "resnetv2", 224, sources, aliases, "bit-m", description, arch)


def _vit(name: str, timm_name: str, description: str, in1k: bool, augreg21k: bool, orig21k: bool) -> Preset:
    sources = {}
    if in1k:
        sources["in1k"] = Source("in1k", *IMAGENET_1K, hub=f"{timm_name}.augreg_in1k")
    if augreg21k:
        sources["in21k"] = Source("in21k", *IMAGENET_21K, hub=f"{timm_name}.augreg_in21k")
    if orig21k:
        # The original ViT in21k release has no head (timm num_classes=0).
        key = "in21k-orig" if augreg21k else "in21k"
        sources[key] = Source(key, IMAGENET_21K[0], IMAGENET_21K[1], 0, hub=f"{timm_name}.orig_in21k")
    return Preset(name, timm_name, "vit", 224, sources, {}, "in21k", description)


def _tiny(name: str, family: str, description: str) -> Preset:
    # Trained from scratch or from a demo upstream run (``upstream:<name>``), whose size the study config sets.
    return Preset(name, name, family, 64, {}, {}, "", description)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _bit("R50x1", "resnetv2_50x1_bit", "BiT ResNet-50, width 1"),
        _bit("R50x3", "resnetv2_50x3_bit", "BiT ResNet-50, width 3"),
        _bit("R101x1", "resnetv2_101x1_bit", "BiT ResNet-101, width 1"),
        _bit("R101x3", "resnetv2_101x3_bit", "BiT ResNet-101, width 3"),
        _bit("R152x2", "resnetv2_152x2_bit", "BiT ResNet-152, width 2 (code release only)"),
        _bit("R152x4", "resnetv2_152x4_bit", "BiT ResNet-152, width 4 (the 928M-parameter BiT)"),
        _vit("vit_s16", "vit_small_patch16_224", "ViT-S/16", in1k=True, augreg21k=True, orig21k=False),
        _vit("vit_b16", "vit_base_patch16_224", "ViT-B/16", in1k=True, augreg21k=True, orig21k=True),
        # timm has no ImageNet-1k-only ViT-L/16 or ViT-H/14 weights.
        _vit("vit_l16", "vit_large_patch16_224", "ViT-L/16", in1k=False, augreg21k=True, orig21k=True),
        _vit("vit_h14", "vit_huge_patch14_224", "ViT-H/14", in1k=False, augreg21k=False, orig21k=True),
        _tiny("resnetv2_tiny", "resnetv2", "demo BiT-style ResNetV2, 1 block per stage"),
        _tiny("resnetv2_small", "resnetv2", "demo BiT-style ResNetV2, 2 blocks per stage, 1.5x wider"),
        _tiny("vit_micro", "vit", "demo ViT, 64 px, patch 8, width 64, depth 4"),
        _tiny("vit_mini", "vit", "demo ViT, 64 px, patch 8, width 128, depth 6"),
    ]
}


HF_PREFIX = "hf:"


def is_hf(name: str) -> bool:
    """True for ``hf:<repo or dir>`` strings (a Hugging Face encoder, :mod:`scaling.models.hf`)."""
    return name.strip().lower().startswith(HF_PREFIX)


def hf_location(name: str) -> str:
    """The repo id or directory of an ``hf:`` string."""
    return name.strip()[len(HF_PREFIX):].strip()


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def find_preset(name: str) -> Preset | None:
    """Return the preset called ``name`` (case/dash-insensitive), or None when it is not a preset."""
    return PRESETS.get(_key(name))


def resolve_backbone(name: str) -> Preset:
    """Return the preset for ``name``, or an ad-hoc preset (no named sources) for any timm architecture.

    Raises ValueError listing the presets when ``name`` is neither a preset nor a timm model.
    """
    preset = find_preset(name)
    if preset is not None:
        return preset
    if is_hf(name):
        # A Hugging Face encoder (scaling.models.hf): the architecture comes from its config.json.
        return Preset(name.strip(), name.strip(), "hf", 0, {}, {}, "", "Hugging Face vision encoder")
    import timm

    from scaling.models import tiny  # noqa: F401  (registers the tiny models)

    arch = name.strip()
    if not timm.is_model(arch):
        raise ValueError(
            f"unknown backbone {name!r}: not a scaling preset and not a timm model. "
            f"Presets: {sorted(PRESETS)}; timm models: timm.list_models()"
        )
    family = _family_of_arch(arch)
    return Preset(arch, arch, family, 0, {}, {}, "", "timm architecture")


def has_source(backbone: str, pretrained: str) -> bool:
    """True when ``pretrained`` can be resolved for ``backbone`` without a user-supplied file.

    For study grids, whose axes are a Cartesian product: e.g. ``vit_l16`` x ``in1k`` has no public checkpoint,
    so the runner skips that cell (and logs it) instead of failing the study. ``scratch``, ``hub:``, paths,
    ``<source>:<path>`` and ``upstream:`` sources are always considered available here; loading checks them. A
    ``meanvar:<source>`` is available where its source is.
    """
    inner = mean_var_source(pretrained)
    if inner is not None:
        return has_source(backbone, inner)
    preset = resolve_backbone(backbone)
    key = pretrained.strip().lower()
    if preset.family == "hf" or key.startswith("hf:"):
        # hf: sources carry their own architecture: they pair only with the same hf: backbone.
        return preset.family == "hf" and key in ("scratch", "none", "", "hf", "hub", preset.name.lower())
    if key in ("scratch", "none", "") or ":" in key or "/" in key:
        return True
    if key.endswith((".npz", ".safetensors", ".pt", ".pth", ".bin")):
        return True
    if key == "hub":
        return bool(preset.default_hub)
    key = preset.aliases.get(key, key)
    return key in preset.sources and not preset.sources[key].user_file


def missing_source_hint(backbone: str, pretrained: str) -> str:
    """What to do about a grid cell :func:`has_source` rejects, for the message that skips it.

    A named source without public weights takes a file (``in1k:/w/vit_l16.npz``). A Hugging Face pair does not: an
    ``hf`` source on a timm backbone (or a timm source on an ``hf:`` backbone) is refused whatever file is given,
    because a Hugging Face checkpoint brings its own architecture.
    """
    key = (mean_var_source(pretrained) or pretrained).strip().lower()  # meanvar:<source> as its source
    if resolve_backbone(backbone).family == "hf":
        return "an 'hf:' backbone takes pretrained 'hf' (its own weights) or 'scratch'"
    if key == "hf" or key.startswith(HF_PREFIX):
        return ("Hugging Face weights come with their own architecture: list 'hf:<repo or directory>' in "
                "grid.backbones, with pretrained 'hf'")
    return f"give a file as '{pretrained}:<path>'"


def _family_of_arch(arch: str) -> str:
    # The family is confirmed from the built module's class by ``families.family_spec``; this guess only fills
    # the metadata table without building the model.
    for prefix, family in (("resnetv2", "resnetv2"), ("vit_", "vit"), ("convnext", "convnext")):
        if arch.startswith(prefix):
            return family
    return "other"

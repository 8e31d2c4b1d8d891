"""Block re-initialisation and the Mean Var initialisation: what of the pretrained weights transfers (Raghu et al.
2019).

Raghu, Zhang, Kleinberg & Bengio 2019 ("Transfusion: Understanding Transfer Learning for Medical Imaging",
arXiv 1902.07208, §6) separate feature reuse from a better initialisation by re-initialising part of a pretrained
network before fine-tuning: their *weight transfusion* keeps the pretrained weights up to a block and re-initialises
everything above it (:func:`reinit_after`); the converse, re-initialising the lowest blocks and keeping the rest
(:func:`reinit_first`), asks whether the low-level filters are what transfers.

A backbone is cut into *units* in forward order: unit 0 is the stem (every tensor before the first block: the
patch embedding, class token and position embedding of a ViT, the root convolution of a ResNetV2), units
1..n are the family's blocks (:mod:`scaling.models.families`; a tensor between two blocks, e.g. a ConvNeXt
stage's downsampling layer, belongs to the block it feeds), and the last unit is the neck (the norms after the
last block). The classifier head is never a unit: it is the new downstream head and is left as built.

Re-initialised tensors are copied from a fresh backbone built with the library's own init under ``seed``
(:meth:`scaling.models.TransferModel.fresh_backbone`: ``timm.create_model``, i.e. each timm family's
``init_weights``), so they equal a from-scratch model of that seed exactly. Call before the Trainer shards the
model.

The *Mean Var init* (Raghu et al. §5, "Feature independent benefits of transfer: weight scalings") keeps the scale
of the pretrained weights and none of their features: :func:`mean_var_init` replaces every tensor of the backbone by
i.i.d. normal draws with that tensor's own mean and variance. Fine-tuning from it, against fine-tuning from scratch
and from the pretrained weights, says how much of pretraining's benefit is the scale of the weights alone. The study
builds it from a ``meanvar:<source>`` weight source (:func:`scaling.models.build_model`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from scaling.models.families import family_spec, timm_model
from scaling.models.weights import classifier_keys

STEM, NECK = "stem", "neck"

MEAN_VAR_STREAM = 0x4D56
"""Second entropy word of the Mean Var draw's seed (:func:`mean_var_init`), which keeps it apart from the stream a
scratch init of the same seed draws from (``torch.manual_seed(seed)``)."""


def units(model: nn.Module) -> dict[str, list[str]]:
    """``{unit: [state-dict keys of the timm model]}`` in forward order: ``stem``, each block, ``neck``."""
    inner = timm_model(model)
    classes = family_spec(model).block_classes
    blocks = [n for n, m in inner.named_modules() if m is not inner and isinstance(m, classes)]
    head = classifier_keys(inner)
    keys = [k for k in inner.state_dict() if k not in head]
    out: dict[str, list[str]] = {STEM: [], **{b: [] for b in blocks}, NECK: []}
    pending: list[str] = []  # non-block tensors waiting for the block they feed
    for key in keys:
        block = next((b for b in blocks if key.startswith(b + ".")), None)
        if block is None:
            pending.append(key)
            continue
        target = STEM if not any(out[b] for b in blocks) else block
        out[target] += pending
        pending = []
        out[block].append(key)
    out[NECK] += pending
    return out


def _reinit(model: nn.Module, chosen: list[str], seed: int) -> list[str]:
    if not hasattr(model, "fresh_backbone"):
        raise TypeError(f"re-initialisation needs a model from scaling.models.build_model, got {type(model).__name__}")
    inner = timm_model(model)
    if any(p.is_meta for p in inner.parameters()):
        raise ValueError("the model is on the meta device; re-initialise a materialised model before sharding it")
    table = units(model)
    fresh = model.fresh_backbone(seed).state_dict()
    own = inner.state_dict()
    with torch.no_grad():
        for unit in chosen:
            for key in table[unit]:
                own[key].copy_(fresh[key])
    return chosen


def reinit_first(model: nn.Module, k: int, seed: int = 0) -> list[str]:
    """Re-initialise units ``0..k-1`` (``k=1``: the stem only; ``k=2``: stem and first block); return their names.

    ``k`` ranges from 0 (nothing) to ``len(units(model))`` (the whole backbone, i.e. a scratch model of ``seed``
    with the pretrained head dropped as usual).
    """
    names = list(units(model))
    if not 0 <= k <= len(names):
        raise ValueError(f"k={k} must be between 0 and the number of units, {len(names)} ({names[0]} .. {names[-1]})")
    return _reinit(model, names[:k], seed)


def reinit_after(model: nn.Module, k: int, seed: int = 0) -> list[str]:
    """Keep units ``0..k-1`` pretrained and re-initialise every later one (Raghu et al.'s weight transfusion)."""
    names = list(units(model))
    if not 0 <= k <= len(names):
        raise ValueError(f"k={k} must be between 0 and the number of units, {len(names)} ({names[0]} .. {names[-1]})")
    return _reinit(model, names[k:], seed)


def mean_var_init(model: nn.Module, seed: int) -> list[str]:
    """Raghu et al.'s Mean Var init: draw every backbone parameter i.i.d. from the normal with that tensor's own mean
    and variance; return the names of the tensors drawn (in module order).

    Every floating-point parameter of the backbone is drawn, one tensor at a time: convolution and linear weights, and
    also biases, normalisation scales and shifts, a ViT's class token and position embedding. Raghu et al. define the
    draw per layer for "the weights" and say nothing about the rest; a tensor kept pretrained would carry pretrained
    features (a per-channel scale picks out channels), and BiT's weight-standardised convolutions divide every filter
    by its own standard deviation, so for BiT the scale the init keeps is in the normalisation layers' tensors. The
    variance is the tensor's population variance, so a one-element tensor keeps its value. Running statistics of
    batch normalisation are statistics of the pretrained features' activations: they are reset as a fresh model has
    them (``reset_running_stats``); other buffers (index tables) are left as built. The classifier head is never
    drawn: it is the new downstream head and stays as built.

    The draw is a function of ``seed`` alone (its own CPU generator, seeded through NumPy's ``SeedSequence`` with
    :data:`MEAN_VAR_STREAM`, so the same on every rank and device; the global RNG is untouched), so a Mean Var cell
    and a scratch cell of one seed do not share noise. Call before the Trainer shards the model.
    """
    inner = timm_model(model)
    if any(p.is_meta for p in inner.parameters()):
        raise ValueError("the model is on the meta device; draw the Mean Var init on a materialised model")
    head = classifier_keys(inner)
    state = np.random.SeedSequence([seed, MEAN_VAR_STREAM]).generate_state(1, dtype=np.uint64)
    draws = torch.Generator().manual_seed(int(state[0]))
    drawn = []
    with torch.no_grad():
        for name, param in inner.named_parameters():
            if name in head or not param.is_floating_point():
                continue
            values = param.detach().to(torch.float64)
            mean, std = values.mean(), values.std(correction=0)
            sample = torch.randn(param.shape, generator=draws, dtype=torch.float32)
            param.copy_(sample.to(torch.float64).mul_(std).add_(mean))
            drawn.append(name)
        for module in inner.modules():
            if getattr(module, "track_running_stats", False) and hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
    return drawn

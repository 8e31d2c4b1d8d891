"""Optimizer parameter groups and construction from ``TrainConfig``.

BiT fine-tunes with SGD momentum 0.9 and no weight decay (BiT-HyperRule, Kolesnikov et al. 2020 §3.3); the
ViT recipe uses AdamW with layer-wise LR decay (groups from timm's ``group_matcher``) and no decay on the
``no_weight_decay()`` set, norms and biases. Every group carries ``lr_scale``: the trainer sets
``group["lr"] = lr_at(step, ...) * group["lr_scale"]`` at each step. Groups are built from parameter names,
which FSDP2 keeps, so build the optimizer after sharding (https://github.com/pytorch/pytorch/issues/83204).
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from scaling.models.families import timm_model


def param_groups(model: torch.nn.Module, train_cfg) -> list[dict]:
    """Parameter groups with ``weight_decay`` and ``lr_scale`` for ``model`` under ``train_cfg``.

    No weight decay on the timm model's ``no_weight_decay()`` set or on 1-D tensors (norms, biases).
    ``train_cfg.layer_decay < 1`` scales each layer group's LR by ``layer_decay ** (depth - layer_id)`` via
    timm's ``param_groups_layer_decay`` (head = 1, stem smallest). Frozen parameters are left out.
    """
    inner = timm_model(model)
    no_wd = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else ()
    if train_cfg.layer_decay < 1.0:
        groups = param_groups_layer_decay(
            inner, weight_decay=train_cfg.weight_decay, no_weight_decay_list=no_wd, layer_decay=train_cfg.layer_decay
        )
    else:
        groups = param_groups_weight_decay(inner, weight_decay=train_cfg.weight_decay, no_weight_decay_list=no_wd)
    out = []
    for g in groups:
        if not g["params"]:
            continue
        g = dict(g)
        g.setdefault("lr_scale", 1.0)
        g["lr"] = train_cfg.lr * g["lr_scale"]
        out.append(g)
    return out


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """SGD with momentum (BiT) or AdamW over :func:`param_groups`, initial LR = peak LR x ``lr_scale``."""
    groups = param_groups(model, train_cfg)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr)
    raise ValueError(f"train.optimizer={train_cfg.optimizer!r} is not supported; choose 'sgd' or 'adamw'")

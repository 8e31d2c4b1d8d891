"""MixUp for multi-label targets with missing labels, and for class-index targets.

timm's ``Mixup`` one-hots integer targets, so it cannot mix multi-label CXR targets that contain NaN
("not labelled"; timm 1.0 ``timm/data/mixup.py``, ``mixup_target``). Here a mixed label is
``lam * y_i + (1 - lam) * y_j`` and it is known only where both ``y_i`` and ``y_j`` are known: elsewhere it
is NaN, which the trainer's masked BCE excludes from the loss.

As in bit_pytorch/train.py, one ``lam`` is drawn per optimizer step, not per micro-batch; each micro-batch
is mixed with a permutation of itself. Call pattern in the trainer::

    lam = sample_lambda(train_cfg.mixup_alpha, generator)          # once per optimizer step
    for images, targets in micro_batches:
        images, targets = mixup(images, targets, lam, generator=generator, num_classes=C)
"""

from __future__ import annotations

import numpy as np
import torch


def sample_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """Draw ``lam ~ Beta(alpha, alpha)``; 1.0 (no mixing) when ``alpha <= 0``. Seeded by ``generator``."""
    if alpha <= 0:
        return 1.0
    # torch's Beta sampler takes no generator; derive a numpy stream from it so runs stay reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    lam: float,
    perm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with a permutation of itself: ``(lam * x + (1 - lam) * x[perm], mixed targets)``.

    ``targets`` is either float ``[B, C]`` multi-label (NaN = missing; the mixed label is NaN unless both
    samples have it) or integer class indices ``[B]`` (then ``num_classes`` is required and soft one-hot
    targets ``[B, num_classes]`` are returned, for ``cross_entropy`` with probabilities; an index of -1, an
    unlabelled sample, becomes a row of NaN, so a pair with an unlabelled partner stays out of the loss).
    ``perm`` defaults to a random permutation drawn from ``generator``. ``lam == 1`` returns the inputs unchanged
    (integer targets still become one-hot so the loss sees one target format for the whole run).
    """
    if not targets.is_floating_point():
        if num_classes is None:
            raise ValueError("integer class targets need num_classes")
        index = targets.long()
        onehot = torch.nn.functional.one_hot(index.clamp_min(0), num_classes).to(images.dtype)
        targets = torch.where((index >= 0)[:, None], onehot, torch.full_like(onehot, float("nan")))
    if lam >= 1.0:
        return images, targets
    if perm is None:
        perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    mixed_images = lam * images + (1.0 - lam) * images[perm]
    other = targets[perm]
    known = ~torch.isnan(targets) & ~torch.isnan(other)
    mixed = lam * torch.nan_to_num(targets) + (1.0 - lam) * torch.nan_to_num(other)
    mixed = torch.where(known, mixed, torch.full_like(mixed, float("nan")))
    return mixed_images, mixed

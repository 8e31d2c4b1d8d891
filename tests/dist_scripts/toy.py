"""A tiny learnable multi-label problem and tiny timm models, shared by the trainer tests and launched scripts."""

from __future__ import annotations

import torch

NUM_LABELS = 3
IMG = 32


class ToyDataset(torch.utils.data.Dataset):
    """Noise images; label l is positive when channel l carries a bright square (learnable); ~15 % NaN labels."""

    def __init__(self, n: int, seed: int = 0, nan_fraction: float = 0.15, multiclass: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, IMG, IMG, generator=g) * 0.5
        self.targets = (torch.rand(n, NUM_LABELS, generator=g) < 0.4).float()
        for l in range(NUM_LABELS):
            self.images[:, l, 8:24, 8:24] += 1.5 * self.targets[:, l, None, None]
        self.labels = self.targets.argmax(1)
        self.multiclass = multiclass
        if nan_fraction > 0:
            self.targets[torch.rand(n, NUM_LABELS, generator=g) < nan_fraction] = float("nan")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        target = self.labels[i] if self.multiclass else self.targets[i]
        return {"image": self.images[i], "target": target, "index": int(i) * 10 + 3}


def vit(seed: int = 0, depth: int = 2, **kw):
    """vit_tiny_patch16_224 at 32 px, shallow (a few hundred thousand parameters)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_LABELS, img_size=IMG,
                             depth=depth, **kw)


def resnet(seed: int = 0):
    """The demo's tiny BiT-style ResNetV2 (StdConv + GroupNorm, one pre-activation bottleneck per stage)."""
    import timm

    import scaling.models.tiny  # noqa: F401  (registers resnetv2_tiny)

    torch.manual_seed(seed)
    return timm.create_model("resnetv2_tiny", pretrained=False, num_classes=NUM_LABELS)


def convnext(seed: int = 0):
    """timm's smallest ConvNeXt (atto) at 32 px, the third family of the sharding table."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=NUM_LABELS)


FAMILIES = {"vit": vit, "resnetv2": resnet, "convnext": convnext}

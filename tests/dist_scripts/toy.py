"""A tiny learnable multi-label problem and tiny timm models, shared by the trainer tests and launched scripts."""

from __future__ import annotations

import torch

from scaling.data.dataset import split_key

NUM_LABELS = 3
IMG = 32


class ToyDataset(torch.utils.data.Dataset):
    """Noise images; label l is positive when channel l carries a bright square (learnable); ~15 % NaN labels.

    ``multiclass``: the target is a class index (the first positive label's); ``unlabelled`` of them are -1."""

    def __init__(self, n: int, seed: int = 0, nan_fraction: float = 0.15, multiclass: bool = False,
                 unlabelled: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, IMG, IMG, generator=g) * 0.5
        self.targets = (torch.rand(n, NUM_LABELS, generator=g) < 0.4).float()
        for l in range(NUM_LABELS):
            self.images[:, l, 8:24, 8:24] += 1.5 * self.targets[:, l, None, None]
        self.labels = self.targets.argmax(1)
        self.multiclass = multiclass
        if nan_fraction > 0:
            self.targets[torch.rand(n, NUM_LABELS, generator=g) < nan_fraction] = float("nan")
        if unlabelled > 0:
            self.labels[torch.rand(n, generator=g) < unlabelled] = -1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        i, _ = split_key(key)  # training keys are (position, draw_seed); the toy images are not augmented
        target = self.labels[i] if self.multiclass else self.targets[i]
        return {"image": self.images[i], "target": target, "index": int(i) * 10 + 3}


IMAGE_LABELS = ("Edema", "Fracture", "Nodule")


class SigtermAt:
    """Tracker double that sends this process a real SIGTERM (as SLURM preempts) while step ``at - 1`` is logged.

    The Trainer agrees on signals at its sync points (every ``log_every`` steps, without a host read in between),
    so with ``log_every=1`` the run stops and checkpoints at step ``at``."""

    run_id = "run-1"

    def __init__(self, at: int):
        self.at = at

    def log(self, data, step):
        if step == self.at - 1:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


class Payload:
    """A pickle an attacker could plant: unpickling it creates the file ``marker`` (instead of doing harm)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker) -> None:
    """Overwrite ``path`` with a :class:`Payload` pickle: ``torch.save`` format for ``.pt``/``.distcp``, else raw."""
    import pickle
    from pathlib import Path

    path = Path(path)
    if path.suffix in (".pt", ".distcp"):
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def write_image_table(directory, n: int, seed: int = 0, source: int = 40):
    """``n`` 8-bit grayscale PNGs of ``source`` px and their sample table (``TableDataset`` input).

    Label ``l`` is positive when band ``l`` of the image (a third of its height) holds a bright block, which
    survives the training augmentation (75-100 % crops, 7 degree rotations); ~15 % of labels are missing.
    """
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    band = source // 3
    rows = []
    for i in range(n):
        img = rng.normal(90, 25, (source, source))
        y = (rng.random(len(IMAGE_LABELS)) < 0.4).astype(float)
        for l, positive in enumerate(y):
            if positive:
                img[l * band + 2:(l + 1) * band - 2, source // 4:3 * source // 4] += 110
        y[rng.random(len(IMAGE_LABELS)) < 0.15] = np.nan
        path = directory / f"img{i:04d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(path)
        rows.append((f"s{i}", f"p{i}", str(path), *y))
    return pd.DataFrame(rows, columns=["sample_id", "patient_id", "path", *(f"label:{l}" for l in IMAGE_LABELS)])


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

"""Host → device: integer images from the DataLoader become normalised float tensors on the accelerator.

Datasets return images as ``uint8`` (8-bit sources) or ``uint16`` (16-bit PNG / DICOM) ``[C, H, W]`` tensors after
augmentation (``scaling.data.dataset``): a quarter (uint8) or half (uint16) of the bytes of float32 through the
DataLoader's worker-to-main-process queue, pinned memory and the host→device copy, and the 1 → 3 channel expansion
of grayscale X-rays is a free ``expand`` on the device instead of 3x the bytes on the host. :func:`to_device` does
the rest on the device:

1. ``.to(device, non_blocking=True)``: asynchronous when the batch is in pinned memory, which the Trainer's
   DataLoaders request on CUDA (:func:`pin_memory`);
2. float32 in [0, 1] by the dtype's range (``/ 255`` or ``/ 65535``), the same arithmetic as the host-side
   ``scaling.data.images.to_float``;
3. the channels the model takes (:func:`scaling.models.input_channels`): 1 → N is a view; 3 → 1 (an RGB image for a
   model built with ``in_chans: 1``) is the luma of ITU-R 601, the weights Pillow's ``convert("L")`` uses, so it
   matches decoding the image as grayscale;
4. ``(x - mean) / std`` with the dataset's ``mean`` / ``std`` (``torchvision.transforms.v2.Normalize``'s arithmetic);
5. optionally ``channels_last`` memory format (NHWC), which convolutional backbones run faster in on recent GPUs
   when the model is converted too (PyTorch tutorial "Channels Last Memory Format").

Floating-point batches pass through steps 1 and 5 only: they come from datasets that normalise themselves
(synthetic benchmarks, tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_RANGE = {torch.uint8: 255.0, torch.uint16: 65535.0}


@dataclass(frozen=True)
class Normalisation:
    """Per-channel input normalisation of a dataset: ``(x - mean) / std`` on [0, 1] pixels."""

    mean: tuple[float, ...]
    """Per-channel mean (3 values, or 1 for every channel)."""
    std: tuple[float, ...]
    """Per-channel standard deviation (same length as ``mean``)."""

    def __post_init__(self):
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ValueError(f"mean {self.mean} and std {self.std} must both have 1 or 3 values")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std {self.std} must be > 0")

    def for_channels(self, channels: int) -> Normalisation:
        """The statistics for ``channels`` image channels: these, or the one value of equal per-RGB-channel ones for
        a 1-channel model. Different per-channel values have no 1-channel equivalent: an error naming them."""
        if len(self.mean) in (1, channels):
            return self
        if channels == 1 and len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            return Normalisation(self.mean[:1], self.std[:1])
        raise ValueError(f"the dataset's mean {self.mean} and std {self.std} have one value per RGB channel, but the "
                         f"model takes {channels} channel(s); give the dataset one mean and one std value")

    @classmethod
    def of(cls, dataset) -> Normalisation | None:
        """The dataset's ``mean`` / ``std`` attributes, or None when it has none (it then returns float images)."""
        mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        if mean is None or std is None:
            return None
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))


@functools.lru_cache(maxsize=16)
def _stats(norm: Normalisation, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (dataset statistics, device): a fresh host tensor per batch would be a synchronous copy on CUDA.
    return (torch.tensor(norm.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(norm.std, device=device).view(1, -1, 1, 1))


LUMA = (0.299, 0.587, 0.114)
"""RGB → gray weights (ITU-R 601-2 luma; Pillow's ``Image.convert("L")``)."""


@functools.lru_cache(maxsize=16)
def _luma(device: torch.device) -> torch.Tensor:
    return torch.tensor(LUMA, device=device).view(1, 3, 1, 1)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return x.expand(-1, channels, -1, -1)
    if have == 3 and channels == 1:
        return (x * _luma(x.device)).sum(1, keepdim=True)
    raise ValueError(f"images with {have} channels cannot feed a model that takes {channels} (1 → N and RGB → gray "
                     f"are converted; nothing else is)")


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders feeding ``device`` should pin their batches (only CUDA copies asynchronously from them)."""
    return device.type == "cuda"


def to_device(images: torch.Tensor, device: torch.device, norm: Normalisation | None, *, channels: int = 3,
              channels_last: bool = False) -> torch.Tensor:
    """A batch ``[B, C, H, W]`` of images on ``device`` as normalised float32 with ``channels`` channels.

    Integer batches (uint8 / uint16) are scaled to [0, 1] by their dtype's range, brought to ``channels`` channels
    (1 → N expanded, RGB → gray by :data:`LUMA`) and normalised with ``norm`` (required for them; equal RGB values
    serve a 1-channel model, :meth:`Normalisation.for_channels`); float batches are moved as they are.
    """
    x = images.to(device, non_blocking=True)
    if not x.is_floating_point():
        if x.dtype not in _RANGE:
            raise TypeError(f"images of dtype {x.dtype}: datasets return uint8, uint16 or normalised float images")
        if norm is None:
            raise ValueError(f"{x.dtype} images need the dataset's mean and std (attributes .mean/.std) to be "
                             f"normalised on the device")
        x = _to_channels(x.float().div_(_RANGE[images.dtype]), channels)
        mean, std = _stats(norm.for_channels(channels), x.device)
        x = (x - mean).div_(std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x

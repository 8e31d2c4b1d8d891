"""Torch datasets: multi-label or one-of-K samples from a sample table, and single-label ImageFolder data for
pretraining.

Items are dicts ``{"image": uint8 | uint16 Tensor[C, H, W], "target": ..., "index": int}``: pixels after augmentation,
not normalised, as stored in the image cache (uint8 for 8-bit sources, uint16 for 16-bit PNG and DICOM, full range),
with the dataset's channels (1 for grayscale). ``scaling.engine.inputs.to_device`` turns a batch into normalised
float with the model's channels (3, or 1 for ``in_chans: 1``) on the accelerator, with the dataset's ``mean`` /
``std``: 4x fewer bytes than float32 through the DataLoader and the host→device copy. ``index`` is the row
position in the table (or file list); the trainer gathers indices across ranks and drops the duplicates that
distributed padding creates, then maps indices back to ``sample_id`` / ``patient_id``.

Keys: ``ds[i]`` (an int) is the sample without randomness (evaluation); ``ds[(i, draw_seed)]`` is the training view,
augmented from a generator seeded with ``draw_seed`` (the trainer's sampler derives it from the run seed, the step
and the slot in the global batch). No sample ever draws from a global RNG, so a resumed run, or one with more
DataLoader workers, sees the same pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from scaling.data.images import (
    BIT_MEAN,
    BIT_STD,
    CacheReport,
    ImageCache,
    bad_image_error,
    build_transform,
    check_images,
    check_on_bad_image,
    decode,
    quantise,
    table_kind,
)
from scaling.data.labels import class_targets, select_labels
from scaling.data.table import LABEL_PREFIX, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


def _tensor(a: np.ndarray) -> torch.Tensor:
    # Pillow's arrays are read-only views; a tensor over them would warn and must not be written to.
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def split_key(key) -> tuple[int, int | None]:
    """``(position, draw_seed)`` of a dataset key: an int (``draw_seed`` None: no randomness) or such a pair."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"a dataset key is an int or a (position, draw_seed) pair, got {key!r}")
        return int(key[0]), int(key[1])
    return int(key), None


def prepare_table(
    table: pd.DataFrame,
    image_size: int,
    cache_dir: str | Path | None = None,
    on_bad_image: str = "error",
    num_workers: int = 0,
) -> tuple[pd.DataFrame, ImageCache | None, list[str]]:
    """Cache (or, without a cache, check when skipping) the images of ``table`` before building a dataset.

    Returns ``(kept_table, cache_or_None, skipped_sample_ids)``. With ``cache_dir`` the images are decoded once
    into an :class:`ImageCache`; without it and ``on_bad_image='skip'`` every image is decoded once to find
    unreadable ones; without it and ``'error'`` nothing is read up front (a bad image raises, naming the file and
    sample id, when first loaded).
    """
    check_on_bad_image(on_bad_image)
    if cache_dir is not None:
        cache = ImageCache(cache_dir, image_size)
        report: CacheReport = cache.build(table, on_bad_image, num_workers)
        kept = table[~table["sample_id"].isin(set(report.skipped))].reset_index(drop=True)
        return kept, cache, report.skipped
    if on_bad_image == "skip":
        kept, skipped = check_images(table, "skip")
        return kept, None, skipped
    return table.reset_index(drop=True), None, []


TASKS = ("multilabel", "multiclass")
"""What a :class:`TableDataset` target is: a multi-hot float vector, or a one-of-K class index."""


class TableDataset(Dataset):
    """Dataset over a sample table. ``task='multilabel'``: ``target`` is FloatTensor[L] with NaN where a label is
    missing. ``task='multiclass'``: ``labels`` are K mutually exclusive classes and ``target`` is a LongTensor scalar,
    the class index (:func:`scaling.data.labels.class_targets`; -1 = no class label, excluded from the loss).

    With ``cache_dir`` the images are decoded and resized once into an :class:`ImageCache` there (shared by every
    table of a study) and read from it; otherwise they are decoded on every access. ``on_bad_image='skip'`` drops
    unreadable images up front: ``n_skipped`` / ``skipped`` say which, for the run's metadata, and ``table`` holds
    the rows actually served (``index`` in every item is a row position of ``table``). ``channels`` (1 or 3)
    defaults to the table's (:func:`~scaling.data.images.table_kind`); ``flip`` enables horizontal flips
    (dermatology, not chest X-ray); ``augment``
    picks the training views (``light`` or ``bit``: :class:`~scaling.data.images.ImageTransform`), and under
    ``bit`` a training dataset decodes and caches its images at ``resize`` (default: BiT's ratio,
    ``scaling.config.bit_resize``) and crops ``image_size`` out of them. ``mean`` /
    ``std`` normalise [0, 1] pixels on the device (the trainer reads them from the dataset). ``keep_labels`` are
    label columns kept in ``table`` beside ``labels`` without being trained on (derived labels, scored from the
    predictions). ``shuffle`` > 0 block-shuffles every image it serves, training views and keys without a draw seed
    alike, with the one permutation of ``shuffle_seed`` (a block-shuffled cell passes its run seed;
    docs/analysis.md).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        labels: Sequence[str],
        image_size: int,
        train: bool = False,
        cache_dir: str | Path | None = None,
        on_bad_image: str = "error",
        num_workers: int = 0,
        mean: Sequence[float] = BIT_MEAN,
        std: Sequence[float] = BIT_STD,
        flip: bool = False,
        channels: int | None = None,
        task: str = "multilabel",
        keep_labels: Sequence[str] = (),
        augment: str = "light",
        resize: int | None = None,
        shuffle: int = 0,
        shuffle_seed: int = 0,
    ):
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not one of {list(TASKS)}")
        self.image_size = int(image_size)
        self.transform = build_transform(self.image_size, train, flip, augment, resize, shuffle, shuffle_seed)
        self.load_size = self.transform.load_size
        """The square size images are decoded and cached at: ``image_size``, or BiT's ``resize`` for its training
        views (a store of its own in the cache, ``<resize>px``)."""
        kept, self.cache, self.skipped = prepare_table(table, self.load_size, cache_dir, on_bad_image, num_workers)
        self.table = select_labels(kept, [*labels, *keep_labels])
        self.labels, self.task = list(labels), task
        if task == "multiclass":
            self.targets = torch.from_numpy(class_targets(self.table, self.labels))
            if train:
                self._warn_outside_classes()
        else:
            self.targets = torch.tensor(self.table[[LABEL_PREFIX + n for n in self.labels]].to_numpy(np.float32))
        self.sample_ids = self.table["sample_id"].astype(str).tolist()
        self.paths = self.table["path"].astype(str).tolist()
        # Without a cache, every image is quantised like the cache would store it: to the table's kind.
        self.dtype = np.dtype(np.uint8)
        if self.cache is None and self.paths:
            probed_channels, self.dtype = table_kind(self.paths)
            channels = channels or probed_channels
        self.channels = channels or 1
        self.mean, self.std = tuple(mean), tuple(std)

    def _warn_outside_classes(self) -> None:
        """Training samples that carry labels but no class (known 0s, no 1) belong to none of the K classes as far
        as the data says: they train nothing, which should not pass unnoticed."""
        y = self.table[[LABEL_PREFIX + n for n in self.labels]].to_numpy(dtype=float)
        outside = int(((self.targets < 0).numpy() & ~np.isnan(y).all(axis=1)).sum())
        if outside:
            log.warning("%d of %d training samples have labels but no positive class among %s: not one of the "
                        "K classes, excluded from the loss", outside, len(y), self.labels)

    @property
    def n_skipped(self) -> int:
        """Number of unreadable images dropped under ``on_bad_image='skip'``."""
        return len(self.skipped)

    def __len__(self) -> int:
        """Number of samples (rows of ``table``)."""
        return len(self.sample_ids)

    def load_pixels(self, i: int) -> torch.Tensor:
        """Row ``i``'s image, uint8 or uint16 ``(C, load_size, load_size)``, before the transform.

        From the cache, or decoded and quantised exactly as the cache stores it (so both give the same pixels).
        """
        if self.cache is not None:
            return torch.from_numpy(self.cache.read(self.paths[i]))
        try:
            return _tensor(quantise(decode(self.paths[i], self.load_size, self.channels), self.dtype))
        except Exception as e:  # name the file and sample of any decoder failure
            raise bad_image_error(self.paths[i], self.sample_ids[i], e) from e

    def __getitem__(self, key) -> dict:
        """``{"image": uint8/uint16 Tensor[C, H, W], "target": FloatTensor[L] (NaN = unlabelled) or a class index
        (-1 = unlabelled), "index": i}`` for key ``i`` or ``(i, draw_seed)`` (see the module docstring)."""
        i, seed = split_key(key)
        return {"image": self.transform(self.load_pixels(i), seed), "target": self.targets[i], "index": i}


class ImageFolderDataset(Dataset):
    """Single-label dataset over ``root/<class>/<image>`` (upstream pretraining): ``target`` is a LongTensor scalar.

    Classes are the sorted sub-directory names; images are decoded as RGB on every access (pretraining images are
    small and generated at the training resolution) and served as uint8 (16-bit sources are quantised to 8 bits).
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        train: bool = True,
        mean: Sequence[float] = BIT_MEAN,
        std: Sequence[float] = BIT_STD,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"image folder {self.root} has no class sub-directories")
        self.samples: list[tuple[Path, int]] = [
            (p, c)
            for c, name in enumerate(self.classes)
            for p in sorted((self.root / name).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise DataError(f"image folder {self.root} has no images (suffixes {IMAGE_SUFFIXES})")
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = build_transform(self.image_size, train, flip=True)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        """``{"image": uint8 Tensor[3, H, W], "target": LongTensor scalar (class index), "index": i}`` for key ``i``
        or ``(i, draw_seed)`` (see the module docstring)."""
        i, seed = split_key(key)
        path, cls = self.samples[i]
        try:
            pixels = _tensor(quantise(decode(path, self.image_size, channels=3), np.uint8))
        except Exception as e:  # name the file of any decoder failure
            raise bad_image_error(path, f"{self.classes[cls]}/{path.name}", e) from e
        return {"image": self.transform(pixels, seed), "target": torch.tensor(cls, dtype=torch.long), "index": i}

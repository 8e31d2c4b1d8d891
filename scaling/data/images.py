"""Image decoding, train/eval transforms, and the preprocessed memory-mapped cache.

Decoding (:func:`decode`) returns a channels-first array resized to the target resolution:

* 8-bit JPEG/PNG (``L``/``RGB``) stay ``uint8`` (value / 255 is the intensity); resizing runs in Pillow on the
  8-bit image, and JPEGs are decoded with DCT scaling (``Image.draft``) when the target is much smaller, which cuts
  decode time several-fold at no visible cost once we downsample anyway;
* 16-bit PNG and DICOM (``.dcm``/``.dicom``, through ``scaling.data.dicom.read_dicom``) become ``float32`` in
  [0, 1] by per-image min-max: the bit depth actually used (10/12/14/16) varies by scanner and a PNG does not
  record it, so a fixed divisor would leave many images nearly black.

The resize squashes to a square ``size x size`` (CheXpert-style pipelines resize rather than crop, so findings at
the image border are kept).

The cache (:class:`ImageCache`) stores each image decoded and resized once, as ``uint8`` (8-bit sources) or
``uint16`` (16-bit/DICOM sources), in a numpy memmap of shape ``(N, C, size, size)`` plus a Parquet index of
samples (``sample_id``, source path, byte size, mtime). One cache directory holds one such store per resolution
and kind of image (``<size>px/gray-uint8``, ``<size>px/rgb-uint8``, ``<size>px/gray-uint16``; the kind of a table
is the majority of a sample of its image headers, :func:`table_kind`), so a colour dataset is never squeezed into a
grayscale store nor a 16-bit one into 8 bits, and launches at two resolutions sharing one cache directory never rebuild (and delete) each other's store.
BiT's augmentation (``augment='bit'``) caches training images at its resize (``<resize>px``), larger than the crop,
and evaluation images at the crop size: two resolutions, two stores.
Entries are looked up by the sample's absolute source path: sample ids are unique only within one dataset
(CheXpert and CheXpert-small, or two synthetic sites, share ids), while one store serves every dataset of a study.
An entry is reused only when path, size and mtime all match; otherwise the image is decoded again. Decoding every
time costs a full-resolution decode per sample per epoch; the cache costs one memmap row read
(``benchmarks/dataloader.py`` measures both).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from PIL import Image
from torchvision.transforms.v2 import functional as F

from scaling.config import bit_resize
from scaling.data.table import DataError
from scaling.io import atomic_write_json, atomic_write_parquet, check_free_space, write_error

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""Suffixes decoded by Pillow without looking for a DICOM header."""
BAD_IMAGE_POLICIES = ("error", "skip")
BIT_MEAN = (0.5, 0.5, 0.5)
BIT_STD = (0.5, 0.5, 0.5)
"""BiT's input normalisation: pixels in [0, 1] → [-1, 1] (big_transfer ``preprocess``)."""
_COLOUR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV")
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
CACHE_VERSION = 1
_COPY_CHUNK = 4096  # rows copied at a time from an old store: bounds memory on 100k-image stores
_PROGRESS_EVERY = 5000


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=False)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _resize_float(a: np.ndarray, size: int | None) -> np.ndarray:
    """Resize a (H, W) float32 image with Pillow's antialiasing bilinear filter (mode ``F``)."""
    if size is None or a.shape == (size, size):
        return a
    return np.array(Image.fromarray(a, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)


def _is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the ``DICM`` magic for files with another or no suffix (never for PNG/JPEG)."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in PIL_SUFFIXES:
        return False
    from scaling.data.dicom import is_dicom

    return is_dicom(path)


def _decode_dicom(path: Path, size: int | None, channels: int) -> np.ndarray:
    # Deferred import: pydicom is needed only for DICOM datasets.
    from scaling.data.dicom import dicom_kind, read_dicom

    a = np.asarray(read_dicom(path), dtype=np.float32)
    if a.ndim == 3:  # colour DICOM (ISIC ships dermoscopy as DICOM too): (H, W, 3) RGB
        # One scale for all three planes (the stored bit depth), never a per-plane min-max, which shifts hues.
        scale = float(2 ** dicom_kind(path)[1] - 1)
        planes = [_resize_float(np.clip(a[..., c] / scale, 0.0, 1.0), size) for c in range(a.shape[-1])]
        out = np.stack(planes)
        return out if channels == 3 else out.mean(axis=0, keepdims=True)
    out = _resize_float(_minmax(a), size)[None]
    return np.repeat(out, 3, axis=0) if channels == 3 else out


def decode(path: str | Path, size: int | None = None, channels: int = 1) -> np.ndarray:
    """Decode an image to a ``(channels, size, size)`` array (``(channels, H, W)`` when ``size`` is None).

    ``uint8`` for 8-bit sources, ``float32`` in [0, 1] for 16-bit PNG and DICOM (see the module docstring).
    An unreadable file is a DataError naming it.
    """
    path = Path(path)
    if _is_dicom(path):
        return _decode_dicom(path, size, channels)  # read_dicom's errors already name the file
    try:
        return _decode_pillow(path, size, channels)
    except Exception as e:  # Pillow's format plugins raise OSError, SyntaxError, ValueError, struct.error ...
        raise DataError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from e


def _decode_pillow(path: Path, size: int | None, channels: int) -> np.ndarray:
    with Image.open(path) as im:
        png = im.format == "PNG"
        a = _pixels(im, size, channels)
    if png:  # after decoding, so that a truncated file keeps the decoder's own message
        _verify_png(path)
    return a


def _pixels(im: Image.Image, size: int | None, channels: int) -> np.ndarray:
    mode = "RGB" if channels == 3 else "L"
    if im.mode in _HIGH_DEPTH_MODES:
        a = _resize_float(_minmax(np.asarray(im, dtype=np.float32)), size)[None]
        return np.repeat(a, 3, axis=0) if channels == 3 else a
    if size is not None and im.format == "JPEG":
        im.draft(mode, (size, size))
    im = im.convert(mode)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if channels == 1 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _verify_png(path: Path) -> None:
    """Check every chunk checksum of a PNG up to its ``IEND`` (Pillow's ``verify``, on a fresh open).

    Pillow's decoder skips the checksums of the image data and stops quietly at a broken chunk after it, so a PNG
    whose tail is zero-filled (an interrupted copy, a preallocated download) decodes as a partly black image. The
    check reads the file once more but inflates nothing: about 5 % of a decode.
    """
    with Image.open(path) as im:
        try:
            im.verify()
        except Exception as e:  # SyntaxError for a bad checksum, OSError for a missing IEND
            raise OSError(f"damaged PNG: {type(e).__name__}: {e}") from e


def to_float(a: np.ndarray) -> np.ndarray:
    """Decoded/cached pixels as float32 in [0, 1] (uint8 / 255, uint16 / 65535, floats unchanged)."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    return a.astype(np.float32, copy=False)


def quantise(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Store decoded pixels as ``dtype`` (uint8/uint16); exact for a uint8 source stored as uint8."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    scale = float(np.iinfo(dtype).max)
    return np.clip(np.rint(to_float(a) * scale), 0, scale).astype(dtype)


def probe(path: str | Path) -> tuple[int, np.dtype]:
    """(channels, cache dtype) for a source image, from its header only: RGB → 3, 16-bit/DICOM → uint16."""
    path = Path(path)
    if _is_dicom(path):
        from scaling.data.dicom import dicom_kind

        channels, bits = dicom_kind(path)
        return channels, np.dtype(np.uint8 if channels == 3 and bits <= 8 else np.uint16)
    try:
        with Image.open(path) as im:
            channels = 3 if im.mode in _COLOUR_MODES else 1
            return channels, np.dtype(np.uint16 if im.mode in _HIGH_DEPTH_MODES else np.uint8)
    except Exception as e:  # as in decode
        raise DataError(f"{path}: cannot read image header: {type(e).__name__}: {e}") from e


def bad_image_error(path, sample_id, exc: BaseException) -> DataError:
    """The error for an unreadable image: names the file and the sample id."""
    return DataError(f"cannot read image {path} (sample {sample_id!r}): {_failure(path, exc)}")


def _failure(path, exc: BaseException) -> str:
    """What went wrong reading ``path``, without the path when ``exc`` is a DataError that starts with it."""
    text = str(exc)
    if isinstance(exc, DataError) and text.startswith(f"{path}: "):
        return text[len(f"{path}: "):]
    return f"{type(exc).__name__}: {exc}"


def check_on_bad_image(policy: str) -> None:
    """Validate an ``on_bad_image`` value."""
    if policy not in BAD_IMAGE_POLICIES:
        raise DataError(f"on_bad_image={policy!r} is not allowed; choose one of {list(BAD_IMAGE_POLICIES)}")


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


CROP_SCALE = (0.75, 1.0)
"""Random resized crop: fraction of the image area kept."""
CROP_RATIO = (0.9, 1.1)
"""Random resized crop: aspect ratio range (near-square)."""
ROTATION_DEGREES = 7.0
"""Random rotation: uniform in ``[-7, 7]`` degrees."""


def crop_params(height: int, width: int, generator: torch.Generator, scale=CROP_SCALE,
                ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop, drawn from ``generator``.

    The same draws, in the same order, as torchvision 0.29's ``v2.RandomResizedCrop.make_params`` (10 tries of area
    and log-aspect, then a centre crop clamped to ``ratio``), so with a generator seeded like the global RNG the crop
    is torchvision's.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision computes it
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


AUGMENTS = ("light", "bit")
"""Training augmentations (``data.augment``): the library's ``light`` one, or BiT's resize + random crop (``bit``)."""


def random_crop_params(height: int, width: int, crop: int, generator: torch.Generator) -> tuple[int, int]:
    """``(top, left)`` of a uniformly random ``crop x crop`` window in a ``height x width`` image, from ``generator``.

    The draws of torchvision 0.29's ``v2.RandomCrop.make_params`` without padding: ``randint(0, height - crop + 1)``
    for the top, then ``randint(0, width - crop + 1)`` for the left, each drawn only when that side is longer than
    the crop (a crop of the full side draws nothing), so with a generator seeded like the global RNG the window is
    torchvision's.
    """
    if crop > height or crop > width:
        raise ValueError(f"a {crop}x{crop} crop does not fit a {height}x{width} image")
    top = int(torch.randint(0, height - crop + 1, size=(), generator=generator)) if height > crop else 0
    left = int(torch.randint(0, width - crop + 1, size=(), generator=generator)) if width > crop else 0
    return top, left


def _hflip(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint16:  # torch < 2.14 has no CPU flip for uint16: flip the same bits as int16
        return F.horizontal_flip(image.view(torch.int16)).view(torch.uint16)
    return F.horizontal_flip(image)


def block_permutation(n_blocks: int, seed: int) -> torch.Tensor:
    """The permutation of ``n_blocks`` blocks that seed ``seed`` stands for: ``torch.randperm`` from a generator of
    its own seeded with ``seed``, so it is the same on every rank, DataLoader worker and launch, and independent of
    every other draw of the run."""
    return torch.randperm(int(n_blocks), generator=torch.Generator().manual_seed(int(seed)))


def block_shuffle(image: torch.Tensor, block: int, permutation: torch.Tensor) -> torch.Tensor:
    """``image`` (``(C, H, W)``, any dtype) cut into ``block x block`` blocks, read in row-major order, and put back
    with block ``permutation[j]`` at position ``j``: Neyshabur, Sedghi & Zhang 2020's block shuffling (their
    ``RandomBlockShuffle``, google-research/understanding-transfer-learning ``libdata/utils.py``, which gathers
    ``blocks[..., perm]`` the same way). Every channel moves together; the pixels are moved, never changed, so a
    uint8/uint16 image keeps its exact values. ``block`` must divide ``H`` and ``W``; a block of the whole image is
    the identity."""
    c, h, w = image.shape
    if h % block or w % block:
        raise ValueError(f"a {block}x{block} block does not tile a {h}x{w} image")
    blocks = rearrange(image, "c (nh bh) (nw bw) -> (nh nw) c bh bw", bh=block, bw=block)
    return rearrange(blocks[permutation], "(nh nw) c bh bw -> c (nh bh) (nw bw)", nh=h // block)


class ImageTransform:
    """Geometry of the train/eval pipeline on a ``(C, H, W)`` image, with randomness only from an explicit seed.

    ``transform(image)`` (or ``seed=None``, or ``train=False``) resizes to ``image_size`` if needed and draws nothing.
    ``transform(image, seed)`` with ``train=True`` augments, drawing from ``torch.Generator().manual_seed(seed)``:

    * ``augment='light'`` (the default): a random resized crop covering 75-100 % of the image with near-square
      aspect, back to ``image_size``, a rotation of up to 7 degrees (nearest neighbour, black corners) and, with
      ``flip``, a horizontal flip half of the time;
    * ``augment='bit'``: BiT's fine-tuning views (big_transfer ``bit_pytorch/train.py``: ``Resize((precrop,
      precrop))``, ``RandomCrop((crop, crop))``, ``RandomHorizontalFlip()``): the image squashed to ``resize x
      resize`` (a no-op for an image cached at that size), a uniformly random ``image_size`` window of it, no
      rescaling and no rotation, and, with ``flip``, a horizontal flip half of the time. Evaluation is BiT's too:
      the image resized to ``image_size``.

    Why not torchvision's ``v2.RandomResizedCrop`` / ``v2.RandomRotation`` / ``v2.RandomCrop``: they draw from the
    process-global RNG, so what a sample gets depends on everything drawn before it in that process (the order of a
    resume, the number of DataLoader workers). The draws here are theirs, made from the sample's own generator; tests
    check that ``torch.manual_seed(s)`` + the torchvision pipeline gives the same pixels as ``transform(image, s)``.
    Horizontal flips are off by default, under both augmentations, because chest anatomy is not mirror-symmetric (the
    heart is on the left); turn ``flip`` on for dermatology.

    ``shuffle`` > 0 block-shuffles every output, training view and evaluation image alike, as the last step (after
    the crop, on the integer pixels, before any normalisation): the ``image_size`` image is cut into ``shuffle x
    shuffle`` blocks, permuted by :func:`block_permutation` of ``shuffle_seed`` (:func:`block_shuffle`). The
    permutation is one per transform, the same for every image, as in Neyshabur et al. 2020's code (one
    ``RandomBlockShuffle`` per run, applied to the training and the test images): it draws nothing from a view's
    generator, so a view's crop, rotation and flip are those of the unshuffled cell of the same seed.
    """

    def __init__(self, image_size: int, train: bool, flip: bool = False, augment: str = "light",
                 resize: int | None = None, shuffle: int = 0, shuffle_seed: int = 0):
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r} is not one of {list(AUGMENTS)}")
        if shuffle < 0 or (shuffle and int(image_size) % shuffle):
            raise ValueError(f"shuffle={shuffle} is not a block size that divides image_size={image_size}")
        self.shuffle = int(shuffle)
        """Side of the blocks permuted (0: no block shuffling)."""
        self.permutation = block_permutation((int(image_size) // shuffle) ** 2, shuffle_seed) if shuffle else None
        """Block ``permutation[j]`` of an image lands at position ``j`` (row-major); None without shuffling."""
        self.image_size, self.train, self.flip, self.augment = int(image_size), bool(train), bool(flip), augment
        if resize is None:
            resize = bit_resize(self.image_size) if augment == "bit" else self.image_size
        self.resize = int(resize)
        """The square size BiT's random crop is taken from (``augment='bit'`` only; default BiT's ratio,
        :func:`scaling.config.bit_resize`)."""
        if augment == "bit" and self.resize < self.image_size:
            raise ValueError(f"resize={self.resize} is smaller than the {self.image_size}px crop")

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The transformed ``(C, image_size, image_size)`` image, of the input's dtype."""
        out = self._geometry(image, seed)
        return out if self.permutation is None else block_shuffle(out, self.shuffle, self.permutation)

    def _geometry(self, image: torch.Tensor, seed: int | None) -> torch.Tensor:
        size = [self.image_size, self.image_size]
        if not self.train or seed is None:
            return image if tuple(image.shape[-2:]) == tuple(size) else F.resize(image, size, antialias=True)
        g = torch.Generator().manual_seed(seed)
        if self.augment == "bit":
            return self._bit(image, g)
        top, left, h, w = crop_params(image.shape[-2], image.shape[-1], g)
        out = F.resized_crop(image, top, left, h, w, size, antialias=True)
        angle = torch.empty(1).uniform_(-ROTATION_DEGREES, ROTATION_DEGREES, generator=g).item()
        out = F.rotate(out, angle)  # torchvision's RandomRotation defaults: nearest neighbour, fill 0
        if self.flip and torch.rand(1, generator=g).item() < 0.5:
            out = _hflip(out)
        return out

    def _bit(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        pre = [self.resize, self.resize]
        if tuple(image.shape[-2:]) != tuple(pre):
            image = F.resize(image, pre, antialias=True)
        top, left = random_crop_params(self.resize, self.resize, self.image_size, g)
        out = F.crop(image, top, left, self.image_size, self.image_size)
        if self.flip and torch.rand(1, generator=g).item() < 0.5:  # RandomHorizontalFlip: flip when rand < p
            out = _hflip(out)
        return out

    @property
    def load_size(self) -> int:
        """The square size images should be decoded (and cached) at for this transform: BiT's ``resize`` for its
        training views, ``image_size`` otherwise."""
        return self.resize if self.train and self.augment == "bit" else self.image_size


def build_transform(image_size: int, train: bool, flip: bool = False, augment: str = "light",
                    resize: int | None = None, shuffle: int = 0, shuffle_seed: int = 0) -> ImageTransform:
    """The train (``train=True``: seeded augmentation) or eval geometry at ``image_size``, block-shuffled with
    ``shuffle`` > 0 (:class:`ImageTransform`)."""
    return ImageTransform(image_size, train, flip, augment, resize, shuffle, shuffle_seed)


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CacheReport:
    """What :meth:`ImageCache.build` did."""

    decoded: int = 0
    """Images decoded in this call."""
    reused: int = 0
    """Images whose cache entry was still valid."""
    skipped: list[str] = field(default_factory=list)
    """Sample ids of unreadable images (only with ``on_bad_image='skip'``)."""
    narrowed: dict[str, list[str]] = field(default_factory=dict)
    """Paths of the images decoded in this call that lost something to the store's kind (:func:`table_kind`), by
    what they lost (``"colour"``, ``"16-bit"``, ``"colour and 16-bit"``)."""

    @property
    def n_skipped(self) -> int:
        """Number of skipped samples (recorded in the run's metadata)."""
        return len(self.skipped)


def _source_stat(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.full(len(paths), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


KIND_SAMPLE = 64
"""How many image headers (spread evenly over a table) decide the kind of its store: see :func:`table_kind`."""


def table_kind(paths: Sequence[str], sample: int = KIND_SAMPLE) -> tuple[int, np.dtype]:
    """Channels and dtype in which a table's images are stored (cached or not), from a sample of their headers.

    Reads the headers of up to ``sample`` readable images spread evenly over ``paths`` (the first and last
    included; always the same ones for one table, so every rank, worker and launch agrees). Each of the two
    properties is the majority of the sample, a tie going to the wider kind (colour, uint16): one odd image at the
    top of an export (a 16-bit PNG before 10^5 8-bit ones, an RGBA screenshot before grayscale radiographs) no
    longer decides for the whole table, as the first image alone did. Images of a minority kind are converted:
    colour to luma, 16-bit to 8 bits after their per-image min-max (see :func:`decode`); a cache build counts them
    and says so (:class:`CacheReport`). Unreadable files are skipped (the decode pass reports them); no readable
    image gives gray uint8.
    """
    unique = list(dict.fromkeys(str(p) for p in paths))
    if not unique:
        return 1, np.dtype(np.uint8)
    spread = np.unique(np.linspace(0, len(unique) - 1, min(sample, len(unique))).round().astype(int)).tolist()
    # Unreadable files are skipped, and the sample is refilled from the rest in table order.
    picked = set(spread)
    order = itertools.chain(spread, (i for i in range(len(unique)) if i not in picked))
    kinds = []
    for i in order:
        if len(kinds) == sample:
            break
        try:
            kinds.append(probe(unique[i]))
        except Exception as e:  # noqa: BLE001 - unreadable images are reported (error or skip) by the decode pass
            log.debug("cannot probe %s: %s", unique[i], e)
    if not kinds:
        return 1, np.dtype(np.uint8)
    colour = sum(c == 3 for c, _ in kinds)
    deep = sum(d == np.uint16 for _, d in kinds)
    channels = 3 if 2 * colour >= len(kinds) else 1
    dtype = np.dtype(np.uint16 if 2 * deep >= len(kinds) else np.uint8)
    if 0 < colour < len(kinds) or 0 < deep < len(kinds):
        log.warning("images of mixed kinds in one table: of %d headers read, %d colour and %d 16-bit/DICOM; storing "
                    "all as %s-%s", len(kinds), colour, deep, "rgb" if channels == 3 else "gray", dtype.name)
    return channels, dtype


def narrowing(path: str | Path, channels: int, dtype: np.dtype) -> str | None:
    """What storing the image at ``path`` as ``channels`` x ``dtype`` drops (``"colour"``, ``"16-bit"``), or None."""
    src_channels, src_dtype = probe(path)
    lost = [*(["colour"] if src_channels > channels else []),
            *(["16-bit"] if np.dtype(src_dtype).itemsize > np.dtype(dtype).itemsize else [])]
    return " and ".join(lost) or None


def _decode_for_cache(args) -> tuple[np.ndarray | None, str | None, str | None]:
    """``(pixels, error, narrowing)`` of one image for the cache."""
    path, size, channels, dtype = args
    try:
        a = quantise(decode(path, size, channels), dtype)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image; the caller decides error vs skip
        return None, _failure(path, e), None
    try:  # a header read, a few percent of a decode
        lost = narrowing(path, channels, dtype)
    except Exception:  # noqa: BLE001 - it decoded, so it is stored; what it lost is only reported
        lost = None
    return a, None, lost


class ImageCache:
    """A memory-mapped store of images decoded and resized once, keyed by sample id (see the module docstring).

    Layout: ``directory/<size>px/<kind>/`` (kind ``gray-uint8``, ``rgb-uint8``, ``gray-uint16`` ...) holds
    ``meta.json`` (resolution, dtype, channels, file names), ``index-<token>.parquet`` (``sample_id, path, size,
    mtime_ns, row, ok``) and ``data-<token>.bin`` (the memmap). Everything that changes the cached bytes (the
    resolution, the channels and the dtype) is in the path, so each build only ever replaces its own store's files.
    A build writes new files and swaps ``meta.json`` last, under a file lock per resolution
    (``directory/<size>px/.lock``), so concurrent processes (DDP ranks, launches sharing a study's store) never read
    a half-built store. Entries for samples not in the current table are kept, so train/val/test, the OOD sets and
    every data fraction share one store per resolution and kind.
    """

    def __init__(self, directory: str | Path, image_size: int):
        self.directory = Path(directory)
        self.image_size = int(image_size)
        self.root = self.directory / f"{self.image_size}px"
        """The stores of this resolution (one per kind of image)."""
        self.store: Path | None = None  # root/<gray|rgb>-<dtype>, chosen by build() from the images' kind
        self._data: np.memmap | None = None
        self._meta: dict | None = None
        self._rows: dict[str, int] | None = None

    # -- state on disk -------------------------------------------------------------------------------------------
    @staticmethod
    @contextmanager
    def _flock(path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _lock(self):
        """The lock of this resolution's stores: builds at another resolution never wait for it."""
        return self._flock(self.root / ".lock")

    def _adopt_old_layout(self) -> None:
        """Move a store of this resolution and kind from where caches kept it before stores were per resolution
        (``directory/<kind>``) to ``directory/<size>px/<kind>`` instead of decoding every image again (a rename:
        hours of decoding saved on a 10^5-image dataset). Under the old layout's lock too, so that a process of an
        older version never sees the store half moved; stores of other resolutions stay where they are."""
        old = self.directory / self.store.name
        if not (old / "meta.json").is_file():
            return
        with self._flock(self.directory / ".lock"), self._lock():
            try:
                meta = json.loads((old / "meta.json").read_text())
            except (OSError, ValueError):
                return
            if meta.get("version") != CACHE_VERSION or meta.get("image_size") != self.image_size \
                    or (self.store / "meta.json").is_file():
                return
            try:
                os.replace(old, self.store)  # onto nothing, or the empty directory a failed build left
            except OSError as e:
                log.warning("image cache: cannot move %s to %s (%s); decoding its images again", old, self.store, e)
                return
            log.info("image cache: moved the %dpx store %s to %s", self.image_size, old, self.store)

    def _read_state(self) -> tuple[dict | None, pd.DataFrame | None]:
        meta_path = self.store / "meta.json"
        if not meta_path.is_file():
            return None, None
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("image_size") != self.image_size:
            return None, None
        if not (self.store / meta["data_file"]).is_file() or not (self.store / meta["index_file"]).is_file():
            return None, None
        index = pd.read_parquet(self.store / meta["index_file"])
        return meta, index.drop_duplicates("path", keep="last")  # stores built before one entry per path

    # -- building ------------------------------------------------------------------------------------------------
    def build(self, df: pd.DataFrame, on_bad_image: str = "error", num_workers: int = 0) -> CacheReport:
        """Make sure every sample of ``df`` (columns ``sample_id``, ``path``) is cached and current.

        ``on_bad_image='error'`` raises a DataError naming the file and sample id of the first unreadable image;
        ``'skip'`` leaves it out and lists it in the report. ``num_workers`` > 0 decodes in that many processes.
        """
        check_on_bad_image(on_bad_image)
        # One entry per source image: a training table repeated to fill a batch (a k-shot or tiny fraction) lists
        # each image several times, and an index holding a path twice misaligns the next build's merge with it.
        unique = df.drop_duplicates("path")
        ids = unique["sample_id"].astype(str).to_numpy()
        paths = unique["path"].astype(str).to_numpy()
        sizes, mtimes = _source_stat(paths)
        channels, dtype = table_kind(paths)
        self.store = self.root / f"{'rgb' if channels == 3 else 'gray'}-{dtype.name}"
        self._adopt_old_layout()
        with self._lock():
            meta, old = self._read_state()
            want = pd.DataFrame({"sample_id": ids, "path": paths, "size": sizes, "mtime_ns": mtimes})
            if old is not None:
                merged = want.merge(old, on="path", how="left", suffixes=("", "_old"))
                valid = (
                    (merged["size"] == merged["size_old"])
                    & (merged["mtime_ns"] == merged["mtime_ns_old"])
                    & (merged["size"] >= 0)
                ).to_numpy()
                old_ok = merged["ok"].eq(True).to_numpy()  # NaN: a path the old index lacks
            else:
                valid = np.zeros(len(ids), dtype=bool)
                old_ok = valid
            report = CacheReport(reused=int((valid & old_ok).sum()))
            stale_bad = valid & ~old_ok  # unchanged files that failed before fail again without a retry
            for i in np.flatnonzero(stale_bad):
                if on_bad_image == "error":
                    raise bad_image_error(paths[i], ids[i], OSError("unreadable (recorded when the cache was built)"))
                report.skipped.append(ids[i])
            todo = np.flatnonzero(~valid)
            if len(todo):
                self._rebuild(meta, old, want, todo, channels, dtype, on_bad_image, num_workers, report)
            self._close()
        if report.skipped:
            log.warning("image cache: skipped %d unreadable image(s), e.g. %s", report.n_skipped, report.skipped[:3])
        for lost, narrowed in report.narrowed.items():
            log.warning("image cache %s: %d image(s) stored without their %s (the table's images are mostly %s), "
                        "e.g. %s", self.store, len(narrowed), lost, self.store.name, narrowed[:3])
        log.info("image cache %s: %d decoded, %d reused", self.store, report.decoded, report.reused)
        return report

    def _rebuild(self, meta, old, want, todo, channels, dtype, on_bad_image, num_workers, report) -> None:
        """Write a new store: the still-valid old entries, then ``todo`` decoded (streamed, never all in memory)."""
        self.store.mkdir(parents=True, exist_ok=True)
        size = self.image_size
        redo = set(want["path"].iloc[todo])
        keep_old = old[~old["path"].isin(redo)].reset_index(drop=True) if old is not None else None
        n_old = 0 if keep_old is None else len(keep_old)
        n = max(n_old + len(todo), 1)
        data_file = f"data-{uuid.uuid4().hex[:12]}.bin"
        data_path = self.store / data_file
        ok = np.zeros(len(todo), dtype=bool)
        nbytes = n * channels * size * size * dtype.itemsize
        # A memmap on a full file system dies by SIGBUS at the first page written, never with an error: check first.
        check_free_space(data_path, nbytes, "image cache")
        try:
            # A raw memmap (shape and dtype live in meta.json) so readers map it without parsing a header.
            data = np.memmap(data_path, dtype=dtype, mode="w+", shape=(n, channels, size, size))
            if n_old:
                old_data = np.memmap(self.store / meta["data_file"], dtype=dtype, mode="r",
                                     shape=(meta["n"], channels, size, size))
                rows = keep_old["row"].to_numpy()
                for lo in range(0, n_old, _COPY_CHUNK):
                    chunk = rows[lo : lo + _COPY_CHUNK]
                    data[lo : lo + len(chunk)] = old_data[chunk]
                del old_data
            stream = self._decode_stream(want["path"].iloc[todo], channels, dtype, num_workers)
            for j, (arr, err, lost) in enumerate(stream):
                i = todo[j]
                if lost is not None:
                    report.narrowed.setdefault(lost, []).append(want["path"].iloc[i])
                if err is not None:
                    if on_bad_image == "error":
                        raise DataError(
                            f"cannot read image {want['path'].iloc[i]} (sample {want['sample_id'].iloc[i]!r}): {err}"
                        )
                    report.skipped.append(want["sample_id"].iloc[i])
                else:
                    data[n_old + j] = arr
                    ok[j] = True
                if (j + 1) % _PROGRESS_EVERY == 0:
                    log.info("image cache %s: decoded %d of %d", self.store, j + 1, len(todo))
            data.flush()
            del data
        except OSError as e:  # file-size limit, quota: name the file and the bytes
            data_path.unlink(missing_ok=True)  # a failed build leaves the previous store untouched
            raise write_error(data_path, e, nbytes, what="cannot write image cache") from e
        except BaseException:
            data_path.unlink(missing_ok=True)
            raise
        new_rows = want.iloc[todo].reset_index(drop=True).copy()
        new_rows["ok"] = ok
        index = pd.concat(([keep_old.drop(columns="row")] if n_old else []) + [new_rows], ignore_index=True)
        index["row"] = np.arange(len(index))
        index_file = f"index-{data_file[5:-4]}.parquet"
        atomic_write_parquet(self.store / index_file, index)
        atomic_write_json(
            self.store / "meta.json",
            {"version": CACHE_VERSION, "image_size": size, "channels": channels, "dtype": dtype.name, "n": n,
             "data_file": data_file, "index_file": index_file},
        )
        for stale in [*self.store.glob("data-*.bin"), *self.store.glob("index-*.parquet")]:
            if stale.name not in (data_file, index_file):
                stale.unlink()
        report.decoded += int(ok.sum())

    def _decode_stream(self, paths: pd.Series, channels: int, dtype: np.dtype, num_workers: int) -> Iterator:
        """Yield ``(array, error)`` per path, in order; in ``num_workers`` processes when > 0."""
        jobs = ((p, self.image_size, channels, dtype) for p in paths)
        if num_workers > 0 and len(paths) > 1:
            with ProcessPoolExecutor(num_workers) as pool:
                yield from pool.map(_decode_for_cache, jobs, chunksize=max(1, min(64, len(paths) // (8 * num_workers))))
        else:
            yield from map(_decode_for_cache, jobs)

    # -- reading -------------------------------------------------------------------------------------------------
    def _close(self) -> None:
        self._data, self._meta, self._rows = None, None, None

    def _open(self) -> None:
        with self._lock():  # a concurrent build swaps the files; never read meta of one build and data of another
            self._open_locked()

    def _open_locked(self) -> None:
        if self.store is None:  # not built by this object: use the only store at this resolution
            stores = [d for d in sorted(self.root.glob("*-uint*")) if (d / "meta.json").is_file()]
            if len(stores) != 1:
                raise DataError(
                    f"image cache {self.root} has {len(stores)} stores at {self.image_size}px; call build() first"
                )
            self.store = stores[0]
        meta, index = self._read_state()
        if meta is None:
            raise DataError(f"image cache {self.store} is not built for {self.image_size}px; call build() first")
        self._meta = meta
        self._data = np.memmap(
            self.store / meta["data_file"], dtype=np.dtype(meta["dtype"]), mode="r",
            shape=(meta["n"], meta["channels"], self.image_size, self.image_size),
        )
        ok = index[index["ok"]]
        self._rows = dict(zip(ok["path"], ok["row"].astype(int)))

    def row(self, path: str) -> int:
        """Row of a cached source image; DataError if it is not cached (or was skipped as unreadable)."""
        if self._rows is None:
            self._open()
        try:
            return self._rows[str(path)]
        except KeyError:
            raise DataError(f"image {path} is not in image cache {self.store}; build() it first") from None

    def read(self, path: str) -> np.ndarray:
        """The cached ``(C, size, size)`` uint8/uint16 array of the image at source ``path``."""
        r = self.row(path)  # opens the store on first use, so look the row up before touching the memmap
        return np.array(self._data[r])

    def __getstate__(self) -> dict:
        # A memmap pickles as a full in-memory copy; DataLoader workers reopen the file instead.
        state = self.__dict__.copy()
        state.update(_data=None, _meta=None, _rows=None)
        return state


def check_images(df: pd.DataFrame, on_bad_image: str = "error") -> tuple[pd.DataFrame, list[str]]:
    """Decode every image of ``df`` once (no cache) and drop or raise on unreadable ones.

    Returns the kept rows and the skipped sample ids. With the cache on, :meth:`ImageCache.build` does this
    for free; this pre-pass is for decode-every-time training with ``on_bad_image='skip'``.
    """
    check_on_bad_image(on_bad_image)
    bad = []
    for sid, p in zip(df["sample_id"], df["path"]):
        try:
            decode(p)
        except Exception as e:  # any decoder failure is a bad image
            if on_bad_image == "error":
                raise bad_image_error(p, sid, e) from e
            bad.append(sid)
    if bad:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[:3])
    return df[~df["sample_id"].isin(set(bad))].reset_index(drop=True), bad

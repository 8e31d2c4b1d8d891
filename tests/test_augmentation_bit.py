"""``data.augment: bit``: BiT's own fine-tuning views (big_transfer ``bit_pytorch/train.py``: ``Resize((precrop,
precrop))``, ``RandomCrop((crop, crop))``, ``RandomHorizontalFlip()``; evaluation ``Resize((crop, crop))``).

Checked against torchvision's transforms under ``torch.manual_seed(s)`` (the same draws, from the sample's own
generator), against crop offsets read back from pixels that encode their own coordinates, for the integer dtypes the
cache stores, and through ``TableDataset``: the training views are cropped from images cached at the resize, the
evaluation images from a store at ``image_size``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from scaling.config import bit_resize
from scaling.data.dataset import TableDataset
from scaling.data.images import build_transform, decode, random_crop_params


def _coded(size: int, channels: int = 1, dtype=torch.uint8) -> torch.Tensor:
    """A ``size x size`` image (``size`` <= 16) whose pixel (r, c) holds ``16 r + c``: a crop's pixels name its
    offsets, and fit in 8 bits."""
    assert size <= 16
    rows = torch.arange(size).view(-1, 1) * 16 + torch.arange(size).view(1, -1)
    return rows.expand(channels, size, size).to(torch.int32).to(dtype).clone()


def test_bit_views_are_torchvisions_resize_random_crop_and_flip_drawn_from_the_samples_seed():
    img = torch.rand(1, 40, 36)  # not square: BiT squashes it to resize x resize first
    reference = v2.Compose([v2.Resize((28, 28), antialias=True), v2.RandomCrop((24, 24)), v2.RandomHorizontalFlip()])
    ours = build_transform(24, train=True, flip=True, augment="bit", resize=28)
    outputs = []
    for s in range(16):
        torch.manual_seed(s)
        expected = reference(img)
        outputs.append(ours(img, s))
        assert torch.equal(outputs[-1], expected), s
    assert len({o.sum().item() for o in outputs}) > 8  # the seeds give different windows and flips
    # without flips: Resize + RandomCrop alone, the same windows
    no_flip = build_transform(24, train=True, augment="bit", resize=28)
    for s in range(8):
        torch.manual_seed(s)
        assert torch.equal(no_flip(img, s), v2.Compose([v2.Resize((28, 28), antialias=True),
                                                        v2.RandomCrop((24, 24))])(img)), s


def test_bit_views_never_read_or_advance_the_global_rng():
    img = _coded(16)
    t = build_transform(10, train=True, flip=True, augment="bit", resize=16)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = t(img, 7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert torch.equal(t(img, 7), a)


def test_crop_offsets_read_back_from_the_pixels_are_the_seeds_uniform_draws():
    img = _coded(10)
    t = build_transform(6, train=True, augment="bit", resize=10)
    seen = np.zeros((5, 5), dtype=int)
    for s in range(500):
        out = t(img, s)
        top, left = divmod(int(out[0, 0, 0]), 16)
        # the view is the 6 x 6 window at (top, left), unscaled and unflipped
        assert torch.equal(out, img[:, top:top + 6, left:left + 6]), s
        # torch.randint(0, 10 - 6 + 1) for the top, then for the left, from the sample's own generator
        g = torch.Generator().manual_seed(s)
        assert (top, left) == (int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g)))
        seen[top, left] += 1
    # pinned: seed 0 draws 4 then 4 from randint(0, 5), seed 1 draws 0 then 4 (torch's CPU generator)
    assert divmod(int(t(img, 0)[0, 0, 0]), 16) == (4, 4) and divmod(int(t(img, 1)[0, 0, 0]), 16) == (0, 4)
    # uniform over the 25 windows: 20 expected each; a count below 5 or above 40 has p < 1e-4 per window
    assert seen.min() >= 5 and seen.max() <= 40, seen
    # a crop the size of the image draws nothing and keeps it whole
    assert random_crop_params(6, 6, 6, torch.Generator().manual_seed(0)) == (0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        random_crop_params(5, 8, 6, torch.Generator())


def test_flips_only_with_flip_and_then_about_half_of_the_views():
    img = _coded(12)
    plain = build_transform(8, train=True, augment="bit", resize=12)
    flipping = build_transform(8, train=True, flip=True, augment="bit", resize=12)
    flipped = 0
    for s in range(200):
        a, b = plain(img, s), flipping(img, s)
        assert int(a[0, 0, 1]) - int(a[0, 0, 0]) == 1  # columns increase: never mirrored without flip
        if torch.equal(b, a.flip(-1)):  # the same window (drawn before the flip), mirrored
            flipped += 1
        else:
            assert torch.equal(b, a), s
    assert 70 <= flipped <= 130, flipped  # Binomial(200, 0.5): outside [70, 130] has p < 3e-5


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16])
@pytest.mark.parametrize("channels", [1, 3])
def test_integer_images_keep_their_dtype_and_values(dtype, channels):
    img = _coded(16, channels)
    if dtype == torch.uint16:
        img = (img.to(torch.int32) * 200).to(torch.uint16)  # values up to 51000: above int16's range
    t = build_transform(12, train=True, flip=True, augment="bit", resize=16)
    for s in range(6):
        out = t(img, s)
        assert out.dtype == dtype and tuple(out.shape) == (channels, 12, 12)
        a = out.to(torch.int32)
        top_left = a[0, 0].min()  # the smallest value of the window's first row is its top-left corner
        top, left = divmod(int(top_left) // (200 if dtype == torch.uint16 else 1), 16)
        window = img[:, top:top + 12, left:left + 12].to(torch.int32)
        assert torch.equal(a, window) or torch.equal(a, window.flip(-1)), s


def test_evaluation_resizes_to_the_crop_size_as_bit_does():
    img = torch.rand(3, 28, 28)
    t = build_transform(24, train=True, flip=True, augment="bit", resize=28)
    ev = build_transform(24, train=False, augment="bit", resize=28)
    want = v2.Resize((24, 24), antialias=True)(img)  # big_transfer's val_tx
    assert torch.equal(t(img), want) and torch.equal(ev(img, 5), want)  # no seed, or not training: no draw
    at_size = torch.rand(1, 24, 24)
    assert ev(at_size) is at_size  # already at the crop size: untouched
    assert t.load_size == 28 and ev.load_size == 24 and build_transform(24, True).load_size == 24


def test_the_resize_must_hold_the_crop_and_the_augmentation_must_exist():
    with pytest.raises(ValueError, match="resize=20 is smaller than the 24px crop"):
        build_transform(24, train=True, augment="bit", resize=20)
    with pytest.raises(ValueError, match=r"augment='autoaugment' is not one of \['light', 'bit'\]"):
        build_transform(24, train=True, augment="autoaugment")


def test_the_default_resize_is_the_papers_448_to_384_ratio():
    assert [bit_resize(c) for c in (384, 48, 32, 24, 96, 224, 480)] == [448, 56, 37, 28, 112, 261, 560]
    with pytest.raises(ValueError):
        bit_resize(0)


def _png_table(tmp_path, n: int = 5, kind: str = "png8") -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = tmp_path / f"{kind}{i}.png"
        if kind == "png16":
            Image.fromarray((rng.random((40, 34)) * 4095).astype(np.uint16)).save(path)
        else:
            Image.fromarray((rng.random((40, 34)) * 255).astype(np.uint8), "L").save(path)
        rows.append((f"s{i}", f"p{i}", str(path), float(i % 2)))
    return pd.DataFrame(rows, columns=["sample_id", "patient_id", "path", "label:Edema"])


@pytest.mark.parametrize("kind", ["png8", "png16"])
def test_training_views_are_cropped_from_images_cached_at_the_resize(tmp_path, kind):
    table = _png_table(tmp_path, kind=kind)
    cache = tmp_path / "cache"
    train = TableDataset(table, ["Edema"], 24, train=True, cache_dir=cache, flip=True, augment="bit")  # resize 28
    test = TableDataset(table, ["Edema"], 24, cache_dir=cache, augment="bit")
    # two stores, one per resolution: the training images at BiT's resize, the evaluation ones at the crop size
    assert train.load_size == 28 and test.load_size == 24
    assert sorted(p.name for p in cache.glob("*px")) == ["24px", "28px"]
    dtype = torch.uint16 if kind == "png16" else torch.uint8
    reference = v2.Compose([v2.RandomCrop((24, 24)), v2.RandomHorizontalFlip()])
    uncached = TableDataset(table, ["Edema"], 24, train=True, flip=True, augment="bit", resize=28)
    for i in range(len(train)):
        pixels = train.load_pixels(i)
        assert tuple(pixels.shape) == (1, 28, 28) and pixels.dtype == dtype
        if kind == "png8":  # the cached pixels are the image decoded at 28 px (BiT's Resize((precrop, precrop)))
            assert torch.equal(pixels, torch.from_numpy(np.array(decode(table.path[i], 28))))
        torch.manual_seed(1000 + i)
        view = train[(i, 1000 + i)]["image"]
        assert view.dtype == dtype and torch.equal(view, reference(pixels))
        assert torch.equal(uncached[(i, 1000 + i)]["image"], view)  # with or without the cache
        assert tuple(test[i]["image"].shape) == (1, 24, 24) and test[i]["image"].dtype == dtype
        # evaluation images come from the 24 px store: one resize from the source, as big_transfer's val_tx
        if kind == "png8":
            assert torch.equal(test[i]["image"], torch.from_numpy(np.array(decode(table.path[i], 24))))
    # the light augmentation is unchanged: its training images are cached at the crop size
    light = TableDataset(table, ["Edema"], 24, train=True, cache_dir=cache)
    assert light.load_size == 24 and tuple(light.load_pixels(0).shape) == (1, 24, 24)

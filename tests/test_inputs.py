"""Integer images to the device: the same model inputs as the float pipeline, up to the cache's quantisation.

The reference is the pipeline before integer images: pixels as float32 in [0, 1] on the host (``to_float``), the
geometry on those floats, 1 -> 3 channels and ``v2.Normalize``. Evaluation (no resampling) must be bit-identical for
8-bit sources; augmentation resamples in the source's integer type, so it may differ by the rounding of one level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from scaling.data.dataset import TableDataset
from scaling.data.images import BIT_MEAN, BIT_STD, to_float
from scaling.engine.inputs import Normalisation, to_device
from scaling.engine.mixup import mixup

CPU = torch.device("cpu")
SIZE = 24


def _table(tmp_path, kind: str, n: int = 6):
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = tmp_path / f"{kind}{i}.png"
        if kind == "png16":
            Image.fromarray((rng.random((30, 28)) * 4095).astype(np.uint16)).save(path)  # 12-bit data
        elif kind == "rgb":
            Image.fromarray((rng.random((30, 28, 3)) * 255).astype(np.uint8), "RGB").save(path)
        else:
            Image.fromarray((rng.random((30, 28)) * 255).astype(np.uint8), "L").save(path)
        rows.append((f"s{i}", f"p{i}", str(path), float(i % 2)))
    return pd.DataFrame(rows, columns=["sample_id", "patient_id", "path", "label:Edema"])


def _float_reference(ds: TableDataset, key) -> torch.Tensor:
    """The float pipeline: [0, 1] floats on the host, the same geometry (and seed), 3 channels, v2.Normalize."""
    i, seed = key if isinstance(key, tuple) else (key, None)
    x = torch.from_numpy(to_float(ds.load_pixels(i).numpy()))
    x = ds.transform(x, seed)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return v2.Normalize(list(ds.mean), list(ds.std))(x)


@pytest.mark.parametrize("kind", ["png8", "rgb", "png16"])
def test_device_inputs_equal_the_float_pipeline_up_to_quantisation(tmp_path, kind):
    table = _table(tmp_path, kind)
    for train in (False, True):
        ds = TableDataset(table, ["Edema"], SIZE, train=train, cache_dir=tmp_path / "cache", flip=True)
        keys = [(i, 1000 + i) for i in range(len(ds))] if train else list(range(len(ds)))
        batch = torch.utils.data.default_collate([ds[k] for k in keys])
        assert batch["image"].dtype == (torch.uint16 if kind == "png16" else torch.uint8)
        got = to_device(batch["image"], CPU, Normalisation.of(ds))
        want = torch.stack([_float_reference(ds, k) for k in keys])
        assert got.shape == want.shape == (len(ds), 3, SIZE, SIZE)
        diff = (got - want).abs().max().item()
        if not train and kind != "png16":
            assert diff == 0.0  # no resampling: the very same arithmetic
        else:
            # Resampling rounds to the source's levels: at most one level (1/255 or 1/65535), / std in normalised units.
            level = 1 / (65535 if kind == "png16" else 255)
            assert diff <= level / BIT_STD[0] + 1e-6, diff
            if train:
                assert diff > 0.0 or kind == "png16"  # really resampled in integers (uint16 may round exactly)


def test_integer_batches_are_smaller_than_float_ones(tmp_path):
    ds = TableDataset(_table(tmp_path, "png8"), ["Edema"], SIZE, cache_dir=tmp_path / "cache")
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])["image"]
    float_batch = torch.stack([_float_reference(ds, i) for i in range(len(ds))])
    # 1 byte per grayscale pixel instead of 4 bytes x 3 channels: what the DataLoader and the H2D copy carry.
    assert float_batch.nbytes == 12 * batch.nbytes


def test_to_device_contract():
    norm = Normalisation(BIT_MEAN, BIT_STD)
    x16 = torch.tensor([[[[0, 65535]]]], dtype=torch.uint16)
    assert to_device(x16, CPU, norm).tolist() == [[[[-1.0, 1.0]]] * 3]  # full uint16 range -> [-1, 1]
    floats = torch.randn(2, 3, 4, 4)
    assert torch.equal(to_device(floats, CPU, None), floats)  # already normalised by its dataset
    cl = to_device(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), CPU, norm, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and cl.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="need the dataset's mean and std"):
        to_device(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), CPU, None)
    with pytest.raises(TypeError, match="uint8, uint16 or normalised float"):
        to_device(torch.zeros(1, 1, 2, 2, dtype=torch.int32), CPU, norm)
    with pytest.raises(ValueError, match="must both have 1 or 3 values"):
        Normalisation((0.5, 0.5), (0.5,))


def test_a_one_channel_model_gets_one_channel_images(tmp_path):
    """``model.kwargs: {in_chans: 1}``: grayscale images stay 1 channel, normalised by the one value of equal RGB
    statistics; RGB images become their luma, i.e. what decoding them as grayscale (Pillow's ``convert("L")``)
    gives, up to the rounding of one 8-bit level in each path."""
    norm = Normalisation(BIT_MEAN, BIT_STD)
    gray = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    one = to_device(gray, CPU, norm, channels=1)
    assert one.shape == (1, 1, 2, 2)
    torch.testing.assert_close(one.flatten(), torch.tensor([0, 255, 51, 102]) / 255 * 2 - 1, atol=1e-6, rtol=0)
    table = _table(tmp_path, "rgb")
    rgb = TableDataset(table, ["Edema"], SIZE)
    as_gray = TableDataset(table, ["Edema"], SIZE, channels=1)
    rgb_batch = torch.stack([rgb[i]["image"] for i in range(len(rgb))])
    gray_batch = torch.stack([as_gray[i]["image"] for i in range(len(rgb))])
    assert rgb_batch.shape[1] == 3 and gray_batch.shape[1] == 1
    got, want = to_device(rgb_batch, CPU, norm, channels=1), to_device(gray_batch, CPU, norm, channels=1)
    assert got.shape == want.shape == (len(rgb), 1, SIZE, SIZE)
    assert (got - want).abs().max().item() <= 2 / 255 / BIT_STD[0] + 1e-6
    with pytest.raises(ValueError, match=r"one value per RGB channel, but the model takes 1 channel"):
        to_device(gray, CPU, Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), channels=1)
    with pytest.raises(ValueError, match="images with 2 channels cannot feed a model that takes 3"):
        to_device(torch.zeros(1, 2, 2, 2, dtype=torch.uint8), CPU, norm)


def test_mixup_after_normalisation_equals_normalising_the_mixed_pixels():
    """Normalisation is affine and MixUp a convex combination, so mixing on the device after normalisation is the
    same as mixing raw pixels."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8, generator=g)
    targets = torch.rand(6, 2, generator=g)
    norm = Normalisation(BIT_MEAN, BIT_STD)
    perm = torch.tensor([3, 4, 5, 0, 1, 2])
    after, _ = mixup(to_device(raw, CPU, norm), targets, 0.3, perm=perm)
    mixed_raw = 0.3 * raw.float() / 255 + 0.7 * raw.float()[perm] / 255
    before = ((mixed_raw - 0.5) / 0.5).expand(-1, 3, -1, -1)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_block_features_read_integer_images_like_the_trainer(tmp_path):
    """scaling.analysis.features on a TableDataset: the plain-module path and the Trainer path (Trainer.predict on
    chunks of the dataset) both feed the model the normalised device inputs, so their logits equal predict's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
    from toy import vit

    from scaling.analysis.features import PRE_LOGITS, block_features
    from scaling.config import ShardingConfig, TrainConfig
    from scaling.engine import Trainer

    table = _table(tmp_path, "png8", n=5)
    ds = TableDataset(table, ["Edema"], 32, cache_dir=tmp_path / "cache")
    model = vit()
    with torch.no_grad():
        model.eval()
        want = model(to_device(torch.stack([ds[i]["image"] for i in range(5)]), CPU, Normalisation.of(ds)))
    plain = block_features(model, ds, batch_size=2)
    torch.testing.assert_close(torch.as_tensor(plain["logits"]), want, atol=1e-5, rtol=0)
    trainer = Trainer(vit(), TrainConfig(batch_size=4, steps=1), ShardingConfig(strategy="none"))
    through = block_features(trainer, ds, batch_size=2)
    torch.testing.assert_close(torch.as_tensor(through["logits"]), want, atol=1e-5, rtol=0)
    assert through["features"][PRE_LOGITS].shape[0] == 5

"""Image decoding, the memory-mapped cache (equality with direct decode, rebuilds, bad images) and the datasets."""

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from scaling.data import DataError
from scaling.data.dataset import ImageFolderDataset, TableDataset
from scaling.data.images import ImageCache, check_images, decode, quantise, table_kind, to_float
from scaling.engine.inputs import Normalisation, to_device

SIZE = 16


def write_images(tmp_path, n=6, kind="png8"):
    """n small images with distinct content, and their sample table (two labels, one missing for some rows)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        if kind == "png16":
            a = (rng.random((40, 30)) * 4095).astype(np.uint16)  # 12-bit data in a 16-bit PNG
            path = tmp_path / f"img{i}.png"
            Image.fromarray(a).save(path)
        elif kind == "rgb":
            path = tmp_path / f"img{i}.jpg"
            Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8), "RGB").save(path)
        else:
            path = tmp_path / f"img{i}.{'jpg' if kind == 'jpg' else 'png'}"
            Image.fromarray((rng.random((40, 30)) * 255).astype(np.uint8), "L").save(path)
        rows.append((f"s{i}", f"p{i // 2}", str(path), i % 2 * 1.0, np.nan if i % 3 == 0 else 0.0))
    df = pd.DataFrame(rows, columns=["sample_id", "patient_id", "path", "label:Edema", "label:Fracture"])
    df["sex"], df["age"] = "F", 50.0
    return df


def test_decode_depths_and_channels(tmp_path):
    (tmp_path / "a").mkdir()
    df8 = write_images(tmp_path / "a")
    a = decode(df8["path"][0], SIZE)
    assert a.dtype == np.uint8 and a.shape == (1, SIZE, SIZE)
    assert np.array_equal(a[0], np.asarray(Image.open(df8["path"][0]).resize((SIZE, SIZE), Image.BILINEAR)))
    (tmp_path / "b").mkdir()
    df16 = write_images(tmp_path / "b", kind="png16")
    b = decode(df16["path"][0])
    assert b.dtype == np.float32 and b.shape == (1, 40, 30) and b.min() == 0.0 and b.max() == 1.0  # min-max scaled
    (tmp_path / "c").mkdir()
    dfc = write_images(tmp_path / "c", kind="rgb")
    c = decode(dfc["path"][0], SIZE, channels=3)
    assert c.dtype == np.uint8 and c.shape == (3, SIZE, SIZE)
    assert decode(dfc["path"][0], SIZE, channels=1).shape == (1, SIZE, SIZE)
    assert np.array_equal(quantise(a, np.uint16), (a.astype(np.uint32) * 257).astype(np.uint16))  # 255 -> 65535


@pytest.mark.parametrize("kind", ["png8", "jpg", "png16", "rgb"])
def test_cache_equals_direct_decode(tmp_path, kind):
    df = write_images(tmp_path, kind=kind)
    cached = TableDataset(df, ["Edema", "Fracture"], SIZE, cache_dir=tmp_path / "cache")
    direct = TableDataset(df, ["Edema", "Fracture"], SIZE)
    assert cached.cache is not None and direct.cache is None
    for i in range(len(df)):
        x, y = cached.load_pixels(i), direct.load_pixels(i)
        assert x.shape == y.shape == ((3 if kind == "rgb" else 1), SIZE, SIZE)
        assert x.dtype == y.dtype == (torch.uint16 if kind == "png16" else torch.uint8)
        assert torch.equal(x, y)  # decoded directly, an image is quantised exactly as the cache stores it
        assert torch.equal(cached[i]["image"], direct[i]["image"])


def test_dataset_items(tmp_path):
    df = write_images(tmp_path)
    ds = TableDataset(df, ["Edema", "Fracture", "Nodule"], SIZE, train=True, cache_dir=tmp_path / "cache")
    item = ds[5]
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.uint8  # normalised on the device
    assert item["index"] == 5
    assert item["target"].dtype == torch.float32
    assert item["target"].tolist()[:2] == [1.0, 0.0] and np.isnan(item["target"][2].item())  # Nodule: not labelled
    assert np.isnan(ds[0]["target"][1].item())  # a NaN in the table stays NaN
    assert (ds.mean, ds.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # BiT normalisation, applied by to_device
    blob = pickle.dumps(ds)  # DataLoader workers: the memmap is reopened, not pickled
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert torch.equal(clone.load_pixels(2), ds.load_pixels(2))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, SIZE, SIZE) and batch["index"].tolist() == [0, 1, 2, 3]
    x = to_device(batch["image"], torch.device("cpu"), Normalisation.of(ds))
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_cache_rebuilt_when_source_or_resolution_changes(tmp_path):
    df = write_images(tmp_path)
    cache = ImageCache(tmp_path / "cache", SIZE)
    first = cache.build(df)
    assert (first.decoded, first.reused) == (6, 0)
    again = cache.build(df)
    assert (again.decoded, again.reused) == (6 - 6, 6)
    # Rewrite one source with new content (and a new mtime): only it is decoded again, and the cache follows.
    p = df["path"][2]
    Image.fromarray(np.full((40, 30), 200, np.uint8), "L").save(p)
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = cache.build(df)
    assert (changed.decoded, changed.reused) == (1, 5)
    assert np.array_equal(cache.read(p), decode(p, SIZE)) and int(cache.read(p).max()) == 200
    # A subset reuses everything; a new sample is added without re-decoding the others.
    assert cache.build(df.iloc[:3]).reused == 3
    # Another resolution: a store of its own, beside the first one (whose files stay as they were).
    first_files = _files(tmp_path / "cache" / f"{SIZE}px")
    big = ImageCache(tmp_path / "cache", SIZE * 2)
    rebuilt = big.build(df)
    assert (rebuilt.decoded, rebuilt.reused) == (6, 0)
    assert big.read(df["path"][0]).shape == (1, SIZE * 2, SIZE * 2)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [f"{SIZE}px", f"{SIZE * 2}px"]
    assert _files(tmp_path / "cache" / f"{SIZE}px") == first_files
    assert len(list((tmp_path / "cache").rglob("data-*.bin"))) == 2  # one per resolution: replaced ones are removed


def test_cache_of_a_table_repeated_to_fill_a_batch_follows_a_changed_image(tmp_path):
    # A training set smaller than the batch is repeated to fill it (scaling.study.protocols.repeat_to_batch): the
    # cache keeps one entry per image, so a later build sees the one image that changed on disk.
    from scaling.study.protocols import repeat_to_batch

    df = write_images(tmp_path, n=3)
    fit = repeat_to_batch(df, 16)
    cache = ImageCache(tmp_path / "cache", SIZE)
    assert cache.build(fit).decoded == 3
    assert cache.build(fit).reused == 3
    p = df["path"][2]
    Image.fromarray(np.full((40, 30), 200, np.uint8), "L").save(p)
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = ImageCache(tmp_path / "cache", SIZE).build(fit)
    assert (changed.decoded, changed.reused) == (1, 2)
    reopened = ImageCache(tmp_path / "cache", SIZE)
    reopened.build(df)
    assert np.array_equal(reopened.read(p), decode(p, SIZE)) and int(reopened.read(p).max()) == 200


def _files(root):
    """Every file under ``root`` but the lock, with its content."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_two_resolutions_share_one_cache_directory(tmp_path):
    # Two launches of one study store that differ in data.image_size (a counted setting, so other run ids) share
    # <output_dir>/cache: building one resolution never replaces the other's store, in whatever order they go.
    df = write_images(tmp_path)
    small, big = ImageCache(tmp_path / "cache", SIZE), ImageCache(tmp_path / "cache", SIZE + 8)
    assert small.build(df).decoded == 6
    assert big.build(df).decoded == 6
    assert small.build(df).reused == 6 and big.build(df.iloc[:3]).reused == 3  # nothing decoded again
    for cache, size in ((small, SIZE), (big, SIZE + 8)):
        for p in df["path"]:
            assert np.array_equal(cache.read(p), decode(p, size))
            # a reader that did not build (a DataLoader worker, another rank) finds the store of its resolution
            assert np.array_equal(ImageCache(tmp_path / "cache", size).read(p), decode(p, size))


_BUILD_AND_READ = """
import sys
import numpy as np
import pandas as pd
from scaling.data.images import ImageCache, decode
table, cache_dir, size = pd.read_csv(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(int(sys.argv[4])):
    rows = table.iloc[: 2 + i % (len(table) - 1)]  # a growing, shrinking table: every build that adds a row rewrites
    cache = ImageCache(cache_dir, size)
    cache.build(rows)
    for p in rows["path"]:
        assert np.array_equal(cache.read(p), decode(p, size)), (size, i, p)
"""


def test_two_processes_building_two_resolutions_at_once_both_succeed(tmp_path):
    import subprocess
    import sys

    df = write_images(tmp_path, n=8)
    table = tmp_path / "table.csv"
    df.to_csv(table, index=False)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AND_READ, str(table), str(tmp_path / "cache"), str(size),
                               "25"], env=env, stderr=subprocess.PIPE, text=True) for size in (SIZE, SIZE + 8)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errors)
    for size in (SIZE, SIZE + 8):
        cache = ImageCache(tmp_path / "cache", size)
        assert cache.build(df).reused == 8
        assert all(np.array_equal(cache.read(p), decode(p, size)) for p in df["path"])


def test_a_store_of_the_old_layout_is_moved_not_decoded_again(tmp_path):
    # Before stores were kept per resolution, <cache>/<kind> held the one resolution last built.
    df = write_images(tmp_path)
    ImageCache(tmp_path / "cache", SIZE).build(df)
    (tmp_path / "cache" / f"{SIZE}px" / "gray-uint8").rename(tmp_path / "cache" / "gray-uint8")
    shutil.rmtree(tmp_path / "cache" / f"{SIZE}px")
    other = ImageCache(tmp_path / "cache", SIZE * 2).build(df)  # another resolution leaves it where it is
    assert other.decoded == 6 and (tmp_path / "cache" / "gray-uint8" / "meta.json").is_file()
    cache = ImageCache(tmp_path / "cache", SIZE)
    report = cache.build(df)
    assert (report.decoded, report.reused) == (0, 6)
    assert not (tmp_path / "cache" / "gray-uint8").exists()
    assert all(np.array_equal(cache.read(p), decode(p, SIZE)) for p in df["path"])


def test_one_cache_directory_keeps_each_image_kind_intact(tmp_path):
    (tmp_path / "gray").mkdir()
    (tmp_path / "rgb").mkdir()
    (tmp_path / "deep").mkdir()
    gray, rgb = write_images(tmp_path / "gray"), write_images(tmp_path / "rgb", kind="rgb")
    deep = write_images(tmp_path / "deep", kind="png16")
    sets = {name: TableDataset(t, ["Edema"], SIZE, cache_dir=tmp_path / "cache") for name, t in
            (("gray", gray), ("rgb", rgb), ("deep", deep))}
    kinds = sorted(p.name for p in (tmp_path / "cache" / f"{SIZE}px").iterdir() if p.is_dir())
    assert kinds == ["gray-uint16", "gray-uint8", "rgb-uint8"]
    assert sets["rgb"].load_pixels(1).shape == (3, SIZE, SIZE)  # colour is not squeezed into the gray store
    assert torch.equal(sets["rgb"].load_pixels(1), TableDataset(rgb, ["Edema"], SIZE).load_pixels(1))
    assert sets["deep"].cache.read(deep["path"][0]).dtype == np.uint16
    assert torch.equal(sets["gray"].load_pixels(2), TableDataset(gray, ["Edema"], SIZE).load_pixels(2))


def _mixed(tmp_path, kinds):
    """One table whose images are of the given kinds in order (``png8``, ``png16``, ``rgb``), one per row."""
    parts = []
    for i, kind in enumerate(kinds):
        (tmp_path / str(i)).mkdir(parents=True)
        parts.append(write_images(tmp_path / str(i), n=1, kind=kind).assign(sample_id=f"s{i}"))
    return pd.concat(parts, ignore_index=True)


def test_a_table_is_stored_at_the_kind_of_most_of_its_images_not_of_its_first(tmp_path, caplog):
    # A 16-bit export with one 8-bit image at the top: the first image alone made it an 8-bit store, every 16-bit
    # image quantised to 256 levels.
    mostly_deep = _mixed(tmp_path / "a", ["png8"] + ["png16"] * 4)
    cached = TableDataset(mostly_deep, ["Edema"], SIZE, cache_dir=tmp_path / "cache")
    assert cached.cache.store.name == "gray-uint16"
    direct = TableDataset(mostly_deep, ["Edema"], SIZE)
    for i in range(5):
        x = cached.load_pixels(i)
        assert x.dtype == torch.uint16
        assert np.array_equal(x.numpy(), quantise(decode(mostly_deep["path"][i], SIZE), np.uint16))
        assert torch.equal(x, direct.load_pixels(i))  # cached or not, one kind for the table
    assert (cached.load_pixels(1).numpy() % 257 != 0).any()  # 16-bit levels, not 8-bit ones scaled by 257
    # ... and the odd one out is converted and reported: the 16-bit image of a mostly 8-bit table.
    caplog.set_level("WARNING")
    mostly_8 = _mixed(tmp_path / "b", ["png16"] + ["png8"] * 4)
    cache = ImageCache(tmp_path / "cache2", SIZE)
    report = cache.build(mostly_8)
    assert cache.store.name == "gray-uint8"
    assert report.narrowed == {"16-bit": [mostly_8["path"][0]]}
    assert any("1 image(s) stored without their 16-bit" in r.getMessage() and mostly_8["path"][0] in r.getMessage()
               for r in caplog.records)
    assert cache.build(mostly_8).narrowed == {}  # reported when decoded, not on every launch


def test_table_kind_reads_a_spread_sample_and_ties_go_to_the_wider_kind(tmp_path, monkeypatch):
    assert table_kind(_mixed(tmp_path / "t", ["png8", "rgb"])["path"]) == (3, np.dtype(np.uint8))
    assert table_kind(_mixed(tmp_path / "d", ["png16", "png8"])["path"]) == (1, np.dtype(np.uint16))
    assert table_kind([]) == (1, np.dtype(np.uint8))
    import scaling.data.images as images

    read = []
    monkeypatch.setattr(images, "probe", lambda p: read.append(p) or (1, np.dtype(np.uint8)))
    paths = [f"/x/{i}.png" for i in range(100)]
    table_kind(paths + paths[:10], sample=5)  # repeated rows count once
    assert read == [paths[i] for i in (0, 25, 50, 74, 99)]  # first, last and evenly between

    def unreadable_evens(p):
        if int(Path(p).stem) % 2 == 0:
            raise DataError(f"{p}: cannot read image header")
        read.append(p)
        return 3, np.dtype(np.uint8)

    read.clear()
    monkeypatch.setattr(images, "probe", unreadable_evens)
    assert table_kind(paths, sample=5) == (3, np.dtype(np.uint8))
    assert read == [paths[i] for i in (25, 99, 1, 3, 5)]  # unreadable ones are replaced in table order


def test_bad_image_error_names_file_and_sample(tmp_path):
    df = write_images(tmp_path)
    bad = df["path"][4]
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(DataError, match=rf"cannot read image {bad} \(sample 's4'\)"):
        TableDataset(df, ["Edema"], SIZE, cache_dir=tmp_path / "cache")
    direct = TableDataset(df, ["Edema"], SIZE)  # no cache, 'error': raises when the image is loaded
    with pytest.raises(DataError, match=rf"cannot read image {bad} \(sample 's4'\)"):
        direct[4]


def test_bad_image_skip_counts(tmp_path):
    df = write_images(tmp_path)
    with open(df["path"][4], "wb") as f:
        f.write(b"not an image")
    os.remove(df["path"][1])  # a missing file is a bad image too
    ds = TableDataset(df, ["Edema"], SIZE, cache_dir=tmp_path / "cache", on_bad_image="skip")
    assert ds.n_skipped == 2 and sorted(ds.skipped) == ["s1", "s4"]
    assert list(ds.table["sample_id"]) == ["s0", "s2", "s3", "s5"] and len(ds) == 4
    again = TableDataset(df, ["Edema"], SIZE, cache_dir=tmp_path / "cache", on_bad_image="skip")
    assert again.n_skipped == 2  # recorded failures are counted again on reuse
    nocache = TableDataset(df, ["Edema"], SIZE, on_bad_image="skip")
    assert nocache.n_skipped == 2 and len(nocache) == 4
    kept, skipped = check_images(df, "skip")
    assert skipped == ["s1", "s4"] and len(kept) == 4
    with pytest.raises(DataError, match=r"on_bad_image='drop' is not allowed"):
        TableDataset(df, ["Edema"], SIZE, on_bad_image="drop")


def test_image_folder_dataset(tmp_path):
    for c in ("b", "a"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8), "RGB").save(tmp_path / c / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, SIZE, train=False)
    assert ds.classes == ["a", "b"] and len(ds) == 6
    item = ds[4]
    assert item["image"].shape == (3, SIZE, SIZE) and item["index"] == 4
    assert item["target"].dtype == torch.long and item["target"].shape == () and int(item["target"]) == 1
    assert torch.equal(item["image"], torch.full((3, SIZE, SIZE), 40, dtype=torch.uint8))
    x = to_device(item["image"][None], torch.device("cpu"), Normalisation.of(ds))
    assert torch.allclose(x, torch.full((1, 3, SIZE, SIZE), to_float(np.uint8(40)) * 2 - 1), atol=1e-6)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", SIZE)


def test_dicom_dispatch_and_uint16_cache(tmp_path):
    from dataset_fixtures import write_dicom

    ramp = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (30, 1))  # 30 x 40, 12-bit values rising left→right
    rows = []
    for i, photometric in enumerate(["MONOCHROME2", "MONOCHROME1"]):
        path = tmp_path / f"img{i}.dcm"
        write_dicom(path, ramp, photometric=photometric, bits_stored=12)
        rows.append((f"d{i}", f"p{i}", str(path), 1.0))
    df = pd.DataFrame(rows, columns=["sample_id", "patient_id", "path", "label:Malignant"])
    df["sex"], df["age"] = "F", np.nan
    mono2, mono1 = decode(df["path"][0]), decode(df["path"][1])
    assert mono2.dtype == np.float32 and mono2.shape == (1, 30, 40)
    assert mono2[0, 0, 0] == 0.0 and mono2[0, 0, -1] == 1.0  # min-max scaled to [0, 1]
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)  # MONOCHROME1: higher values are darker
    cache = ImageCache(tmp_path / "cache", SIZE)
    cache.build(df)
    assert cache.read(df["path"][1]).dtype == np.uint16
    ds = TableDataset(df, ["Malignant"], SIZE, cache_dir=tmp_path / "cache")
    direct = TableDataset(df, ["Malignant"], SIZE)
    assert ds.load_pixels(1).dtype == torch.uint16 and torch.equal(ds.load_pixels(1), direct.load_pixels(1))

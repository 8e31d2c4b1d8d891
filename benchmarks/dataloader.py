"""Data-loader throughput per worker: decode-every-time versus the preprocessed memmap cache, same images.

Writes ``--n`` grayscale 8-bit PNGs of ``--source`` px (X-ray-like: smooth anatomy-scale structure, rib-like
stripes and pixel noise, so they compress like radiographs rather than like flat test patterns), then times
``TableDataset.__getitem__`` over them in one process with one thread (= one DataLoader worker), eval transform,
at ``--size`` px:

* decode: every item decodes the full-resolution PNG and resizes it;
* cache: the images are decoded and resized once into an :class:`~scaling.data.images.ImageCache` (build time
  reported separately), then every item is a memmap row read.

Prints images/s for both and their ratio from this one run (goal: cache >= 5x at 224 px from 1024 px
PNG sources). Then, from the cache, the training view (random resized crop, rotation, flip):

* stateless: ``ds[(i, draw_seed)]``, the geometry on the uint8 image with a per-sample ``torch.Generator``
  (``scaling.data.images.ImageTransform``), returned as uint8 ``[1, H, W]``;
* global RNG (the pipeline before): pixels as float32 in [0, 1], torchvision v2's RandomResizedCrop /
  RandomRotation / RandomHorizontalFlip drawing from the global RNG, 3 channels, Normalize, float32 ``[3, H, W]``;

with their ratio, and the bytes per item each puts through the DataLoader and the host→device copy.

    python benchmarks/dataloader.py [--n 64] [--source 1024] [--size 224] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from scaling.data.dataset import TableDataset


def write_sources(directory: Path, n: int, size: int, seed: int = 0) -> pd.DataFrame:
    """``n`` X-ray-like 8-bit grayscale PNGs of ``size`` px and their sample table."""
    rng = np.random.default_rng(seed)
    y = np.linspace(-1, 1, size)[:, None]
    rows = []
    for i in range(n):
        field = gaussian_filter(rng.normal(0, 1, (size // 8, size // 8)), 3)
        field = np.kron(field, np.ones((8, 8)))[:size, :size]
        ribs = 0.5 + 0.5 * np.sin(y * 40 + rng.uniform(0, 6.28))
        img = 110 + 220 * field + 25 * ribs + rng.normal(0, 4, (size, size))
        path = directory / f"{i:04d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(path)
        rows.append((f"s{i}", f"p{i}", str(path), float(i % 2)))
    df = pd.DataFrame(rows, columns=["sample_id", "patient_id", "path", "label:Edema"])
    df["sex"], df["age"] = None, np.nan
    return df


def images_per_second(ds: TableDataset, epochs: int) -> float:
    """Items served per second by ``ds[i]`` over ``epochs`` passes (first pass included: no warm-up cache hides)."""
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in range(len(ds)):
            ds[i]
    return epochs * len(ds) / (time.perf_counter() - t0)


def float_pipeline(ds: TableDataset):
    """The pre-integer training pipeline: float [0, 1] pixels, torchvision v2 transforms on the global RNG."""
    from torchvision.transforms import v2

    from scaling.data.images import to_float

    t = v2.Compose([v2.RandomResizedCrop(ds.image_size, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
                    v2.RandomRotation(7), v2.RandomHorizontalFlip(), v2.Lambda(lambda x: x.expand(3, -1, -1)),
                    v2.Normalize(list(ds.mean), list(ds.std))])
    return lambda i: t(torch.from_numpy(to_float(ds.load_pixels(i).numpy())))


def items_per_second(get, n: int, epochs: int) -> float:
    """Calls of ``get(i)`` per second over ``epochs`` passes of ``range(n)``."""
    t0 = time.perf_counter()
    for e in range(epochs):
        for i in range(n):
            get(i)
    return epochs * n / (time.perf_counter() - t0)


def main() -> None:
    """Run the benchmark and print the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="number of source images")
    ap.add_argument("--source", type=int, default=1024, help="source resolution (px)")
    ap.add_argument("--size", type=int, default=224, help="training resolution (px)")
    ap.add_argument("--epochs", type=int, default=3, help="passes over the images per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker = one core
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        df = write_sources(tmp / "src", args.n, args.source)
        mb = sum(Path(p).stat().st_size for p in df["path"]) / 2**20
        decode_ds = TableDataset(df, ["Edema"], args.size)
        decode_ips = images_per_second(decode_ds, args.epochs)
        t0 = time.perf_counter()
        cache_ds = TableDataset(df, ["Edema"], args.size, cache_dir=tmp / "cache")
        build_s = time.perf_counter() - t0
        cache_ips = images_per_second(cache_ds, args.epochs)
        train_ds = TableDataset(df, ["Edema"], args.size, train=True, cache_dir=tmp / "cache", flip=True)
        old = float_pipeline(train_ds)
        stateless_ips = items_per_second(lambda i: train_ds[(i, 1_000 + i)], args.n, args.epochs)
        global_ips = items_per_second(old, args.n, args.epochs)
        new_bytes, old_bytes = train_ds[(0, 1)]["image"].nbytes, old(0).nbytes
    print(f"sources: {args.n} x {args.source}px 8-bit PNG ({mb / args.n:.2f} MB each) -> {args.size}px, 1 worker, 1 thread")
    print(f"decode every time : {decode_ips:8.1f} images/s")
    print(f"cache (memmap)    : {cache_ips:8.1f} images/s   (one-off build: {build_s:.2f} s, {args.n / build_s:.1f} images/s)")
    print(f"cache / decode    : {cache_ips / decode_ips:8.1f} x   (goal >= 5x)")
    print(f"train view, stateless (uint8)      : {stateless_ips:8.1f} images/s, {new_bytes:7d} bytes/item")
    print(f"train view, global RNG (float32)   : {global_ips:8.1f} images/s, {old_bytes:7d} bytes/item")
    print(f"stateless / global RNG             : {stateless_ips / global_ips:8.2f} x speed, "
          f"{old_bytes / new_bytes:.0f} x fewer bytes")


if __name__ == "__main__":
    main()

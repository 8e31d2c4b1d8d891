"""Supervised upstream pretraining of any backbone: how BiT-S/M/L were made, with the fine-tuning Trainer.

    # BiT's upstream recipe (Kolesnikov et al. 2020 §3.1) on ImageNet-1k in ImageFolder layout, 8 GPUs, FSDP2:
    accelerate launch --num_processes 8 recipes/pretrain.py --backbone bit_r50x1 \\
        --data /data/imagenet/train --image-size 224 --out weights/r50x1_in1k.safetensors \\
        train.batch_size=4096 train.grad_accum=4 sharding.strategy=fsdp

    # the same from WebDataset tar shards (``<key>.jpg`` + ``<key>.cls`` members):
    accelerate launch ... recipes/pretrain.py --backbone bit_r50x1 --data '/data/in21k/shard-*.tar' ...

    # demo scale on a 2-core CPU (~15 s), on the fractal images the demo study generated:
    python recipes/pretrain.py --backbone resnetv2_tiny --recipe short --data runs/demo/data/fractal_1000_12_48 \\
        --image-size 48 --out /tmp/tiny.safetensors train.steps=50 train.batch_size=32 sharding.strategy=none

    # in-domain supervised pretraining on a medical dataset of the registry (multi-label, masked BCE: unlabelled
    # findings do not count), e.g. MIMIC-CXR before fine-tuning on CheXpert; one file per backbone in a directory
    # makes that directory a weight source for a whole grid (``model.pretrained: /weights/mimic``):
    accelerate launch --num_processes 8 recipes/pretrain.py --backbone bit_r50x1 --dataset mimic_cxr \\
        --data /data/mimic-cxr-jpg --option uncertainty=ignore --image-size 224 \\
        --out /weights/mimic/bit_r50x1.safetensors train.batch_size=512 sharding.strategy=fsdp

The exported safetensors file holds the whole model with its upstream head; fine-tuning loads it as a local file
(``model.pretrained: /path/to/file.safetensors`` or ``bit-l:/path/...`` to label it as a JFT-class source; a
directory holding ``<preset>.safetensors`` per backbone serves a whole grid), drops that head and attaches a new
one. Pretraining on a medical table uses all of the split's patients: keep the downstream dataset's test
patients out of it (pretrain on another dataset, or on a split that excludes them). The study's demo pretraining
axis (``upstream:<name>``) calls ``scaling.study.upstream.pretrain``; this script is for real-scale runs and any
dataset on disk.

An override of the training length (one of ``train.steps``, ``train.epochs``, ``train.examples``) replaces the
recipe's length, whichever field the recipe uses. ``--recipe short`` warms up for 10 % of the final length.
Exit status: 0 done, 2 bad input (config, data, weights, launch), printed as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import glob
import io
import logging
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from scaling.config import ConfigError, ShardingConfig, TrainConfig, apply_overrides, from_dict, to_dict
from scaling.data.table import DataError
from scaling.engine.distributed import LaunchError
from scaling.engine.schedule import total_steps
from scaling.models import CheckpointMismatch, WeightsUnavailable
from scaling.study.upstream import run_pretraining


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
USER_ERRORS = (ConfigError, DataError, LaunchError, WeightsUnavailable, CheckpointMismatch)
"""Bad input: reported as one ``error:`` line with exit status 2, like ``recipes/scale_study.py``."""
LENGTH_FIELDS = ("steps", "epochs", "examples")
"""The TrainConfig fields that set the training length; at most one may be > 0."""
SHORT_WARMUP = 0.1
"""``--recipe short`` warms up for this fraction of the final number of steps."""


def bit_upstream_train_config(batch_size: int = 4096, epochs: float = 90.0, **overrides) -> TrainConfig:
    """BiT's upstream recipe: SGD 0.9, lr 0.03 x batch/256, weight decay 1e-4, 5000 warmup steps, 90 epochs.

    BiT divides the lr by 10 at epochs 30, 60 and 80 (BiT-S/M); the ``bit`` schedule decays at 30/60/90 % of the
    steps, i.e. at epochs 27, 54 and 81: the same shape within a few epochs. Overrides are TrainConfig fields.
    """
    fields = dict(
        batch_size=batch_size,
        optimizer="sgd",
        lr=0.03 * batch_size / 256,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="bit",
        warmup_steps=5000,
        epochs=epochs,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        log_every=100,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _split_key(name: str) -> tuple[str, str]:
    # WebDataset: the key is the member path up to the first dot of its file name ("a/b/0001.cls" -> "a/b/0001").
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


class TarShardDataset(Dataset):
    """Single-label images from WebDataset-style tar shards, as a map-style dataset (the Trainer's samplers index).

    Each sample is a group of members sharing a key: one image (``.jpg``/``.jpeg``/``.png``/``.webp``) and a
    ``.cls`` member holding the integer class. The shards are indexed once (member offsets); items are read with
    a seek, so any sample can be fetched by index without unpacking. Items match ``ImageFolderDataset``:
    ``{"image": uint8 Tensor[3, S, S], "target": LongTensor scalar, "index": i}`` (normalised on the device with
    ``mean`` / ``std``).
    """

    def __init__(self, shards: list[str | Path], image_size: int, train: bool = True):
        from scaling.data.images import BIT_MEAN, BIT_STD, build_transform

        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise DataError("no tar shards given")
        self.samples: list[tuple[int, int, int, int]] = []  # (shard, offset, size, class)
        for si, shard in enumerate(self.shards):
            images, classes = {}, {}
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if ext.lower() in IMAGE_EXTS:
                        images[key] = (m.offset_data, m.size)
                    elif ext.lower() == "cls":
                        classes[key] = int(tar.extractfile(m).read().decode().strip())
            missing = sorted(set(images) - set(classes))
            if missing:
                raise DataError(f"{shard}: image {missing[0]!r} has no .cls member ({len(missing)} without a class)")
            self.samples += [(si, off, size, classes[k]) for k, (off, size) in sorted(images.items())]
        if not self.samples:
            raise DataError(f"no images in {len(self.shards)} shard(s), e.g. {self.shards[0]}")
        self.classes = sorted({c for *_, c in self.samples})
        if self.classes != list(range(len(self.classes))):
            raise DataError(f"class indices must be 0..K-1; found {self.classes[:5]}... ({len(self.classes)} classes)")
        self.image_size = int(image_size)
        self.mean, self.std = BIT_MEAN, BIT_STD
        self.transform = build_transform(self.image_size, train, flip=True)

    def __len__(self) -> int:
        """Number of images over all shards."""
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        """The image of key ``i`` (or ``(i, draw_seed)``, augmented), decoded to RGB at ``image_size``, with its class."""
        from PIL import Image

        from scaling.data.dataset import split_key

        i, seed = split_key(key)
        shard, offset, size, cls = self.samples[i]
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))
        return {"image": self.transform(pixels, seed), "target": torch.tensor(cls, dtype=torch.long), "index": i}


def open_dataset(data: str | Path, image_size: int, train: bool = True) -> Dataset:
    """An ImageFolder directory (``root/<class>/<image>``) or a glob / list file of WebDataset tar shards."""
    text = str(data)
    if Path(text).is_dir():
        from scaling.data.dataset import ImageFolderDataset

        return ImageFolderDataset(text, image_size, train=train)
    shards = sorted(glob.glob(text)) if any(c in text for c in "*?[") else [text] if text.endswith(".tar") else []
    if not shards and Path(text).is_file():  # a text file listing one shard per line
        shards = [s.strip() for s in Path(text).read_text().splitlines() if s.strip()]
    if not shards:
        raise DataError(f"--data {text!r} is neither an ImageFolder directory nor tar shards (a glob, .tar, or list)")
    return TarShardDataset(shards, image_size, train=train)


def open_table_dataset(dataset: str, root: str | Path, image_size: int, split: str = "train",
                       labels: list[str] | None = None, options: dict | None = None,
                       cache_dir: str | Path | None = None) -> Dataset:
    """A multi-label training set from any registered medical dataset (``scaling.data`` loaders).

    ``labels`` default to every label column of the loaded table; unlabelled entries stay NaN and are masked out of
    the loss. Chest X-rays keep their orientation (no flips: laterality carries meaning).
    """
    from scaling.data.dataset import TableDataset
    from scaling.data.registry import load_table
    from scaling.data.table import DataError, label_names

    table = load_table(dataset, root, split, **(options or {}))
    names = labels or label_names(table)
    if not names:
        raise DataError(f"{dataset}:{split} at {root} has no label columns to pretrain on")
    return TableDataset(table, names, image_size, train=True, cache_dir=cache_dir)


def _options(pairs: list[str]) -> dict:
    """``key=value`` loader options, values parsed as YAML (``uncertainty=ignore``, ``frontal_only=true``)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _override_keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].strip() for o in overrides if "=" in o}


def configs(recipe: str, overrides: list[str]) -> tuple[TrainConfig, ShardingConfig]:
    """The recipe's TrainConfig with ``overrides`` applied, and the ShardingConfig.

    An override of one length field clears the recipe's others: ``train.steps=100`` on the ``bit`` recipe (90
    epochs) means 100 steps, not "set only one of train.steps, train.epochs, train.examples". Setting two length
    fields in the overrides themselves is still refused.
    """
    base = bit_upstream_train_config() if recipe == "bit" else \
        TrainConfig(optimizer="sgd", lr=0.05, weight_decay=1e-4, schedule="cosine", steps=200)
    train = to_dict(base)
    keys = _override_keys(overrides)
    if keys & {f"train.{f}" for f in LENGTH_FIELDS}:
        train.update({f: type(train[f])(0) for f in LENGTH_FIELDS if f"train.{f}" not in keys})
    config = apply_overrides({"train": train, "sharding": to_dict(ShardingConfig())}, overrides)
    unknown = set(config) - {"train", "sharding"}
    if unknown:
        raise ConfigError(f"overrides must start with train. or sharding.; got {sorted(unknown)}")
    train_cfg = from_dict(TrainConfig, config["train"], prefix="train")
    if recipe == "bit" and "train.lr" not in keys:
        # Keep BiT's linear lr scaling when only the batch size was overridden.
        train_cfg = from_dict(TrainConfig, {**config["train"], "lr": 0.03 * train_cfg.batch_size / 256}, prefix="train")
    return train_cfg, from_dict(ShardingConfig, config["sharding"], prefix="sharding")


def short_warmup(train_cfg: TrainConfig, n_examples: int) -> TrainConfig:
    """``--recipe short``'s warmup: :data:`SHORT_WARMUP` of the final length, which an override of
    steps / epochs / examples (or the dataset size, for epochs and examples) sets."""
    from dataclasses import replace

    return replace(train_cfg, warmup_steps=round(SHORT_WARMUP * total_steps(train_cfg, n_examples)))


def main(argv: list[str] | None = None) -> dict:
    """Command line: ``--backbone --data --out [--dataset --split --labels --option k=v] [--image-size]
    [--recipe bit|short] [train.x=y sharding.x=y ...]``. Returns the Trainer's summary; bad input prints one
    ``error:`` line and exits with status 2 (``SystemExit(2)``, as argparse does for a bad option)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="preset (bit_r50x1, vit_b16, ...) or timm model name")
    parser.add_argument("--data", required=True,
                        help="ImageFolder directory, tar shards (glob, .tar, list file), or with --dataset its root")
    parser.add_argument("--dataset", default="",
                        help="registered medical dataset (chexpert, mimic_cxr, ...): multi-label masked-BCE pretraining")
    parser.add_argument("--split", default="train", help="with --dataset: the split to pretrain on")
    parser.add_argument("--labels", default="", help="with --dataset: comma-separated labels (default: all)")
    parser.add_argument("--option", action="append", default=[], help="with --dataset: loader option key=value")
    parser.add_argument("--cache-dir", default="", help="with --dataset: decode each image once into this cache")
    parser.add_argument("--out", required=True, help="output safetensors file")
    parser.add_argument("--image-size", type=int, default=224, help="training resolution (BiT upstream: 224)")
    parser.add_argument("--recipe", choices=("bit", "short"), default="bit",
                        help="bit: BiT's 90-epoch upstream recipe; short: cosine over 200 steps, 10 %% warmup, "
                             "lr 0.05 (demo scale)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides: train.steps=100 sharding.strategy=fsdp (a length override replaces "
                             "the recipe's length)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return _pretrain(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _pretrain(args: argparse.Namespace) -> dict:
    train_cfg, sharding_cfg = configs(args.recipe, args.overrides)
    if args.dataset:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()] or None
        dataset = open_table_dataset(args.dataset, args.data, args.image_size, args.split, labels,
                                     _options(args.option), args.cache_dir or None)
        loss = "multilabel"
    else:
        dataset = open_dataset(args.data, args.image_size, train=True)
        loss = "multiclass"
    if args.recipe == "short" and "train.warmup_steps" not in _override_keys(args.overrides):
        train_cfg = short_warmup(train_cfg, len(dataset))
    return run_pretraining(args.backbone, dataset, args.out, train_cfg, sharding_cfg, loss=loss)


if __name__ == "__main__":
    main(sys.argv[1:])

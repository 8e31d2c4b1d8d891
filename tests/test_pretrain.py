"""recipes/pretrain.py: upstream pretraining from an ImageFolder or tar shards, exported and reloaded."""

from __future__ import annotations

import importlib.util
import sys
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaling.config import ConfigError, ModelConfig, ShardingConfig, TrainConfig
from scaling.data.table import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pretrain_recipe", REPO / "recipes" / "pretrain.py")
pretrain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain)


def _image(cls: int, i: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(100 * cls + i)
    a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    a[:, : size // 2] += np.uint8(150) if cls == 0 else np.uint8(0)  # class 0: bright left half
    return Image.fromarray(a)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    for cls in range(2):
        (root / f"class{cls}").mkdir(parents=True)
        for i in range(6):
            _image(cls, i).save(root / f"class{cls}" / f"{i:03d}.png")
    return root


def _shards(tmp_path, per_shard=6):
    paths = []
    for s in range(2):
        path = tmp_path / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                cls = i % 2
                for name, payload in ((f"sub/{s}{i:04d}.png", None), (f"sub/{s}{i:04d}.cls", str(cls).encode())):
                    if payload is None:
                        buf = io.BytesIO()
                        _image(cls, i).save(buf, format="PNG")
                        payload = buf.getvalue()
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def test_tar_shards_index_and_decode_like_an_image_folder(tmp_path):
    paths = _shards(tmp_path)
    ds = pretrain.open_dataset(str(tmp_path / "shard-*.tar"), image_size=16, train=False)
    assert len(ds) == 12 and ds.classes == [0, 1]
    item = ds[7]
    assert item["image"].shape == (3, 16, 16) and item["target"].dtype == torch.long and item["index"] == 7
    listed = tmp_path / "shards.txt"
    listed.write_text("\n".join(map(str, paths)))
    assert len(pretrain.open_dataset(listed, 16)) == 12
    with pytest.raises(DataError, match="neither an ImageFolder"):
        pretrain.open_dataset(tmp_path / "nothing-*.tar", 16)


def test_bit_upstream_recipe():
    cfg = pretrain.bit_upstream_train_config(batch_size=1024)
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.warmup_steps, cfg.epochs) == ("sgd", 0.9, 1e-4, 5000, 90)
    assert cfg.lr == pytest.approx(0.12) and cfg.schedule == "bit"


def test_pretraining_exports_weights_that_fine_tuning_loads(image_folder, tmp_path):
    from scaling.models import build_model

    out = tmp_path / "up.safetensors"
    train = TrainConfig(batch_size=6, steps=4, lr=0.05, warmup_steps=1, schedule="constant", log_every=2)
    summary = pretrain.run_pretraining(
        "resnetv2_tiny", pretrain.open_dataset(image_folder, 24), out, train, ShardingConfig(strategy="none")
    )
    assert summary["steps"] == 4 and out.is_file()
    assert not out.with_suffix(".run").exists()  # its final checkpoint held the same weights: stored once
    tuned = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(out)), num_outputs=3)
    scratch = build_model(ModelConfig(backbone="resnetv2_tiny"), num_outputs=3)
    from safetensors.torch import load_file

    sd = {k.removeprefix("backbone."): v for k, v in load_file(str(out)).items()}
    torch.testing.assert_close(tuned.backbone.stem.conv.weight, sd["stem.conv.weight"])
    assert not torch.equal(tuned.backbone.stem.conv.weight, scratch.backbone.stem.conv.weight)
    assert sd["head.fc.weight"].shape[0] == 2  # the upstream head (2 classes) was exported and then replaced


def test_cli_runs_the_short_recipe(image_folder, tmp_path):
    out = tmp_path / "cli.safetensors"
    summary = pretrain.main([
        "--backbone", "vit_micro", "--data", str(image_folder), "--out", str(out), "--image-size", "32",
        "--recipe", "short", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "sharding.strategy=none",
    ])
    assert summary["steps"] == 2 and out.is_file()
    # --help's example, train.steps=..., on the default bit recipe (whose length is 90 epochs)
    summary = pretrain.main(["--backbone", "resnetv2_tiny", "--data", str(image_folder), "--out", str(out),
                             "--image-size", "24", "train.steps=2", "train.batch_size=4", "sharding.strategy=none"])
    assert summary["steps"] == 2


@pytest.mark.parametrize("recipe", ["bit", "short"])
@pytest.mark.parametrize("length,field,value", [("train.steps=100", "steps", 100), ("train.epochs=2", "epochs", 2.0),
                                                ("train.examples=640", "examples", 640)])
def test_a_length_override_replaces_the_recipes_length(recipe, length, field, value):
    """``--help``'s own example, ``train.steps=100``, on the default ``bit`` recipe (90 epochs): the override is the
    length, the recipe's other length fields are cleared."""
    train, _ = pretrain.configs(recipe, [length, "sharding.strategy=none"])
    assert {f: getattr(train, f) for f in ("steps", "epochs", "examples")} == \
        {f: (value if f == field else 0) for f in ("steps", "epochs", "examples")}
    untouched, _ = pretrain.configs(recipe, [])
    assert (untouched.epochs, untouched.steps) == ((90.0, 0) if recipe == "bit" else (0.0, 200))
    with pytest.raises(ConfigError, match="set only one of train.steps, train.epochs, train.examples"):
        pretrain.configs(recipe, ["train.steps=100", "train.epochs=2"])


@pytest.mark.parametrize("overrides,n,warmup", [([], 100, 20), (["train.steps=50"], 100, 5),
                                                (["train.epochs=3", "train.batch_size=10"], 100, 3),
                                                (["train.steps=50", "train.warmup_steps=7"], 100, 7)])
def test_short_recipe_warms_up_for_a_tenth_of_its_final_length(overrides, n, warmup):
    train, _ = pretrain.configs("short", overrides)
    if "train.warmup_steps=7" not in overrides:
        train = pretrain.short_warmup(train, n)
    assert train.warmup_steps == warmup


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(list(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return exit_.value.code, lines


def test_cli_bad_input_is_one_error_line_and_exit_status_2(image_folder, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    code, lines = _cli(capsys, "--backbone", "resnetv2_tiny", "--data", str(image_folder), "--out", out,
                       "train.stepz=2")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: unknown config key 'train.stepz'; did you mean 'train.steps'?")
    code, lines = _cli(capsys, "--backbone", "resnetv2_tiny", "--dataset", "chexpert", "--data",
                       str(tmp_path / "nonexistent"), "--out", out)
    assert code == 2 and lines == [f"error: chexpert: dataset root '{tmp_path / 'nonexistent'}' does not exist"]
    code, lines = _cli(capsys, "--backbone", "resnetv2_tiny", "--data", str(tmp_path / "nothing"), "--out", out)
    assert code == 2 and len(lines) == 1 and "neither an ImageFolder directory nor tar shards" in lines[0]
    code, lines = _cli(capsys, "--backbone", "resnetv2_tiny", "--dataset", "mimic_cxr", "--data", str(tmp_path),
                       "--out", out, "--option", "uncertainty")
    assert code == 2 and lines == ["error: --option expects key=value, got 'uncertainty'"]
    code, lines = _cli(capsys, "--backbone", "resnetv2_tiny", "--data", str(image_folder), "--out", out,
                       "model.kwargs={}")
    assert code == 2 and lines == ["error: overrides must start with train. or sharding.; got ['model']"]
    code, lines = _cli(capsys, "--backbone", "resnetv2_tiny", "--data", str(image_folder), "--out", out,
                       "train.steps=2")  # the bit recipe's batch of 4096 on 12 images
    assert code == 2 and len(lines) == 1 and "fewer than train.batch_size=4096" in lines[-1]


def test_multilabel_pretraining_on_a_medical_table_exports_a_grid_weight_source(tmp_path):
    """--dataset: masked-BCE pretraining on a registry dataset; the file serves as a per-backbone weight source."""
    from dataset_fixtures import write_fixture
    from safetensors.torch import load_file

    from scaling.models import build_model

    root = write_fixture("mimic_cxr", tmp_path / "mimic", n=24)
    weights = tmp_path / "weights"
    summary = pretrain.main([
        "--backbone", "resnetv2_tiny", "--dataset", "mimic_cxr", "--data", str(root), "--option", "uncertainty=ignore",
        "--labels", "Edema,Cardiomegaly,Pleural Effusion", "--image-size", "32", "--recipe", "short",
        "--out", str(weights / "resnetv2_tiny.safetensors"), "train.steps=3", "train.batch_size=4",
        "train.warmup_steps=1", "sharding.strategy=none",
    ])
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    sd = {k.removeprefix("backbone."): v for k, v in load_file(str(weights / "resnetv2_tiny.safetensors")).items()}
    assert sd["head.fc.weight"].shape[0] == 3  # one upstream output per label
    tuned = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(weights)), num_outputs=2)
    torch.testing.assert_close(tuned.backbone.stem.conv.weight, sd["stem.conv.weight"])
    ds = pretrain.open_table_dataset("mimic_cxr", root, 32, options={"uncertainty": "ignore"})
    assert len(ds.labels) == 14 and torch.isnan(ds.targets).any()  # all labels by default, unlabelled stay NaN
    with pytest.raises(ConfigError, match="key=value"):
        pretrain._options(["uncertainty"])

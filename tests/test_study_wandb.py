"""A real (tiny) study with offline W&B: one W&B run per grid cell with the study axes, and no patient or sample id,
nor any file path, anywhere in what W&B wrote."""

import pandas as pd

from scaling.config import load_config
from scaling.study.data import load_study_data
from scaling.study.grid import config_hash
from scaling.study.runner import run_study


def test_offline_wandb_study_leaks_no_identifiers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'store'}", "name=wandb_study", "data.root=synthetic", "data.image_size=32",
        "data.ood=[{name: ood_site_b, root: 'synthetic:b', split: train}]", "train.steps=6", "train.batch_size=16",
        "train.log_every=2", "train.warmup_steps=1", "eval.n_boot=20", "grid.backbones=[resnetv2_tiny]",
        "grid.pretrained=[scratch]", "grid.fractions=[0.5,1.0]", "tracking.wandb=offline",
        "tracking.project=scaling-test",
    ])
    table = run_study(cfg)
    assert list(table.status) == ["complete", "complete"]

    data = load_study_data(cfg)
    tables = [data.train, *data.eval_sets().values()]
    identifiers = set(pd.concat([t.sample_id for t in tables])) | set(pd.concat([t.patient_id for t in tables]))
    assert len(identifiers) > 1000
    wandb_files = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and "wandb" in p.parts]
    binaries = [p for p in wandb_files if p.suffix == ".wandb"]
    assert len(binaries) >= 2  # one W&B run per grid cell (plus the study-level view, if any)
    blob = b"\n".join(p.read_bytes() for p in wandb_files)
    leaked = [i for i in identifiers if i.encode() in blob]
    assert not leaked, f"{len(leaked)} identifiers leaked into W&B files, e.g. {leaked[:3]}"
    # what `wandb sync` uploads (the .wandb run file and files/) names no path; the client's own local debug.log
    # records where the run directory is, which never leaves the machine
    synced = b"\n".join(p.read_bytes() for p in wandb_files if "logs" not in p.parts and p.suffix != ".log")
    assert str(tmp_path).encode() not in synced and b"CheXpert-v1.0-small" not in blob
    # a cell's run file (under runs/<run id>/), not the study-level view's, whatever order the file system lists
    # them in (Python 3.13's rglob listed the study view first)
    cell = next(b for b in sorted(binaries) if "runs" in b.relative_to(tmp_path / "store").parts).read_bytes()
    # the config hash is in every cell's W&B config: the W&B Report selects one study config by it
    for key in (b"test/auroc", b"ood_site_b/auroc", b"train/loss", b"resnetv2_tiny", b"wandb_study", b"config_hash",
                config_hash(cfg).encode()):
        assert key in cell, key

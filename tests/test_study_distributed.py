"""The study runner under `accelerate launch` with 2 real CPU ranks (gloo): one store, every sample predicted once."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from scaling.config import load_config
from scaling.study.data import load_study_data
from scaling.study.store import RunStore

REPO = Path(__file__).resolve().parents[1]


def test_two_rank_study_writes_one_complete_store(tmp_path):
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "dist", "output_dir": str(tmp_path / "store"),
        "data": {"root": "synthetic", "image_size": 32, "options": {"uncertainty": "ignore"},
                 "ood": [{"name": "ood_site_b", "root": "synthetic:b", "split": "train"}]},
        "train": {"batch_size": 16, "lr": 0.05, "steps": 8, "warmup_steps": 2, "log_every": 4},
        "eval": {"n_boot": 20, "batch_size": 48},
        "grid": {"backbones": ["resnetv2_tiny"], "pretrained": ["scratch"], "fractions": [0.5], "seeds": [0]},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    proc = subprocess.run([accelerate, "launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
                           "--main_process_port", "0", str(REPO / "recipes" / "scale_study.py"), "--config",
                           str(cfg_path), "--no-report"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    tb = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "File " in ln]
    assert proc.returncode == 0, "\n".join(tb[-40:]) + proc.stderr[-2000:]
    store = RunStore(tmp_path / "store")
    (rid,) = store.run_ids()
    assert store.is_complete(rid)
    meta = store.read_meta(rid)
    assert meta["world_size"] == 2  # really two ranks, not a silent single-process fallback
    data = load_study_data(load_config(cfg_path))
    for name, table in data.eval_sets().items():
        preds = store.read_predictions(rid, name)
        # distributed padding duplicates were dropped and nothing was lost: each sample exactly once
        assert sorted(preds.sample_id) == sorted(table.sample_id), name

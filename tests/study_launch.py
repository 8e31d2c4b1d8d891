"""Launching tiny studies in fresh processes, for the runner and fault tests (this module holds no tests itself).

Every launch is a real ``python recipes/scale_study.py`` process with one CPU thread, so that two launches of one
run can be compared bit for bit. The study is the demo's synthetic CheXpert data at 32 px with a resnetv2_tiny
trained for a few steps, augmentation on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
OOD = {"name": "ood_site_b", "root": "synthetic:b", "split": "train"}


def study_config(tmp: Path, store: Path, *, ood: bool = True, **grid) -> Path:
    """Write a tiny study config for ``store`` and return its path; ``grid`` overrides the grid axes."""
    cfg = {
        "name": "tiny",
        "output_dir": str(store),
        "data": {"root": "synthetic", "image_size": 32, "labels": LABELS, "options": {"uncertainty": "ignore"},
                 "flip": True, "ood": [OOD] if ood else []},
        "train": {"batch_size": 16, "lr": 0.05, "steps": 4, "warmup_steps": 1, "log_every": 4},
        "sharding": {"strategy": "none"},
        "eval": {"n_boot": 10},
        "grid": {"backbones": ["resnetv2_tiny"], "pretrained": ["scratch"], "fractions": [1.0], "seeds": [0],
                 **grid},
    }
    path = tmp / f"study-{len(list(tmp.glob('study-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict:
    """The environment of a launch: this checkout first on the path, one thread, no network."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled", **extra}


def command(config: Path, *args: str) -> list[str]:
    """The command line of one launch (``--no-report``: the report has tests of its own)."""
    return [sys.executable, str(REPO / "recipes" / "scale_study.py"), "--config", str(config), "--no-report", *args]


def launch(config: Path, *args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    """Run one launch to its end; returns the finished process (stdout, stderr as text)."""
    return subprocess.run(command(config, *args), env=env(), capture_output=True, text=True, timeout=900,
                          preexec_fn=preexec_fn)


def events(store: Path) -> list[dict]:
    """The store's events.jsonl."""
    p = store / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def count(store: Path, event: str) -> dict[str, int]:
    """How many times each run had ``event`` (train, done, evaluate, metrics, failed)."""
    out: dict[str, int] = {}
    for e in events(store):
        if e["event"] == event:
            out[e["run_id"]] = out.get(e["run_id"], 0) + 1
    return out


def results(store: Path, run_id: str) -> dict[str, pd.DataFrame]:
    """Every stored predictions file and the metrics of one run, by file name."""
    d = store / "runs" / run_id
    return {p.relative_to(d).as_posix(): pd.read_parquet(p) for p in sorted(d.rglob("*.parquet"))}


def assert_same_results(a: Path, b: Path, run_ids) -> None:
    """The runs have exactly the same predictions and metrics in stores ``a`` and ``b`` (bit for bit)."""
    for rid in run_ids:
        ra, rb = results(a, rid), results(b, rid)
        assert sorted(ra) == sorted(rb), rid
        for name in ra:
            pd.testing.assert_frame_equal(ra[name], rb[name], check_exact=True, obj=f"{rid}/{name}")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime (to assert that nothing was written)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}

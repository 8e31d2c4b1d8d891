"""Launched by tests/test_resume.py: one training cell killed for real and resumed in fresh launches.

    python resume_suite.py <phase> <out_dir>                                        # STRATEGY=none: one process
    torchrun --standalone --nproc_per_node 2 resume_suite.py <phase> <out_dir>      # STRATEGY=fsdp
    ACCELERATE_USE_DEEPSPEED=true torchrun ... resume_suite.py <phase> <out_dir>    # STRATEGY=zero3

The cell trains the toy ViT on 8-bit PNGs through ``TableDataset`` with the image cache, random resized crops,
rotations and flips (stateless augmentation), and MixUp; it checkpoints every 2 steps. ``<out_dir>/table.csv`` and
``test.csv`` (written by the test) are its training and test tables.

Phases (``LABEL`` names the launch in marker files):

* ``victim``  with ``FIRST=1`` first fits the cell uninterrupted (``reference_a``: a fresh process fitting the same
              cell as the ``final`` phase's reference) and a MixUp-free cell that preempts itself at step 4
              (``n2m``, the source of the world-size change checks); then the victim cell, in
              ``<out_dir>/<strategy>/victim``, resuming if it holds a checkpoint. Rank 0 writes
              ``<out_dir>/<LABEL>_step<N>`` after logging step N and then sleeps, so the test can kill the launch at a
              chosen step (SIGKILL of the whole process group, or SIGTERM to the launcher, which torchrun forwards).
* ``final``   resumes the victim to the end, fits it again (the run is finished: its final checkpoint is loaded,
              nothing trains), fits the reference, and resumes ``N2M_FROM`` (a copy of another world size's ``n2m``
              checkpoint) next to an uninterrupted MixUp-free reference; fsdp also resumes a copy of its own
              ``n2m`` checkpoint with 2 blocks per FSDP unit (``regrouped``). The ``none`` launch, last, also loads
              the finished fsdp and zero3 victims (2 ranks) in its 1 process; the zero3 launch also fits a zero2
              cell twice, and resumes copies of a ZeRO checkpoint whose model-state or optimizer-state files (both
              ranks') hold a pickle that would create ``<out_dir>/PWNED`` when unpickled.

Rank 0 writes ``<out_dir>/<strategy>_<phase>.pt``: per cell the world size, summary, final consolidated parameters
and test logits.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toy import IMAGE_LABELS, IMG, plant, vit  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.data.dataset import TableDataset  # noqa: E402
from scaling.engine import CheckpointError, Preempted, Trainer  # noqa: E402

STEPS = 10
SLOW_S = 0.4


def train_cfg(mixup: bool = True) -> TrainConfig:
    """The cell: SGD + momentum, cosine, checkpoints every 2 steps, MixUp unless ``mixup=False``, deterministic
    kernels (``train.deterministic``)."""
    return TrainConfig(batch_size=8, steps=STEPS, lr=0.05, optimizer="sgd", momentum=0.9, warmup_steps=2,
                       log_every=1, schedule="cosine", checkpoint_every=2, mixup_alpha=0.4 if mixup else 0.0, seed=5,
                       deterministic=True)


class Marks:
    """Tracker double on rank 0: a marker file per logged step, then a pause in which the test can kill."""

    run_id = "resume-suite"

    def __init__(self, out: Path, label: str):
        self.out, self.label = out, label

    def log(self, data, step):
        (self.out / f"{self.label}_step{step}").write_text("")
        time.sleep(SLOW_S)


class PreemptAt:
    """Tracker double that SIGTERMs its own process while step ``at - 1`` is logged: the ranks agree on the flag at
    the next sync point (``log_every=1``: step ``at``), save and stop there."""

    run_id = "resume-suite"

    def __init__(self, at: int):
        self.at = at

    def log(self, data, step):
        if step == self.at - 1:
            os.kill(os.getpid(), 15)


def datasets(out: Path) -> tuple[TableDataset, TableDataset]:
    """The training set (augmented, flips on) and the test set, both read from the image cache the test built."""
    train = TableDataset(pd.read_csv(out / "table.csv"), IMAGE_LABELS, IMG, train=True, cache_dir=out / "cache",
                         flip=True)
    test = TableDataset(pd.read_csv(out / "test.csv"), IMAGE_LABELS, IMG, train=False, cache_dir=out / "cache")
    return train, test


def cell(strategy: str, out: dict, name: str, run_dir: Path | None, data, train=None, tracker=None,
         **sharding) -> None:
    """Fit (resuming from ``run_dir`` if it holds a checkpoint) and record the result under ``name``."""
    train_ds, test_ds = data
    trainer = Trainer(vit(), train or train_cfg(), ShardingConfig(strategy=strategy, **sharding), output_dir=run_dir,
                      tracker=tracker)
    try:
        summary = trainer.fit(train_ds)
        pred = trainer.predict(test_ds, batch_size=8)
        out[name] = {"world": trainer.world_size, "summary": summary, "params": trainer.full_state_dict(),
                     "logits": None if pred is None else torch.from_numpy(pred["logits"])}
    finally:
        trainer.close()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def poisoned_zero_checkpoint(out: dict, base: Path, out_dir: Path, data, rank: int) -> None:
    """Resume copies of a ZeRO-3 checkpoint with planted pickles; record every rank's error and the marker."""
    try:
        cell("zero3", {}, "poison_source", base / "poison_source", data, train=train_cfg(mixup=False),
             tracker=PreemptAt(2))
    except Preempted:
        pass
    marker = out_dir / "PWNED"
    for kind in ("model_states", "optim_states"):
        run = base / f"poisoned_{kind}"
        if rank == 0:
            shutil.copytree(base / "poison_source", run)
            for f in run.rglob(f"*{kind}.pt"):
                plant(f, marker)
        barrier()
        try:
            cell("zero3", {}, "poisoned", run, data, train=train_cfg(mixup=False))
            error = None
        except CheckpointError as e:
            error = str(e)
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        out[f"poisoned_{kind}"] = {"errors": errors, "marker": marker.exists(),
                                   "planted": sorted(str(f) for f in run.rglob(f"*{kind}.pt"))}


def main():
    phase, out_dir = sys.argv[1], Path(sys.argv[2])
    strategy, label = os.environ["STRATEGY"], os.environ.get("LABEL", "")
    rank = int(os.environ.get("RANK", "0"))
    base = out_dir / strategy
    data = datasets(out_dir)
    out: dict = {}
    reshardable = strategy != "zero3"  # ZeRO partitions are tied to their world size
    if phase == "victim":
        if os.environ.get("FIRST") == "1":
            if strategy == "none":
                cell(strategy, out, "reference_a", None, data)
            if reshardable:
                try:
                    cell(strategy, out, "n2m", base / "n2m", data, train=train_cfg(mixup=False),
                         tracker=PreemptAt(4))
                except Preempted:
                    out["n2m"] = {"world": int(os.environ.get("WORLD_SIZE", "1"))}
        if rank == 0:
            torch.save(out, out_dir / f"{strategy}_{label}.pt")
        cell(strategy, out, "victim", base / "victim", data, tracker=Marks(out_dir, label))
        raise SystemExit("the victim was not killed")
    if phase == "final":
        if strategy == "zero3":
            poisoned_zero_checkpoint(out, base, out_dir, data, rank)
        cell(strategy, out, "victim", base / "victim", data)
        cell(strategy, out, "victim_again", base / "victim", data)
        cell(strategy, out, "reference", None, data)
        if reshardable:
            cell(strategy, out, "n2m_reference", None, data, train=train_cfg(mixup=False))
            if rank == 0:
                shutil.copytree(out_dir / os.environ["N2M_FROM"] / "n2m", base / "n2m_resumed")
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            cell(strategy, out, "n2m_resumed", base / "n2m_resumed", data, train=train_cfg(mixup=False))
        if strategy == "fsdp":  # its own 2-rank checkpoint (one block per FSDP unit) resumed with 2 blocks per unit
            if rank == 0:
                shutil.copytree(base / "n2m", base / "regrouped")
            barrier()
            cell(strategy, out, "regrouped", base / "regrouped", data, train=train_cfg(mixup=False),
                 blocks_per_unit=2)
        if strategy == "zero3":  # ZeRO-1/2 keep whole parameters on every rank: their final weights load another way
            cell("zero2", out, "zero2", base / "zero2", data, train=train_cfg(mixup=False))
            cell("zero2", out, "zero2_again", base / "zero2", data, train=train_cfg(mixup=False))
        if strategy == "none":
            for other in ("fsdp", "zero3"):
                shutil.copytree(out_dir / other / "victim", base / f"{other}_finished")
                cell(strategy, out, f"{other}_finished", base / f"{other}_finished", data)
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    if rank == 0:
        torch.save(out, out_dir / f"{strategy}_{phase}.pt")


if __name__ == "__main__":
    main()

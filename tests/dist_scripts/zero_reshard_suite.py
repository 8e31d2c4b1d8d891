"""Launched by tests/test_zero_reshard.py: ZeRO checkpoints resumed on another number of processes.

    ACCELERATE_USE_DEEPSPEED=true torchrun --standalone --nproc_per_node <1|2> zero_reshard_suite.py <phase> <out_dir>

Phases:

* ``source``  for zero1, zero2 and zero3 (SGD with momentum): fits the cell uninterrupted (``reference``) and a
              copy that preempts itself at step 3 (its checkpoint: ``<out_dir>/<strategy>_w<world>``); on 2 ranks
              also AdamW cells preempted at step 3 (``<strategy>_adamw_w2``, for the comparison with DeepSpeed's own
              converter).
* ``resume``  resumes (from copies the test made) each strategy's checkpoint of the other world size to the end
              (``resharded``); on 2 ranks also its own 2-rank checkpoint (``same``); on 1 rank the 2-rank zero3
              checkpoint whose rank-1 optimizer file the test removed (``unconvertible``: every rank's error).

Rank 0 writes ``<out_dir>/<phase>_w<world>.pt``: per cell the world size, summary (or the error), final parameters,
SGD momentum (``deepspeed.utils.safe_get_full_optimizer_state``) and DeepSpeed's step counter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toy import ToyDataset, vit  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.engine import CheckpointError, Preempted, Trainer  # noqa: E402

STRATEGIES = ("zero1", "zero2", "zero3")
PREEMPT_AT = 3


def train_cfg(optimizer: str = "sgd") -> TrainConfig:
    """6 steps of 8 images, no checkpoints but the one written when preempted."""
    return TrainConfig(batch_size=8, steps=6, lr=0.05, optimizer=optimizer, momentum=0.9, warmup_steps=2,
                       log_every=1, schedule="cosine")


class PreemptAt:
    """Tracker double that SIGTERMs its own process while step ``at - 1`` is logged: the ranks save at ``at``."""

    run_id = "zero-reshard"

    def __init__(self, at: int):
        self.at = at

    def log(self, data, step):
        if step == self.at - 1:
            os.kill(os.getpid(), 15)


def cell(strategy: str, out: dict, name: str, run_dir: Path | None, optimizer: str = "sgd") -> None:
    """Fit (resuming from ``run_dir`` if it holds a checkpoint); record the result, or the CheckpointError."""
    from deepspeed.utils import safe_get_full_optimizer_state

    trainer = Trainer(vit(), train_cfg(optimizer), ShardingConfig(strategy=strategy), output_dir=run_dir)
    try:
        summary = trainer.fit(ToyDataset(64))
        momentum = {n: safe_get_full_optimizer_state(p, "momentum_buffer").clone()
                    for n, p in trainer.module.named_parameters()}
        out[name] = {"world": trainer.world_size, "summary": summary, "params": trainer.full_state_dict(),
                     "momentum": momentum, "engine_steps": trainer.engine.global_steps}
    except CheckpointError as e:
        errors = [None] * trainer.world_size
        torch.distributed.all_gather_object(errors, str(e))
        out[name] = {"world": trainer.world_size, "errors": errors}
    finally:
        trainer.close()


def preempted(strategy: str, run_dir: Path, optimizer: str = "sgd") -> None:
    """Fit until the self-sent SIGTERM at step 3 leaves a checkpoint in ``run_dir``."""
    trainer = Trainer(vit(), train_cfg(optimizer), ShardingConfig(strategy=strategy), output_dir=run_dir,
                      tracker=PreemptAt(PREEMPT_AT))
    try:
        trainer.fit(ToyDataset(64))
        raise SystemExit(f"{strategy}: the cell was not preempted")
    except Preempted:
        pass
    finally:
        trainer.close()


def main():
    phase, out_dir = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    other = 3 - world  # 1 <-> 2
    out: dict = {}
    if phase == "source":
        for strategy in STRATEGIES:
            cell(strategy, out, f"{strategy}/reference", None)
            preempted(strategy, out_dir / f"{strategy}_w{world}")
        if world == 2:
            for strategy in ("zero2", "zero3"):
                preempted(strategy, out_dir / f"{strategy}_adamw_w2", optimizer="adamw")
    elif phase == "resume":
        for strategy in STRATEGIES:
            cell(strategy, out, f"{strategy}/resharded", out_dir / f"{strategy}_w{other}_on{world}")
            if world == 2:
                cell(strategy, out, f"{strategy}/same", out_dir / f"{strategy}_w2_on2")
        if world == 1:
            cell("zero3", out, "unconvertible", out_dir / "unconvertible")
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    if rank == 0:
        torch.save(out, out_dir / f"{phase}_w{world}.pt")


if __name__ == "__main__":
    main()

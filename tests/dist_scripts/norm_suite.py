"""Launched on 2 CPU ranks by tests/test_norm_sync.py (torchrun, gloo): BatchNorm running statistics under ddp and
fsdp, for a model of one's own (its blocks given as ``Trainer(..., block_classes=)``).

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/norm_suite.py norm <out_dir>

Per strategy: train a few steps (each rank's BatchNorm layers see only its own micro-batches), then record every
rank's running statistics, the Trainer's predictions, the exported weights, and the predictions of a second
Trainer that reloads the run's final checkpoint. Rank 0 writes ``<out_dir>/norm.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toy import NUM_LABELS, ToyDataset  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.engine import Trainer  # noqa: E402

N_EVAL = 21  # odd: the ranks' shares are padded, as in a real evaluation set


class Block(nn.Module):
    """Convolution, BatchNorm, ReLU: the repeated unit (one FSDP unit each)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class SmallBN(nn.Module):
    """A user's own BatchNorm CNN (no timm, no family row)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, 16), Block(16, 16))
        self.head = nn.Linear(16, NUM_LABELS)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().cpu().clone() for n, b in module.named_buffers() if "running_" in n}


def trainer_for(strategy: str, out: Path) -> Trainer:
    cfg = TrainConfig(batch_size=8, steps=6, lr=0.05, warmup_steps=0, schedule="constant", log_every=3,
                      checkpoint_every=3)
    return Trainer(SmallBN(), cfg, ShardingConfig(strategy=strategy), output_dir=out,
                   block_classes=(Block,) if strategy == "fsdp" else None)


def main():
    out_dir = Path(sys.argv[2])
    world = int(os.environ["WORLD_SIZE"])
    results: dict = {"world": world}
    train, data = ToyDataset(48), ToyDataset(N_EVAL, seed=1)
    for strategy in ("ddp", "fsdp"):
        run = out_dir / f"norm_{strategy}"
        trainer = trainer_for(strategy, run)
        trainer.fit(train)
        mine = bn_buffers(trainer.module)
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
        pred = trainer.predict(data, batch_size=4)
        exported = trainer.export(run / "exported.safetensors")
        trainer.close()
        # A second Trainer on the same run directory loads checkpoints/final instead of training.
        again = trainer_for(strategy, run)
        summary = again.fit(train)
        pred_again = again.predict(data, batch_size=4)
        again.close()
        if torch.distributed.get_rank() == 0:
            from safetensors.torch import load_file

            model = SmallBN(seed=1)  # other initial weights: everything must come from the file
            model.load_state_dict(load_file(exported))
            model.eval()
            with torch.no_grad():
                reloaded = model(data.images[(pred["index"] - 3) // 10]).numpy()
            results[strategy] = {"buffers": every, "exported": bn_buffers(model), "pred": pred,
                                 "reloaded_logits": reloaded, "from_final": summary["from_final_checkpoint"],
                                 "pred_again": pred_again}
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_dir / "norm.pt")


if __name__ == "__main__":
    main()

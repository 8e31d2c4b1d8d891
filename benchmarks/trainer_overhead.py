"""Trainer per-step overhead against a bare PyTorch loop on the same model, data and optimizer.

    python benchmarks/trainer_overhead.py [--model vit_tiny_patch16_224] [--img 32] [--batch 32] [--steps 20] [--threads 1]

Both loops run in this one process on identical copies of the model: SGD with momentum, the same learning-rate
schedule, the masked multi-label BCE, a DataLoader over the same in-memory dataset. They alternate in ``--rounds``
rounds (bare, trainer, bare, trainer, ...) so that load from other processes hits both alike; the per-step time of
each loop is its median over rounds, the first step of each run excluded (warm-up). Prints the ratio trainer/bare
(goal <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.data.dataset import split_key  # noqa: E402
from scaling.engine.schedule import lr_at  # noqa: E402
from scaling.engine.trainer import Trainer  # noqa: E402
from scaling.models.optim import build_optimizer  # noqa: E402


class Data(torch.utils.data.Dataset):
    """Random images and multi-label targets with ~15 % missing labels."""

    def __init__(self, n: int, img: int, labels: int = 5):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, img, img, generator=g)
        self.y = (torch.rand(n, labels, generator=g) < 0.4).float()
        self.y[torch.rand(n, labels, generator=g) < 0.15] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        i, _ = split_key(key)  # the Trainer's keys are (position, draw_seed); nothing here is random
        return {"image": self.x[i], "target": self.y[i], "index": i}


def make_model(args):
    import timm

    torch.manual_seed(0)
    return timm.create_model(args.model, pretrained=False, num_classes=5, img_size=args.img)


def bare_loop(args, cfg, data) -> tuple[float, float]:
    """The minimal loop: (wall, CPU) seconds per step, mean over the steps after the first."""
    model = make_model(args)
    opt = build_optimizer(model, cfg)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    it = iter(loader)
    t0 = None
    for step in range(cfg.steps):
        if step == 1:
            t0, c0 = time.perf_counter(), time.process_time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg) * g["lr_scale"]
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        logits = model(b["image"])
        known = ~torch.isnan(b["target"])
        loss = (F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(b["target"]), reduction="none")
                * known).sum() / known.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.detach().item()  # the trainer reads the loss at log steps only; a bare loop usually prints it
    return (time.perf_counter() - t0) / (cfg.steps - 1), (time.process_time() - c0) / (cfg.steps - 1)


def trainer_loop(args, cfg, data) -> tuple[float, float]:
    """The Trainer on the same model/data: (wall, CPU) seconds per step after the first step (its own timers)."""
    trainer = Trainer(make_model(args), cfg, ShardingConfig(strategy="none"))
    summary = trainer.fit(data)
    trainer.close()
    return summary["seconds"] / (cfg.steps - 1), summary["cpu_seconds"] / (cfg.steps - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps OpenMP from spin-waiting, which inflates CPU time under load")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(batch_size=args.batch, steps=args.steps, lr=0.01, warmup_steps=5, log_every=10)
    data = Data(args.batch * 8, args.img)
    bare, ours = [], []
    for r in range(args.rounds):
        bare.append(bare_loop(args, cfg, data))
        ours.append(trainer_loop(args, cfg, data))
        print(f"round {r}: bare {bare[-1][0] * 1e3:.1f} ms/step wall, {bare[-1][1] * 1e3:.1f} ms CPU; "
              f"trainer {ours[-1][0] * 1e3:.1f} ms/step wall, {ours[-1][1] * 1e3:.1f} ms CPU", flush=True)
    print(f"{args.model} @{args.img}px batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
    for i, what in enumerate(("wall", "CPU")):
        b, t = statistics.median(x[i] for x in bare), statistics.median(x[i] for x in ours)
        print(f"{what:>4}: bare PyTorch loop {b * 1e3:.1f} ms/step, Trainer {t * 1e3:.1f} ms/step, "
              f"ratio trainer/bare = {t / b:.3f} (goal <= 1.05)")
    print("CPU time (all threads of this process) is the robust figure when other processes share the cores.")


if __name__ == "__main__":
    main()

"""Training throughput (images/s) and MFU of the Trainer on GPUs: ViT-L/16 @224 and BiT R101x3 @384, unsharded on
one GPU vs ``fsdp`` and ``zero3`` on all GPUs of the node .

    python benchmarks/gpu_throughput.py [--gpus 8] [--models vit_l16,bit_r101x3] [--strategies none,fsdp,zero3]

Protocol (as timm's ``benchmark.py`` and Accelerate's ``PerformanceTracker``): synthetic inputs from an in-memory dataset, bf16 compute with fp32 master weights,
SGD momentum (as timm's ``benchmark.py``), ``--warmup`` steps discarded then ``--steps`` timed steps; throughput is
global images / wall time of the timed window (the Trainer's log window, closed by a loss read that synchronises
the GPU). MFU = model FLOPs (3 x a forward counted by ``torch.utils.flop_counter`` at batch 1) x images/s /
(GPUs x dense bf16 peak of the card). Peak memory is ``torch.cuda.max_memory_allocated`` on rank 0.

Needs CUDA; on a machine without a GPU it says so and exits with status 2 (nothing is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    # name: (timm architecture, resolution, per-GPU micro-batch)
    "vit_l16": ("vit_large_patch16_224", 224, 32),
    "bit_r101x3": ("resnetv2_101x3_bit", 384, 8),
}


class Synthetic(torch.utils.data.Dataset):
    """A fixed bank of random images, indexed cyclically (no decode cost: model throughput, not pipeline)."""

    def __init__(self, n: int, res: int, labels: int = 14):
        self.bank = torch.randn(64, 3, res, res)
        self.target = (torch.rand(64, labels) > 0.5).float()
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        from scaling.data.dataset import split_key

        i, _ = split_key(key)  # training keys are (position, draw_seed); nothing here is random
        return {"image": self.bank[i % 64], "target": self.target[i % 64], "index": i}


def worker(args) -> None:
    import timm

    from scaling.config import ShardingConfig, TrainConfig
    from scaling.engine import Trainer

    arch, res, micro = MODELS[args.model]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = micro * world
    cfg = TrainConfig(batch_size=batch, steps=args.warmup + args.steps, lr=0.001, warmup_steps=0,
                      log_every=args.warmup, schedule="constant", mixed_precision="bf16")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=14, img_size=res) if "vit" in arch else \
        timm.create_model(arch, pretrained=False, num_classes=14)
    sharding = ShardingConfig(strategy=args.strategy, activation_checkpointing=args.activation_checkpointing)
    trainer = Trainer(model, cfg, sharding, num_workers=4)
    del model
    trainer.fit(Synthetic(batch * (args.warmup + args.steps), res))
    last = trainer.history[-1]  # the timed window (the first log closed the warm-up window)
    if trainer.is_main:
        result = {"model": args.model, "res": res, "strategy": args.strategy, "gpus": world, "global_batch": batch,
                  "images_per_s": last["images_per_s"], "mfu": last.get("mfu"),
                  "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        Path(args.out).write_text(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=0, help="GPUs for fsdp/zero3 (default: all visible)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--strategies", default="none,fsdp,zero3")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "timm", "fsdp"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not torch.cuda.is_available():
        print("no CUDA device on this machine: GPU throughput not measured")
        raise SystemExit(2)
    gpus = args.gpus or torch.cuda.device_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for strategy in args.strategies.split(","):
                n = 1 if strategy == "none" else gpus
                out = Path(tmp) / f"{model}_{strategy}.json"
                env = dict(os.environ, HF_HUB_OFFLINE="1")
                env.pop("ACCELERATE_USE_DEEPSPEED", None)
                if strategy.startswith("zero"):
                    env.update(ACCELERATE_USE_DEEPSPEED="true",
                               ACCELERATE_DEEPSPEED_CONFIG_FILE=str(REPO / "launch" / f"ds_{strategy}.json"))
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                       __file__, "--worker", "--model", model, "--strategy", strategy, "--out", str(out),
                       "--warmup", str(args.warmup), "--steps", str(args.steps),
                       "--activation-checkpointing", args.activation_checkpointing]
                proc = subprocess.run(cmd, env=env, cwd=REPO)
                if proc.returncode != 0 or not out.exists():
                    rows.append({"model": model, "strategy": strategy, "gpus": n, "error": proc.returncode})
                    continue
                rows.append(json.loads(out.read_text()))
    print("| model | px | strategy | GPUs | global batch | images/s | images/s/GPU | MFU | peak mem GiB | card |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | | {r['strategy']} | {r['gpus']} | failed (exit {r['error']}) | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        print(f"| {r['model']} | {r['res']} | {r['strategy']} | {r['gpus']} | {r['global_batch']} | "
              f"{r['images_per_s']:.1f} | {r['images_per_s'] / r['gpus']:.1f} | {mfu} | {r['peak_mem_gib']:.1f} | "
              f"{r['device']} |")


if __name__ == "__main__":
    main()

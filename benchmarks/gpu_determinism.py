"""``train.deterministic`` on a GPU: what it costs in images/s, and whether reruns are bit-identical.

    python benchmarks/gpu_determinism.py [--models resnetv2_50x1_bit,vit_base_patch16_224] [--steps 30] [--batch 64]

For each model, four fresh processes each fit the same cell (strategy ``none``, bf16, SGD, 224 px uint8 images
through the integer pipeline with stateless augmentation and MixUp): two with ``train.deterministic: false`` and two
with ``true``. Prints images/s (Trainer summary: after the first step) per run, the deterministic / default speed
ratio, and whether the two runs of each setting ended with bit-identical parameters. Then one process checks the
host→device step on CUDA (uint8 and uint16 batches equal the CPU result) and that a run preempted by a real SIGTERM
and resumed in a fresh Trainer ends bit-identical to the uninterrupted run on the GPU.

Exits with status 2 on a machine without CUDA. ``--cpu-smoke`` checks the script itself on the CPU before a GPU's
minutes are spent on it: the same four processes per model and the SIGTERM + resume check, with a tiny ViT on 32 px
images (the host→device checks need CUDA and are skipped); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Images(torch.utils.data.Dataset):
    """``n`` random uint8 grayscale images (256 px) with multi-label targets, augmented like the real datasets."""

    def __init__(self, n: int = 512, size: int = 224, labels: int = 5):
        from scaling.data.images import BIT_MEAN, BIT_STD, build_transform

        g = torch.Generator().manual_seed(0)
        stored = 256 * size // 224  # the stored image is larger than the crop, as with the real datasets' cache
        self.x = torch.randint(0, 256, (n, 1, stored, stored), dtype=torch.uint8, generator=g)
        self.y = (torch.rand(n, labels, generator=g) < 0.3).float()
        self.mean, self.std = BIT_MEAN, BIT_STD
        self.transform = build_transform(size, train=True, flip=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key) -> dict:
        from scaling.data.dataset import split_key

        i, seed = split_key(key)
        return {"image": self.transform(self.x[i], seed), "target": self.y[i], "index": i}


SMOKE = {"model": "vit_tiny_patch16_224", "size": 32, "n": 32}
"""``--cpu-smoke``: a ViT-Ti on 32 px crops of 36 px images, 32 of them."""


def cfg(steps: int, batch: int, deterministic: bool):
    from scaling.config import TrainConfig

    return TrainConfig(batch_size=batch, steps=steps, lr=0.01, warmup_steps=2, log_every=steps, mixup_alpha=0.2,
                       mixed_precision="bf16", deterministic=deterministic)


def model(name: str, size: int = 224):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **({"img_size": size} if "vit" in name else {}))


def digest(trainer) -> str:
    """sha256 of the final parameters (bit-identical runs have equal digests)."""
    h = hashlib.sha256()
    for k, v in sorted(trainer.full_state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def worker(name: str, steps: int, batch: int, deterministic: bool, smoke: bool = False) -> None:
    from scaling.config import ShardingConfig
    from scaling.engine import Trainer

    size, n = (SMOKE["size"], SMOKE["n"]) if smoke else (224, 512)
    trainer = Trainer(model(name, size), cfg(steps, batch, deterministic), ShardingConfig(strategy="none"),
                      num_workers=0 if smoke else 12)
    summary = trainer.fit(Images(n, size))
    print(json.dumps({"images_per_s": summary["images_per_s"], "digest": digest(trainer)}))


def pipeline_and_resume(smoke: bool = False) -> dict:
    """CUDA checks in one process: to_device vs CPU, and SIGTERM + resume bit-identical (deterministic kernels).
    ``smoke``: the resume check only, on the CPU with the smoke model."""
    from scaling.config import ShardingConfig
    from scaling.engine import Preempted, Trainer
    from scaling.engine.inputs import Normalisation, to_device

    out = {}
    norm = Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for dtype, top in () if smoke else ((torch.uint8, 255), (torch.uint16, 65535)):
        x = torch.randint(0, top + 1, (8, 1, 64, 64), dtype=torch.int32).to(dtype).pin_memory()
        gpu = to_device(x, torch.device("cuda"), norm, channels_last=True)
        cpu = to_device(x, torch.device("cpu"), norm)
        out[f"to_device_{str(dtype).split('.')[-1]}_max_diff"] = (gpu.cpu() - cpu).abs().max().item()
        out[f"to_device_{str(dtype).split('.')[-1]}_channels_last"] = gpu.is_contiguous(
            memory_format=torch.channels_last)

    class SigtermAt:
        run_id = "gpu"

        def log(self, data, step):
            if step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    c = dataclasses.replace(cfg(8, 8 if smoke else 32, True), log_every=1)
    name, size = (SMOKE["model"], SMOKE["size"]) if smoke else ("resnetv2_50x1_bit", 224)
    data = Images(SMOKE["n"] if smoke else 128, size)
    ref = Trainer(model(name, size), c, ShardingConfig(strategy="none"))
    ref.fit(data)
    want = digest(ref)
    with tempfile.TemporaryDirectory() as d:
        try:
            Trainer(model(name, size), c, ShardingConfig(strategy="none"), output_dir=d, tracker=SigtermAt()).fit(data)
        except Preempted:
            pass
        resumed = Trainer(model(name, size), c, ShardingConfig(strategy="none"), output_dir=d)
        out["resumed_from"] = resumed.fit(data)["resumed_from"]
        out["resume_bit_identical"] = digest(resumed) == want
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnetv2_50x1_bit,vit_base_patch16_224")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "DETERMINISTIC"), help=argparse.SUPPRESS)
    ap.add_argument("--checks", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check the script itself on the CPU (tiny ViT, 32 px) before spending GPU time; no timings")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.models = SMOKE["model"]
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        raise SystemExit(2)
    smoke = ["--cpu-smoke"] if args.cpu_smoke else []
    if args.worker:
        return worker(args.worker[0], args.steps, args.batch, args.worker[1] == "1", args.cpu_smoke)
    if args.checks:
        return print(json.dumps(pipeline_and_resume(args.cpu_smoke)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    card = "CPU (smoke run: no timings)" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, {args.steps} steps, batch {args.batch}, bf16\n")
    print("| model | deterministic | images/s run 1 | run 2 | runs bit-identical |")
    print("|---|---|---|---|---|")
    speed = {}
    for name in args.models.split(","):
        for det in (0, 1):
            runs = []
            for _ in range(2):
                p = subprocess.run([sys.executable, __file__, "--worker", name, str(det), "--steps", str(args.steps),
                                    "--batch", str(args.batch), *smoke], env=env, capture_output=True, text=True)
                if p.returncode:
                    raise SystemExit(f"{name} deterministic={det} failed:\n{p.stderr[-4000:]}")
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            speed[name, det] = sum(r["images_per_s"] for r in runs) / 2
            print(f"| {name} | {bool(det)} | {runs[0]['images_per_s']:.0f} | {runs[1]['images_per_s']:.0f} | "
                  f"{runs[0]['digest'] == runs[1]['digest']} |", flush=True)
    print()
    for name in args.models.split(","):
        print(f"{name}: deterministic / default images/s = {speed[name, 1] / speed[name, 0]:.3f}")
    p = subprocess.run([sys.executable, __file__, "--checks", *smoke], env=env, capture_output=True, text=True)
    print("checks:", p.stdout.strip().splitlines()[-1] if p.returncode == 0 else p.stderr[-4000:])


if __name__ == "__main__":
    main()

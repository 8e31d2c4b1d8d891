"""Training throughput (images/s), MFU, peak memory and host synchronisations of the Trainer on GPUs, per strategy,
micro-batch and ``train.compile``, with the ratio to ``none`` at the same micro-batch.

    python benchmarks/gpu_throughput.py                      # quick preset: the goal points, ~8 min on one H100/H200
    python benchmarks/gpu_throughput.py --preset sweep --models vit_l16 --batches 32,64,128,256 --compile off,blocks
    python benchmarks/gpu_throughput.py --gpus 8 --strategies none,ddp,fsdp,zero3   # all GPUs of the node
    python benchmarks/gpu_throughput.py --budget 480        # stop starting runs that would end after 8 minutes
    python benchmarks/gpu_throughput.py --cpu-smoke --batches 8 --compile off --warmup 1 --steps 2  # no GPU: a check
    python benchmarks/gpu_throughput.py --preset sweep --strategies none,fsdp,fsdp:4   # fsdp:N = N blocks per unit
    python benchmarks/gpu_throughput.py --fake-world 8     # one GPU as rank 0 of 8: a multi-GPU rank's path and memory

Protocol (as timm's ``benchmark.py``): synthetic inputs from an in-memory dataset, bf16 compute with fp32 master
weights, SGD momentum, ``--warmup`` steps discarded, then ``--steps`` timed steps; every run is a fresh ``torchrun``
process. Throughput is global images / wall time of the Trainer's log windows after the first (each window is
closed by the loss read that synchronises the GPU); images/s/GPU divides by the GPUs of the run. MFU = model FLOPs
(3 x a forward counted by ``torch.utils.flop_counter`` at batch 1) x images/s / (GPUs x dense bf16 peak of the
card). Peak memory: ``torch.cuda.max_memory_allocated`` on rank 0. ``none`` runs on one GPU; the other strategies
on ``--gpus`` GPUs with the same micro-batch per GPU, so "ratio to none" compares images/s per GPU.

Host synchronisation: each training run is wrapped in ``torch.cuda.set_sync_debug_mode``. The Trainer exempts its
planned sync points (the warm-up step, the log windows), so for none/ddp/fsdp the mode is ``error``: any other
synchronisation inside a step fails the run and names the operation. Under ZeRO the mode is ``warn`` and the column
counts the synchronisations per step that DeepSpeed 0.19.8 makes inside ``engine.step()`` (its host check of the
gradient norm, ``deepspeed/runtime/utils.py`` ``is_invalid_grad_norm``).

``--fake-world N`` runs every strategy but ``none`` on one GPU as rank 0 of N ranks in torch's fake process group
(``fake_world.py``: collectives return at once and move no data): the rank holds 1/N of the model and runs the
all-gather / reduce-scatter code of an N-GPU job, so one lent GPU shows the host work and the memory of a rank of
that job, without its communication (which NCCL runs on its own streams). On one GPU without it, fsdp and zero3 run
the world-size-1 paths of FSDP2 and DeepSpeed, which shard nothing. ``ddp`` cannot run in a fake world.

A micro-batch that runs out of memory is retried smaller (timm ``decay_batch_step``). ``zero3`` is skipped with a
message when DeepSpeed is not installed. On a machine without CUDA the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    # name: (timm architecture, resolution)
    "vit_l16": ("vit_large_patch16_224", 224),
    "bit_r101x3": ("resnetv2_101x3_bit", 384),
}
SMOKE = {"smoke": ("vit_tiny_patch16_224", 32)}
"""``--cpu-smoke``'s only model: a ViT-Ti at 32 px (patch 16: 4 tokens) that runs the whole script on CPU ranks in
seconds."""

# (model, micro-batch per GPU, train.compile, strategy): the points the goals in benchmarks/README.md are about.
QUICK = [
    ("vit_l16", 32, "off", "none"), ("vit_l16", 32, "off", "fsdp"),
    ("vit_l16", 128, "off", "none"), ("vit_l16", 128, "off", "fsdp"), ("vit_l16", 128, "off", "zero3"),
    ("vit_l16", 32, "blocks", "none"), ("vit_l16", 32, "blocks", "fsdp"), ("vit_l16", 128, "blocks", "none"),
    ("bit_r101x3", 8, "off", "none"), ("bit_r101x3", 8, "off", "fsdp"), ("bit_r101x3", 8, "blocks", "none"),
    ("vit_l16", 32, "off", "fsdp:4"),
]
"""``fsdp:N`` is fsdp with N blocks per FSDP unit (``sharding.blocks_per_unit``)."""

GOALS = ("ViT-L/16 @224 with compile: MFU >= 45 %; fsdp >= 0.9x none at 32 images/GPU; zero3 >= 0.8x fsdp at 128; "
         "BiT-R101x3 @384: MFU >= 25 %")


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


def sharding_of(cell: str):
    """``fsdp`` -> strategy fsdp; ``fsdp:4`` -> strategy fsdp with 4 blocks per FSDP unit."""
    from scaling.config import ShardingConfig

    strategy, _, per_unit = cell.partition(":")
    return ShardingConfig(strategy=strategy, blocks_per_unit=int(per_unit or 1))


def worker(args) -> None:
    """One run on every rank of a torchrun launch: writes a JSON result (or ``{"oom": true}``) on rank 0."""
    import timm

    from scaling.config import TrainConfig
    from scaling.engine import Trainer

    arch, res = {**MODELS, **SMOKE}[args.model]
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if args.fake_world > 1:  # rank 0 of a fake world, launched as a plain process
        from fake_world import enter_world

        enter_world(args.fake_world)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    cfg = TrainConfig(batch_size=args.micro * world, steps=args.warmup + args.steps, lr=0.001, warmup_steps=0,
                      log_every=args.warmup, schedule="constant", mixed_precision="bf16", compile=args.compile)
    torch.manual_seed(0)
    kw = {"img_size": res} if "vit" in arch else {}
    out = Path(args.out)
    try:
        trainer = Trainer(timm.create_model(arch, pretrained=False, num_classes=14, **kw), cfg,
                          sharding_of(args.strategy), num_workers=0 if args.cpu_smoke else 4)
        mode = "warn" if args.strategy.startswith("zero") else "error"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.set_sync_debug_mode(mode)
            try:
                summary = trainer.fit(Synthetic(cfg.batch_size * cfg.steps, res))
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
    except torch.OutOfMemoryError:
        if rank0:
            out.write_text(json.dumps({"oom": True}))
        raise SystemExit(0)
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        if rank0:  # set_sync_debug_mode("error") caught a synchronisation the Trainer did not plan
            out.write_text(json.dumps({"sync_error": traceback.format_exc(limit=-8)}))
        raise SystemExit(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    timed = trainer.history[1:]  # the first window holds the warm-up (and compilation)
    if rank0:
        out.write_text(json.dumps({
            "model": args.model, "res": res, "strategy": args.strategy, "compile": args.compile, "world": world,
            "gpus": 1 if args.fake_world > 1 else world, "fake_world": args.fake_world > 1,
            "micro": args.micro, "images_per_s": statistics.mean(h["images_per_s"] for h in timed),
            "mfu": timed[-1].get("mfu"), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "syncs_per_step": syncs / args.steps if mode == "warn" else 0.0, "fsdp_units": summary["fsdp_units"],
            "device": torch.cuda.get_device_name() if cuda else "CPU (smoke run: no timings)",
            "torch": torch.__version__}))


def launch(cmd: list[str], env: dict, timeout: float) -> int | str:
    """Run one launch in a process group of its own; its exit status, or ``"timeout"``. On a timeout (or Ctrl-C)
    the whole group is killed: killing only the launcher, as ``subprocess.run(timeout=)`` does, leaves torchrun's
    ranks running under init, holding their GPU memory through every later run of the benchmark."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except BaseException as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            return "timeout"
        raise


def run(spec: tuple, args, tmp: Path) -> dict:
    """Launch one (model, micro, compile, strategy) run; retry smaller micro-batches on OOM."""
    from timm.utils import decay_batch_step

    model, micro, compile_mode, strategy = spec
    fake = args.fake_world if args.fake_world > 1 and strategy != "none" else 0
    gpus = 1 if strategy == "none" or fake else args.gpus
    while micro > 0:
        out = tmp / f"{model}_{strategy}_{compile_mode}_{micro}.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
        env.pop("ACCELERATE_USE_DEEPSPEED", None)
        if strategy.startswith("zero"):
            env.update(ACCELERATE_USE_DEEPSPEED="true",
                       ACCELERATE_DEEPSPEED_CONFIG_FILE=str(REPO / "launch" / f"ds_{strategy}.json"))
        launcher = ([] if fake else
                    ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)])
        cmd = [sys.executable, *launcher, __file__, "--worker", "--fake-world", str(fake), "--model", model, "--strategy", strategy, "--out", str(out), "--micro",
               str(micro), "--compile-mode", compile_mode, "--warmup", str(args.warmup), "--steps", str(args.steps),
               *(["--cpu-smoke"] if args.cpu_smoke else [])]
        if args.cpu_smoke:
            env.update(OMP_NUM_THREADS="1")
        code = launch(cmd, env, args.timeout)
        if code != 0 or not out.exists():
            return {"model": model, "strategy": strategy, "compile": compile_mode, "gpus": gpus, "world": fake or gpus,
                    "micro": micro, "error": code}
        result = json.loads(out.read_text())
        if "sync_error" in result:
            print(result["sync_error"], flush=True)
            return {"model": model, "strategy": strategy, "compile": compile_mode, "gpus": gpus, "world": fake or gpus,
                    "micro": micro, "error": "host sync inside a step"}
        if not result.get("oom"):
            return result
        print(f"{model} {strategy} compile={compile_mode}: micro-batch {micro} out of memory, retrying smaller",
              flush=True)
        micro = decay_batch_step(micro, no_odd=True)
    return {"model": model, "strategy": strategy, "compile": compile_mode, "gpus": gpus, "world": fake or gpus,
            "micro": 0, "error": "oom"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=["quick", "sweep"],
                   help="quick: the goal points; sweep: models x batches x compile x strategies")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the non-none strategies (default: all visible)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="32,128", help="sweep: micro-batches per GPU (BiT uses a quarter)")
    p.add_argument("--compile", dest="compile_modes", default="off,blocks", help="sweep: train.compile values")
    p.add_argument("--strategies", default="none,fsdp,zero3")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--timeout", type=int, default=420, help="seconds per run")
    p.add_argument("--budget", type=int, default=0,
                   help="seconds for the whole benchmark (0: no limit): runs that would not fit, judged by the longest "
                        "run so far, are skipped and the table is printed for those that ran (a lent GPU's minutes)")
    p.add_argument("--fake-world", type=int, default=0, metavar="N",
                   help="N >= 2: every strategy but none runs on one GPU as rank 0 of N fake ranks (see above)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="", help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--compile-mode", dest="compile", default="off", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script itself on CPU ranks (gloo) with a tiny ViT before spending GPU time: every "
                        "launch, strategy and the table run; the numbers mean nothing")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.cpu_smoke:
        args.gpus = args.gpus or 2
    elif not torch.cuda.is_available():
        print("no CUDA device on this machine: GPU throughput not measured")
        raise SystemExit(2)
    args.gpus = args.gpus or torch.cuda.device_count()
    strategies = args.strategies.split(",")
    if args.fake_world > 1 and "ddp" in strategies:
        raise SystemExit("ddp cannot run in a fake process group (its gradient hook needs a real all-reduce result)")
    if importlib.util.find_spec("deepspeed") is None:
        print("deepspeed is not installed: zero* strategies skipped")
        strategies = [s for s in strategies if not s.startswith("zero")]
    models = ["smoke"] if args.cpu_smoke else args.models.split(",")
    if args.preset == "quick" and not args.cpu_smoke:
        specs = [s for s in QUICK if s[0] in models and s[3].split(":")[0] in strategies]
    else:
        specs = [(m, b if m == "vit_l16" else max(1, b // 4), c, s) for m in models
                 for b in map(int, args.batches.split(",")) for c in args.compile_modes.split(",") for s in strategies]
    rows = []
    start, longest = time.perf_counter(), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs):
            elapsed = time.perf_counter() - start
            if args.budget and elapsed + longest > args.budget:
                print(f"--budget {args.budget} s: {elapsed:.0f} s spent, the longest run took {longest:.0f} s; "
                      f"skipped {[' '.join(map(str, s)) for s in specs[i:]]}", flush=True)
                break
            t0 = time.perf_counter()
            rows.append(run(spec, args, Path(tmp)))
            longest = max(longest, time.perf_counter() - t0)
            print(json.dumps(rows[-1]), flush=True)
    none = {(r["model"], r["micro"], r["compile"]): r["images_per_s"] for r in rows
            if r["strategy"] == "none" and "error" not in r}
    print(f"\nGoals: {GOALS}\n")
    print("| model | px | strategy | compile | GPUs | ranks | micro-batch/GPU | images/s/GPU | ratio to none | MFU | "
          "peak GiB | syncs/step in step | card |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ranks = f"{r['world']} (fake)" if r.get("fake_world") or r["world"] != r["gpus"] else str(r["world"])
        if "error" in r:
            print(f"| {r['model']} | | {r['strategy']} | {r['compile']} | {r['gpus']} | {ranks} | {r['micro']} | "
                  f"failed ({r['error']}) | | | | | |")
            continue
        per_gpu = r["images_per_s"] / r["world"]  # the Trainer counts the global batch: micro-batch x ranks
        base = none.get((r["model"], r["micro"], r["compile"]))
        ratio = f"{per_gpu / base:.2f}" if base else "n/a"
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        print(f"| {r['model']} | {r['res']} | {r['strategy']} | {r['compile']} | {r['gpus']} | {ranks} | {r['micro']} | "
              f"{per_gpu:.1f} | {ratio} | {mfu} | {r['peak_mem_gib']:.1f} | {r['syncs_per_step']:.1f} | "
              f"{r['device']} |")


if __name__ == "__main__":
    main()

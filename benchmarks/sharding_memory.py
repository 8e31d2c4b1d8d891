"""Per-rank model-state memory of every sharding strategy on 2 CPU ranks, and peak host memory of loading a
ViT-L-sized model with and without meta-device materialisation .

    python benchmarks/sharding_memory.py                 # model states: ddp fsdp fsdp_grad_op zero1 zero2 zero3
    python benchmarks/sharding_memory.py --peak-host     # ViT-L/16: every rank loads vs meta + own shard only

Model states: vit_small_patch16_224 at 64 px (22 M parameters), AdamW, fp32, global batch 8 on 2 ranks. Just
before the optimizer step of the second step (moments allocated, gradients not yet freed) each rank records:

* params: what it holds of the parameters (FSDP ``to_local()``, ZeRO-3 ``ds_tensor``, full tensors otherwise);
* optimizer: AdamW moments (``exp_avg``, ``exp_avg_sq``), wherever they live;
* master: DeepSpeed's separate fp32 partition the optimizer steps (ZeRO-1/2/3 keep one even in fp32 training);
* grads + buffers: the rest of what the process allocated since before the model was built (glibc
  ``mallinfo2``): gradients, gradient buckets and communication buffers. DeepSpeed's bucket sizes are set to 1 M
  elements here (its defaults of 5e8 would allocate 2 GB of buckets for a 22 M-parameter model).

The ratio column divides the total by DDP's (unsharded) total; goals: fsdp/zero3 <= 0.55, zero2 optimizer <= 0.55.
Memory formulas these numbers check (Rajbhandari et al. 2020, ZeRO, arXiv 1910.02054): per-rank model states of Adam in fp32 are 16 B/param
unsharded (4 param + 4 grad + 8 moments); FSDP full shard 16/N; ZeRO-2 4 + (4 + 8 + 4 master)/N; ZeRO-3 all /N.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 2**20
TORCH_STRATEGIES = ("ddp", "fsdp", "fsdp_grad_op")
ZERO_STRATEGIES = ("zero1", "zero2", "zero3")


# --------------------------------------------------------------------------------------------------------------
# Worker side (runs on every rank)
# --------------------------------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def allocated() -> int:
    """Bytes currently allocated by this process through malloc (glibc ``mallinfo2``: heap + mmap'd blocks).

    CPU tensors are allocated with malloc, so this sees every tensor, including those that exist only in C++
    (gradient buckets, DeepSpeed's flat buffers), which a walk over Python objects would miss.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def account(trainer) -> dict:
    """params / optimizer / master bytes this rank holds, by strategy."""
    from torch.distributed.tensor import DTensor

    s = trainer.strategy
    local = [p.to_local() if isinstance(p, DTensor) else p for p in trainer.module.parameters()]
    if s == "zero3":
        local = [p.ds_tensor for p in trainer.module.parameters()]
    if trainer.engine is not None:
        zero = trainer.engine.optimizer
        base = zero.optimizer
        master = zero.fp32_partitioned_groups_flat if s == "zero3" else zero.single_partition_of_fp32_groups
    else:
        base, master = trainer.optimizer, []
    moments = [v for st in base.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step"]
    moments = [m.to_local() if isinstance(m, DTensor) else m for m in moments]
    return {"params": _nbytes(local), "optimizer": _nbytes(moments), "master": _nbytes(master)}


class Items(torch.utils.data.Dataset):
    """Fixed items; the Trainer's training keys are ``(position, draw_seed)`` pairs (nothing here is random)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        from scaling.data.dataset import split_key

        return self.items[split_key(key)[0]]


def worker_states(strategies: list[str], out: Path, precision: str) -> None:
    import timm

    from scaling.config import ShardingConfig, TrainConfig
    from scaling.engine import Trainer

    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    data = Items([{"image": x, "target": y, "index": i} for i, (x, y) in
                  enumerate(zip(torch.randn(16, 3, 64, 64, generator=g), (torch.rand(16, 5, generator=g) > 0.5).float()))])
    results = {}
    for strategy in strategies:
        if strategy.startswith("zero"):
            # Per-cell DeepSpeed JSON (scaling reads ACCELERATE_DEEPSPEED_CONFIG_FILE for every Trainer).
            ds = out / f"ds_{strategy}.json"
            ds.write_text(json.dumps({"zero_optimization": {
                "stage": int(strategy[-1]), "reduce_bucket_size": 10**6, "allgather_bucket_size": 10**6,
                **({"stage3_prefetch_bucket_size": 10**6, "stage3_param_persistence_threshold": 10**4,
                    "stage3_max_live_parameters": 10**6} if strategy == "zero3" else {})}}))
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds)
        gc.collect()
        baseline = allocated()
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=5, img_size=64)
        cfg = TrainConfig(batch_size=8, steps=2, optimizer="adamw", lr=1e-4, warmup_steps=0, log_every=1,
                          mixed_precision=precision)
        trainer = Trainer(model, cfg, ShardingConfig(strategy=strategy))
        del model
        seen: dict = {}

        def measure():
            if trainer._step_calls == 1:  # second optimizer step: moments exist, gradients still held
                gc.collect()
                seen.update(account(trainer), total=allocated() - baseline)
            trainer._step_calls += 1

        trainer._step_calls = 0
        if trainer.engine is not None:
            engine_step = trainer.engine.step

            def step_hook():
                if trainer.engine.is_gradient_accumulation_boundary():
                    measure()
                engine_step()

            trainer.engine.step = step_hook
        else:
            opt_step = trainer.plan.step

            def step_hook():
                measure()
                opt_step()

            trainer.plan.step = step_hook
        trainer.fit(data)
        seen["grads_buffers"] = seen["total"] - seen["params"] - seen["optimizer"] - seen["master"]
        seen["n_params"] = trainer.shard.total
        results[strategy] = seen
        trainer.close()
        del trainer
    f = out / f"states_rank{rank}.json"
    f.write_text(json.dumps({**(json.loads(f.read_text()) if f.exists() else {}), **results}))


def worker_peak(mode: str, weights: Path, out: Path) -> None:
    import timm
    from safetensors.torch import load_file

    from scaling.config import ShardingConfig, TrainConfig
    from scaling.engine import Trainer
    from scaling.engine.sharding import build_on_meta

    rank = int(os.environ["RANK"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def vit_l():
        return timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=5)

    cfg = TrainConfig(batch_size=2, steps=1)
    if mode == "naive":  # every rank builds and loads the whole model, then shards it
        model = vit_l()
        model.load_state_dict(load_file(str(weights)))
        trainer = Trainer(model, cfg, ShardingConfig(strategy="fsdp"))
        del model
    else:  # meta device, each rank reads only its rows of the memory-mapped file
        trainer = Trainer(build_on_meta(vit_l), cfg, ShardingConfig(strategy="fsdp"), weights=weights)
    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {k: int(status[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}
    result = {"mode": mode, "rss_after_imports": before, "peak_rss": peak, "share": trainer.shard.share,
              "params": trainer.shard.total, "anon_now": kib["RssAnon"], "file_now": kib["RssFile"]}
    (out / f"peak_{mode}_rank{rank}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------------------


def launch(args: list[str], deepspeed: bool = False) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    if deepspeed:
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *args]
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def report_states(out: Path, precision: str) -> None:
    ranks = [json.loads((out / f"states_rank{r}.json").read_text()) for r in (0, 1)]
    ref = ranks[0]["ddp"]
    n = ref["n_params"]
    what = "fp32" if precision == "no" else "bf16 compute, fp32 master weights"
    print(f"vit_small_patch16_224 @64px, {n / 1e6:.1f} M params, AdamW, {what}, 2 CPU ranks (gloo); MB per rank")
    print(f"{'strategy':<13}{'rank':>5}{'params':>9}{'grads+buf':>11}{'optimizer':>11}{'master':>9}{'total':>9}"
          f"{'total/ddp':>11}{'optim/ddp':>11}")
    for strategy in (*TORCH_STRATEGIES, *ZERO_STRATEGIES):
        for r, res in enumerate(ranks):
            m = res[strategy]
            print(f"{strategy:<13}{r:>5}{m['params'] / MB:>9.1f}{m['grads_buffers'] / MB:>11.1f}"
                  f"{m['optimizer'] / MB:>11.1f}{m['master'] / MB:>9.1f}{m['total'] / MB:>9.1f}"
                  f"{m['total'] / ref['total']:>11.3f}{m['optimizer'] / ref['optimizer']:>11.3f}")


def report_peak(out: Path) -> None:
    print("ViT-L/16 (304 M params, 1.22 GB fp32 safetensors), fsdp on 2 CPU ranks: host memory per rank "
          "(naive: every rank builds + loads the whole model, then shards; meta: meta device + own rows only)")
    for mode in ("naive", "meta"):
        for r in (0, 1):
            m = json.loads((out / f"peak_{mode}_rank{r}.json").read_text())
            print(f"  {mode:<6} rank {r}: after imports {m['rss_after_imports'] / 2**30:.2f} GiB, "
                  f"peak {m['peak_rss'] / 2**30:.2f} GiB; after loading: anonymous {m['anon_now'] / 2**30:.2f} GiB, "
                  f"file-backed (mmap/page cache, shared) {m['file_now'] / 2**30:.2f} GiB; "
                  f"holds {m['share']:.3f} of {m['params'] / 1e6:.0f} M params")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peak-host", action="store_true", help="measure ViT-L loading peak RSS instead")
    p.add_argument("--precision", choices=["no", "bf16"], default="no",
                   help="train.mixed_precision (bf16: DeepSpeed keeps bf16 params/grads + fp32 master)")
    p.add_argument("--worker", choices=["states", "peak"], help=argparse.SUPPRESS)
    p.add_argument("--strategies", default="", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    p.add_argument("--weights", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "states":
        return worker_states(args.strategies.split(","), Path(args.out), args.precision)
    if args.worker == "peak":
        return worker_peak(args.mode, Path(args.weights), Path(args.out))
    with tempfile.TemporaryDirectory(prefix="sharding-memory-") as tmp:
        out = Path(tmp)
        if args.peak_host:
            weights = out / "vit_l.safetensors"
            subprocess.run([sys.executable, "-c",
                            "import timm, torch; from safetensors.torch import save_file; torch.manual_seed(0); "
                            "m = timm.create_model('vit_large_patch16_224', pretrained=False, num_classes=5); "
                            f"save_file(m.state_dict(), {str(weights)!r})"], check=True)
            for mode in ("naive", "meta"):
                launch(["--worker", "peak", "--mode", mode, "--weights", str(weights), "--out", tmp])
            report_peak(out)
        else:
            for strategy in (*TORCH_STRATEGIES, *ZERO_STRATEGIES):  # a fresh process per strategy
                launch(["--worker", "states", "--strategies", strategy, "--out", tmp, "--precision", args.precision],
                       deepspeed=strategy in ZERO_STRATEGIES)
            report_states(out, args.precision)


if __name__ == "__main__":
    main()

"""Launched on 2 CPU ranks by tests/test_sharding.py (torchrun, gloo; resume: tests/dist_scripts/resume_suite.py).

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/sharded_suite.py <suite> <out_dir>

Suites group many checks into one launch (each launch costs seconds of imports on 2 cores):

* ``torch``   ddp, fsdp (+ accumulation, gradient clipping, bf16, FSDP activation checkpointing, an Accelerate-FSDP launch routed to
              our path, a meta-device model materialised shard by shard, ResNetV2 and ConvNeXt), fsdp_grad_op, hsdp (2 fake nodes),
              predict with padding duplicates, export
* ``zero``    zero1, zero2 (+ gradient clipping), zero3 (+ bf16, + parameter/optimizer offload), export

Rank 0 writes ``<out_dir>/<suite>.pt``: per cell the world size, per-step losses, final consolidated parameters,
every rank's share of the sharded state and the number of FSDP units. The pytest side compares them with a
single-process run of the same config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toy import FAMILIES, ToyDataset, vit  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.engine import LaunchError, Trainer  # noqa: E402
from scaling.engine.sharding import build_on_meta  # noqa: E402

STEPS = 5


def train_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=8, steps=STEPS, lr=0.05, optimizer="sgd", momentum=0.9, warmup_steps=2, log_every=1,
                schedule="cosine")
    base.update(kw)
    return TrainConfig(**base)


def run_cell(strategy: str, out: dict, name: str, train=None, output_dir=None, predict=False, model=None,
             weights=None, **sharding):
    torch.manual_seed(0)
    trainer = Trainer(model or vit(), train or train_cfg(), ShardingConfig(strategy=strategy, **sharding),
                      output_dir=output_dir, weights=weights)
    summary = trainer.fit(ToyDataset(64))
    shares = [None] * trainer.world_size
    torch.distributed.all_gather_object(shares, trainer.shard.share)
    cell = {"world": trainer.accelerator.num_processes, "losses": [h["loss"] for h in trainer.history],
            "params": trainer.full_state_dict(), "shares": shares, "units": trainer.shard.units,
            "summary": summary}
    if predict:
        cell["pred"] = trainer.predict(ToyDataset(21, seed=1), batch_size=4)
        trainer.export(Path(output_dir or os.environ["SUITE_OUT"]) / f"{name}.safetensors")
    trainer.close()
    out[name] = cell


def main():
    suite, out_dir = sys.argv[1], Path(sys.argv[2])
    os.environ["SUITE_OUT"] = str(out_dir)
    out: dict = {}
    rank = int(os.environ["RANK"])
    if suite == "torch":
        run_cell("ddp", out, "ddp", predict=True)
        run_cell("fsdp", out, "fsdp", predict=True)
        run_cell("fsdp", out, "fsdp_accum", train=train_cfg(grad_accum=2))
        run_cell("fsdp", out, "fsdp_clip", train=train_cfg(clip_grad_norm=0.1))
        run_cell("fsdp", out, "fsdp_bf16", train=train_cfg(mixed_precision="bf16"))
        run_cell("fsdp", out, "fsdp_ac", activation_checkpointing="fsdp")
        run_cell("fsdp_grad_op", out, "fsdp_grad_op")
        # The other backbone families of the table: BiT-style ResNetV2 (bottleneck units) and ConvNeXt.
        for family in ("resnetv2", "convnext"):
            run_cell("fsdp", out, f"fsdp_{family}", model=FAMILIES[family]())
        # HSDP's 2-D mesh, faking 2 nodes of 1 process (replicate over 2, shard over 1).
        os.environ["LOCAL_WORLD_SIZE"] = "1"
        run_cell("hsdp", out, "hsdp")
        os.environ["LOCAL_WORLD_SIZE"] = "2"
        # Meta-device model + safetensors file: each rank materialises only its rows of every tensor.
        weights = out_dir / "vit_init.safetensors"
        if rank == 0:
            from safetensors.torch import save_file

            save_file(vit().state_dict(), str(weights))
        torch.distributed.barrier()
        run_cell("fsdp", out, "fsdp_meta", model=build_on_meta(vit), weights=weights)
        # An Accelerate FSDP launch (ACCELERATE_USE_FSDP=true) is routed to scaling's FSDP2 path ...
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        run_cell("fsdp", out, "accelerate_fsdp")
        # ... and with a non-FSDP strategy it stops before building anything.
        try:
            run_cell("ddp", out, "accelerate_fsdp_ddp")
        except LaunchError as e:
            out["accelerate_fsdp_ddp_error"] = str(e)
        del os.environ["ACCELERATE_USE_FSDP"]
    elif suite == "zero":
        run_cell("zero1", out, "zero1")
        run_cell("zero2", out, "zero2", predict=True)
        run_cell("zero2", out, "zero2_clip", train=train_cfg(clip_grad_norm=0.1))
        run_cell("zero3", out, "zero3", predict=True)
        run_cell("zero3", out, "zero3_bf16", train=train_cfg(mixed_precision="bf16"))
        run_cell("zero3", out, "zero3_offload", offload_params=True, offload_optimizer=True)
    else:
        raise SystemExit(f"unknown suite {suite!r}")
    if rank == 0:
        torch.save(out, out_dir / f"{suite}.pt")


if __name__ == "__main__":
    main()

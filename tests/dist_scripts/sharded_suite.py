"""Launched on 2 CPU ranks by tests/test_sharding.py (torchrun, gloo; resume: tests/dist_scripts/resume_suite.py).

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/sharded_suite.py <suite> <out_dir>

Suites group many checks into one launch (each launch costs seconds of imports on 2 cores):

* ``torch``   ddp (+ one-of-K cross-entropy with unlabelled samples), fsdp (+ accumulation, gradient clipping, bf16, FSDP activation checkpointing, compiled blocks,
              an Accelerate-FSDP launch routed to our path, a meta-device model materialised shard by shard,
              ResNetV2 and ConvNeXt), fsdp_grad_op, hsdp (2 fake nodes), predict with padding duplicates, export;
              host reads per step (ddp, fsdp); fsdp selecting its weights on validation with early stopping
* ``zero``    zero1, zero2 (+ gradient clipping), zero3 (+ bf16, + compiled blocks, + parameter/optimizer offload,
              + selecting its weights on validation), export; host reads per step (zero1/2/3, zero2 in bf16);
              zero2 in bf16 with NaN gradients (DeepSpeed's bf16 overflow check on and off);
              ZeRO-3 module-hook calls per step with and without block leaves; a ZeRO-3 checkpoint whose
              write fails on one rank only
* ``nodes``   hsdp over 2 "nodes" of 2 processes: two ``accelerate launch`` process groups (machine ranks 0/1)
* ``single``  ``none`` launched as one rank (torchrun ``--nproc_per_node 1``: a process group of one): what
              the forward calls
* ``plain``   fsdp and fsdp_grad_op in a plain ``python`` process (no launcher, no ``RANK``): the process group
              the strategy starts for itself, and one the caller started, after the cell

Rank 0 writes ``<out_dir>/<suite>.pt``: per cell the world size, per-step losses, final consolidated parameters,
every rank's share of the sharded state and the number of FSDP units. The pytest side compares them with a
single-process run of the same config.
"""

from __future__ import annotations

import contextlib
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


class ValidationLog:
    """Tracker double (rank 0): the validation scores logged per step."""

    run_id = "suite"

    def __init__(self):
        self.val = {}

    def log(self, data, step):
        if "val/loss" in data:
            self.val[step] = (data["val/loss"], data["val/auroc"])


def run_cell(strategy: str, out: dict, name: str, train=None, output_dir=None, predict=False, build=vit,
             weights=None, loss="multilabel", data=None, val=None, **sharding):
    torch.manual_seed(0)
    tracker = ValidationLog()
    # ``build`` makes the model here, not in the caller: a model passed in as an argument stays on the caller's
    # stack until this function returns on Python 3.10 (3.11 moves arguments into the callee's frame), and
    # released_by_close checks that nothing but the Trainer keeps it.
    trainer = Trainer(build(), train or train_cfg(), ShardingConfig(strategy=strategy, **sharding),
                      loss=loss, output_dir=output_dir, weights=weights, tracker=tracker)
    summary = trainer.fit(data or ToyDataset(64), val_dataset=val)
    shares = [None] * trainer.world_size
    torch.distributed.all_gather_object(shares, trainer.shard.share)
    cell = {"world": trainer.accelerator.num_processes, "losses": [h["loss"] for h in trainer.history],
            "params": trainer.full_state_dict(), "shares": shares, "units": trainer.shard.units,
            "summary": summary, "val": tracker.val, "model_class": type(trainer.model).__name__,
            "compiled": sum(hasattr(m.forward, "_torchdynamo_orig_callable") for m in trainer.module.modules())}
    if predict:
        cell["pred"] = trainer.predict(ToyDataset(21, seed=1), batch_size=4)
        cell["eval"] = evaluations(trainer)
        trainer.export(Path(output_dir or os.environ["SUITE_OUT"]) / f"{name}.safetensors")
    cell["released"] = released_by_close(trainer)
    out[name] = cell


def released_by_close(trainer) -> dict[str, bool]:
    """``trainer.close()``, then whether its model, optimizer and (ZeRO) engine are gone: a study runs many cells in
    one process, and anything a cell leaves reachable (on a GPU: its parameters) adds up over the grid."""
    import gc
    import weakref

    plan = trainer.plan
    refs = {"module": weakref.ref(plan.module), "optimizer": weakref.ref(plan.optimizer)}
    if plan.engine is not None:
        refs["engine"] = weakref.ref(plan.engine)
    del plan
    trainer.close()
    gc.collect()
    return {k: r() is None for k, r in refs.items()}


EVAL_SIZES = (1, 3, 21)
"""Validation sets of the evaluation checks: on 2 ranks, 1 sample leaves rank 1 without a sample of its own (it
scores only a padding duplicate), 3 gives it one, 21 gives it 10."""


def evaluations(trainer) -> dict[int, dict[str, float]]:
    """``trainer.evaluate`` (loss and macro AUROC, a collective) on each of :data:`EVAL_SIZES` samples."""
    return {n: trainer.evaluate(ToyDataset(n, seed=5), batch_size=2) for n in EVAL_SIZES}


def select_cfg() -> TrainConfig:
    """The selection cell: at a constant lr of 0.3 the validation loss is lowest at step 2 and rises after it, so
    patience 2 stops training at step 6 of 12 and keeps step 2's weights (tests/test_selection.py)."""
    return train_cfg(steps=12, lr=0.3, schedule="constant", warmup_steps=0, eval_every=2, select="val_loss",
                     early_stopping_patience=2)


def multiclass_data() -> ToyDataset:
    """The one-of-K toy problem of the multiclass cell, with unlabelled samples (class -1)."""
    return ToyDataset(64, multiclass=True, unlabelled=0.25)


def sync_cell(strategy: str, out: dict, name: str, **train):
    """Host reads per step with no log point inside the run (accumulation and clipping on)."""
    from sync_counter import syncs_per_step

    torch.manual_seed(0)
    cfg = train_cfg(steps=6, log_every=100, grad_accum=2, clip_grad_norm=0.5, **train)
    trainer = Trainer(vit(), cfg, ShardingConfig(strategy=strategy))
    out[name] = {"world": trainer.world_size, "per_step": syncs_per_step(trainer, ToyDataset(64))}
    trainer.close()


class PoisonGradient(torch.autograd.Function):
    """Identity forward; the backward of call number ``at`` (1-based) returns NaN gradients: a step whose loss is
    finite but whose gradients are not."""

    calls = 0
    at = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        PoisonGradient.calls += 1
        return torch.full_like(grad, float("nan")) if PoisonGradient.calls == PoisonGradient.at else grad


class Poisoned(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.inner = head

    def forward(self, x):
        return PoisonGradient.apply(self.inner(x))


@contextlib.contextmanager
def launch_json(strategy: str, check_grad_overflow: bool | None):
    """The launch's DeepSpeed JSON for ``strategy`` with ``bf16.check_grad_overflow`` set (None: as it is)."""
    import json
    import tempfile

    from scaling.engine.strategies.zero import load_deepspeed_base

    base = load_deepspeed_base(strategy)[0] or {}
    if check_grad_overflow is not None:
        base.setdefault("bf16", {})["check_grad_overflow"] = check_grad_overflow
    saved = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(base, f)
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = f.name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)
        else:
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = saved
        os.unlink(f.name)


def nan_gradient_cell(out: dict, name: str, check_grad_overflow: bool | None):
    """zero2 in bf16, NaN gradients (finite loss) at step 2 of 6, sync points every 3 steps; the launch JSON sets
    ``bf16.check_grad_overflow`` to ``check_grad_overflow`` (None: DeepSpeed's default). Records the error (or None)
    and the steps logged."""
    torch.manual_seed(0)
    model = vit()
    model.head = Poisoned(model.head)
    PoisonGradient.calls, PoisonGradient.at = 0, 2
    with launch_json("zero2", check_grad_overflow):
        trainer = Trainer(model, train_cfg(steps=6, log_every=3, mixed_precision="bf16", warmup_steps=0,
                                           schedule="constant"), ShardingConfig(strategy="zero2"))
        error = None
        try:
            trainer.fit(ToyDataset(64))
        except FloatingPointError as e:
            error = str(e)
        out[name] = {"world": trainer.world_size, "error": error, "logged": [h["step"] for h in trainer.history],
                     "check": trainer.engine.optimizer.check_grad_overflow}
        trainer.close()


def zero3_hooks_cell(out: dict, name: str, leaves: bool, depth: int = 8):
    """DeepSpeed's ZeRO-3 module-hook calls per step on a ViT of ``depth`` blocks, with or without block leaves."""
    import scaling.engine.strategies.zero as zero
    from zero_hooks import counting_zero3_hooks

    torch.manual_seed(0)
    steps = 3
    original = zero.set_block_leaves
    if not leaves:  # the control: DeepSpeed's default of hooks on every submodule
        zero.set_block_leaves = lambda model, block_classes: 0
    try:
        trainer = Trainer(vit(depth=depth), train_cfg(steps=steps), ShardingConfig(strategy="zero3"))
        with counting_zero3_hooks() as calls:
            trainer.fit(ToyDataset(64))
    finally:
        zero.set_block_leaves = original
    out[name] = {"world": trainer.world_size, "depth": depth, "losses": [h["loss"] for h in trainer.history],
                 "per_step": {k: v / steps for k, v in calls.items()},
                 "leaves": sum(getattr(m, "_z3_leaf", False) for m in trainer.module.modules())}
    trainer.close()


def zero3_save_fails_on_one_rank_cell(out: dict, name: str, out_dir: Path):
    """ZeRO-3 checkpoint whose file write fails on rank 1 only (a full disk there): every rank must raise the same
    CheckpointError within seconds (not wait in DeepSpeed's barrier for the process-group timeout), and ``latest``
    must still name the checkpoint before it."""
    import time

    from scaling.engine.checkpoint import CheckpointError, latest_checkpoint

    torch.manual_seed(0)
    run_dir = out_dir / name
    trainer = Trainer(vit(), train_cfg(steps=2), ShardingConfig(strategy="zero3"), output_dir=run_dir)
    trainer.fit(ToyDataset(64))
    trainer.save_checkpoint(1, 2)
    before = latest_checkpoint(run_dir)
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device", str(f))

    if trainer.rank == 1:
        torch.save = full_disk
    start, error = time.perf_counter(), None
    try:
        trainer.save_checkpoint(2, 2)
    except CheckpointError as e:
        error = str(e)
    finally:
        torch.save = save
    seconds = time.perf_counter() - start
    everyone = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, {"error": error, "seconds": seconds})
    out[name] = {"world": trainer.world_size, "ranks": everyone, "before": str(before),
                 "latest": str(latest_checkpoint(run_dir)), "run_dir": str(run_dir)}
    trainer.close()


def nodes_cell(out: dict, name: str):
    """hsdp on 2 "nodes" x 2 processes: the mesh, every rank's local shards (to compare across ranks), training."""
    torch.manual_seed(0)
    trainer = Trainer(vit(), train_cfg(), ShardingConfig(strategy="hsdp"))
    mesh = next(trainer.module.parameters()).device_mesh
    trainer.fit(ToyDataset(64))
    local = {n: p.to_local().detach().clone() for n, p in trainer.module.named_parameters()}
    everyone = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, {"rank": trainer.rank, "node": int(os.environ["GROUP_RANK"]),
                                                   "share": trainer.shard.share, "local": local})
    out[name] = {"world": trainer.world_size, "mesh_shape": tuple(mesh.shape), "mesh_dims": mesh.mesh_dim_names,
                 "shard_groups": mesh.mesh.tolist(), "ranks": everyone, "units": trainer.shard.units,
                 "losses": [h["loss"] for h in trainer.history], "params": trainer.full_state_dict()}
    trainer.close()


def plain_process_cells(out: dict) -> None:
    """FSDP2 cells in a process no launcher started: each starts a process group of its own and ends it on close
    (so the next cell starts afresh); a group the caller started before the cell is used and left up."""
    import torch.distributed as dist

    if "RANK" in os.environ or dist.is_initialized():
        raise SystemExit("the plain suite must run in a plain process (no RANK, no process group)")
    for strategy in ("fsdp", "fsdp_grad_op"):
        run_cell(strategy, out, strategy)
        out[strategy]["group_after_close"] = dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    callers = dist.group.WORLD
    run_cell("fsdp", out, "fsdp_in_callers_group")
    alive = torch.ones(1)
    dist.all_reduce(alive)  # raises if the group was destroyed
    out["fsdp_in_callers_group"]["group_after_close"] = dist.is_initialized() and dist.group.WORLD is callers
    dist.destroy_process_group()


def shm_buffers(trainer=None) -> list[dict]:
    """Per rank: the /dev/shm all-reduce buffer name the ZeRO plan of ``trainer`` removed, and which of this
    launch's buffer names are still in /dev/shm (each is 69 MB of RAM that outlives the processes)."""
    prefix = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
              f"{os.environ.get('MASTER_PORT', '')}_")
    unlinked = getattr(trainer.plan, "shm_unlinked", None) if trainer is not None else None
    mine = {"unlinked": unlinked.name if unlinked else None,
            "left": sorted(p.name for p in Path("/dev/shm").glob(prefix + "*"))}
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def main():
    suite, out_dir = sys.argv[1], Path(sys.argv[2])
    os.environ["SUITE_OUT"] = str(out_dir)
    out: dict = {}
    rank = int(os.environ.get("RANK", "0"))  # unset in the plain suite
    if suite == "torch":
        run_cell("ddp", out, "ddp", predict=True)
        run_cell("fsdp", out, "fsdp", predict=True)
        run_cell("fsdp", out, "fsdp_accum", train=train_cfg(grad_accum=2))
        # One-of-K: cross-entropy normalised by the labelled samples of the global batch (a quarter have no class).
        run_cell("ddp", out, "ddp_multiclass", train=train_cfg(grad_accum=2), loss="multiclass",
                 data=multiclass_data())
        run_cell("fsdp", out, "fsdp_clip", train=train_cfg(clip_grad_norm=0.1))
        run_cell("fsdp", out, "fsdp_bf16", train=train_cfg(mixed_precision="bf16"))
        run_cell("fsdp", out, "fsdp_ac", activation_checkpointing="fsdp")
        run_cell("fsdp_grad_op", out, "fsdp_grad_op")
        # Weights chosen on validation, stopping early: 23 validation samples pad rank 1 with a duplicate.
        run_cell("fsdp", out, "fsdp_select", train=select_cfg(), output_dir=out_dir / "fsdp_select",
                 val=ToyDataset(23, seed=2))
        run_cell("fsdp", out, "fsdp_compile", train=train_cfg(compile="blocks"))
        # The other backbone families of the table: BiT-style ResNetV2 (bottleneck units) and ConvNeXt.
        for family in ("resnetv2", "convnext"):
            run_cell("fsdp", out, f"fsdp_{family}", build=FAMILIES[family])
        # Several blocks per FSDP unit: 5 ViT blocks as units of 2, 2, 1, with accumulation and checkpointing per
        # block; ConvNeXt's 12 blocks as units of 4 that cross its stage boundaries.
        run_cell("fsdp", out, "fsdp_units", build=lambda: vit(depth=5), train=train_cfg(grad_accum=2),
                 blocks_per_unit=2, activation_checkpointing="fsdp")
        run_cell("fsdp", out, "fsdp_convnext_units", build=FAMILIES["convnext"], blocks_per_unit=4)
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
        run_cell("fsdp", out, "fsdp_meta", build=lambda: build_on_meta(vit), weights=weights)
        # An Accelerate FSDP launch (ACCELERATE_USE_FSDP=true) is routed to scaling's FSDP2 path ...
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        run_cell("fsdp", out, "accelerate_fsdp")
        # ... and with a non-FSDP strategy it stops before building anything.
        try:
            run_cell("ddp", out, "accelerate_fsdp_ddp")
        except LaunchError as e:
            out["accelerate_fsdp_ddp_error"] = str(e)
        del os.environ["ACCELERATE_USE_FSDP"]
        sync_cell("ddp", out, "ddp_syncfree")
        sync_cell("fsdp", out, "fsdp_syncfree")
    elif suite == "zero":
        run_cell("zero1", out, "zero1")
        run_cell("zero2", out, "zero2", predict=True)
        run_cell("zero2", out, "zero2_clip", train=train_cfg(clip_grad_norm=0.1))
        run_cell("zero3", out, "zero3", predict=True)
        run_cell("zero3", out, "zero3_bf16", train=train_cfg(mixed_precision="bf16"))
        run_cell("zero3", out, "zero3_compile", train=train_cfg(compile="blocks"))
        run_cell("zero3", out, "zero3_offload", offload_params=True, offload_optimizer=True)
        # Selection under ZeRO-3: each improvement gathers the partitioned weights (a collective) into best_<N>/.
        run_cell("zero3", out, "zero3_select", train=select_cfg(), output_dir=out_dir / "zero3_select",
                 val=ToyDataset(23, seed=2))
        for stage in ("zero1", "zero2", "zero3"):
            sync_cell(stage, out, f"{stage}_syncfree")
        sync_cell("zero2", out, "zero2_bf16_syncfree", mixed_precision="bf16")
        with launch_json("zero2", check_grad_overflow=False):
            sync_cell("zero2", out, "zero2_bf16_nocheck_syncfree", mixed_precision="bf16")
        nan_gradient_cell(out, "zero2_bf16_nan_gradient", None)
        nan_gradient_cell(out, "zero2_bf16_nan_gradient_nocheck", False)
        zero3_hooks_cell(out, "zero3_hooks", leaves=True)
        zero3_hooks_cell(out, "zero3_hooks_noleaf", leaves=False)
        zero3_save_fails_on_one_rank_cell(out, "zero3_save_fails_on_rank_1", out_dir)
        out["shm_buffers"] = shm_buffers()
    elif suite == "zero_local_size":
        # Launched with LOCAL_SIZE=2 set, as DeepSpeed's own launcher does: DeepSpeed maps its /dev/shm buffers.
        torch.manual_seed(0)
        trainer = Trainer(vit(), train_cfg(steps=2), ShardingConfig(strategy="zero3"))
        trainer.fit(ToyDataset(32))
        out["shm_buffers"] = shm_buffers(trainer)
        trainer.close()
    elif suite == "single":
        run_cell("none", out, "none_launched")
    elif suite == "plain":
        plain_process_cells(out)
    elif suite == "nodes":
        # Launched as 2 accelerate process groups (machine ranks 0 and 1) of 2 processes: tests/test_sharding.py.
        nodes_cell(out, "hsdp_nodes")
    else:
        raise SystemExit(f"unknown suite {suite!r}")
    if rank == 0:
        torch.save(out, out_dir / f"{suite}.pt")


if __name__ == "__main__":
    main()

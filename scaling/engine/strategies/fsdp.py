"""FSDP2, applied by scaling: ``fsdp`` (full shard), ``fsdp_grad_op`` (ZeRO-2-like) and ``hsdp`` (shard within a
node, replicate across nodes).

Each block class from the backbone's family table becomes one ``fully_shard`` unit, then the root; the same code
runs over gloo (CPU) and NCCL (GPU). Accelerate's FSDP plugin is never used (it silently trains unsharded on CPU
and auto-wraps timm models into one giant unit, https://github.com/huggingface/accelerate/issues/1943), so the
Accelerator here only provides the process group and the device.
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch
import torch.nn as nn

from scaling.config import ShardingConfig, TrainConfig
from scaling.engine.launch import LaunchError, LaunchInfo, compute_dtype, make_accelerator
from scaling.engine.ranks import end_process_group, start_one_process_group
from scaling.engine.sharding import (
    ShardingError,
    ShardReport,
    block_classes_for,
    blocks_of,
    has_meta,
    materialize_from_safetensors,
)
from scaling.engine.strategies.base import Strategy, warn_if_nothing_to_shard

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_mesh(sharding: ShardingConfig, launch: LaunchInfo):
    """1-D mesh over all ranks (fsdp/fsdp_grad_op) or 2-D (replicate over nodes, shard within a node) for hsdp."""
    from torch.distributed.device_mesh import init_device_mesh

    dev = "cuda" if launch.cuda else "cpu"
    if sharding.strategy == "hsdp":
        return init_device_mesh(dev, (launch.num_nodes, launch.local_world_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(dev, (launch.world_size,), mesh_dim_names=("shard",))


def apply_fsdp(model: nn.Module, train: TrainConfig, sharding: ShardingConfig, launch: LaunchInfo,
               block_classes: tuple[type, ...]) -> nn.Module:
    """``fully_shard`` every unit of ``sharding.blocks_per_unit`` blocks (innermost first), then the root; optional
    FSDP activation checkpointing per block.

    Precision: fp32 master weights; compute in ``train.mixed_precision``; gradients reduced in
    ``sharding.reduce_dtype`` (fp32 by default: FSDP2 needs uniform fp32 master weights,
    https://github.com/pytorch/pytorch/issues/75478).
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    blocks = blocks_of(model, block_classes)
    if len(blocks) < 1:
        raise ShardingError(
            f"none of the block classes {[c.__name__ for c in block_classes]} occurs in "
            f"{type(model).__name__}; FSDP would wrap only the root (one giant unit)"
        )
    mesh = fsdp_mesh(sharding, launch)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype(train), reduce_dtype=_DTYPES[sharding.reduce_dtype])
    offload = CPUOffloadPolicy() if sharding.offload_params else OffloadPolicy()
    # fsdp_grad_op keeps the gathered parameters from forward to backward (ZeRO-2-like: shards grads + optimizer).
    reshard = sharding.strategy != "fsdp_grad_op"
    if sharding.activation_checkpointing == "fsdp":
        # Composable checkpoint on every block (the FSDP unit, or a member of one): one recomputation per block,
        # never combined with timm's own checkpointing (two recomputations per backward:
        # https://github.com/meta-llama/llama-cookbook/issues/740).
        for block in blocks:
            checkpoint(block)
    units = block_units(blocks, sharding.blocks_per_unit)
    for unit in units:
        # The last unit's backward follows its forward at once (only the root's norm and head lie between), so
        # resharding it would free its parameters just to all-gather them again: torchtitan keeps it unsharded
        # (torchtitan/models/llama3/infra/parallelize.py, apply_fsdp). Same arithmetic, one unit more memory.
        last = unit is units[0]
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, reshard_after_forward=reshard and not last,
                    mp_policy=mp, offload_policy=offload)
    # The root is used right after the last block's backward, so keeping it gathered saves one all-gather.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    return model


def block_units(blocks: list[nn.Module], per_unit: int) -> list[list[nn.Module]]:
    """``blocks`` (innermost first, i.e. the reverse of the order they run in) cut into units of ``per_unit``
    blocks that run one after another, in the same innermost-first order: the first unit holds the last blocks to
    run. timm registers blocks in execution order; were it otherwise, a unit would gather blocks that do not run
    together (more memory, the same arithmetic). Nested blocks cannot share a unit (FSDP2 shards a child before its
    parent), so grouping is refused for them."""
    if per_unit == 1:
        return [[b] for b in blocks]
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    nested = [b for b in blocks if id(b) in inside]
    if nested:
        raise ShardingError(f"sharding.blocks_per_unit={per_unit} needs blocks that do not contain each other; "
                            f"{type(nested[0]).__name__} blocks sit inside other blocks")
    in_order = blocks[::-1]
    units = [in_order[i:i + per_unit] for i in range(0, len(in_order), per_unit)]
    return units[::-1]


def fsdp_units(model: nn.Module) -> int:
    """Number of FSDP units: the ``fully_shard`` calls on ``model`` (a call on a list of blocks is one unit)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return len({id(fully_shard.state(m)) for m in model.modules() if isinstance(m, FSDPModule)})


def step_on_local_shards(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` update the local shards of its DTensor parameters as plain tensors.

    The optimizer keeps its DTensor parameters and DTensor state, so ``torch.distributed.checkpoint`` saves and
    loads it sharded as before; only the arithmetic of a step runs on each parameter's local shard, with the
    gradient's local shard, and new state tensors are wrapped back as DTensors of the parameter's layout. An
    optimizer update is elementwise, so this is the same computation. Why: every tensor op on a DTensor pays
    sharding propagation on the host; the update is ~3 ops x every parameter (or foreach lists whose sharding
    propagation is not cached), which measured 2/3 of the fsdp step of ``benchmarks/host_overhead.py`` and the
    ~2,000 DTensor dispatches per step of a profiled ViT-L step on an H200.
    """
    from torch.distributed.tensor import DTensor

    step = optimizer.step

    def local_step(closure=None):
        params = [g["params"] for g in optimizer.param_groups]
        state = optimizer.state
        local_state: dict = {}
        pairs = []
        for group in optimizer.param_groups:
            local_params = []
            for p in group["params"]:
                lp = p._local_tensor
                lp.grad = p.grad._local_tensor if p.grad is not None else None
                if p in state:
                    local_state[lp] = {k: v._local_tensor if isinstance(v, DTensor) else v for k, v in state[p].items()}
                local_params.append(lp)
                pairs.append((p, lp))
            group["params"] = local_params
        optimizer.state = collections.defaultdict(dict, local_state)
        try:
            return step(closure)
        finally:
            updated = optimizer.state
            optimizer.state = state
            for group, original in zip(optimizer.param_groups, params):
                group["params"] = original
            for p, lp in pairs:
                lp.grad = None
                if lp in updated:
                    old = state.get(p, {})
                    state[p] = {k: _as_param_dtensor(v, p, old.get(k)) for k, v in updated[lp].items()}

    optimizer.step = local_step
    return optimizer


def _as_param_dtensor(value, param, previous):
    """A new per-element state tensor of ``param``'s local shard as a DTensor of ``param``'s layout; the existing
    DTensor when ``value`` is its local tensor (updated in place); scalars (e.g. Adam's ``step``) unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(previous, DTensor) and previous._local_tensor is value:
        return previous
    if isinstance(value, torch.Tensor) and value.shape == param._local_tensor.shape and value.ndim > 0:
        return DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride(), run_check=False)
    return value


def clip_local_shards_(params, max_norm: float, group) -> None:
    """``clip_grad_norm_`` over FSDP2-sharded gradients: local sums of squares, one all-reduce over the shard
    group (under hsdp, gradients are already equal across replicas), then every local shard scaled on the device.
    The same result as torch's DTensor-aware ``clip_grad_norm_`` without a DTensor dispatch per gradient."""
    grads = [p.grad._local_tensor for p in params if p.grad is not None]
    total_sq = torch.nn.utils.get_total_norm(grads, 2.0).pow(2)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total_sq, group=group)
    # torch.nn.utils.clip_grads_with_norm_'s arithmetic, applied to the shards (it takes parameters, not gradients).
    clip_coef = (max_norm / (total_sq.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, clip_coef)


class FSDP2(Strategy):
    """``fsdp`` / ``fsdp_grad_op`` / ``hsdp``: one FSDP2 unit per backbone block, then the root."""

    names = ("fsdp", "fsdp_grad_op", "hsdp")
    fsdp_launch = True
    _own_group = False
    """This plan started the (one-process) process group, and ends it in :meth:`close`."""

    @classmethod
    def check_launch(cls, sharding: ShardingConfig, train: TrainConfig, launch: LaunchInfo) -> None:
        """hsdp needs >= 2 nodes; offload moves GPU shards (so needs a GPU); no fp16 (no sharded gradient scaler)."""
        super().check_launch(sharding, train, launch)
        s = sharding.strategy
        if s == "hsdp" and launch.num_nodes < 2:
            raise LaunchError(
                f"sharding.strategy='hsdp' shards within a node and replicates across nodes, but this launch has "
                f"{launch.num_nodes} node (WORLD_SIZE={launch.world_size}, LOCAL_WORLD_SIZE="
                f"{launch.local_world_size}); use 'fsdp' on one node"
            )
        if sharding.offload_optimizer:
            raise LaunchError(
                f"sharding.offload_optimizer is a DeepSpeed ZeRO option, not available with {s!r}; under FSDP2 "
                f"sharding.offload_params also keeps gradients and optimizer state on the CPU"
            )
        if sharding.offload_params and not launch.cuda:
            raise LaunchError("sharding.offload_params moves FSDP shards from the GPU to the CPU; there is no GPU here")
        if train.mixed_precision == "fp16":
            raise LaunchError(
                "train.mixed_precision='fp16' under FSDP2 needs a sharded gradient scaler, which scaling does not "
                "provide; use 'bf16' (no loss scaling needed)"
            )
        warn_if_nothing_to_shard(sharding, launch)

    def prepare(self, model: nn.Module, *, weights: str | Path | None = None,
                block_classes: tuple[type, ...] | None = None) -> None:
        """Compile blocks, ``fully_shard`` them and the root, materialise a meta model shard by shard, optimizer."""
        # Precision is FSDP2's MixedPrecisionPolicy (parameters cast once per unit), not autocast.
        self.accelerator = make_accelerator(self.train, self.sharding, self.launch, None)
        # A plain one-process run has no process group for the mesh (a launched one has the launcher's). Started
        # after the Accelerator, which then stays in its single-process mode (no distributed wrapper, no gather).
        self._own_group = start_one_process_group(self.launch.cuda)
        block_classes = self._before_sharding(model, block_classes) or block_classes_for(model)
        apply_fsdp(model, self.train, self.sharding, self.launch, block_classes)
        if weights is not None and has_meta(model):
            materialize_from_safetensors(model, weights, self.accelerator.device)
        self._compile_whole_model(model)
        self.model = self.module = model
        # Built after sharding, so that it holds the DTensor shards
        # (https://github.com/pytorch/pytorch/issues/83204).
        self.optimizer = step_on_local_shards(self._build_optimizer(model))
        self._shard_group = next(model.parameters()).device_mesh.get_group("shard")
        self._gradient_sync = True  # FSDP2's default

    def grad_sync(self, last: bool):
        """Reduce-scatter on the last micro-batch only, unless ``sharding.sync_each_micro_batch`` (less memory)."""
        sync = last or self.sharding.sync_each_micro_batch
        if sync != self._gradient_sync:  # the setter walks every module; without accumulation it never changes
            self.model.set_requires_gradient_sync(sync)
            self._gradient_sync = sync
        return super().grad_sync(last)

    def _clip(self, max_norm: float) -> None:
        clip_local_shards_(self.module.parameters(), max_norm, self._shard_group)

    def shard_report(self) -> ShardReport:
        """Local DTensor shards over global sizes; shard group = all ranks (processes per node under hsdp)."""
        from torch.distributed.tensor import DTensor

        params = list(self.module.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        total = sum(p.numel() for p in params)
        shard = self.launch.local_world_size if self.name == "hsdp" else self.launch.world_size
        return ShardReport(self.name, fsdp_units(self.module), local, total, shard)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered from the shards, offloaded to the CPU as it goes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def close(self) -> None:
        """Release the model and optimizer, then end the process group if :meth:`prepare` started it (the next cell
        of a study starts its own; a launcher's group stays up)."""
        super().close()
        self._shard_group = None
        if self._own_group:
            self._own_group = False
            end_process_group()

"""Sharding plans: DDP, FSDP2 applied by scaling (``fully_shard`` per block, then the root), DeepSpeed ZeRO-1/2/3.

Design (``docs/design.md``, "Sharding is ours, launched by Accelerate"):

* FSDP2 is applied here, the same code over gloo (CPU) and NCCL (GPU): each block class from the backbone's family
  table becomes one FSDP unit, then the root. Accelerate's FSDP plugin is never used (it silently trains unsharded
  on CPU and auto-wraps timm models into one giant unit,
  https://github.com/huggingface/accelerate/issues/1943).
* DeepSpeed ZeRO goes through Accelerate's DeepSpeed plugin. Every ``"auto"`` of the launch JSON is filled from
  scaling's config in :func:`deepspeed_config` and nowhere else (batch, accumulation, clipping — DeepSpeed's
  default clipping is 1.0 and Accelerate fills ``auto`` with 1.0 too — and precision;
  https://github.com/huggingface/accelerate/issues/1101).
* After preparation :func:`verify_sharding` proves the model really is sharded (more than one FSDP unit, each rank
  holding ~1/world of the parameters or optimizer state) so a run never trains unsharded while claiming to shard.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from scaling.config import ShardingConfig, TrainConfig
from scaling.engine.distributed import FSDP_STRATEGIES, ZERO_STRATEGIES, LaunchError, LaunchInfo, compute_dtype

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARE_TOLERANCE = 0.03
"""Allowed absolute deviation of a rank's parameter/optimizer share from 1/shard_size (uneven dim-0 chunks)."""


class ShardingError(RuntimeError):
    """Sharding was asked for and is not in effect (or cannot be applied to this model)."""


# --------------------------------------------------------------------------------------------------------------
# Which modules become FSDP units / checkpointed blocks
# --------------------------------------------------------------------------------------------------------------


def block_classes_for(model: nn.Module) -> tuple[type, ...]:
    """Block classes that become one FSDP unit each, from the backbone family table (``scaling.models.families``)."""
    from scaling.models.families import family_spec

    return tuple(family_spec(model).block_classes)


def blocks_of(model: nn.Module, block_classes: tuple[type, ...]) -> list[nn.Module]:
    """Instances of ``block_classes`` in ``model``, innermost first (FSDP2 must wrap children before parents)."""
    blocks = [m for m in model.modules() if m is not model and isinstance(m, block_classes)]
    return list(reversed(blocks))


def enable_timm_checkpointing(model: nn.Module) -> None:
    """Switch on timm's own activation checkpointing (``set_grad_checkpointing``) through the family table."""
    from scaling.models.families import family_spec

    family_spec(model).set_grad_checkpointing(model, True)


# --------------------------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------------------------


def fsdp_mesh(sharding: ShardingConfig, launch: LaunchInfo):
    """1-D mesh over all ranks (fsdp/fsdp_grad_op) or 2-D (replicate over nodes, shard within a node) for hsdp."""
    from torch.distributed.device_mesh import init_device_mesh

    dev = "cuda" if launch.cuda else "cpu"
    if sharding.strategy == "hsdp":
        return init_device_mesh(dev, (launch.num_nodes, launch.local_world_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(dev, (launch.world_size,), mesh_dim_names=("shard",))


def apply_fsdp(model: nn.Module, train: TrainConfig, sharding: ShardingConfig, launch: LaunchInfo,
               block_classes: tuple[type, ...]) -> nn.Module:
    """``fully_shard`` every block (innermost first), then the root; optional FSDP activation checkpointing.

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
    for block in blocks:
        if sharding.activation_checkpointing == "fsdp":
            # Composable checkpoint on the same module that is the FSDP unit: one recomputation per block,
            # never combined with timm's own checkpointing (two recomputations per backward:
            # https://github.com/meta-llama/llama-cookbook/issues/740).
            checkpoint(block)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    # The root is used right after the last block's backward, so keeping it gathered saves one all-gather.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    return model


def fsdp_units(model: nn.Module) -> int:
    """Number of FSDP units (modules turned into ``FSDPModule`` by ``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in model.modules())


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------------------------


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _autos(cfg, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _autos(v, key + ".")
        elif v == "auto":
            out.append(key)
    return out


def deepspeed_config(train: TrainConfig, sharding: ShardingConfig, world_size: int, base: dict | None = None,
                     source: str = "<built-in>") -> dict:
    """The DeepSpeed config for this cell: ``base`` (a ``launch/*.json``) with every ``"auto"`` filled from scaling's
    config. The one place batch size, accumulation, clipping and precision reach DeepSpeed (Accelerate fills
    "auto" only on the first prepare(): https://github.com/huggingface/accelerate/issues/1101).

    A concrete value in ``base`` that contradicts scaling's config is an error naming the key and ``source``;
    so is an ``"auto"`` scaling does not know how to fill.
    """
    if sharding.strategy not in ZERO_STRATEGIES:
        raise ValueError(f"deepspeed_config is for zero1/zero2/zero3, not {sharding.strategy!r}")
    stage = int(sharding.strategy[-1])
    values = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // (world_size * train.grad_accum),
        "gradient_accumulation_steps": train.grad_accum,
        # DeepSpeed (runtime/constants.py) and Accelerate both default to 1.0; 0.0 = off, as in scaling.
        "gradient_clipping": float(train.clip_grad_norm),
        "zero_optimization.stage": stage,
        "bf16.enabled": train.mixed_precision == "bf16",
        "fp16.enabled": train.mixed_precision == "fp16",
        "communication_data_type": sharding.reduce_dtype,
        "zero_optimization.offload_optimizer.device": "cpu" if sharding.offload_optimizer else "none",
        "zero_optimization.offload_param.device": "cpu" if sharding.offload_params else "none",
        # scaling exports consolidated fp32 itself (export), so no 16-bit gather on save.
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
    }
    cfg = copy.deepcopy(base) if base else {}
    for key, value in values.items():
        current = _get(cfg, key)
        if current is None or current == "auto":
            _set(cfg, key, value)
        elif current != value:
            raise ValueError(
                f"{source}: {key}={current!r} contradicts scaling's config (which gives {value!r}); set it to "
                f'"auto" so it is filled from train/sharding settings'
            )
    if train.mixed_precision == "fp16" and _get(cfg, "fp16.loss_scale") is None:
        _set(cfg, "fp16.loss_scale", 0)  # dynamic loss scaling
    if sharding.offload_optimizer:
        # scaling builds a torch optimizer (SGD has no DeepSpeed CPU kernel); let ZeRO-Offload step it on the CPU.
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    left = _autos(cfg)
    if left:
        raise ValueError(f"{source}: scaling does not fill {left}; replace these \"auto\" values with numbers")
    return cfg


def load_deepspeed_base(strategy: str) -> tuple[dict | None, str]:
    """The DeepSpeed JSON the launcher named (``ACCELERATE_DEEPSPEED_CONFIG_FILE``), or None for the built-in."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path in ("", "none"):
        return None, "<built-in>"
    p = Path(path)
    try:
        return json.loads(p.read_text()), str(p)
    except (OSError, json.JSONDecodeError) as e:
        raise LaunchError(f"DeepSpeed config {p} (from the launch config) cannot be read: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# Verification: is the model really sharded?
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardReport:
    """What one rank holds after preparation."""

    strategy: str
    """The sharding strategy in effect."""
    units: int
    """FSDP units (0 outside FSDP)."""
    local: int
    """Elements this rank holds of what is sharded (parameters for fsdp/zero3, fp32 optimizer partition for zero1/2)."""
    total: int
    """Elements of the whole model."""
    shard_size: int
    """Ranks the model is sharded over (world size; processes per node under hsdp)."""

    @property
    def share(self) -> float:
        """``local / total``: ~1/shard_size when sharded, 1.0 when replicated."""
        return self.local / max(1, self.total)


def shard_report(strategy: str, model: nn.Module, optimizer, launch: LaunchInfo) -> ShardReport:
    """Measure how much of the model (or optimizer state) this rank holds."""
    if strategy in FSDP_STRATEGIES:
        from torch.distributed.tensor import DTensor

        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        shard = launch.local_world_size if strategy == "hsdp" else launch.world_size
        return ShardReport(strategy, fsdp_units(model), local, total, shard)
    if strategy == "zero3":
        params = list(model.parameters())
        local = sum(p.ds_tensor.numel() for p in params)
        total = sum(p.ds_numel for p in params)
        return ShardReport(strategy, 0, local, total, launch.world_size)
    if strategy in ("zero1", "zero2"):
        zero_opt = getattr(optimizer, "optimizer", optimizer)
        local = sum(t.numel() for t in zero_opt.single_partition_of_fp32_groups)
        total = sum(p.numel() for p in model.parameters())
        return ShardReport(strategy, 0, local, total, launch.world_size)
    total = sum(p.numel() for p in model.parameters())
    return ShardReport(strategy, 0, total, total, 1)


def verify_sharding(report: ShardReport) -> None:
    """Raise :class:`ShardingError` unless the model is split as the strategy promises."""
    s = report.strategy
    if s in FSDP_STRATEGIES and report.units < 2:
        raise ShardingError(f"strategy {s!r}: the model is one FSDP unit ({report.units}); expected one per block + root")
    if s in FSDP_STRATEGIES or s in ZERO_STRATEGIES:
        want = 1.0 / report.shard_size
        if abs(report.share - want) > SHARE_TOLERANCE:
            raise ShardingError(
                f"strategy {s!r}: this rank holds {report.local:,}/{report.total:,} = {report.share:.3f} of the "
                f"sharded state, expected ~{want:.3f} (1/{report.shard_size}); refusing to train unsharded"
            )


# --------------------------------------------------------------------------------------------------------------
# Meta-device models: materialise only this rank's shard
# --------------------------------------------------------------------------------------------------------------


def has_meta(model: nn.Module) -> bool:
    """True when any parameter or buffer of ``model`` lives on the meta device (built without memory)."""
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def materialize_from_safetensors(model: nn.Module, path: str | Path, device: torch.device) -> None:
    """Allocate a meta-device (possibly FSDP2-sharded) model on ``device`` and fill it from a safetensors file,
    reading only the rows of each tensor this rank holds.

    The file is memory-mapped and each rank slices its own shard, so no process ever holds the whole model
    (the meta-device recipe of https://github.com/pytorch/pytorch/issues/105840; measured in
    ``benchmarks/sharding_memory.py --meta``). Every parameter and buffer must be
    in the file: a missing or mis-shaped tensor is an error naming the file and the tensor.
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    path = Path(path)
    model.to_empty(device=device)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        missing = sorted(set(tensors) - names)
        if missing:
            raise ShardingError(f"{path}: no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for name, t in tensors.items():
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != tuple(t.shape):
                    raise ShardingError(f"{path}: tensor {name!r} has shape {shape}, the model expects {tuple(t.shape)}")
                if isinstance(t, DTensor):
                    local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
                    if t.to_local().numel():  # a rank may hold no rows of a small tensor
                        index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
                        t.to_local().copy_(sl[index])
                else:
                    t.copy_(f.get_tensor(name))


def build_on_meta(fn: Callable[[], nn.Module]) -> nn.Module:
    """Call ``fn`` (e.g. ``lambda: build_model(cfg, n)``) with every tensor on the meta device: no memory, no init."""
    with torch.device("meta"):
        return fn()

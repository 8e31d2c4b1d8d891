"""What every sharding strategy shares: which modules are the units, proof that sharding is in effect, meta-device
models materialised shard by shard.

The strategies themselves live in ``scaling.engine.strategies`` (replicate, FSDP2, ZeRO). Design
(``docs/design.md``, "Sharding is ours, launched by Accelerate"):

* Each block class from the backbone's family table (``scaling.models.families``) is one unit: one FSDP2
  ``fully_shard``, one ZeRO-3 leaf module, one compiled region, one activation-checkpointing unit.
* After preparation :func:`verify_sharding` proves the model really is sharded (more than one FSDP unit, each rank
  holding ~1/world of the parameters or optimizer state) so a run never trains unsharded while claiming to shard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from scaling.engine.launch import FSDP_STRATEGIES, ZERO_STRATEGIES

log = logging.getLogger(__name__)

SHARE_TOLERANCE = 0.03
"""Allowed absolute deviation of a rank's parameter/optimizer share from 1/shard_size (uneven dim-0 chunks)."""


class ShardingError(RuntimeError):
    """Sharding was asked for and is not in effect (or cannot be applied to this model)."""


# --------------------------------------------------------------------------------------------------------------
# Which modules become FSDP units / checkpointed blocks
# --------------------------------------------------------------------------------------------------------------


def block_classes_for(model: nn.Module) -> tuple[type, ...]:
    """Block classes that become one FSDP unit each, from the backbone family table (``scaling.models.families``).

    What the Trainer uses when it is not given ``block_classes=``. A model that no family row describes (your own
    ``nn.Module``), or a timm model whose generic row finds no blocks, raises ValueError saying to pass
    ``Trainer(..., block_classes=(YourBlock,))``.
    """
    from scaling.models.families import family_spec, timm_model

    how = ("pass Trainer(..., block_classes=(YourBlock,)) naming the module class your model repeats (a residual "
           "block, a transformer layer: each instance becomes one FSDP unit / ZeRO-3 leaf / compiled region), or "
           "register the architecture with scaling.models.families.register_family(FamilySpec(...))")
    name = type(timm_model(model)).__name__
    try:
        classes = tuple(family_spec(model).block_classes)
    except ValueError:
        raise ValueError(f"{name} is neither a timm model nor in the family table, so its blocks are unknown: "
                         f"{how}") from None
    if not classes:
        raise ValueError(f"{name}: the generic timm rule found no blocks (the model lists no feature_info): {how}")
    return classes


def blocks_of(model: nn.Module, block_classes: tuple[type, ...]) -> list[nn.Module]:
    """Instances of ``block_classes`` in ``model``, innermost first (FSDP2 must wrap children before parents)."""
    blocks = [m for m in model.modules() if m is not model and isinstance(m, block_classes)]
    return list(reversed(blocks))


def enable_timm_checkpointing(model: nn.Module) -> None:
    """Switch on timm's own activation checkpointing (``set_grad_checkpointing``) through the family table."""
    from scaling.models.families import family_spec

    family_spec(model).set_grad_checkpointing(model, True)


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
    ``benchmarks/sharding_memory.py --peak-host``). Every parameter and buffer must be
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

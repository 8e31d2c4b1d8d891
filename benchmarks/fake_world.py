"""A world of N ranks in one process, for the benchmarks: this process is rank 0 of N in torch's fake process group.

torch's ``fake`` backend (``torch.testing._internal.distributed.fake_pg``; torchtitan's dry runs use it) answers
every collective at once and moves no data, so a sharding strategy runs the code path of rank 0 of an N-rank job
(holding 1/N of the model, gathering and reduce-scattering around every block) on one device, without the
communication. That measures what one GPU cannot otherwise show: the host work and the memory of a rank of a
multi-GPU job (in a world of one, FSDP2 and DeepSpeed take shortcuts that no multi-GPU rank takes).

The fake backend of torch 2.14 fills the outputs as if every rank held rank 0's data (an all-gather repeats the local
shard in every slot, a reduce-scatter returns rank 0's chunk); where an older one leaves them as whatever memory held
(garbage that can be NaN and end a run at the Trainer's non-finite-loss check), :func:`enter_world` wraps the tensor
collectives to do the same: one device copy each, the bytes an all-gather writes anyway. Either way the numbers
trained are not a real N-rank run's; only the times and the memory are meaningful.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

_GATHERS = ("all_gather_single", "all_gather_into_tensor")
_SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor")


def _fill_gather(output: torch.Tensor, input: torch.Tensor) -> None:
    """``output`` as if every rank had contributed ``input`` (rank 0's slot is ``input``'s own)."""
    n = input.numel()
    rows = output.view(-1).view(output.numel() // n, n)
    src = input.reshape(1, n)
    if input.data_ptr() == rows.data_ptr():  # in-place all-gather: the input is slot 0 of the output
        rows[1:].copy_(src.expand(rows.shape[0] - 1, n))
    else:
        rows.copy_(src.expand_as(rows))


def _fill_scatter(output: torch.Tensor, input: torch.Tensor) -> None:
    """``output`` as rank 0's chunk of ``input``."""
    output.view(-1).copy_(input.view(-1)[: output.numel()])


def _loopback(name: str, fill):
    original = getattr(dist.distributed_c10d, name)
    if getattr(original, "_loopback", False):
        return original

    def collective(*args, **kwargs):
        work = original(*args, **kwargs)
        out = args[0] if args else kwargs.get("output_tensor", kwargs.get("output"))
        inp = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
        if dist.get_backend(kwargs.get("group")) == "fake":
            fill(out, inp)
        return work

    collective._loopback = True
    collective.__wrapped__ = original
    return collective


def _install_loopback() -> None:
    for names, fill in ((_GATHERS, _fill_gather), (_SCATTERS, _fill_scatter)):
        for name in names:
            if hasattr(dist.distributed_c10d, name):
                wrapped = _loopback(name, fill)
                setattr(dist.distributed_c10d, name, wrapped)
                setattr(dist, name, wrapped)


def leave_world() -> None:
    """Destroy the default process group, with DeepSpeed's cached references to it, and Accelerate's process state."""
    from accelerate.state import AcceleratorState

    if dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and ds_comm.cdb is not None and ds_comm.cdb.is_initialized():
            ds_comm.destroy_process_group()  # also drops DeepSpeed's references to the old groups
        else:
            dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)


def enter_world(size: int) -> None:
    """Make the default process group rank 0 of ``size`` fake ranks (``size >= 2``) or a real gloo group of one
    (``size == 1``), replacing any earlier one, with the launcher variables the Trainer reads set to match.

    Install before DeepSpeed starts its communication backend, which binds the collectives once."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    leave_world()
    os.environ.update(WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size), RANK="0", LOCAL_RANK="0")
    if size == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    if not _fake_fills_outputs():
        _install_loopback()


def _fake_fills_outputs() -> bool:
    """Whether the collectives of this torch's fake backend (or the wrappers installed before) write their outputs."""
    world = dist.get_world_size()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    gathered, scattered = torch.full((world,), float("nan")), torch.full((1,), float("nan"))
    gather(gathered, torch.zeros(1))
    scatter(scattered, torch.zeros(world))
    return not (gathered.isnan().any() or scattered.isnan().any())

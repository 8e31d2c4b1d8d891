"""Process-group helpers for code that every rank of a launch runs (the study runner, recipes, checkpoints).

A study runs under ``accelerate launch`` / ``torchrun`` with 1..N processes. Only the main process writes to the run
store; shared preparation (demo data, image caches, downloaded weights) is done by the main process first while the
others wait (:func:`main_process_first`). Without a process group every helper degrades to the one-process case.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from scaling.engine.launch import PROCESS_GROUP_TIMEOUT

T = TypeVar("T")


def process_group():
    """``torch.distributed`` when a process group is initialised, else None."""
    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    """True on rank 0 (or without a process group): the only process that writes to the store."""
    d = process_group()
    return d is None or d.get_rank() == 0


def broadcast(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank; the value itself without a process group."""
    d = process_group()
    if d is None:
        return value
    box = [value]
    d.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    d = process_group()
    if d is not None:
        d.barrier()


def main_process_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process, then on the others (shared caches and downloads are filled once)."""
    if not is_main_process():
        barrier()
    out = fn()
    if is_main_process():
        barrier()
    return out


def init_distributed() -> None:
    """Join the launcher's process group before a study touches the store or the data.

    The study prepares data and upstream weights on the main process while the other ranks wait, which needs the
    process group before the first Trainer (and its Accelerator) exists. Accelerate and DeepSpeed reuse a group
    that is already initialised.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=PROCESS_GROUP_TIMEOUT)


def start_one_process_group(cuda: bool) -> bool:
    """Start a process group of this process alone (rank 0 of 1) when none exists; True when this call started it.

    FSDP2's device mesh needs a process group even in a world of one process, and a plain ``python`` run or a
    one-process ``accelerate launch`` sets no ``RANK`` / ``MASTER_ADDR`` for torch's ``env://`` rendezvous to read.
    The one rank needs no rendezvous: an in-memory store (``HashStore``) serves it, so no port or file is taken and
    nothing is left behind. Whoever started the group ends it (:func:`end_process_group`); a group that existed
    before (a launcher's, a caller's) is reused and left alone.
    """
    if dist.is_initialized():
        return False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise RuntimeError(f"WORLD_SIZE={world} but no process group is initialised; a process group of one "
                           f"process would train {world} unsynchronised copies")
    dist.init_process_group(backend="nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=PROCESS_GROUP_TIMEOUT)
    return True


def end_process_group() -> None:
    """Destroy the default process group (one :func:`start_one_process_group` started); no-op when there is none."""
    if dist.is_initialized():
        dist.destroy_process_group()

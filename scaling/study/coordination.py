"""What every rank of a launch shares while running a study: which errors fail one run, work done on rank 0 with its
failure seen by every rank, and shared preparation built once across launches and ranks (under a file lock,
:func:`scaling.study.claims.file_lock`). The generic rank helpers (broadcast, barrier) are
``scaling.engine.ranks``."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

from scaling.engine.ranks import barrier, broadcast, is_main_process
from scaling.study.claims import file_lock
from scaling.study.store import RunStore, StoreError

T = TypeVar("T")


@functools.cache
def run_errors() -> tuple[type[BaseException], ...]:
    """What fails one run (recorded in its FAILED.json) rather than the launch.

    torch.distributed.checkpoint reports a failed save (a full disk included) as CheckpointException, which derives
    from BaseException, not Exception; every other BaseException (an interrupt, preemption, a test runner's
    timeout) is not a failure of the run and passes.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only and let every rank see whether it raised, so that all of them stop together
    instead of the others waiting at the next collective for a rank that has gone."""
    error, out = None, None
    if is_main_process():
        try:
            out = fn()
        except run_errors() as e:  # re-raised below, on every rank
            error = e
    message = broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise StoreError(f"rank 0 failed: {message}")
    return out


def once(store: RunStore, name: str, is_done: Callable[[], bool], make: Callable[[], None]) -> None:
    """Build a shared item once across launches and ranks: rank 0 takes the item's lock and checks ``is_done``;
    if it is not, every rank calls ``make`` (which writes on rank 0 only, or trains collectively)."""
    if broadcast(is_done() if is_main_process() else None):  # fast path: a read-only store is never locked
        return
    with contextlib.ExitStack() as stack:
        if is_main_process():
            stack.enter_context(file_lock(store.lock_path(name)))
        if not broadcast(is_done() if is_main_process() else None):
            make()
        barrier()

"""SIGTERM / SIGUSR1 (SLURM preemption, ``scancel``) without a host-device synchronisation per step.

The handler only records the signal number. Ranks *agree* on it (an all-reduce of the flag, MAX) at points where the
trainer synchronises anyway: every ``train.log_every`` steps, every ``train.checkpoint_every`` steps, the last
step, and every batch of ``predict``/``evaluate`` (which copies logits to the host per batch anyway). So all ranks
stop at the same step, save one consistent checkpoint and exit together, and the training step itself never waits
for the device. The price is latency: a signal is honoured at most ``min(log_every, checkpoint_every)`` optimizer
steps after it arrives (docs/scaling-out.md, "Preemption latency"); SLURM's ``--signal=B:USR1@120`` in
``launch/slurm.sbatch`` leaves 120 s for that and the checkpoint.

SLURM signals every process of a job step (``scancel --signal``, preemption, a signal srun forwards), DataLoader
workers included; a worker ignores these signals (:func:`ignore_in_worker`) and leaves them to its rank.
"""

from __future__ import annotations

import atexit
import signal
import threading
import weakref

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: this worker ignores SIGTERM and SIGUSR1, which its rank handles.

    Without it a worker dies of a signal meant for the job (torch's worker handler exits on a SIGTERM only when its
    parent sent it, ``torch/csrc/DataLoader.cpp``; SIGUSR1's default action ends the process), and its rank raises
    ``DataLoader worker ... is killed by signal`` instead of checkpointing. A worker still ends when the loader
    shuts it down or its rank exits (torch's worker loop watches its parent).
    """
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


_PERSISTENT_LOADERS: weakref.WeakSet = weakref.WeakSet()
_exit_hook = False


def shut_down_workers(loader_or_iterator) -> None:
    """End the worker processes of a DataLoader (its persistent workers) or of one of its iterators now, as torch
    does when the iterator is collected (``_shutdown_workers``: each worker is told to stop and joined).

    Workers that ignore SIGTERM (:func:`ignore_in_worker`) must not outlive their loader's user: at interpreter exit
    ``multiprocessing`` ends every daemonic child it still has with SIGTERM and then joins it
    (``multiprocessing.util._exit_function``), and would wait forever for a worker that ignores it — a script that
    trained with ``num_workers > 0`` and kept its Trainer (or the exception a run raised) would never exit.
    """
    iterator = getattr(loader_or_iterator, "_iterator", loader_or_iterator)
    stop = getattr(iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()


def shut_down_at_exit(loader):
    """Return ``loader`` (a DataLoader with persistent workers), whose workers :func:`shut_down_workers` ends at
    interpreter exit if nothing ended them before, ahead of ``multiprocessing``'s own exit handler."""
    global _exit_hook
    if not _exit_hook:  # registered after multiprocessing's (torch imports it), so run before it
        atexit.register(lambda: [shut_down_workers(x) for x in list(_PERSISTENT_LOADERS)])
        _exit_hook = True
    _PERSISTENT_LOADERS.add(loader)
    return loader


class PreemptionSignals:
    """Re-entrant context that installs the handlers (main thread only) and restores the previous ones on exit."""

    def __init__(self):
        self.signum = 0
        self._depth = 0
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> "PreemptionSignals":
        if self._depth == 0 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for s, h in self._previous.items():
                signal.signal(s, h)
            self._previous = {}

    def agree(self, world_size: int, device: torch.device) -> int:
        """The signal number any rank received (0 if none); a collective when ``world_size > 1``, so call it at the
        same point on every rank. One process: no device involved at all."""
        if world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

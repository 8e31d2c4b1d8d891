"""Count what makes the host wait for the device, step by step, during ``Trainer.fit``.

``.item()``, ``float(t)``, ``int(t)`` and ``bool(t)`` all reach ``aten::_local_scalar_dense``; ``.cpu()``,
``.tolist()`` and ``.numpy()`` of a device tensor are copies from the device to the CPU. A
:class:`~torch.utils._python_dispatch.TorchDispatchMode` sees both (on a CPU-only machine the scalar reads are what
there is to see; on a GPU ``torch.cuda.set_sync_debug_mode("error")`` checks the same, see
benchmarks/gpu_throughput.py). The counts are cut at the end of every optimizer step (after ``plan.step``), so
segment ``s`` holds everything step ``s`` did, from fetching its batch to its optimizer step.

Device-wide synchronisations that read no value (``torch.cuda.synchronize`` and DeepSpeed's
``get_accelerator().synchronize()``, e.g. its throughput timer's) are counted too, by wrapping both functions: on
this CPU-only machine they wait for nothing, but the calls are the same as on a GPU, where each drains the queue.

Reads made inside DeepSpeed are counted apart: DeepSpeed 0.19.8's ZeRO optimizers check the gradient norm for
NaN/inf on the host in every ``engine.step()`` (``deepspeed/runtime/utils.py``, ``is_invalid_grad_norm``), which
scaling cannot remove without patching DeepSpeed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


def _device_of(x):
    return x.device if isinstance(x, torch.Tensor) else None


class SyncCounter(TorchDispatchMode):
    """Counts scalar reads (``_local_scalar_dense``; those made inside DeepSpeed apart) and device-to-host copies."""

    def __init__(self):
        super().__init__()
        self.scalar_reads = 0
        self.deepspeed_reads = 0
        self.device_to_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            if any("/deepspeed/" in frame.filename for frame in traceback.extract_stack()):
                self.deepspeed_reads += 1
            else:
                self.scalar_reads += 1
        elif func in _COPIES:
            # _to_copy(src) -> out; copy_(dst, src)
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if _device_of(src) is not None and src.device.type != "cpu" and dst.device.type == "cpu":
                self.device_to_host += 1
        return out


@contextlib.contextmanager
def counting_device_syncs():
    """Count calls of ``torch.cuda.synchronize`` and of DeepSpeed's accelerator ``synchronize`` (a one-item list)."""
    count = [0]
    targets = [(torch.cuda, "synchronize")]
    if importlib.util.find_spec("deepspeed") is not None:
        from deepspeed.accelerator import get_accelerator

        targets.append((get_accelerator(), "synchronize"))
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def counted(original):
        def synchronize(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)
        return synchronize

    for owner, name, original in originals:
        setattr(owner, name, counted(original))
    try:
        yield count
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def syncs_per_step(trainer, dataset) -> list[tuple[int, int, int, int]]:
    """Run ``trainer.fit(dataset)`` under a :class:`SyncCounter`; per step (scalar reads outside DeepSpeed,
    device-to-host copies, scalar reads inside DeepSpeed, device-wide synchronisations)."""
    counter, marks = SyncCounter(), []
    original = trainer.plan.step

    with counting_device_syncs() as device_syncs:
        def step():
            original()
            marks.append((counter.scalar_reads, counter.device_to_host, counter.deepspeed_reads, device_syncs[0]))

        trainer.plan.step = step
        with counter:
            trainer.fit(dataset)
    trainer.plan.step = original
    previous = (0, 0, 0, 0)
    out = []
    for mark in marks:
        out.append(tuple(m - p for m, p in zip(mark, previous)))
        previous = mark
    return out

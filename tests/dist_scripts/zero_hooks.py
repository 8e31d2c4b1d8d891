"""Count DeepSpeed ZeRO-3's per-module hook calls (parameter fetch before a module's forward, release after its
backward) over ``Trainer.fit``: the host work that dominates a ZeRO-3 step at small per-GPU batches."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

HOOKS = ("pre_sub_module_forward_function", "post_sub_module_forward_function",
         "pre_sub_module_backward_function", "post_sub_module_backward_function")


@contextmanager
def counting_zero3_hooks():
    """Yield a Counter of hook name -> calls while DeepSpeed's ZeRO-3 module hooks run inside the block."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    calls: Counter = Counter()
    originals = {name: getattr(DeepSpeedZeRoOffload, name) for name in HOOKS}

    def wrap(name, fn):
        def counted(self, module):
            calls[name] += 1
            return fn(self, module)
        return counted

    for name, fn in originals.items():
        setattr(DeepSpeedZeRoOffload, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(DeepSpeedZeRoOffload, name, fn)

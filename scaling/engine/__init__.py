"""The Accelerate-based engine: the :class:`Trainer`, sharding plans (FSDP2, DeepSpeed ZeRO), checkpoints.

``Trainer`` is imported lazily so that ``scaling.engine.schedule`` (a pure module) stays cheap to import.
"""

from __future__ import annotations

__all__ = ["Trainer", "Preempted", "check_launch", "LaunchError", "ShardingError", "CheckpointError"]


def __getattr__(name: str):
    if name in ("Trainer", "Preempted"):
        from scaling.engine import trainer

        return getattr(trainer, name)
    if name in ("check_launch", "LaunchError"):
        from scaling.engine import distributed

        return getattr(distributed, name)
    if name == "ShardingError":
        from scaling.engine.sharding import ShardingError

        return ShardingError
    if name == "CheckpointError":
        from scaling.engine.checkpoint import CheckpointError

        return CheckpointError
    raise AttributeError(f"module 'scaling.engine' has no attribute {name!r}")

"""Strategy plans: one object per sharding family, each owning everything that differs between them.

========================  =========================================  ===========================================
family                    ``sharding.strategy``                      module
========================  =========================================  ===========================================
:class:`Replicate`        ``none``, ``ddp``                          ``scaling.engine.strategies.replicate``
:class:`FSDP2`            ``fsdp``, ``fsdp_grad_op``, ``hsdp``       ``scaling.engine.strategies.fsdp``
:class:`ZeRO`             ``zero1``, ``zero2``, ``zero3``            ``scaling.engine.strategies.zero``
========================  =========================================  ===========================================

The contract (launch check, preparation, the pieces of a step, checkpoints, export, release) is
:class:`~scaling.engine.strategies.base.Strategy`; the Trainer's loop calls only that.
"""

from __future__ import annotations

from scaling.engine.strategies.base import Strategy
from scaling.engine.strategies.fsdp import FSDP2
from scaling.engine.strategies.replicate import Replicate
from scaling.engine.strategies.zero import ZeRO

FAMILIES: tuple[type[Strategy], ...] = (Replicate, FSDP2, ZeRO)


def strategy_class(strategy: str) -> type[Strategy]:
    """The family implementing ``sharding.strategy`` (a value :class:`~scaling.config.ShardingConfig` accepted)."""
    for family in FAMILIES:
        if strategy in family.names:
            return family
    raise ValueError(f"no strategy family implements {strategy!r}; known: {[n for f in FAMILIES for n in f.names]}")


__all__ = ["Strategy", "Replicate", "FSDP2", "ZeRO", "strategy_class"]

"""Replicate: ``none`` (one process) and ``ddp`` (every rank holds the whole model; gradients all-reduced).

Precision comes from Accelerate's autocast (fp32 master weights, bf16/fp16 compute; fp16 with its gradient scaler).
DDP reduces gradients in buckets during the backward of the last micro-batch only (``no_sync`` before it), with
gradients as views into the buckets (no second copy, ``scaling.engine.launch.make_accelerator``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from scaling.config import ShardingConfig, TrainConfig
from scaling.engine.launch import LaunchError, LaunchInfo, make_accelerator
from scaling.engine.sharding import ShardReport, has_meta, materialize_from_safetensors
from scaling.engine.strategies.base import Strategy


class Replicate(Strategy):
    """``none`` / ``ddp``: the whole model on every rank."""

    names = ("none", "ddp")

    @classmethod
    def check_launch(cls, sharding: ShardingConfig, train: TrainConfig, launch: LaunchInfo) -> None:
        """``none`` runs one process; neither offloads (nothing is sharded to offload)."""
        super().check_launch(sharding, train, launch)
        s = sharding.strategy
        if s == "none" and launch.world_size > 1:
            raise LaunchError(
                f"sharding.strategy='none' with {launch.world_size} processes would train {launch.world_size} "
                f"independent copies; use 'ddp' (or launch one process)"
            )
        if sharding.offload_params:
            raise LaunchError(f"sharding.offload_params needs fsdp/fsdp_grad_op/hsdp or zero3, not {s!r}")
        if sharding.offload_optimizer:
            raise LaunchError(
                f"sharding.offload_optimizer is a DeepSpeed ZeRO option, not available with {s!r}; under FSDP2 "
                f"sharding.offload_params also keeps gradients and optimizer state on the CPU"
            )

    def prepare(self, model: nn.Module, *, weights: str | Path | None = None,
                block_classes: tuple[type, ...] | None = None) -> None:
        """Materialise a meta model on the CPU, compile, build the optimizer, let Accelerate wrap (DDP) and place."""
        self.accelerator = make_accelerator(self.train, self.sharding, self.launch, None)
        if weights is not None and has_meta(model):
            materialize_from_safetensors(model, weights, torch.device("cpu"))
        self._before_sharding(model, block_classes)
        self._compile_whole_model(model)
        optimizer = self._build_optimizer(model)
        if self.name == "none":
            # One process launched by torchrun/srun (LOCAL_RANK set) would make Accelerate wrap the model in DDP, whose
            # per-step bucket bookkeeping and two all-reduces with itself cost ~12 % of a launch-bound step
            # (benchmarks/host_overhead.py: 25.3 -> 22.1 ms). Accelerate's evaluation_mode is its switch for "device
            # placement and mixed precision (autocast on forward), no distributed wrapper": what one process needs.
            self.model = self.accelerator.prepare_model(model, evaluation_mode=True)
            self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.module = self.accelerator.unwrap_model(self.model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits under Accelerate's autocast (``train.mixed_precision``)."""
        with self.accelerator.autocast():
            return self.model(images)

    def grad_sync(self, last: bool):
        """DDP skips the all-reduce on every micro-batch but the last (``no_sync``)."""
        if self.name == "ddp" and not last:
            return self.accelerator.no_sync(self.model)
        return super().grad_sync(last)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Through Accelerate, which applies the fp16 gradient scaler when there is one."""
        self.accelerator.backward(loss)

    def _clip(self, max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)  # unscales fp16 gradients first

    def shard_report(self) -> ShardReport:
        """Replicated: every rank holds everything."""
        total = sum(p.numel() for p in self.module.parameters())
        return ShardReport(self.name, 0, total, total, 1)

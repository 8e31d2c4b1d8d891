"""The contract every strategy family fulfils, and what the families share.

A strategy object owns everything that differs between replicate (none/ddp), FSDP2 (fsdp/fsdp_grad_op/hsdp) and
ZeRO (zero1-3): its launch check, the Accelerator, preparing the model (activation checkpointing, compile, memory
layout, sharding, optimizer), the pieces of a training step, checkpoints, the consolidated state dict and release.
The :class:`~scaling.engine.Trainer` calls these in one strategy-agnostic loop. Lifecycle::

    Family.check_launch(sharding, train, launch)       # class method, before anything is built
    plan = Family(train, sharding, launch)
    plan.check_model(model, weights)                   # before the Accelerator exists
    plan.prepare(model, weights=..., block_classes=...)  # builds .accelerator, .model, .module, .optimizer
    per step:  with plan.grad_sync(last): loss = ...(plan.forward(x)); plan.backward(loss * plan.loss_scale ..., last)
               plan.step()
    plan.save_checkpoint(...) / plan.load_checkpoint(...) / plan.full_state_dict() / plan.close()

Nothing in a step reads a value back from the device: clipping, the optimizer and the gradient reductions are
queued on the device like the forward and backward (docs/scaling-out.md, "A step without host synchronisation").
"""

from __future__ import annotations

import abc
import contextlib
import logging
from pathlib import Path

import torch
import torch.nn as nn

from scaling.config import ShardingConfig, TrainConfig
from scaling.engine import checkpoint as ckpt_lib
from scaling.engine.compilation import compile_blocks, compile_model
from scaling.engine.launch import LaunchError, LaunchInfo
from scaling.engine.sharding import ShardReport, block_classes_for, enable_timm_checkpointing, has_meta

HOW = "see launch/README.md for the matching `accelerate launch --config_file launch/<...>.yaml`"

log = logging.getLogger(__name__)
_warned_unsharded: set[str] = set()


def warn_if_nothing_to_shard(sharding: ShardingConfig, launch: LaunchInfo) -> None:
    """Warn (once per strategy and process) when a sharding strategy runs in a world of one process without offload:
    every parameter, gradient and optimizer state stays whole on that one device, so the strategy saves no memory
    and only adds its host work per step (2-4 x the step time of ``none`` on ``benchmarks/host_overhead.py``'s
    launch-bound model). Not an error: a one-GPU debugging run of a multi-GPU config is legitimate."""
    s = sharding.strategy
    if launch.world_size != 1 or sharding.offload_params or sharding.offload_optimizer or s in _warned_unsharded:
        return
    _warned_unsharded.add(s)
    log.warning("sharding.strategy=%r in a world of 1 process shards nothing (the whole model, its gradients and "
                "optimizer state stay on this one device) and costs host time every step; on one GPU use "
                "sharding.strategy='none', or offload (sharding.offload_params / offload_optimizer)", s)


class Strategy(abc.ABC):
    """One sharding family; see the module docstring for the lifecycle.

    After :meth:`prepare`: ``accelerator``; ``model`` (what the forward calls: the DDP wrapper, the FSDP2 root, the
    DeepSpeed engine); ``module`` (the bare ``nn.Module``, parameter names as built); ``optimizer``.
    """

    names: tuple[str, ...] = ()
    """The ``sharding.strategy`` values this family implements."""
    deepspeed_launch: bool = False
    """The family runs under Accelerate's DeepSpeed plugin (and only there)."""
    fsdp_launch: bool = False
    """An Accelerate FSDP launch (``ACCELERATE_USE_FSDP``) is routed to this family."""

    def __init__(self, train: TrainConfig, sharding: ShardingConfig, launch: LaunchInfo):
        if sharding.strategy not in self.names:
            raise ValueError(f"{type(self).__name__} implements {list(self.names)}, not {sharding.strategy!r}")
        self.train, self.sharding, self.launch = train, sharding, launch
        self.name = sharding.strategy
        self.accelerator = None
        self.model: nn.Module | None = None
        self.module: nn.Module | None = None
        self.optimizer = None
        self.engine = None  # the DeepSpeed engine under ZeRO

    # ------------------------------------------------------------------------------------------------------------
    # Before anything is built
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def check_launch(cls, sharding: ShardingConfig, train: TrainConfig, launch: LaunchInfo) -> None:
        """Raise :class:`LaunchError` when this launch cannot run ``sharding.strategy``; families add their own."""
        s = sharding.strategy
        if launch.deepspeed and not cls.deepspeed_launch:
            raise LaunchError(
                f"this process was launched with Accelerate's DeepSpeed plugin but sharding.strategy={s!r}; "
                f"set sharding.strategy to zero1/zero2/zero3 or launch without DeepSpeed ({HOW})"
            )
        if launch.accelerate_fsdp and not cls.fsdp_launch:
            raise LaunchError(
                f"this process was launched with an Accelerate FSDP config (ACCELERATE_USE_FSDP=true) but "
                f"sharding.strategy={s!r}; scaling shards with FSDP2 itself: set sharding.strategy=fsdp (or "
                f"fsdp_grad_op/hsdp), or launch with launch/multi_gpu.yaml ({HOW})"
            )

    def check_model(self, model: nn.Module, weights: str | Path | None) -> None:
        """Refuse a model this family cannot prepare (checked before the Accelerator is built)."""
        if has_meta(model) and weights is None:
            raise ValueError("the model is on the meta device; pass weights=<file.safetensors> to materialise it")

    # ------------------------------------------------------------------------------------------------------------
    # Preparation
    # ------------------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, model: nn.Module, *, weights: str | Path | None = None,
                block_classes: tuple[type, ...] | None = None) -> None:
        """Build the Accelerator, shard (or wrap) ``model`` and build the optimizer."""

    def _before_sharding(self, model: nn.Module, block_classes: tuple[type, ...] | None) -> tuple[type, ...] | None:
        """What every family does to the bare model first, in torchtitan's order: activation checkpointing, then
        per-block compile, then (the caller) sharding. Returns the block classes when they were needed."""
        if self.sharding.activation_checkpointing == "timm":
            enable_timm_checkpointing(model)
        if self.channels_last(model):
            model.to(memory_format=torch.channels_last)
        if self.train.compile == "blocks":
            block_classes = block_classes or block_classes_for(model)
            compile_blocks(model, block_classes)
        return block_classes

    def channels_last(self, model: nn.Module) -> bool:
        """NHWC for convolutional families (the family table's flag), on GPUs only: on the CPU oneDNN chooses its own
        layout, and keeping NCHW there keeps CPU runs bit-comparable across strategies."""
        from scaling.models.families import find_family

        family = find_family(model)
        return self.launch.cuda and family is not None and family.channels_last

    def _compile_whole_model(self, model: nn.Module) -> None:
        if self.train.compile == "model":
            compile_model(model)

    def _build_optimizer(self, model: nn.Module):
        from scaling.models.optim import build_optimizer

        optimizer = build_optimizer(model, self.train)
        # One multi-tensor (foreach) kernel per update instead of a Python loop over parameters: torch.optim picks
        # foreach by itself only on CUDA; the arithmetic is the same elementwise ops either way.
        for group in optimizer.param_groups:
            group["foreach"] = True
        return optimizer

    # ------------------------------------------------------------------------------------------------------------
    # The pieces of a step (all queued on the device; none reads a value back)
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch already on the device."""
        return self.model(images)

    def grad_sync(self, last: bool):
        """Context for one micro-batch: gradients are reduced over ranks only on the ``last`` one (default: always)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's (already scaled) loss."""
        loss.backward()

    @property
    def loss_scale(self) -> int:
        """Factor on the backward loss that turns the framework's gradient average (over ranks, and under ZeRO over
        accumulation steps) back into the gradient of (sum of losses) / (global count)."""
        return self.launch.world_size

    def set_lr(self, lr: float) -> None:
        """Learning rate of this step for every parameter group (scaled by the group's ``lr_scale``)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        """Clip (``train.clip_grad_norm``), step and zero the gradients, at the end of an optimizer step."""
        clip = self.train.clip_grad_norm
        if clip > 0:
            self._clip(clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _clip(self, max_norm: float) -> None:
        # foreach norm + in-place scale on the device; error_if_nonfinite stays False (True would read the norm).
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def train_mode(self, training: bool) -> None:
        """Switch dropout / drop-path (and norm statistics) between training and evaluation."""
        self.model.train(training)

    # ------------------------------------------------------------------------------------------------------------
    # Verification, checkpoints, export, release
    # ------------------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def shard_report(self) -> ShardReport:
        """How much of the model (or optimizer state) this rank holds."""

    def save_checkpoint(self, run_dir: Path, step: int, state: dict, rank: int) -> Path:
        """Resumable state of ``step`` (collective); model + optimizer through ``torch.distributed.checkpoint``."""
        return ckpt_lib.save_checkpoint(run_dir, step, state, rank=rank, module=self.module,
                                        optimizer=self.optimizer, engine=self.engine)

    def load_checkpoint(self, path: Path, rank: int) -> None:
        """Restore what :meth:`save_checkpoint` wrote (collective)."""
        ckpt_lib.load_checkpoint(path, module=self.module, optimizer=self.optimizer, engine=self.engine)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (collective; every rank gets it, the Trainer keeps it on the main one)."""
        return self.module.state_dict()

    def close(self) -> None:
        """Release the model, optimizer and Accelerator references (between study cells in one process)."""
        if self.accelerator is not None:
            self.accelerator.free_memory()
        self.model = self.module = self.optimizer = self.engine = None

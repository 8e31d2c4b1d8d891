"""The trainer: fit / evaluate / predict / export on Accelerate, for 1 or N processes and every sharding strategy.

Usage (what the study runner calls; every rank runs the same code)::

    trainer = Trainer(model, train_cfg, sharding_cfg, loss="multilabel", output_dir=run_dir, tracker=tracker)
    summary = trainer.fit(train_dataset, val_dataset)     # steps, seconds, images_per_s, final_loss, world_size, ...
    out = trainer.predict(test_dataset, batch_size=64)    # main process: {"index": [N], "logits": [N, L], "target"}
    trainer.evaluate(val_dataset)                         # every rank: {"loss": masked BCE / CE, "auroc": macro}
    trainer.export(run_dir / "model.safetensors")         # consolidated fp32, written by the main process

Datasets yield ``{"image": [C,H,W] uint8/uint16 (or already normalised float), "target": [L] float with NaN =
unlabelled | long class index with -1 = unlabelled, "index": int}``; training datasets take ``(position,
draw_seed)`` keys (:class:`~scaling.engine.distributed.StepBatchSampler`), and images become normalised float on the
device (:meth:`Trainer._to_device`). Everything that differs between strategies lives in a strategy plan
(``scaling.engine.strategies``); the loop in :meth:`Trainer.fit` is the same for all of them and reads top to
bottom in labelled sections (big_vision ``train.py``).

Exactness: every optimizer step sees the same global batch whatever the world size or accumulation
(:class:`~scaling.engine.distributed.StepBatchSampler`), and the loss of a step is the sum over *labelled* entries
of the whole global batch divided by their global count (one all-reduce of the count per step). So k micro-batches
of b equal one batch of k·b, and N ranks equal one process, also when labels are missing unevenly.

No host-device synchronisation inside a step: the loss, the label count, the non-finite guard and clipping stay on
the device; values are read back only at *sync points* (every ``log_every`` and ``checkpoint_every`` steps and the
last step), where the ranks also agree on preemption signals (``scaling.engine.preemption``). Run under
``torch.cuda.set_sync_debug_mode("error")`` to prove it: the sync points are exempt, any other synchronisation
raises (``benchmarks/gpu_throughput.py`` does).

Validation every ``eval_every`` steps records the loss and the macro AUROC (``torchmetrics``,
:mod:`scaling.engine.validation`); with ``train.select`` other than ``last`` the weights of the best validation point
are kept and training may stop early (:mod:`scaling.engine.selection`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from scaling.config import ShardingConfig, TrainConfig
from scaling.engine import checkpoint as ckpt_lib
from scaling.engine import seeds
from scaling.engine.distributed import (
    LaunchError,
    ShardedEvalSampler,
    StepBatchSampler,
    check_launch,
    check_training_keys,
)
from scaling.engine.inputs import Normalisation, pin_memory, to_device
from scaling.engine.preemption import PreemptionSignals, ignore_in_worker, shut_down_at_exit, shut_down_workers
from scaling.engine.schedule import lr_at, mixup_alpha, total_steps
from scaling.engine.selection import Selection
from scaling.engine.sharding import ShardingError, verify_sharding
from scaling.engine.strategies import strategy_class
from scaling.engine.validation import ValidationAUROC

log = logging.getLogger(__name__)

LOSSES = ("multilabel", "multiclass")

# Dense bf16 peak per GPU (NVIDIA data sheets; torchtitan ``tools/utils.py`` get_peak_flops). Matched on the device name.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12), ("B200", 2250e12), ("L40S", 362e12), ("A10G", 125e12))

PREFETCH_FACTOR = 4
"""Batches each DataLoader worker prepares ahead (PyTorch's default is 2; small per-GPU batches drain it fast)."""


class Preempted(SystemExit):
    """Raised after SIGTERM/SIGUSR1 once a resumable checkpoint is on disk; exit code 128 + signal number."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


@contextlib.contextmanager
def planned_sync(device: torch.device):
    """A host read the loop makes on purpose (sync points, the warm-up step): exempt from
    ``torch.cuda.set_sync_debug_mode``, so that mode flags only the synchronisations nobody planned."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def labelled(target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mask of the entries the loss counts. ``multilabel``: every label that is not NaN. ``multiclass``: every
    sample with a class, i.e. an index >= 0 (-1 = unlabelled) or a soft target row without NaN (MixUp leaves a
    mixed row NaN when either partner was unlabelled)."""
    if kind == "multilabel":
        return ~torch.isnan(target)
    if target.is_floating_point():
        return ~torch.isnan(target).any(-1)
    return target >= 0


def masked_loss_sum(logits: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-entry losses, number of entries counted) for one micro-batch, in fp32.

    ``multilabel``: BCE-with-logits over labelled entries only (NaN target = not labelled, excluded); soft targets
    from MixUp are fine. ``multiclass``: cross-entropy over labelled samples (:func:`labelled`), with class indices
    or soft (MixUp) target distributions.
    """
    logits = logits.float()
    known = labelled(target, kind)
    if kind == "multilabel":
        per = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
    elif target.is_floating_point():
        per = -(torch.nan_to_num(target) * F.log_softmax(logits, dim=-1)).sum(-1)
    else:
        per = F.cross_entropy(logits, target.long().clamp_min(0), reduction="none")
    # where(), not a product: an unlabelled entry's loss must not reach the sum even if it is inf.
    return torch.where(known, per, torch.zeros_like(per)).sum(), known.sum()


class Trainer:
    """Fine-tunes one model under one sharding strategy; see the module docstring for the call pattern.

    Args:
        model: ``nn.Module`` whose ``forward(images)`` is the only entry point (e.g. ``build_model(...)``). It may
            live on the meta device (``sharding.build_on_meta``); then ``weights`` must name a safetensors file and
            each rank materialises only its shard.
        train_cfg, sharding_cfg: the run's :class:`TrainConfig` and :class:`ShardingConfig`.
        loss: ``multilabel`` (masked BCE) or ``multiclass`` (cross-entropy over labelled samples: one-of-K
            fine-tuning, ``data.task: multiclass``, and upstream pretraining).
        output_dir: run directory; checkpoints go to ``<output_dir>/checkpoints`` and an existing one is resumed.
        tracker: object with ``.log(dict, step=int)`` and ``.run_id``; called on the main process only.
        num_workers: DataLoader workers per process.
        weights: safetensors file to materialise a meta-device model from.
        block_classes: FSDP / ZeRO-3 leaf / compile units; default from the backbone family table.
    """

    def __init__(self, model: nn.Module, train_cfg: TrainConfig, sharding_cfg: ShardingConfig | None = None,
                 loss: str = "multilabel", output_dir: str | Path | None = None, tracker=None, *,
                 num_workers: int = 0, weights: str | Path | None = None,
                 block_classes: tuple[type, ...] | None = None):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not one of {list(LOSSES)}")
        self.train_cfg, self.sharding = train_cfg, sharding_cfg or ShardingConfig()
        self.loss_kind, self.tracker, self.num_workers = loss, tracker, num_workers
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.strategy = self.sharding.strategy
        self.history: list[dict] = []
        self._signals = PreemptionSignals()
        self._eval_loaders: dict[tuple[int, int], tuple[Any, DataLoader]] = {}
        self.selection = Selection(train_cfg.select, train_cfg.early_stopping_patience)

        # --- Launch: refuse an impossible strategy before touching the model ------------------------------------
        self.launch = check_launch(self.sharding, train_cfg)
        self._kernels_before = seeds.deterministic_kernels() if train_cfg.deterministic else None
        self.plan = strategy_class(self.strategy)(train_cfg, self.sharding, self.launch)
        self.plan.check_model(model, weights)

        # --- Model: captured before wrapping (names and global shapes identify the model in checkpoints) -------
        self.signature = ckpt_lib.model_signature([(n, tuple(p.shape)) for n, p in model.named_parameters()])
        # Head width (MixUp one-hots class targets): TransferModel.num_outputs, or a bare timm model's num_classes.
        self.num_outputs = getattr(model, "num_outputs", getattr(model, "num_classes", None))
        from scaling.models.families import input_channels

        self.in_channels = input_channels(model)
        """Image channels the model takes (``model.kwargs: {in_chans: 1}`` gives 1); every batch is brought to it."""

        # --- Prepare: activation checkpointing, compile, memory layout, sharding, optimizer (the plan's job) ----
        self.plan.prepare(model, weights=weights, block_classes=block_classes)
        self.accelerator = acc = self.plan.accelerator
        self.world_size, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        self.is_main = acc.is_main_process
        self._auroc = ValidationAUROC(loss, self.device)
        self._image_format = torch.channels_last if self.plan.channels_last(self.module) else torch.preserve_format

        # --- Verify: sharding asked for is sharding in effect -----------------------------------------------
        self.shard = self.plan.shard_report()
        verify_sharding(self.shard)
        self.micro_batch = train_cfg.batch_size // (self.world_size * train_cfg.grad_accum)
        if self.is_main:
            log.info("strategy=%s world=%d global batch=%d = %d ranks x %d accum x %d micro; rank share %.3f, "
                     "%d FSDP units, compile=%s", self.strategy, self.world_size, train_cfg.batch_size,
                     self.world_size, train_cfg.grad_accum, self.micro_batch, self.shard.share, self.shard.units,
                     train_cfg.compile)

    # The prepared objects, as the plan holds them (benchmarks and tests inspect them).
    model = property(lambda self: self.plan.model, doc="What the forward calls (DDP wrapper, FSDP2 root, engine).")
    module = property(lambda self: self.plan.module, doc="The bare nn.Module (parameter names as built).")
    optimizer = property(lambda self: self.plan.optimizer, doc="The optimizer (Accelerate- or DeepSpeed-wrapped).")
    engine = property(lambda self: self.plan.engine, doc="The DeepSpeed engine under ZeRO, else None.")

    # ----------------------------------------------------------------------------------------------------------
    # Small pieces of the loop
    # ----------------------------------------------------------------------------------------------------------

    def _to_device(self, batch: dict, norm: Normalisation | None) -> dict:
        """The one place a batch moves from host to device (``scaling.engine.inputs.to_device``): pinned memory (the
        DataLoader's) + non-blocking copies of the integer images, float conversion, the model's channel count and
        normalisation on the device, NHWC images for convolutional families on GPUs."""
        return {**batch, "image": to_device(batch["image"], self.device, norm, channels=self.in_channels,
                                            channels_last=self._image_format == torch.channels_last),
                "target": batch["target"].to(self.device, non_blocking=True)}

    def _loader(self, dataset, batch_sampler, persistent: bool = False, seed: int = 0) -> DataLoader:
        """DataLoader with pinned memory on GPUs and, with workers, a deeper prefetch queue; ``persistent`` keeps
        the workers alive between passes (validation every ``eval_every`` steps would otherwise start them anew).
        The loader has its own generator: creating an iterator otherwise draws its workers' base seed from the
        global RNG. Workers leave SIGTERM / SIGUSR1 to their rank (:func:`~scaling.engine.preemption.ignore_in_worker`).
        """
        workers = {"prefetch_factor": PREFETCH_FACTOR, "persistent_workers": persistent,
                   "worker_init_fn": ignore_in_worker} if self.num_workers else {}
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                          pin_memory=pin_memory(self.device), generator=torch.Generator().manual_seed(seed), **workers)

    def _eval_loader(self, dataset, batch_size: int) -> DataLoader:
        """This rank's prediction loader for ``dataset``, kept (with its workers) for the Trainer's lifetime."""
        key = (id(dataset), batch_size)
        if key not in self._eval_loaders:
            sampler = ShardedEvalSampler(len(dataset), batch_size, self.world_size, self.rank)
            # The dataset is held with its loader, so its id cannot be reused by another object meanwhile.
            self._eval_loaders[key] = (dataset, shut_down_at_exit(self._loader(dataset, sampler, persistent=True)))
        return self._eval_loaders[key][1]

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def sync_norm_statistics(self) -> int:
        """Average the BatchNorm running statistics (``running_mean``, ``running_var``) over the ranks, so that
        every rank predicts with the same model and the exported weights are the ones every rank used; returns the
        number of BatchNorm layers averaged (collective: every rank calls; nothing to do for one process or a model
        without BatchNorm, e.g. the GroupNorm / LayerNorm presets).

        During training each rank updates its copy from its own micro-batches (DDP is told not to overwrite them
        with rank 0's: ``broadcast_buffers=False``). A running statistic is an exponential moving average, linear in
        the batch statistics, so the average over ranks of the per-rank averages (all starting equal) is the moving
        average of the rank-averaged batch statistics, whenever it is taken. It is taken before every prediction or
        evaluation, before a checkpoint or the final weights are written and at the end of :meth:`fit`. It is not
        what one process would hold: its batch statistics are those of the whole global batch, whose variance also
        counts the spread between the ranks' means (docs/scaling-out.md, "What N ranks equal").
        """
        if self.world_size == 1:
            return 0
        layers = [m for m in self.module.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                  and m.running_mean is not None]
        buffers = [b for m in layers for b in (m.running_mean, m.running_var)]
        if not buffers:
            return 0
        flat = torch.cat([b.detach().reshape(-1).to(self.device, torch.float32) for b in buffers])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        for b, new in zip(buffers, torch.split(flat, [b.numel() for b in buffers])):
            b.copy_(new.view_as(b))
        return len(layers)

    def _label_count(self, micro: list[dict]) -> torch.Tensor:
        """Labelled entries of the whole global batch (on the device; one all-reduce, no host read)."""
        count = torch.zeros((), device=self.device)
        for b in micro:
            count += labelled(b["target"], self.loss_kind).sum()
        return self._all_sum(count).clamp_min(1)

    def _flops_per_image(self, sample: torch.Tensor) -> float | None:
        """Training FLOPs per image (3x a counted forward at batch 1), for MFU; only on GPU."""
        if self.device.type != "cuda":
            return None
        from torch.utils.flop_counter import FlopCounterMode

        self.plan.train_mode(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.plan.forward(sample[:1])
        self.plan.train_mode(True)
        return 3.0 * counter.get_total_flops()

    def _read_window(self, window: torch.Tensor) -> tuple[float, int, int]:
        """Sync point: (sum over ranks of the window's step losses, steps whose loss was non-finite on any rank,
        agreed signal). ``window`` is [loss sum, one non-finite flag per step of the window]."""
        with planned_sync(self.device):
            total = self._all_sum(window.clone())
            loss_sum, nonfinite = torch.stack([total[0], (total[1:] > 0).sum().to(total.dtype)]).tolist()
            return loss_sum, int(nonfinite), self._signals.agree(self.world_size, self.device)

    # ----------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------------------

    def _expected_state(self, total: int) -> dict:
        state = {"world_size": self.world_size, "strategy": self.strategy, "model_signature": self.signature,
                 "batch_size": self.train_cfg.batch_size, "grad_accum": self.train_cfg.grad_accum,
                 "total_steps": total, "loss": self.loss_kind}
        if self.selection.active:  # absent under `last`: checkpoints written before train.select existed still fit
            state["select"] = self.selection.select
        return state

    def save_checkpoint(self, step: int, total: int) -> Path:
        """Write resumable state for ``step`` (collective: every rank calls)."""
        if self.output_dir is None:
            raise ValueError("Trainer(output_dir=None) cannot save checkpoints")
        state = {**self._expected_state(total), "run_id": getattr(self.tracker, "run_id", None),
                 "history": self.history, "selection": self.selection.state()}
        self.sync_norm_statistics()
        path = self.plan.save_checkpoint(self.output_dir, step, state, self.rank)
        self.selection.checkpoint_written(self.output_dir, self.rank)
        return path

    def save_final(self, total: int, summary: dict) -> Path:
        """Keep the finished run: consolidated fp32 weights and ``summary`` (collective: every rank calls)."""
        state = {**self._expected_state(total), "run_id": getattr(self.tracker, "run_id", None),
                 "history": self.history, "summary": summary}
        return ckpt_lib.save_final(self.output_dir, summary["steps"], state, self.full_state_dict(), rank=self.rank)

    def _resume(self, total: int) -> tuple[int, dict | None]:
        """(step to continue from, the stored summary when training had already finished)."""
        path = ckpt_lib.latest_checkpoint(self.output_dir)
        if path is None:
            return 0, None
        state = ckpt_lib.read_state(path)
        ckpt_lib.check_compatible(path, state, self._expected_state(total))
        if state.get("final"):
            ckpt_lib.load_final_weights(path, self.module, self.device, self.engine)
        else:
            self.plan.load_checkpoint(path, self.rank)
            self.selection.restore(state.get("selection"), self.output_dir)
        self.history = list(state.get("history", []))
        if self.is_main:
            log.info("%s %s at step %d", "training finished earlier: loaded" if state.get("final") else
                     "resumed from", path, state["step"])
        return int(state["step"]), state.get("summary") if state.get("final") else None

    def _preempted(self, signum: int, done: int, total: int) -> Preempted:
        path = self.save_checkpoint(done, total) if self.output_dir is not None else None
        log.warning("signal %d: saved %s at step %d; relaunch to resume", signum, path, done)
        return Preempted(signum, path)

    # ----------------------------------------------------------------------------------------------------------
    # fit
    # ----------------------------------------------------------------------------------------------------------

    def fit(self, train_dataset, val_dataset=None) -> dict[str, Any]:
        """Train for ``total_steps(train_cfg, len(train_dataset))`` optimizer steps; resume if a checkpoint exists.

        Returns (on every rank) ``steps`` (run; fewer than planned after early stopping), ``seconds`` and
        ``cpu_seconds`` (this process, after the first step), ``images_per_s``, ``final_loss``, ``world_size``,
        ``strategy``, ``global_batch``, ``micro_batch``, ``grad_accum``, ``resumed_from``, ``rank_share``,
        ``fsdp_units``, ``mfu`` (GPU only, else None), ``from_final_checkpoint``, ``select``, ``best_step`` and
        ``best_value`` (None under ``train.select: last``), ``stopped_early``, and ``val_loss`` / ``val_auroc``
        of the kept weights when a validation set is given. With ``train.select`` other than ``last`` the kept
        weights are those of the best validation point (:mod:`scaling.engine.selection`; needs ``output_dir`` and
        ``val_dataset``). With ``output_dir``, the finished run is kept (:meth:`save_final`); a later ``fit`` on the
        same directory loads its weights and returns its summary (``from_final_checkpoint: True``) without training.
        Raises :class:`Preempted` after saving a checkpoint when SIGTERM/SIGUSR1 arrives (honoured at the next sync
        point), and ``FloatingPointError`` when the loss became NaN/inf (detected at the next sync point).
        """
        from tqdm.auto import tqdm

        from scaling.engine.mixup import mixup, sample_lambda

        cfg, plan, selection = self.train_cfg, self.plan, self.selection
        if selection.active and (self.output_dir is None or val_dataset is None):
            raise ValueError(f"train.select={selection.select!r} needs a validation set and an output_dir (the best "
                             f"weights are kept on disk); got val_dataset="
                             f"{'None' if val_dataset is None else 'set'}, output_dir={self.output_dir}")

        # --- Schedule and resume ------------------------------------------------------------------------------
        total = total_steps(cfg, len(train_dataset))
        alpha = mixup_alpha(cfg, len(train_dataset))  # 0 for small tasks under the BiT-HyperRule
        start, finished = self._resume(total) if self.output_dir is not None else (0, None)
        if finished is not None:  # trained in an earlier launch (e.g. one killed while evaluating): evaluate only
            return self._validated({**finished, "from_final_checkpoint": True}, val_dataset, total)
        # A launch preempted while validating saved that step unvalidated: the candidate is evaluated now.
        stopped = False
        if selection.active and start and (start % cfg.eval_every == 0 or start == total) \
                and selection.validated < start:
            stopped = self._validation_point(val_dataset, start, total)

        # --- Data: this rank's micro-batches, step by step, from the resume position ----------------------------
        # Keys are (position, draw_seed): augmentation is a function of (seed, step, slot), never of a global RNG.
        check_training_keys(train_dataset)
        sampler = StepBatchSampler(len(train_dataset), cfg.batch_size, self.world_size, self.rank, cfg.grad_accum,
                                   cfg.seed, start, total)
        batches = iter(self._loader(train_dataset, sampler, seed=cfg.seed))
        norm = Normalisation.of(train_dataset)

        # --- Loop state: device-side accumulators, read only at sync points ------------------------------------
        plan.train_mode(True)
        flops_per_image, peak = None, _peak_flops(self.device)
        # A progress bar for people at a terminal; batch jobs (SLURM logs, CI) get one log line per log interval.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=total, initial=start, disable=not (self.is_main and interactive), desc="train", unit="step",
                   leave=False)
        # [sum of step losses, a non-finite flag per step]: summed over ranks at a sync point, a step counts once
        # however many ranks saw it. The window is reset at every log point, so log_every steps at most.
        window = torch.zeros(1 + max(1, min(cfg.log_every, total - start)), device=self.device)
        window_steps, window_t0 = 0, time.perf_counter()
        t_start, cpu_start, timed_from = time.perf_counter(), time.process_time(), start
        final_loss = self.history[-1]["loss"] if self.history else float("nan")
        mfu, steps_run = None, start
        with self._signals, contextlib.ExitStack() as ending:
            # The workers end with the loop, however it ends (a signal, an error), not when the iterator is collected
            ending.callback(shut_down_workers, batches)
            for step in range(start, total):
                if stopped:
                    break
                done = steps_run = step + 1
                # The first step pays allocation, lazy initialisation and compilation: allowed to synchronise.
                warmup = planned_sync(self.device) if step == start else contextlib.nullcontext()
                with warmup:
                    # --- Learning rate (a pure function of the step: nothing to restore on resume) -------------
                    lr = lr_at(step, total, cfg)
                    plan.set_lr(lr)
                    # The global RNGs serve dropout / drop-path: seeded per (seed, step, rank), nothing to restore.
                    seeds.seed_step(cfg.seed, step, self.rank)

                    # --- Batches: the k micro-batches of this step on the device; one MixUp lambda per step -----
                    micro = [self._to_device(next(batches), norm) for _ in range(cfg.grad_accum)]
                    if flops_per_image is None and peak is not None:
                        flops_per_image = self._flops_per_image(micro[0]["image"])
                    if alpha > 0:
                        # lambda: the same on every rank; partners: from each micro-batch's piece of the global batch
                        lam = sample_lambda(alpha, seeds.generator(seeds.derive_seed(cfg.seed, seeds.MIXUP, step)))
                        for j, b in enumerate(micro):
                            piece = j * self.world_size + self.rank
                            gen = seeds.generator(seeds.derive_seed(cfg.seed, seeds.MIXUP, step, piece))
                            b["image"], b["target"] = mixup(b["image"], b["target"], lam, generator=gen,
                                                            num_classes=self.num_outputs)

                    # --- Loss normaliser: labelled entries of the whole global batch -------------------------
                    count = self._label_count(micro)

                    # --- Forward / backward per micro-batch; gradients reduced on the last one ---------------
                    step_loss = torch.zeros((), device=self.device)
                    for j, b in enumerate(micro):
                        last = j == len(micro) - 1
                        with plan.grad_sync(last):
                            loss_sum, _ = masked_loss_sum(plan.forward(b["image"]), b["target"], self.loss_kind)
                            plan.backward(loss_sum * plan.loss_scale / count, last)
                        step_loss += loss_sum.detach()

                    # --- Optimizer step (clipping included), then device-side bookkeeping -------------------
                    plan.step()
                    step_loss = step_loss / count
                    window[0] += step_loss
                    window[1 + window_steps] = ~torch.isfinite(step_loss)
                    window_steps += 1
                    bar.update(1)
                if step == start:  # time the steps after the warm-up
                    t_start, cpu_start, timed_from = time.perf_counter(), time.process_time(), done

                # --- Sync point: every log_every / checkpoint_every steps and the last; the only host reads ----
                log_due = done % cfg.log_every == 0 or done == total
                ckpt_due = bool(self.output_dir is not None and cfg.checkpoint_every
                                and done % cfg.checkpoint_every == 0 and done != total)
                signum = 0
                if log_due or ckpt_due:
                    loss_sum, nonfinite, signum = self._read_window(window)
                    if nonfinite:
                        bar.close()
                        raise FloatingPointError(
                            f"the training loss was NaN/inf in {nonfinite} step(s) up to step {done} (checked every "
                            f"train.log_every={cfg.log_every} / train.checkpoint_every={cfg.checkpoint_every} "
                            f"steps); the last checkpoint before it is intact. Lower train.lr, set "
                            f"train.clip_grad_norm, or check the inputs")

                # --- Log: loss averaged over ranks and the window, throughput, MFU on GPU ----------------------
                if log_due:
                    final_loss = loss_sum / window_steps
                    ips = window_steps * cfg.batch_size / max(time.perf_counter() - window_t0, 1e-9)
                    if flops_per_image and peak:
                        mfu = flops_per_image * ips / (peak * self.world_size)
                    self._log(done, total, final_loss, lr, ips, mfu, bar, interactive)
                    window.zero_()
                    window_steps, window_t0 = 0, time.perf_counter()

                # --- Validate every eval_every steps and, selecting on validation, at the last; keep the best;
                # stop early when it has not improved for early_stopping_patience validation points ------------
                if val_dataset is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == total) \
                        and (done != total or selection.active):
                    stopped = self._validation_point(val_dataset, done, total, bar)
                    if stopped:
                        log.info("early stopping at step %d: %s has not improved for %d validation points since "
                                 "step %s", done, selection.select, selection.since_best, selection.best_step)
                        break

                # --- Checkpoint every checkpoint_every steps; on an agreed SIGTERM/SIGUSR1 save and stop -------
                if signum:
                    bar.close()
                    raise self._preempted(signum, done, total)
                if ckpt_due:
                    self.save_checkpoint(done, total)
        bar.close()

        # --- Selection: the best validation point's weights replace the last step's -----------------------------
        best = selection.best_weights(self.output_dir)
        if best is not None and selection.best_step != steps_run:
            ckpt_lib.load_final_weights(best, self.module, self.device, self.engine)

        self.sync_norm_statistics()  # every rank ends with the same BatchNorm statistics, also without an export

        # --- Summary --------------------------------------------------------------------------------------------
        seconds, cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
        timed_steps = max(0, steps_run - timed_from)
        summary = {
            "steps": steps_run, "seconds": seconds, "cpu_seconds": cpu_seconds, "world_size": self.world_size,
            "strategy": self.strategy,
            "images_per_s": timed_steps * cfg.batch_size / seconds if timed_steps and seconds > 0 else float("nan"),
            "final_loss": final_loss, "global_batch": cfg.batch_size, "micro_batch": self.micro_batch,
            "grad_accum": cfg.grad_accum, "resumed_from": start, "rank_share": self.shard.share,
            "fsdp_units": self.shard.units, "mfu": mfu, "from_final_checkpoint": False,
            **selection.summary(), "stopped_early": stopped,
        }
        if best is not None:  # the kept weights' validation scores, measured at their step
            summary.update(val_loss=selection.best_scores["loss"], val_auroc=selection.best_scores["auroc"])
        # Kept before validating: a launch killed from here on re-runs only the evaluation.
        if self.output_dir is not None:
            self.save_final(total, summary)
        return self._validated(summary, val_dataset, total)

    def _validated(self, summary: dict, val_dataset, total: int) -> dict:
        """``summary`` with ``val_loss`` and ``val_auroc`` on ``val_dataset`` (when given and not recorded yet, as a
        selected best point's are), also logged to the tracker."""
        if val_dataset is not None and "val_loss" not in summary:
            val = self.evaluate(val_dataset)
            summary.update(val_loss=val["loss"], val_auroc=val["auroc"])
            if self.is_main and self.tracker is not None:
                self.tracker.log({"val/loss": val["loss"], "val/auroc": val["auroc"]}, step=total)
        return summary

    def _validation_point(self, val_dataset, done: int, total: int, bar=None) -> bool:
        """Validate the weights of step ``done``, log ``val/loss`` and ``val/auroc``, keep the weights when they are
        the best so far (``train.select``); True when training should stop early. A signal during it saves this
        step (unvalidated: the resumed launch validates it first)."""
        try:
            val = self.evaluate(val_dataset)
        except Preempted as p:
            if bar is not None:
                bar.close()
            raise self._preempted(p.signum, done, total) from None
        if self.is_main and self.tracker is not None:
            self.tracker.log({"val/loss": val["loss"], "val/auroc": val["auroc"]}, step=done)
        if self.selection.observe(done, val):
            self.selection.keep(self.output_dir, done, self.full_state_dict(), self.rank)
        self.plan.train_mode(True)
        return self.selection.stop

    def _log(self, done: int, total: int, loss: float, lr: float, ips: float, mfu: float | None, bar,
             interactive: bool) -> None:
        record = {"step": done, "loss": loss, "lr": lr, "images_per_s": ips}
        if mfu is not None:
            record["mfu"] = mfu
        self.history.append(record)
        if not self.is_main:
            return
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}")
        if not interactive:
            log.info("step %d/%d loss %.4f lr %.3g images/s %.1f%s", done, total, loss, lr, ips,
                     f" MFU {100 * mfu:.1f}%" if mfu is not None else "")
        if self.tracker is not None:
            self.tracker.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=done)

    # ----------------------------------------------------------------------------------------------------------
    # predict / evaluate
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, dataset, batch_size: int = 64) -> dict[str, np.ndarray] | None:
        """Logits for every sample of ``dataset``; every rank must call (sharded models need all ranks).

        Returns on the main process ``{"index": [N] sorted unique sample indices, "logits": [N, L],
        "target": targets aligned with index}``, with the duplicates that padding to equal per-rank shares
        creates removed by sample index; returns None on the other ranks. SIGTERM/SIGUSR1 raise
        :class:`Preempted` at the next batch, on all ranks together.
        """
        local = self._predict_local(dataset, batch_size)
        del local["owned"]  # the padding duplicates are removed by sample index below
        if self.world_size > 1:
            local = {k: self.accelerator.gather(v.to(self.device)) for k, v in local.items()}
        local = {k: v.cpu() for k, v in local.items()}  # one device-to-host copy per tensor, not one per batch
        if not self.is_main:
            return None
        index = local["index"].numpy()
        uniq, first = np.unique(index, return_index=True)
        return {"index": uniq, "logits": local["logits"].numpy()[first], "target": local["target"].numpy()[first]}

    def _predict_local(self, dataset, batch_size: int) -> dict[str, Any]:
        """This rank's share of ``dataset``: ``index``, ``logits`` (on the device), ``target`` and ``owned``, the
        number of leading entries that are its own samples (the rest repeat other ranks' to even the shares)."""
        loader = self._eval_loader(dataset, batch_size)
        norm = Normalisation.of(dataset)
        self.sync_norm_statistics()
        self.plan.train_mode(False)
        idx, logits, targets = [], [], []
        with self._signals:
            for b in loader:
                signum = self._signals.agree(self.world_size, self.device)
                if signum:
                    log.warning("signal %d during prediction: stopping (training state is on disk)", signum)
                    raise Preempted(signum, None)
                logits.append(self.plan.forward(self._to_device(b, norm)["image"]).float())
                idx.append(torch.as_tensor(b["index"]).long())
                targets.append(b["target"].float() if self.loss_kind == "multilabel" else b["target"].long())
        if not idx:
            raise ValueError("predict() got an empty dataset")
        return {"index": torch.cat(idx), "logits": torch.cat(logits), "target": torch.cat(targets),
                "owned": loader.batch_sampler.owned}

    @torch.no_grad()
    def evaluate(self, dataset, batch_size: int = 64) -> dict[str, float]:
        """``loss`` (mean masked BCE over labelled entries, or CE over labelled samples) and ``auroc`` (macro over
        the labels with both classes, :class:`~scaling.engine.validation.ValidationAUROC`) over ``dataset``, the
        same on every rank (collective). Each rank scores only its own samples, never the padding duplicates."""
        local = self._predict_local(dataset, batch_size)
        n = local["owned"]
        logits, target = local["logits"][:n], local["target"][:n].to(self.device)
        with planned_sync(self.device):
            loss_sum, count = masked_loss_sum(logits, target, self.loss_kind)
            loss_sum, count = self._all_sum(torch.stack([loss_sum.double(), count.double()])).tolist()
            names = getattr(dataset, "labels", None)  # TableDataset's label names
            auroc = self._auroc(logits, target, list(names) if isinstance(names, (list, tuple)) else None)
        return {"loss": loss_sum / max(count, 1.0), "auroc": auroc}

    # ----------------------------------------------------------------------------------------------------------
    # export
    # ----------------------------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated fp32 state dict on the main process (None elsewhere); every rank must call. BatchNorm
        running statistics are those averaged over the ranks (:meth:`sync_norm_statistics`)."""
        self.sync_norm_statistics()
        sd = self.plan.full_state_dict()
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in sd.items()} \
            if self.is_main else None

    def export(self, path: str | Path) -> Path:
        """Write the consolidated fp32 weights as one safetensors file (main process; every rank must call)."""
        sd = self.full_state_dict()
        path = Path(path)
        if self.is_main:
            ckpt_lib.save_safetensors(sd, path, {"strategy": self.strategy, "world_size": self.world_size})
        self.accelerator.wait_for_everyone()
        return path

    def close(self) -> None:
        """Release the model, optimizer and (under ZeRO) the DeepSpeed engine, between study cells in one process."""
        if self._kernels_before is not None:
            seeds.restore_kernels(self._kernels_before)
        self.plan.close()
        for _, loader in self._eval_loaders.values():
            shut_down_workers(loader)
        self._eval_loaders.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["Trainer", "Preempted", "labelled", "masked_loss_sum", "LaunchError", "ShardingError"]

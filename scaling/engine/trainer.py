"""The trainer: fit / evaluate / predict / export on Accelerate, for 1 or N processes and every sharding strategy.

Usage (what the study runner calls; every rank runs the same code)::

    trainer = Trainer(model, train_cfg, sharding_cfg, loss="multilabel", output_dir=run_dir, tracker=tracker)
    summary = trainer.fit(train_dataset, val_dataset)     # steps, seconds, images_per_s, final_loss, world_size, ...
    out = trainer.predict(test_dataset, batch_size=64)    # main process: {"index": [N], "logits": [N, L], "target"}
    trainer.export(run_dir / "model.safetensors")         # consolidated fp32, written by the main process

Datasets yield ``{"image": [C,H,W] uint8/uint16 (or already normalised float), "target": [L] float with NaN =
unlabelled | long class index, "index": int}``; training datasets take ``(position, draw_seed)`` keys
(:class:`~scaling.engine.distributed.StepBatchSampler`). Images become normalised float on the device
(:meth:`Trainer._to_device`). The loop in :meth:`Trainer.fit` reads top to bottom in labelled sections (big_vision
``train.py``).

Exactness: every optimizer step sees the same global batch whatever the world size or accumulation
(:class:`~scaling.engine.distributed.StepBatchSampler`), and the loss of a step is the sum over *labelled* entries
of the whole global batch divided by their global count (one all-reduce of the count per step). So k micro-batches
of b equal one batch of k·b, and N ranks equal one process, also when labels are missing unevenly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
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
    FSDP_STRATEGIES,
    ZERO_STRATEGIES,
    LaunchError,
    ShardedEvalSampler,
    StepBatchSampler,
    check_launch,
    check_training_keys,
    compute_dtype,
    make_accelerator,
)
from scaling.engine.inputs import Normalisation, pin_memory, to_device
from scaling.engine.schedule import lr_at, mixup_alpha, total_steps
from scaling.engine.sharding import (
    ShardingError,
    apply_fsdp,
    block_classes_for,
    deepspeed_config,
    enable_timm_checkpointing,
    has_meta,
    load_deepspeed_base,
    materialize_from_safetensors,
    shard_report,
    verify_sharding,
)

log = logging.getLogger(__name__)

LOSSES = ("multilabel", "multiclass")

# Dense bf16 peak per GPU (NVIDIA data sheets; torchtitan ``tools/utils.py`` get_peak_flops). Matched on the device name.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12), ("B200", 2250e12), ("L40S", 362e12), ("A10G", 125e12))


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


def masked_loss_sum(logits: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-entry losses, number of entries counted) for one micro-batch, in fp32.

    ``multilabel``: BCE-with-logits over labelled entries only (NaN target = not labelled, excluded); soft targets from MixUp are fine. ``multiclass``: cross-entropy over samples, with class indices or
    soft (MixUp) target distributions.
    """
    logits = logits.float()
    if kind == "multilabel":
        known = ~torch.isnan(target)
        per = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
        return (per * known).sum(), known.sum()
    if target.is_floating_point():
        per = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    else:
        per = F.cross_entropy(logits, target.long(), reduction="none")
    return per.sum(), torch.tensor(per.numel(), device=logits.device)


class Trainer:
    """Fine-tunes one model under one sharding strategy; see the module docstring for the call pattern.

    Args:
        model: ``nn.Module`` whose ``forward(images)`` is the only entry point (e.g. ``build_model(...)``). It may
            live on the meta device (``sharding.build_on_meta``); then ``weights`` must name a safetensors file and
            each rank materialises only its shard.
        train_cfg, sharding_cfg: the run's :class:`TrainConfig` and :class:`ShardingConfig`.
        loss: ``multilabel`` (masked BCE) or ``multiclass`` (cross-entropy, for upstream pretraining).
        output_dir: run directory; checkpoints go to ``<output_dir>/checkpoints`` and an existing one is resumed.
        tracker: object with ``.log(dict, step=int)`` and ``.run_id``; called on the main process only.
        num_workers: DataLoader workers per process.
        weights: safetensors file to materialise a meta-device model from.
        block_classes: FSDP unit classes; default from the backbone family table.
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

        # --- Launch: refuse an impossible strategy before touching the model ------------------------------------
        self.launch = check_launch(self.sharding, train_cfg)
        self._kernels_before = seeds.deterministic_kernels() if train_cfg.deterministic else None
        if has_meta(model) and weights is None:
            raise ValueError("the model is on the meta device; pass weights=<file.safetensors> to materialise it")
        if has_meta(model) and self.strategy in ZERO_STRATEGIES:
            raise ShardingError("meta-device models are materialised by the FSDP/DDP paths; build the model normally "
                                "for ZeRO (DeepSpeed partitions it at prepare time)")
        ds_cfg = None
        if self.strategy in ZERO_STRATEGIES:
            base, source = load_deepspeed_base(self.strategy)
            ds_cfg = deepspeed_config(train_cfg, self.sharding, self.launch.world_size, base, source)
        self.accelerator = make_accelerator(train_cfg, self.sharding, self.launch, ds_cfg)
        acc = self.accelerator
        self.world_size, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        self.is_main = acc.is_main_process

        # --- Model: activation checkpointing, sharding, optimizer ---------------------------------------------
        from scaling.models.optim import build_optimizer

        # Captured before wrapping: names and global shapes identify the model in checkpoints.
        self.signature = ckpt_lib.model_signature([(n, tuple(p.shape)) for n, p in model.named_parameters()])
        # Head width (MixUp one-hots class targets): TransferModel.num_outputs, or a bare timm model's num_classes.
        self.num_outputs = getattr(model, "num_outputs", getattr(model, "num_classes", None))
        if self.sharding.activation_checkpointing == "timm":
            enable_timm_checkpointing(model)
        self.engine = None
        if self.strategy in FSDP_STRATEGIES:
            apply_fsdp(model, train_cfg, self.sharding, self.launch, block_classes or block_classes_for(model))
            if weights is not None and has_meta(model):
                materialize_from_safetensors(model, weights, self.device)
            self.model = self.module = model
            self.optimizer = build_optimizer(model, train_cfg)
        else:
            if weights is not None and has_meta(model):
                materialize_from_safetensors(model, weights, torch.device("cpu"))
            optimizer = build_optimizer(model, train_cfg)
            self.model, self.optimizer = acc.prepare(model, optimizer)
            if self.strategy in ZERO_STRATEGIES:
                self.engine = self.model
                self.module = self.engine.module
            else:
                self.module = acc.unwrap_model(self.model)

        # --- Verify: sharding asked for is sharding in effect -----------------------------------------------
        self.shard = shard_report(self.strategy, self.module, self.optimizer, self.launch)
        verify_sharding(self.shard)
        if self.engine is not None:
            # What DeepSpeed actually runs with, not what we asked for ("auto", precedence and clipping defaults:
            # https://github.com/yuvalkirstain/PickScore/issues/18).
            got = {"train_batch_size": self.engine.train_batch_size(),
                   "gradient_accumulation_steps": self.engine.gradient_accumulation_steps(),
                   "gradient_clipping": float(self.engine.gradient_clipping())}
            want = {"train_batch_size": train_cfg.batch_size, "gradient_accumulation_steps": train_cfg.grad_accum,
                    "gradient_clipping": float(train_cfg.clip_grad_norm)}
            if got != want:
                raise ShardingError(f"DeepSpeed engine runs with {got}, but the config asks for {want}")
        self.micro_batch = train_cfg.batch_size // (self.world_size * train_cfg.grad_accum)
        if self.is_main:
            log.info("strategy=%s world=%d global batch=%d = %d ranks x %d accum x %d micro; rank share %.3f, "
                     "%d FSDP units", self.strategy, self.world_size, train_cfg.batch_size, self.world_size,
                     train_cfg.grad_accum, self.micro_batch, self.shard.share, self.shard.units)

    # ----------------------------------------------------------------------------------------------------------
    # Small pieces of the step
    # ----------------------------------------------------------------------------------------------------------

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def _to_device(self, batch: dict, norm: Normalisation | None) -> dict:
        """The batch with its images on the device as normalised float (``scaling.engine.inputs``) and its targets
        on the device."""
        return {**batch, "image": to_device(batch["image"], self.device, norm),
                "target": batch["target"].to(self.device, non_blocking=True)}

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.engine is not None:
            # DeepSpeed holds low-precision parameters itself; inputs must match them.
            return self.engine(images.to(compute_dtype(self.train_cfg)))
        if self.strategy in FSDP_STRATEGIES:
            return self.model(images)  # FSDP2's MixedPrecisionPolicy casts inputs and parameters
        with self.accelerator.autocast():
            return self.model(images)

    def _sync_context(self, last: bool):
        """Gradient reduction only on the last micro-batch (DDP ``no_sync``; FSDP2 unless syncing every one)."""
        if self.strategy in FSDP_STRATEGIES:
            self.model.set_requires_gradient_sync(last or self.sharding.sync_each_micro_batch)
            return contextlib.nullcontext()
        if self.strategy == "ddp" and not last:
            return self.accelerator.no_sync(self.model)
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.engine is not None:
            # ZeRO owns accumulation (docs/design.md, "one switch per concern"): it divides by the accumulation steps,
            # averages over ranks, clips (config) and steps only at the boundary.
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.accelerator.backward(loss)

    def _optimizer_step(self) -> None:
        if self.engine is not None:
            return  # stepped inside engine.step() at the accumulation boundary
        clip = self.train_cfg.clip_grad_norm
        if clip > 0:
            if self.strategy in FSDP_STRATEGIES:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # DTensor-aware global norm
            else:
                self.accelerator.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def _loss_scale(self) -> int:
        # Gradients are averaged over ranks (DDP/FSDP/ZeRO) and, under ZeRO, over accumulation steps; scaling the
        # backward loss by those factors makes the step's gradient that of (sum of losses) / (global count).
        scale = self.world_size
        if self.engine is not None:
            scale *= self.train_cfg.grad_accum
        return scale

    def _flops_per_image(self, sample: torch.Tensor) -> float | None:
        """Training FLOPs per image (3x a counted forward at batch 1), for MFU; only on GPU."""
        if self.device.type != "cuda":
            return None
        from torch.utils.flop_counter import FlopCounterMode

        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self._forward(sample[:1])
        self.model.train(was_training)
        return 3.0 * counter.get_total_flops()

    # ----------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------------------

    def _expected_state(self, total: int) -> dict:
        return {"world_size": self.world_size, "strategy": self.strategy, "model_signature": self.signature,
                "batch_size": self.train_cfg.batch_size, "grad_accum": self.train_cfg.grad_accum,
                "total_steps": total, "loss": self.loss_kind}

    def save_checkpoint(self, step: int, total: int) -> Path:
        """Write resumable state for ``step`` (collective: every rank calls)."""
        if self.output_dir is None:
            raise ValueError("Trainer(output_dir=None) cannot save checkpoints")
        state = {**self._expected_state(total), "run_id": getattr(self.tracker, "run_id", None),
                 "history": self.history}
        return ckpt_lib.save_checkpoint(self.output_dir, step, state, rank=self.rank, module=self.module,
                                        optimizer=self.optimizer, engine=self.engine)

    def save_final(self, total: int, summary: dict) -> Path:
        """Keep the finished run: consolidated fp32 weights and ``summary`` (collective: every rank calls)."""
        state = {**self._expected_state(total), "run_id": getattr(self.tracker, "run_id", None),
                 "history": self.history, "summary": summary}
        return ckpt_lib.save_final(self.output_dir, total, state, self.full_state_dict(), rank=self.rank)

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
            ckpt_lib.load_checkpoint(path, module=self.module, optimizer=self.optimizer, engine=self.engine)
        self.history = list(state.get("history", []))
        if self.is_main:
            log.info("%s %s at step %d", "training finished earlier: loaded" if state.get("final") else
                     "resumed from", path, state["step"])
        return int(state["step"]), state.get("summary") if state.get("final") else None

    @contextlib.contextmanager
    def _preemption_signals(self):
        """SIGTERM/SIGUSR1 set a flag; the loop checks it (agreed over ranks) after each step and saves."""
        self._signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _signal_received(self) -> int:
        flag = torch.tensor([self._signal], device=self.device, dtype=torch.int64)
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    # ----------------------------------------------------------------------------------------------------------
    # fit
    # ----------------------------------------------------------------------------------------------------------

    def fit(self, train_dataset, val_dataset=None) -> dict[str, Any]:
        """Train for ``total_steps(train_cfg, len(train_dataset))`` optimizer steps; resume if a checkpoint exists.

        Returns (on every rank) ``steps``, ``seconds`` and ``cpu_seconds`` (this process, after the first step),
        ``images_per_s``, ``final_loss``, ``world_size``,
        ``strategy``, ``global_batch``, ``micro_batch``, ``grad_accum``, ``resumed_from``, ``rank_share``,
        ``fsdp_units``, ``mfu`` (GPU only, else None), ``from_final_checkpoint`` and ``val_loss`` when a validation
        set is given. With ``output_dir``, the finished run is kept (:meth:`save_final`); a later ``fit`` on the same
        directory loads its weights and returns its summary (``from_final_checkpoint: True``) without training.
        Raises :class:`Preempted` after saving a checkpoint when SIGTERM/SIGUSR1 arrives.
        """
        from tqdm.auto import tqdm

        from scaling.engine.mixup import mixup, sample_lambda

        cfg, acc = self.train_cfg, self.accelerator

        # --- Schedule and resume ------------------------------------------------------------------------------
        total = total_steps(cfg, len(train_dataset))
        alpha = mixup_alpha(cfg, len(train_dataset))  # 0 for small tasks under the BiT-HyperRule
        start, finished = self._resume(total) if self.output_dir is not None else (0, None)
        if finished is not None:  # trained in an earlier launch (e.g. one killed while evaluating): evaluate only
            return self._validated({**finished, "from_final_checkpoint": True}, val_dataset, total)

        # --- Data: this rank's micro-batches, step by step, from the resume position ----------------------------
        # Keys are (position, draw_seed): augmentation is a function of (seed, step, slot), never of a global RNG.
        # The loader gets its own generator: creating an iterator otherwise draws its workers' base seed from the
        # global RNG.
        check_training_keys(train_dataset)
        sampler = StepBatchSampler(len(train_dataset), cfg.batch_size, self.world_size, self.rank, cfg.grad_accum,
                                   cfg.seed, start, total)
        loader = DataLoader(train_dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=pin_memory(self.device), persistent_workers=False,
                            generator=torch.Generator().manual_seed(cfg.seed))
        norm = Normalisation.of(train_dataset)
        batches = iter(loader)

        # --- Loop -----------------------------------------------------------------------------------------------
        self.model.train()
        images_per_step = cfg.batch_size
        flops_per_image, peak = None, _peak_flops(self.device)
        # A progress bar for people at a terminal; batch jobs (SLURM logs, CI) get one log line per log interval.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=total, initial=start, disable=not (self.is_main and interactive), desc="train", unit="step",
                   leave=False)
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_t0 = 0, time.perf_counter()
        t_start, cpu_start, timed_from = time.perf_counter(), time.process_time(), start
        final_loss = self.history[-1]["loss"] if self.history else float("nan")
        mfu = None
        step = start
        with self._preemption_signals():
            for step in range(start, total):
                # Learning rate and RNG seeds for this step (pure functions of the step: nothing to restore on
                # resume). The global RNGs serve dropout / drop-path, per rank.
                lr = lr_at(step, total, cfg)
                self._set_lr(lr)
                seeds.seed_step(cfg.seed, step, self.rank)

                # Fetch the k micro-batches of this optimizer step; MixUp draws one lambda per step (the same on
                # every rank) and each micro-batch's partners from its piece of the global batch.
                micro = [self._to_device(next(batches), norm) for _ in range(cfg.grad_accum)]
                if flops_per_image is None and peak is not None:
                    flops_per_image = self._flops_per_image(micro[0]["image"])
                if alpha > 0:
                    lam = sample_lambda(alpha, seeds.generator(seeds.derive_seed(cfg.seed, seeds.MIXUP, step)))
                    for j, b in enumerate(micro):
                        piece = j * self.world_size + self.rank
                        gen = seeds.generator(seeds.derive_seed(cfg.seed, seeds.MIXUP, step, piece))
                        b["image"], b["target"] = mixup(b["image"], b["target"], lam, generator=gen,
                                                        num_classes=self.num_outputs)

                # Global number of labelled entries: the step's loss is their mean over the whole global batch.
                count = torch.zeros((), device=self.device)
                for b in micro:
                    t = b["target"]
                    count += (~torch.isnan(t)).sum() if (self.loss_kind == "multilabel") else t.shape[0]
                count = self._all_sum(count).clamp_min(1)

                # Forward / backward per micro-batch; gradients reduced on the last one.
                step_loss = torch.zeros((), device=self.device)
                for j, b in enumerate(micro):
                    last = j == len(micro) - 1
                    with self._sync_context(last):
                        logits = self._forward(b["image"])
                        loss_sum, _ = masked_loss_sum(logits, b["target"].to(self.device), self.loss_kind)
                        self._backward(loss_sum * self._loss_scale() / count, last)
                    step_loss += loss_sum.detach()
                self._optimizer_step()
                window_loss += step_loss / count
                window_steps += 1
                bar.update(1)
                if step == start:  # the first step pays allocation/warm-up; time the rest
                    t_start, cpu_start, timed_from = time.perf_counter(), time.process_time(), step + 1

                # Log: loss averaged over ranks and the window, throughput, MFU on GPU.
                done = step + 1
                if done % cfg.log_every == 0 or done == total:
                    final_loss = float(self._all_sum(window_loss.clone()).item()) / window_steps
                    dt = time.perf_counter() - window_t0
                    ips = window_steps * images_per_step / max(dt, 1e-9)
                    if flops_per_image and peak:
                        mfu = flops_per_image * ips / (peak * self.world_size)
                    record = {"step": done, "loss": final_loss, "lr": lr, "images_per_s": ips}
                    if mfu is not None:
                        record["mfu"] = mfu
                    self.history.append(record)
                    if self.is_main:
                        bar.set_postfix(loss=f"{final_loss:.4f}", img_s=f"{ips:.1f}")
                        if not interactive:
                            log.info("step %d/%d loss %.4f lr %.3g images/s %.1f%s", done, total, final_loss, lr, ips,
                                     f" MFU {100 * mfu:.1f}%" if mfu is not None else "")
                        if self.tracker is not None:
                            self.tracker.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=done)
                    window_loss.zero_()
                    window_steps, window_t0 = 0, time.perf_counter()

                # Validate every eval_every steps.
                if val_dataset is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
                    val = self.evaluate(val_dataset)
                    if self.is_main and self.tracker is not None:
                        self.tracker.log({"val/loss": val["loss"]}, step=done)
                    self.model.train()

                # Checkpoint every N steps, and on SIGTERM/SIGUSR1 (SLURM preemption) save and stop.
                if self.output_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                        and done != total:
                    self.save_checkpoint(done, total)
                signum = self._signal_received()
                if signum:
                    path = self.save_checkpoint(done, total) if self.output_dir is not None else None
                    bar.close()
                    log.warning("signal %d: saved %s at step %d; relaunch to resume", signum, path, done)
                    raise Preempted(signum, path)
        bar.close()

        # --- Summary --------------------------------------------------------------------------------------------
        seconds, cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
        timed_steps = max(0, total - timed_from)
        summary = {
            "steps": total, "seconds": seconds, "cpu_seconds": cpu_seconds, "world_size": self.world_size,
            "strategy": self.strategy,
            "images_per_s": timed_steps * images_per_step / seconds if timed_steps and seconds > 0 else float("nan"),
            "final_loss": final_loss, "global_batch": cfg.batch_size, "micro_batch": self.micro_batch,
            "grad_accum": cfg.grad_accum, "resumed_from": start, "rank_share": self.shard.share,
            "fsdp_units": self.shard.units, "mfu": mfu, "from_final_checkpoint": False,
        }
        # Kept before validating: a launch killed from here on re-runs only the evaluation.
        if self.output_dir is not None:
            self.save_final(total, summary)
        return self._validated(summary, val_dataset, total)

    def _validated(self, summary: dict, val_dataset, total: int) -> dict:
        """``summary`` with ``val_loss`` on ``val_dataset`` (when given), also logged to the tracker."""
        if val_dataset is not None:
            summary["val_loss"] = self.evaluate(val_dataset)["loss"]
            if self.is_main and self.tracker is not None:
                self.tracker.log({"val/loss": summary["val_loss"]}, step=total)
        return summary

    # ----------------------------------------------------------------------------------------------------------
    # predict / evaluate
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, dataset, batch_size: int = 64) -> dict[str, np.ndarray] | None:
        """Logits for every sample of ``dataset``; every rank must call (sharded models need all ranks).

        Returns on the main process ``{"index": [N] sorted unique sample indices, "logits": [N, L],
        "target": targets aligned with index}``, with the duplicates that padding to equal per-rank shares
        creates removed by sample index; returns None on the other ranks.
        """
        sampler = ShardedEvalSampler(len(dataset), batch_size, self.world_size, self.rank)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=pin_memory(self.device))
        norm = Normalisation.of(dataset)
        self.model.eval()
        idx, logits, targets = [], [], []
        for b in loader:
            logits.append(self._forward(self._to_device(b, norm)["image"]).float().cpu())
            idx.append(torch.as_tensor(b["index"]).long())
            targets.append(b["target"].float() if self.loss_kind == "multilabel" else b["target"].long())
        if not idx:
            raise ValueError("predict() got an empty dataset")
        local = {"index": torch.cat(idx), "logits": torch.cat(logits), "target": torch.cat(targets)}
        if self.world_size > 1:
            local = {k: self.accelerator.gather(v.to(self.device)).cpu() for k, v in local.items()}
        if not self.is_main:
            return None
        index = local["index"].numpy()
        uniq, first = np.unique(index, return_index=True)
        return {"index": uniq, "logits": local["logits"].numpy()[first], "target": local["target"].numpy()[first]}

    def evaluate(self, dataset, batch_size: int = 64) -> dict[str, float]:
        """Mean loss over ``dataset`` (masked BCE over labelled entries, or CE), the same on every rank."""
        out = self.predict(dataset, batch_size)
        value = [None]
        if self.is_main:
            s, n = masked_loss_sum(torch.from_numpy(out["logits"]), torch.from_numpy(out["target"]), self.loss_kind)
            value = [float(s / max(int(n), 1))]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(value, src=0)
        return {"loss": value[0]}

    # ----------------------------------------------------------------------------------------------------------
    # export
    # ----------------------------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated fp32 state dict on the main process (None elsewhere); every rank must call."""
        if self.strategy in FSDP_STRATEGIES:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif self.engine is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            # The fp32 master copy (never the engine's state_dict(): empty tensors under ZeRO-3,
            # https://github.com/deepspeedai/DeepSpeed/issues/2413).
            sd = {n: safe_get_full_fp32_param(p) for n, p in self.module.named_parameters()}
            # Persistent buffers are never partitioned; take them (and only them) from the module's state dict.
            sd.update({k: v for k, v in self.module.state_dict().items() if k not in sd})
        else:
            sd = self.module.state_dict()
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
        """Release the model, optimizer and DeepSpeed engine (between study cells in one process).

        Known limit: under ZeRO-3, DeepSpeed 0.19.8 keeps each finished engine reachable (its root module stays in
        ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK`` and in further references we did not trace),
        measured +210 MB per cell for a 22 M-parameter ViT on 2 ranks; zero1/zero2/fsdp/ddp release everything.
        Long ZeRO-3 grids should run one cell per launch.
        """
        if self._kernels_before is not None:
            seeds.restore_kernels(self._kernels_before)
        if self.engine is not None:
            self.engine.destroy()  # removes DeepSpeed's gradient hooks and buffers
        self.accelerator.free_memory()
        self.model = self.module = self.optimizer = self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["Trainer", "Preempted", "masked_loss_sum", "LaunchError", "ShardingError"]

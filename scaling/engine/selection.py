"""Which weights a fine-tuned run keeps: the best validation point (``train.select``), and early stopping.

Hyper-parameters and the checkpoint are chosen on validation data, never on test (docs/design.md, "Checkpoints
are chosen on validation"). With ``train.select: val_loss | val_auroc`` every validation point
(every ``train.eval_every`` steps and the last step) is a candidate: the best value wins, ties go to the earlier
step, and a non-finite value never wins. ``train.early_stopping_patience: k`` stops training after k validation
points without improvement. ``last`` (the default) keeps the last step, as before these settings existed.

Where the best weights live: each improvement writes the consolidated fp32 weights through the Trainer's
``full_state_dict`` (the export path, correct for replicated, FSDP2-sharded and ZeRO-1/2/3 models) into
``<run_dir>/checkpoints/best_<step>/`` (:func:`scaling.engine.checkpoint.save_best`); at the end every rank loads
its share back from that file (:func:`~scaling.engine.checkpoint.load_final_weights`, memory-mapped). Cost per
improvement: one gather of the model to the main process's host memory (the peak of the final export, which every
run pays anyway; no copy is held between validation points) and 4 bytes per parameter written to disk; at most two
best directories exist at once. The bookkeeping below (best step and value, validation points since the best, the
last step validated) is part of every resumable checkpoint's state, and the best directory that state names is
kept until a newer checkpoint names another one: a run killed after its best point and resumed ends with the same
best weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from scaling.engine import checkpoint as ckpt_lib

log = logging.getLogger(__name__)

METRICS = {"val_loss": ("loss", -1.0), "val_auroc": ("auroc", 1.0)}
"""``train.select`` -> (key of the validation scores, +1 when higher is better, -1 when lower is)."""


@dataclass
class Selection:
    """Best-validation-point bookkeeping of one run (the same on every rank: it sees only synchronised scores)."""

    select: str = "last"
    """``train.select``."""
    patience: int = 0
    """``train.early_stopping_patience`` (0 = never stop early)."""
    best_step: int | None = None
    """Step of the best validation point so far (None before the first finite value)."""
    best_value: float | None = None
    """Its value of the selection metric."""
    best_scores: dict[str, float] | None = None
    """All its validation scores (``loss``, ``auroc``): the summary's ``val_loss`` / ``val_auroc``."""
    since_best: int = 0
    """Validation points since the best one (all of them while there is none)."""
    validated: int = 0
    """The last step validated (a resumed run validates its start step again when this is behind)."""
    checkpointed: int | None = None
    """The best step the newest resumable checkpoint names: its best directory must outlive newer bests."""

    @property
    def active(self) -> bool:
        """True when a validation metric chooses the weights (``select`` is not ``last``)."""
        return self.select != "last"

    def observe(self, step: int, scores: dict[str, float]) -> bool:
        """Record the validation ``scores`` (``loss``, ``auroc``) of ``step``; True when it is the new best."""
        self.validated = step
        if not self.active:
            return False
        key, sign = METRICS[self.select]
        value = float(scores[key])
        if math.isfinite(value) and (self.best_value is None or sign * (value - self.best_value) > 0):
            self.best_step, self.best_value, self.best_scores, self.since_best = step, value, dict(scores), 0
            return True
        self.since_best += 1
        return False

    @property
    def stop(self) -> bool:
        """Early stopping: ``patience`` validation points have passed without improvement."""
        return bool(self.patience) and self.since_best >= self.patience

    def state(self) -> dict:
        """JSON-safe state for a resumable checkpoint."""
        return {k: v for k, v in asdict(self).items() if k != "checkpointed"}

    def restore(self, state: dict | None, run_dir: Path) -> None:
        """Continue from a resumable checkpoint's ``state`` (None: it was written before any validation point);
        raise :class:`~scaling.engine.checkpoint.CheckpointError` when the best weights it names are gone."""
        if not state:
            return
        for k in ("best_step", "best_value", "best_scores", "since_best", "validated"):
            setattr(self, k, state[k])
        self.checkpointed = self.best_step
        if self.best_step is not None:
            record = ckpt_lib.read_best(ckpt_lib.best_checkpoint(run_dir, self.best_step))
            if record.get("step") != self.best_step:
                raise ckpt_lib.CheckpointError(
                    f"{ckpt_lib.best_checkpoint(run_dir, self.best_step)}: holds step {record.get('step')}, the "
                    f"checkpoint names step {self.best_step} as the best validation point")

    def keep(self, run_dir: Path, step: int, tensors, rank: int) -> None:
        """Write the new best weights (``tensors``: the main process's consolidated state dict; collective) and
        remove the best directories no checkpoint needs any more."""
        ckpt_lib.save_best(run_dir, step, {"select": self.select, "value": self.best_value}, tensors, rank=rank)
        if rank == 0:
            ckpt_lib.prune_best(run_dir, keep=(self.checkpointed, step))

    def checkpoint_written(self, run_dir: Path, rank: int) -> None:
        """A resumable checkpoint naming the current best was published: older best directories can go."""
        self.checkpointed = self.best_step
        if rank == 0 and self.active:
            ckpt_lib.prune_best(run_dir, keep=(self.best_step,))

    def best_weights(self, run_dir: Path) -> Path | None:
        """The directory of the best weights to load at the end (None under ``last``, or when no validation point
        had a finite value: then the last step's weights stay, with a warning)."""
        if not self.active:
            return None
        if self.best_step is None:
            log.warning("train.select=%s: no validation point had a finite value; keeping the last step's weights",
                        self.select)
            return None
        return ckpt_lib.best_checkpoint(run_dir, self.best_step)

    def summary(self) -> dict:
        """What the run's summary records: the metric, the best step and its value (None under ``last``)."""
        return {"select": self.select, "best_step": self.best_step, "best_value": self.best_value}


__all__ = ["Selection", "METRICS"]

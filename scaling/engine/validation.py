"""Macro AUROC of a validation pass during training, computed and synchronised over ranks by ``torchmetrics``.

Each rank feeds the predictions of its own validation samples (the padding duplicates of
:class:`~scaling.engine.distributed.ShardedEvalSampler` already cut off); ``compute()`` all-gathers the metric states
over ``torch.distributed``, so every rank gets the value of the whole validation set.

* ``multilabel``: :class:`torchmetrics.classification.MultilabelAUROC`, one AUROC per label over its labelled
  samples: a NaN target (missing, or uncertain under the dataset's uncertainty policy) becomes ``ignore_index``.
  A one-label (binary) task uses :class:`~torchmetrics.classification.BinaryAUROC` the same way (the multilabel
  metric needs two labels).
* ``multiclass``: :class:`torchmetrics.classification.MulticlassAUROC`, one-vs-rest per class over the samples with
  a class (index -1 = unlabelled is ``ignore_index``).

The macro averages the labels that have both classes among their validation samples; a label without is left out
(torchmetrics would count it as 0) and named once per Trainer in a warning. Scores are passed as float64
probabilities (sigmoid / softmax), never as logits: torchmetrics decides per ``update`` call whether its input is
logits (any value outside [0, 1]), which could differ between ranks, and fp32 sigmoids of large logits tie at 1.0.
Exact (``thresholds=None``): the states hold every validation score, a few floats per image.
"""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger(__name__)

IGNORE = -1
"""``ignore_index`` of both metrics: a multilabel NaN target is mapped to it, a multiclass -1 already is."""


class ValidationAUROC:
    """Macro AUROC over the labels of one validation pass, the same on every rank (a collective call).

    Args:
        kind: ``multilabel`` or ``multiclass`` (the Trainer's loss).
        device: where the metric states live (the ranks' device: NCCL gathers CUDA tensors only).
    """

    def __init__(self, kind: str, device: torch.device):
        self.kind, self.device = kind, device
        self._metric = None
        self._warned = False

    def _build(self, num_outputs: int):
        from torchmetrics.classification import BinaryAUROC, MulticlassAUROC, MultilabelAUROC

        if self.kind == "multilabel" and num_outputs == 1:
            metric = BinaryAUROC(ignore_index=IGNORE)
        elif self.kind == "multilabel":
            metric = MultilabelAUROC(num_labels=num_outputs, average=None, ignore_index=IGNORE)
        else:
            metric = MulticlassAUROC(num_classes=num_outputs, average=None, ignore_index=IGNORE)
        return metric.to(self.device)

    def _counts(self, target: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """[2, L] positives and negatives per label among this rank's labelled samples, summed over ranks."""
        if self.kind == "multilabel":
            counts = torch.stack([(target == 1).sum(0), (target == 0).sum(0)])
        else:
            pos = torch.bincount(target[target >= 0], minlength=num_outputs)
            counts = torch.stack([pos, (target >= 0).sum() - pos])
        counts = counts.double()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(counts)
        return counts

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, names: list[str] | None = None) -> float:
        """Macro AUROC of this rank's ``logits`` [n, L] and ``target`` ([n, L] float with NaN, or [n] class index)
        together with every other rank's; NaN when no label has both classes. ``names`` label the warning about
        labels left out (indices when None)."""
        num_outputs = logits.shape[-1]
        if self._metric is None:
            self._metric = self._build(num_outputs)
        if self.kind == "multilabel":
            scores = torch.sigmoid(logits.double())
            target = torch.where(torch.isnan(target), IGNORE, target).long()
        else:
            scores = torch.softmax(logits.double(), dim=-1)
            target = target.long()
        binary = self.kind == "multilabel" and num_outputs == 1
        # an empty update (a rank with no own sample) adds nothing
        self._metric.update(*((scores[:, 0], target[:, 0]) if binary else (scores, target)))
        with warnings.catch_warnings():
            # A label with one class only: torchmetrics warns at every call; it is left out below, and said once.
            warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
            per_label = self._metric.compute().double().reshape(-1)
        self._metric.reset()
        counts = self._counts(target, num_outputs).to(per_label.device)
        both = (counts > 0).all(0)
        if not bool(both.all()) and not self._warned:
            left_out = [names[i] if names else i for i in torch.nonzero(~both).flatten().tolist()]
            log.warning("validation AUROC: label(s) %s have only one class among the validation samples and are "
                        "left out of the macro average", left_out)
            self._warned = True
        return float(per_label[both].mean()) if bool(both.any()) else float("nan")

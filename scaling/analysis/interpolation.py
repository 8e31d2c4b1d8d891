"""Linear interpolation between two fine-tuned models and its performance barrier: do they lie in one loss basin?

Neyshabur, Sedghi & Zhang 2020 ("What is being transferred in transfer learning?", NeurIPS 2020, arXiv 2008.11687,
§3.3) fine-tune twice from the same pretrained weights (two seeds) and train twice from scratch, then evaluate the
models on the straight line between each pair, ``w(α) = (1 − α)·w1 + α·w2``. Two models fine-tuned from the same
weights show no barrier along it (one basin); two trained from scratch do. The *performance barrier* is that of
Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020, arXiv 1912.05671):
the largest amount by which the loss on the line exceeds the straight line between the two end points' losses,

    barrier = max_α [ L(w(α)) − ((1 − α)·L(w1) + α·L(w2)) ],

and the same with the error (here 1 − macro AUROC) in place of the loss. A barrier is >= 0 (α = 0 and 1 give 0).

What this module decides where the paper is silent
(docs/analysis.md, "Loss basins: do two fine-tuned seeds share one?"):

* **Every floating-point tensor of the state dict is interpolated**, parameters and buffers alike, as the authors'
  code does (google-research/understanding-transfer-learning at commit 0e4df44, ``ckpt_interpolation.py``
  ``interpolate_state_dicts``: every key of the state dict). Their Fixup ResNet-50 has no normalisation statistics,
  nor have BiT (GroupNorm) or ViT (LayerNorm) here; a timm BatchNorm model's running mean and variance are
  interpolated with its weights, not recomputed on data (recomputing them removes part of a barrier, Jordan et al.
  2023 "REPAIR", and would make α = 0 and 1 differ from the stored models). An integer buffer (BatchNorm's
  ``num_batches_tracked``) is not interpolated: it is the nearer end point's.
* **The loss is the one the runs were trained with** (``scaling.engine.trainer.masked_loss_sum``): the mean masked
  binary cross-entropy over labelled entries, or the cross-entropy over labelled samples of a one-of-K task.
* **AUROC is macro** over the labels with both classes labelled (``scaling.metrics.discrimination``), of the logits
  (a multilabel task) or of the softmax probabilities one class against the rest (a one-of-K task).

The end points are computed like every other α (``(1 − 0)·w1 + 0·w2`` is ``w1`` exactly), so α = 0 and 1 reproduce
the stored models' own predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

INTERPOLATED = "interpolated"
"""How normalisation running statistics are treated (recorded with every curve)."""


def interpolate_state_dicts(state_1: dict[str, torch.Tensor], state_2: dict[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − alpha)·state_1 + alpha·state_2`` for every floating-point tensor; an integer tensor (a counter such as
    ``num_batches_tracked``) is the nearer end point's. The two must hold the same keys and shapes (one
    architecture); anything else is a ValueError naming the first key that differs."""
    if state_1.keys() != state_2.keys():
        only = sorted(set(state_1) ^ set(state_2))
        raise ValueError(f"the two state dicts hold different tensors (e.g. {only[0]!r}): not one architecture")
    out = {}
    for k, a in state_1.items():
        b = state_2[k]
        if a.shape != b.shape:
            raise ValueError(f"tensor {k!r} has shape {tuple(a.shape)} in one state dict and {tuple(b.shape)} in the "
                             "other: not one architecture")
        if a.is_floating_point():
            out[k] = (1.0 - alpha) * a + alpha * b.to(a.dtype)
        else:
            out[k] = (a if alpha < 0.5 else b).clone()
    return out


def loss_and_auroc(logits: np.ndarray, target: np.ndarray, kind: str = "multilabel") -> tuple[float, float]:
    """(mean loss, macro AUROC) of ``logits`` ``[N, L]`` against the targets ``Trainer.predict`` returns: ``[N, L]``
    with NaN for an unlabelled entry (``multilabel``), or ``[N]`` class indices with -1 for an unlabelled sample
    (``multiclass``). The loss is the training loss (:func:`scaling.engine.trainer.masked_loss_sum`)."""
    import warnings

    from scaling.engine.trainer import masked_loss_sum
    from scaling.metrics.discrimination import auroc, macro_average
    from scaling.metrics.multiclass import softmax_probabilities
    from scaling.metrics.validation import MetricWarning

    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(target)
    total, count = masked_loss_sum(torch.from_numpy(z), torch.from_numpy(t if kind == "multilabel" else
                                                                          t.astype(np.int64)), kind)
    loss = float(total / count) if float(count) else float("nan")
    if kind == "multilabel":
        y, scores = t.astype(np.float64), z
    else:
        scores = softmax_probabilities(z)
        y = np.where(t[:, None] < 0, np.nan, (t[:, None] == np.arange(z.shape[1])[None, :]).astype(np.float64))
    with warnings.catch_warnings():  # a label with one class is NaN and left out of the macro, as in the metrics
        warnings.simplefilter("ignore", MetricWarning)
        return loss, macro_average([auroc(y[:, j], scores[:, j]) for j in range(z.shape[1])])


def barrier(alphas: Sequence[float], values: Sequence[float]) -> float:
    """``max_α [v(α) − ((1 − α)·v(0) + α·v(1))]`` over the given points (Frankle et al. 2020): how far the curve
    rises above the chord between its end points. ``alphas`` must include 0 and 1. For a higher-is-better number
    (AUROC) pass the error, ``1 − value``."""
    a = np.asarray(alphas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    ends = [np.flatnonzero(np.isclose(a, e)) for e in (0.0, 1.0)]
    if not all(len(e) for e in ends):
        raise ValueError(f"the barrier needs alpha 0 and 1 among the alphas, got {a.tolist()}")
    v0, v1 = v[ends[0][0]], v[ends[1][0]]
    return float(np.max(v - ((1.0 - a) * v0 + a * v1)))


def interpolation_curve(state_1: dict[str, torch.Tensor], state_2: dict[str, torch.Tensor],
                        model: Callable[[], torch.nn.Module], alphas: Sequence[float],
                        predict: Callable[[torch.nn.Module], dict | None],
                        kind: str = "multilabel") -> pd.DataFrame | None:
    """Evaluate the models on the line between ``state_1`` (α = 0) and ``state_2`` (α = 1).

    ``model()`` builds a fresh model of the architecture for each α (a Trainer may shard the module it is given in
    place, so one module is not reused); the interpolated weights are loaded with ``strict=True``. ``predict(model)``
    returns ``Trainer.predict``'s dict (``logits``, ``target``) on the main process and None on the others (every
    rank must call it under a sharded launch). Returns, on the main process, one row per α: ``alpha``, ``loss``,
    ``auroc`` and the curve's ``loss_barrier`` and ``error_barrier`` (of 1 − AUROC), repeated on every row; None on
    the other ranks."""
    rows = []
    for alpha in alphas:
        m = model()
        m.load_state_dict(interpolate_state_dicts(state_1, state_2, float(alpha)), strict=True)
        out = predict(m)
        del m
        if out is not None:
            loss, auc = loss_and_auroc(out["logits"], out["target"], kind)
            rows.append({"alpha": float(alpha), "loss": loss, "auroc": auc})
    if not rows:
        return None
    curve = pd.DataFrame(rows)
    return curve.assign(loss_barrier=barrier(curve["alpha"], curve["loss"]),
                        error_barrier=barrier(curve["alpha"], 1.0 - curve["auroc"]))

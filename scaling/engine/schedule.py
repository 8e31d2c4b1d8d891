"""Training length and learning-rate schedules, and the BiT-HyperRule, as pure functions.

Modelled on big_transfer's ``bit_hyperrule.py``: no state, one rule per function, table-driven tests
(``tests/test_schedule.py``). Two variants of the HyperRule exist and both are here:

* ``code``: the released ``bit_hyperrule.py`` (resolution 160/128 below 96x96 px, else 512/480; schedule
  supports [100, 200, 300, 400, 500] / [500, 3000, 6000, 9000, 10000] / [500, 6000, 12000, 18000, 20000]).
* ``paper``: Kolesnikov et al. 2020 §3.3 (resolution 160/128 or 448/384, 512/480 for R152x4; 500 / 10k / 20k
  steps with x0.1 decays at 30/60/90 %). The paper gives no downstream warmup, so the code's warmup
  lengths are used (100 / 500 / 500 steps).

Both: tasks < 20k examples use no MixUp, larger ones MixUp alpha 0.1; SGD momentum 0.9, lr 0.003 at batch
512 (scaled linearly with the batch), no weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMALL_TASK = 20_000
"""Below this many training examples a task is "small" (500 steps, no MixUp)."""
LARGE_TASK = 500_000
"""At or above this many training examples a task is "large" (20k steps)."""
BIT_BASE_LR = 0.003
"""BiT-HyperRule learning rate at batch size 512."""
BIT_BATCH = 512
"""BiT-HyperRule batch size."""
VARIANTS = ("code", "paper")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"HyperRule variant {variant!r} is not one of {list(VARIANTS)}")


def bit_resolution(image_hw: tuple[int, int], variant: str = "code", arch: str = "") -> tuple[int, int]:
    """(resize, crop) for images of original size ``image_hw`` under the BiT-HyperRule.

    Small images (area < 96x96) are upsampled to 160 and cropped to 128; others go to 512/480 (code) or
    448/384 (paper; 512/480 for R152x4, the paper's footnote). Test time resizes to the crop size.
    """
    _check_variant(variant)
    h, w = image_hw
    if h * w < 96 * 96:
        return 160, 128
    if variant == "paper" and "152x4" not in arch.lower():
        return 448, 384
    return 512, 480


def bit_schedule(dataset_size: int, variant: str = "code") -> tuple[int, ...]:
    """Support points [warmup_end, decay1, decay2, decay3, end] in steps for ``dataset_size`` examples."""
    _check_variant(variant)
    if variant == "code":
        if dataset_size < SMALL_TASK:
            return 100, 200, 300, 400, 500
        if dataset_size < LARGE_TASK:
            return 500, 3000, 6000, 9000, 10000
        return 500, 6000, 12000, 18000, 20000
    if dataset_size < SMALL_TASK:
        total, warmup = 500, 100
    else:
        total, warmup = (10_000 if dataset_size < LARGE_TASK else 20_000), 500
    return warmup, int(0.3 * total), int(0.6 * total), int(0.9 * total), total


def bit_mixup(dataset_size: int) -> float:
    """MixUp alpha: 0 for small tasks (< 20k examples), 0.1 otherwise."""
    return 0.0 if dataset_size < SMALL_TASK else 0.1


def bit_lr(step: int, dataset_size: int, base_lr: float = BIT_BASE_LR, variant: str = "code") -> float | None:
    """big_transfer's ``get_lr``: linear warmup from 0, then /10 at each later support; None once finished."""
    return _lr_from_supports(step, bit_schedule(dataset_size, variant), base_lr)


def _lr_from_supports(step: int, supports: tuple[int, ...], base_lr: float) -> float | None:
    if step < supports[0]:
        return base_lr * step / supports[0]
    if step >= supports[-1]:
        return None
    return base_lr * 0.1 ** sum(s < step for s in supports[1:])


@dataclass(frozen=True)
class HyperRule:
    """Everything the BiT-HyperRule prescribes for one downstream task."""

    resize: int
    """Training images are resized to this square size ..."""
    crop: int
    """... then randomly cropped to this size (test: resized to it)."""
    supports: tuple[int, ...]
    """[warmup_end, decay1, decay2, decay3, end] in steps."""
    mixup_alpha: float
    """MixUp alpha (0 = off)."""
    lr: float
    """Peak learning rate, 0.003 x batch / 512."""
    batch_size: int
    """Batch size the lr was scaled for."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """No weight decay downstream (BiT §3.3)."""

    @property
    def steps(self) -> int:
        """Total optimizer steps."""
        return self.supports[-1]


def bit_hyperrule(
    dataset_size: int, image_hw: tuple[int, int], batch_size: int = BIT_BATCH, variant: str = "code", arch: str = ""
) -> HyperRule:
    """The full BiT-HyperRule for a task of ``dataset_size`` training examples of original size ``image_hw``.

    The lr scales linearly with the batch (BiT's README runs batch 128 at lr 0.001 ~ 0.003 x 128/512
    "with nearly identical performance"); the step counts do not change with the batch, as in bit_pytorch.
    """
    resize, crop = bit_resolution(image_hw, variant, arch)
    return HyperRule(
        resize=resize,
        crop=crop,
        supports=bit_schedule(dataset_size, variant),
        mixup_alpha=bit_mixup(dataset_size),
        lr=BIT_BASE_LR * batch_size / BIT_BATCH,
        batch_size=batch_size,
    )


def hyperrule_deviations(train_cfg) -> list[str]:
    """Where an SGD ``train_cfg`` with ``train.hyperrule`` set departs from the rule's optimizer, one line each.

    ``train.hyperrule`` sets length, warmup and MixUp; the learning rate, momentum and weight decay stay the config's,
    and the rule's learning rate is 0.003 x batch / 512 (BiT §3.3; big_transfer's README runs batch 128 at about
    that). Empty when the rule is off or the optimizer is AdamW (a recipe of its own, e.g. for ViTs).
    """
    if train_cfg.hyperrule == "off" or train_cfg.optimizer != "sgd":
        return []
    out = []
    rule_lr = BIT_BASE_LR * train_cfg.batch_size / BIT_BATCH
    if not math.isclose(train_cfg.lr, rule_lr, rel_tol=1e-6):
        out.append(f"train.lr={train_cfg.lr:g} with train.batch_size={train_cfg.batch_size}: the BiT-HyperRule's "
                   f"learning rate for this batch is {rule_lr:g} (0.003 x batch / 512)")
    if train_cfg.momentum != 0.9:
        out.append(f"train.momentum={train_cfg.momentum:g}: the BiT-HyperRule uses SGD momentum 0.9")
    if train_cfg.weight_decay:
        out.append(f"train.weight_decay={train_cfg.weight_decay:g}: the BiT-HyperRule uses no weight decay")
    return out


def total_steps(train_cfg, n_train_examples: int) -> int:
    """Optimizer steps for ``train_cfg`` on a training set of ``n_train_examples`` (after the data fraction).

    With ``train.hyperrule`` set, the BiT-HyperRule length for this training-set size. Otherwise ``steps`` is
    used as is; ``epochs`` counts passes over this (fraction) training set; ``examples`` fixes the number of
    images seen, so runs at 1 % and 100 % of the data get the same compute. With none set, the HyperRule
    length (released-code variant).
    """
    if train_cfg.hyperrule != "off":
        return bit_schedule(n_train_examples, train_cfg.hyperrule)[-1]
    if train_cfg.steps > 0:
        return int(train_cfg.steps)
    if train_cfg.epochs > 0:
        if n_train_examples < 1:
            raise ValueError("train.epochs needs a non-empty training set")
        return max(1, math.ceil(train_cfg.epochs * n_train_examples / train_cfg.batch_size))
    if train_cfg.examples > 0:
        return max(1, math.ceil(train_cfg.examples / train_cfg.batch_size))
    return bit_schedule(n_train_examples)[-1]


def mixup_alpha(train_cfg, n_train_examples: int) -> float:
    """MixUp alpha for a run: the HyperRule's (0 below 20k examples, else 0.1) when set, else ``train.mixup_alpha``."""
    if train_cfg.hyperrule != "off":
        return bit_mixup(n_train_examples)
    return train_cfg.mixup_alpha


def _hyperrule_supports(total: int, variant: str) -> tuple[int, ...]:
    # Each HyperRule length belongs to exactly one size class, so ``total`` identifies its support points.
    for size in (0, SMALL_TASK, LARGE_TASK):
        supports = bit_schedule(size, variant)
        if supports[-1] == total:
            return supports
    raise ValueError(f"{total} steps is not a BiT-HyperRule length; use total_steps() with train.hyperrule")


def lr_at(step: int, total: int, train_cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total`` under ``train_cfg``.

    All schedules warm up linearly over ``min(train.warmup_steps, total // 2)`` steps, reaching the peak
    ``train.lr`` at the end of warmup (the first step gets ``lr / warmup``, not 0); then ``bit``: x0.1 at 30,
    60 and 90 % of ``total`` (BiT §3.3); ``cosine``: half-cosine to 0 at ``total``; ``constant``.

    With ``train.hyperrule`` set, the warmup is the HyperRule's (100 or 500 steps) and ``bit`` is
    big_transfer's ``get_lr`` on the HyperRule support points of ``total`` (warmup from 0, /10 after each
    support); ``cosine``/``constant`` keep their shape (the ViT paper fine-tunes with HyperRule-like lengths
    and a cosine decay).
    """
    if total < 1:
        raise ValueError(f"total steps must be >= 1, got {total}")
    peak = train_cfg.lr
    warmup = min(train_cfg.warmup_steps, total // 2)
    if train_cfg.hyperrule != "off":
        supports = _hyperrule_supports(total, train_cfg.hyperrule)
        if train_cfg.schedule == "bit":
            lr = _lr_from_supports(step, supports, peak)
            return 0.0 if lr is None else lr
        warmup = supports[0]
    if step < warmup:
        return peak * (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return peak
    if train_cfg.schedule == "bit":
        decays = sum(step >= math.ceil(f * total) for f in (0.3, 0.6, 0.9))
        return peak * 0.1**decays
    if train_cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule={train_cfg.schedule!r} is not one of ['bit', 'cosine', 'constant']")

"""BiT-HyperRule and schedules: tables checked against big_transfer's bit_hyperrule.py and the BiT paper."""

from __future__ import annotations

import math

import pytest

from scaling.config import TrainConfig
from scaling.engine.schedule import (
    bit_hyperrule,
    bit_lr,
    bit_mixup,
    bit_resolution,
    bit_schedule,
    hyperrule_deviations,
    lr_at,
    total_steps,
)


@pytest.mark.parametrize(
    "size, variant, supports",
    [
        (1_000, "code", (100, 200, 300, 400, 500)),
        (19_999, "code", (100, 200, 300, 400, 500)),
        (20_000, "code", (500, 3000, 6000, 9000, 10000)),
        (499_999, "code", (500, 3000, 6000, 9000, 10000)),
        (500_000, "code", (500, 6000, 12000, 18000, 20000)),
        (1_281_167, "code", (500, 6000, 12000, 18000, 20000)),
        (1_000, "paper", (100, 150, 300, 450, 500)),
        (50_000, "paper", (500, 3000, 6000, 9000, 10000)),
        (224_316, "paper", (500, 3000, 6000, 9000, 10000)),  # CheXpert's training set: "medium"
        (600_000, "paper", (500, 6000, 12000, 18000, 20000)),
    ],
)
def test_bit_schedule(size, variant, supports):
    assert bit_schedule(size, variant) == supports


@pytest.mark.parametrize(
    "hw, variant, arch, expected",
    [
        ((32, 32), "code", "", (160, 128)),
        ((95, 96), "code", "", (160, 128)),
        ((96, 96), "code", "", (512, 480)),
        ((320, 390), "code", "R50x1", (512, 480)),
        ((32, 32), "paper", "", (160, 128)),
        ((320, 390), "paper", "R50x1", (448, 384)),
        ((320, 390), "paper", "bit_r152x4", (512, 480)),
        ((320, 390), "paper", "resnetv2_152x4_bit", (512, 480)),
    ],
)
def test_bit_resolution(hw, variant, arch, expected):
    assert bit_resolution(hw, variant, arch) == expected


@pytest.mark.parametrize("size, alpha", [(0, 0.0), (19_999, 0.0), (20_000, 0.1), (10**7, 0.1)])
def test_bit_mixup(size, alpha):
    assert bit_mixup(size) == alpha


@pytest.mark.parametrize(
    "step, size, lr",
    [
        (0, 1000, 0.0),  # big_transfer's warmup starts at 0
        (50, 1000, 0.0015),
        (100, 1000, 0.003),
        (200, 1000, 0.003),  # decays only strictly after a support point
        (201, 1000, 0.0003),
        (301, 1000, 0.00003),
        (401, 1000, 0.000003),
        (499, 1000, 0.000003),
        (500, 1000, None),
        (250, 50_000, 0.0015),
        (3001, 50_000, 0.0003),
        (10_000, 50_000, None),
        (12_001, 10**6, 0.00003),
    ],
)
def test_bit_lr_matches_big_transfer_get_lr(step, size, lr):
    got = bit_lr(step, size)
    assert got == lr if lr is None else got == pytest.approx(lr)


def test_bit_hyperrule_bundle():
    rule = bit_hyperrule(224_316, (320, 390), batch_size=128, variant="paper", arch="R152x4")
    assert (rule.resize, rule.crop, rule.steps, rule.mixup_alpha) == (512, 480, 10_000, 0.1)
    assert rule.lr == pytest.approx(0.003 * 128 / 512) and rule.momentum == 0.9 and rule.weight_decay == 0.0
    small = bit_hyperrule(5_000, (64, 64))
    assert (small.resize, small.crop, small.steps, small.mixup_alpha, small.lr) == (160, 128, 500, 0.0, 0.003)
    with pytest.raises(ValueError, match="variant"):
        bit_hyperrule(5_000, (64, 64), variant="blog")


@pytest.mark.parametrize(
    "cfg, n, steps",
    [
        (dict(steps=123), 10, 123),
        (dict(epochs=2.0, batch_size=32), 1000, 63),
        (dict(epochs=1.0, batch_size=32), 10, 1),
        (dict(examples=64_000, batch_size=64), 10, 1000),
        (dict(examples=64_000, batch_size=64), 10**6, 1000),  # same compute at every data fraction
        (dict(), 5_000, 500),  # nothing set: BiT-HyperRule length
        (dict(), 224_316, 10_000),
    ],
)
def test_total_steps(cfg, n, steps):
    assert total_steps(TrainConfig(**cfg), n) == steps


@pytest.mark.parametrize(
    "schedule, step, lr",
    [
        ("constant", 0, 0.01),
        ("constant", 9, 0.1),
        ("constant", 99, 0.1),
        ("bit", 29, 0.1),
        ("bit", 30, 0.01),
        ("bit", 60, 0.001),
        ("bit", 89, 0.001),
        ("bit", 90, 0.0001),
        ("cosine", 10, 0.1),
        ("cosine", 55, 0.05),
        ("cosine", 100, 0.0),
    ],
)
def test_lr_at(schedule, step, lr):
    cfg = TrainConfig(schedule=schedule, lr=0.1, warmup_steps=10)
    assert lr_at(step, 100, cfg) == pytest.approx(lr, abs=1e-12)


def test_lr_at_warmup_is_linear_and_capped_by_short_runs():
    cfg = TrainConfig(schedule="cosine", lr=1.0, warmup_steps=100)
    assert [lr_at(s, 10, cfg) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(math.isfinite(lr_at(s, 1, cfg)) for s in range(2))
    with pytest.raises(ValueError):
        lr_at(0, 0, cfg)


@pytest.mark.parametrize(
    "variant, n, steps, alpha, probes",
    [
        # (step, lr) pairs at peak lr 0.003, from big_transfer's get_lr
        ("code", 2_243, 500, 0.0, [(0, 0.0), (50, 0.0015), (150, 0.003), (250, 0.0003), (499, 0.000003)]),
        ("code", 22_431, 10_000, 0.1, [(250, 0.0015), (2999, 0.003), (3001, 0.0003), (9001, 0.000003)]),
        ("code", 224_316, 10_000, 0.1, [(500, 0.003), (6001, 0.00003)]),
        ("paper", 2_243, 500, 0.0, [(151, 0.0003), (301, 0.00003), (451, 0.000003)]),
        ("paper", 600_000, 20_000, 0.1, [(19_999, 0.000003)]),
    ],
)
def test_hyperrule_mode_sets_length_lr_and_mixup_per_fraction(variant, n, steps, alpha, probes):
    from scaling.engine.schedule import mixup_alpha

    cfg = TrainConfig(hyperrule=variant, schedule="bit", lr=0.003, mixup_alpha=0.5, steps=7)
    assert total_steps(cfg, n) == steps
    assert mixup_alpha(cfg, n) == alpha
    for step, lr in probes:
        assert lr_at(step, steps, cfg) == pytest.approx(lr)
    assert mixup_alpha(TrainConfig(mixup_alpha=0.5), n) == 0.5
    with pytest.raises(ValueError, match="HyperRule length"):
        lr_at(0, 123, cfg)


def test_hyperrule_length_with_cosine_decay():
    cfg = TrainConfig(hyperrule="code", schedule="cosine", lr=1e-3, warmup_steps=3)
    total = total_steps(cfg, 50_000)
    assert total == 10_000
    assert lr_at(499, total, cfg) == pytest.approx(1e-3)  # HyperRule warmup (500), not train.warmup_steps
    assert lr_at(500 + 4750, total, cfg) == pytest.approx(0.5e-3)


@pytest.mark.parametrize("overrides, expected", [
    (dict(batch_size=512, lr=0.003), []),
    (dict(batch_size=128, lr=0.00075), []),
    (dict(batch_size=128, lr=0.003), ["train.lr=0.003 with train.batch_size=128: the BiT-HyperRule's learning rate "
                                      "for this batch is 0.00075 (0.003 x batch / 512)"]),
    (dict(batch_size=512, lr=0.003, momentum=0.0, weight_decay=1e-4),
     ["train.momentum=0: the BiT-HyperRule uses SGD momentum 0.9",
      "train.weight_decay=0.0001: the BiT-HyperRule uses no weight decay"]),
    (dict(batch_size=128, lr=0.003, hyperrule="off"), []),
    (dict(batch_size=128, lr=0.003, optimizer="adamw", weight_decay=0.05), []),
])
def test_hyperrule_deviations_name_the_optimizer_settings_the_rule_does_not_set(overrides, expected):
    cfg = TrainConfig(**{"hyperrule": "paper", **overrides})
    assert hyperrule_deviations(cfg) == expected

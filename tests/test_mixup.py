"""Multi-label MixUp with missing labels."""

from __future__ import annotations

import math

import torch

from scaling.engine.mixup import mixup, sample_lambda

NAN = float("nan")


def test_targets_mix_and_a_label_counts_only_where_both_samples_have_it():
    images = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    targets = torch.tensor([[1.0, 0.0, NAN, 1.0], [0.0, NAN, NAN, 1.0]])
    x, y = mixup(images, targets, lam=0.7, perm=torch.tensor([1, 0]))
    torch.testing.assert_close(x[0], torch.full((3, 2, 2), 0.3))
    torch.testing.assert_close(x[1], torch.full((3, 2, 2), 0.7))
    expected = torch.tensor([[0.7, NAN, NAN, 1.0], [0.3, NAN, NAN, 1.0]])
    torch.testing.assert_close(y, expected, equal_nan=True)


def test_lambda_one_is_identity_and_class_targets_become_soft_one_hot():
    images, targets = torch.randn(4, 3, 2, 2), torch.tensor([[1.0, NAN]] * 4)
    x, y = mixup(images, targets, lam=1.0)
    assert x is images and y is targets
    x, y = mixup(images, torch.tensor([0, 1, 2, 0]), lam=0.75, perm=torch.tensor([1, 2, 3, 0]), num_classes=3)
    torch.testing.assert_close(y[0], torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(y.sum(1), torch.ones(4))


def test_sample_lambda_is_seeded_and_off_at_alpha_zero():
    assert sample_lambda(0.0) == 1.0
    a = [sample_lambda(0.1, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1] and 0.0 <= a[0] <= 1.0
    g = torch.Generator().manual_seed(3)
    draws = [sample_lambda(0.1, g) for _ in range(200)]
    # Beta(0.1, 0.1) is U-shaped: most draws sit near 0 or 1.
    assert sum(d < 0.1 or d > 0.9 for d in draws) > 140 and len(set(draws)) == 200
    assert not any(math.isnan(d) for d in draws)

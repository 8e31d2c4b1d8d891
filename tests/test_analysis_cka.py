"""Minibatch linear CKA against an independent U-statistic HSIC and the full-batch definition."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from scaling.analysis.cka import MinibatchCKA, cka_table, hsic_unbiased, linear_cka


def _u_statistic_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012's unbiased HSIC as the U-statistic over ordered 4-tuples of distinct indices.

    HSIC_1 = (n)_4^-1 sum_{(i,j,q,r) distinct} [K_ij L_ij + K_ij L_qr - 2 K_ij L_iq]; written from the definition,
    not from the closed form the library uses.
    """
    n = k.shape[0]
    t = np.array(list(itertools.permutations(range(n), 4)))
    i, j, q, r = t.T
    terms = k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return float(terms.sum() / len(t))


def _pair(n=300, p=20, q=12, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    y = x[:, :q] @ rng.normal(size=(q, q)) + noise * rng.normal(size=(n, q))
    return x, y


def test_unbiased_hsic_matches_the_u_statistic_definition():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 5)), rng.normal(size=(9, 3))
    x[:, 0] += 2 * y[:, 0]
    k, l = x @ x.T, y @ y.T
    assert hsic_unbiased(k, l) == pytest.approx(_u_statistic_hsic(k, l), rel=1e-10)
    rbf = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 4)  # any kernel, not only linear
    assert hsic_unbiased(rbf, l) == pytest.approx(_u_statistic_hsic(rbf, l), rel=1e-10)
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased(k[:3, :3], l[:3, :3])


def test_full_batch_cka_matches_an_independent_computation():
    x, y = _pair(n=10, p=4, q=3)
    ref = _u_statistic_hsic(x @ x.T, y @ y.T) / np.sqrt(
        _u_statistic_hsic(x @ x.T, x @ x.T) * _u_statistic_hsic(y @ y.T, y @ y.T))
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-10)
    assert 0.2 < linear_cka(*_pair()) < 0.99


def test_cka_of_a_representation_with_itself_is_one_and_invariant_to_rotation_and_scale():
    x, y = _pair()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(x.shape[1], x.shape[1])))
    ref = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(ref, abs=1e-10)
    # ... but not to an arbitrary invertible linear map (CKA is not CCA)
    stretch = np.diag(np.r_[10.0, np.ones(x.shape[1] - 1)])
    assert abs(linear_cka(x @ stretch, y) - ref) > 0.01


def _biased_cka(x, y):
    """Kornblith et al. 2019's biased linear CKA: ||XᵀY||² / (||XᵀX|| ||YᵀY||) on centred features."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_minibatch_cka_equals_full_batch_for_one_batch_and_approaches_it_for_many():
    x, y = _pair(n=2000, noise=2.0)
    full = linear_cka(x, y)
    one = MinibatchCKA(["x"], ["y"])
    one.update({"x": torch.as_tensor(x)}, {"y": torch.as_tensor(y)})
    assert one.compute()[0, 0] == pytest.approx(full, abs=1e-12)
    many = MinibatchCKA(["x"], ["y"])
    for lo in range(0, 2000, 200):
        many.update({"x": torch.as_tensor(x[lo:lo + 200])}, {"y": torch.as_tensor(y[lo:lo + 200])})
    assert many.n_batches == 10 and many.n_examples == 2000
    # The unbiased estimator's batch average estimates the same quantity (measured: within 0.003 over 5 seeds);
    # averaging the biased estimator over batches of 200 is off by ~0.025 here, which is why Eq. 3 uses HSIC_1.
    assert many.compute()[0, 0] == pytest.approx(full, abs=0.01)
    biased_batches = np.mean([_biased_cka(x[lo:lo + 200], y[lo:lo + 200]) for lo in range(0, 2000, 200)])
    assert abs(biased_batches - full) > 0.015


def test_layer_by_layer_table_and_bad_input():
    x, y = _pair(n=64)
    a = {"block0": torch.as_tensor(x), "block1": torch.as_tensor(y)}
    acc = MinibatchCKA(["block0", "block1"])
    acc.update(a)
    acc.update({k: v[:3] for k, v in a.items()})  # too small for the estimator: skipped and counted
    t = acc.table()
    assert list(t.columns) == ["layer_a", "layer_b", "index_a", "index_b", "cka", "n_examples", "n_batches"]
    m = t.pivot(index="layer_a", columns="layer_b", values="cka").to_numpy()
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    assert m[0, 1] == pytest.approx(linear_cka(x, y), abs=1e-12)
    assert acc.skipped_examples == 3 and int(t["n_examples"].iloc[0]) == 64
    with pytest.raises(KeyError, match="lack layer"):
        acc.update({"block0": a["block0"]})
    with pytest.raises(ValueError, match="batch sizes"):
        acc.update({"block0": a["block0"], "block1": a["block1"][:10]})
    with pytest.raises(ValueError, match="no minibatch"):
        MinibatchCKA(["a"]).compute()


def test_cka_table_from_two_feature_streams():
    x, y = _pair(n=100)

    def stream(feats):
        for lo in (0, 60):
            yield {"index": np.arange(lo, min(lo + 60, 100)),
                   "features": {k: torch.as_tensor(v[lo:lo + 60]) for k, v in feats.items()}}

    t = cka_table(stream({"x": x}), stream({"y": y, "x": x}), batch_size=100)
    assert isinstance(t, pd.DataFrame) and list(t["layer_b"]) == ["y", "x"]
    row = t.set_index("layer_b")["cka"]
    assert row["x"] == pytest.approx(1.0, abs=1e-12)
    ref = MinibatchCKA(["x"], ["y"])
    ref.update({"x": torch.as_tensor(x[:60])}, {"y": torch.as_tensor(y[:60])})
    ref.update({"x": torch.as_tensor(x[60:])}, {"y": torch.as_tensor(y[60:])})
    assert row["y"] == pytest.approx(ref.compute()[0, 0], abs=1e-12)

    def shifted():
        for c in stream({"y": y}):
            yield dict(c, index=c["index"] + 1)

    with pytest.raises(ValueError, match="same examples"):
        cka_table(stream({"x": x}), shifted())
    assert cka_table(iter([None, None])) is None  # a non-main rank iterates and gets nothing

"""Linear probe: per-label masked logistic regression, C chosen on validation, checked against scikit-learn."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from toy import ToyDataset, vit  # noqa: E402

from scaling.analysis.probe import ProbeConfig, fit_probe, linear_probe  # noqa: E402
from scaling.metrics.discrimination import auroc, per_label  # noqa: E402

CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _data(n, seed, d=12, labels=3, nan=0.2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 20, size=d) + rng.normal(size=d) * 5  # badly scaled on purpose
    w = np.random.default_rng(99).normal(size=(d, labels))
    y = (x / 10 @ w + rng.normal(scale=2.0, size=(n, labels)) > 0).astype(float)
    y[rng.random(y.shape) < nan] = np.nan
    return x, y


def _sklearn_reference(tx, ty, vx, vy, select):
    """Independent per-label search: StandardScaler on all training rows, sklearn LR on labelled rows."""
    scaler = StandardScaler().fit(tx)
    out = []
    for j in range(ty.shape[1]):
        tm, vm = ~np.isnan(ty[:, j]), ~np.isnan(vy[:, j])
        best, best_score = None, -np.inf
        for c in CS:
            clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(tx[tm]), ty[tm, j])
            p = clf.predict_proba(scaler.transform(vx[vm]))[:, 1]
            score = roc_auc_score(vy[vm, j], p) if select == "auroc" else -log_loss(vy[vm, j], p, labels=[0, 1])
            if score > best_score + 1e-12:
                best, best_score = clf, score
        out.append((best.C, lambda x, clf=best: clf.decision_function(scaler.transform(x))))
    return out


@pytest.mark.parametrize("select", ["auroc", "log_loss"])
def test_probe_matches_a_scikit_learn_search_on_labelled_rows(select):
    (tx, ty), (vx, vy), (ex, _) = _data(400, 0), _data(200, 1), _data(100, 2)
    probe = fit_probe(tx, ty, vx, vy, ["a", "b", "c"], ProbeConfig(cs=CS, select=select))
    ref = _sklearn_reference(tx, ty, vx, vy, select)
    chosen = probe.chosen()
    assert list(chosen["label"]) == ["a", "b", "c"] and len(probe.search) == 3 * len(CS)
    logits = probe.logits(ex)
    for j, (c, decision) in enumerate(ref):
        assert chosen["C"][j] == c
        np.testing.assert_allclose(logits[:, j], decision(ex), rtol=1e-4, atol=1e-4)
    assert chosen["n_train"].tolist() == (~np.isnan(ty)).sum(0).tolist()
    # The chosen C is the best on validation by the requested criterion.
    for label, g in probe.search.groupby("label"):
        col, best = ("val_auroc", g["val_auroc"].max()) if select == "auroc" else ("val_log_loss", g["val_log_loss"].min())
        assert g.loc[g["selected"], col].iloc[0] == pytest.approx(best)
    assert auroc(vy[:, 0], probe.logits(vx)[:, 0]) > 0.75  # the signal is there and found


def test_probe_refuses_labels_it_cannot_fit_and_falls_back_to_log_loss():
    (tx, ty), (vx, vy) = _data(200, 0, labels=2), _data(80, 1, labels=2)
    one_class_val = vy.copy()
    one_class_val[:, 1] = np.where(np.isnan(vy[:, 1]), np.nan, 1.0)
    probe = fit_probe(tx, ty, vx, one_class_val, ["a", "b"], ProbeConfig(cs=CS))
    assert probe.chosen()["criterion"].tolist() == ["auroc", "log_loss"]
    bad = ty.copy()
    bad[:, 1] = np.where(np.isnan(ty[:, 1]), np.nan, 0.0)
    with pytest.raises(ValueError, match="label 'b'.*one class"):
        fit_probe(tx, bad, vx, vy, ["a", "b"])
    with pytest.raises(ValueError, match="label 'a' has no labelled validation row"):
        fit_probe(tx, ty, vx, np.full_like(vy, np.nan), ["a", "b"])
    with pytest.raises(ValueError, match="probe.select"):
        ProbeConfig(select="accuracy")
    with pytest.raises(ValueError, match="probe.cs"):
        ProbeConfig(cs=(0.0,))


def _exploding():
    """A ViT whose forward fails: proves that cached features are used instead of running the model."""
    model = vit()

    def forward(x):
        raise AssertionError("the cache should have been used")

    model.forward = forward
    return model


def test_linear_probe_end_to_end_with_cached_features(tmp_path):
    model = vit()
    train, val, test = ToyDataset(96, seed=0), ToyDataset(48, seed=1), ToyDataset(30, seed=2)
    cfg = ProbeConfig(cs=(0.01, 1.0), batch_size=16)
    result = linear_probe(model, train, val, {"test": test}, run_dir=tmp_path, labels=["x", "y", "z"], cfg=cfg,
                          key="vit-seed0")
    pred = result.predictions
    assert set(pred) == {"val", "test"}
    assert pred["test"]["logits"].shape == (30, 3) and pred["test"]["target"].shape == (30, 3)
    np.testing.assert_array_equal(pred["test"]["index"], np.arange(30))
    np.testing.assert_array_equal(pred["test"]["target"], test.targets.numpy())  # NaN where unlabelled
    scores = per_label(auroc, pred["test"]["target"], pred["test"]["logits"], ["x", "y", "z"])
    assert scores.notna().all() and scores.mean() > 0.6  # random ViT features still carry the bright squares
    files = sorted(p.name for p in (tmp_path / "probe_features").iterdir())
    assert files == ["test.safetensors", "train.safetensors", "val.safetensors"]
    # Second call: features come from the cache (the model is never run) and the probe is the same.
    again = linear_probe(_exploding(), train, val, {"test": test}, run_dir=tmp_path, labels=["x", "y", "z"],
                         cfg=cfg, key="vit-seed0")
    np.testing.assert_allclose(again.predictions["test"]["logits"], pred["test"]["logits"], atol=1e-6)
    # Another key (another backbone or weight source) re-extracts.
    with pytest.raises(AssertionError, match="cache should have been used"):
        linear_probe(_exploding(), train, val, {"test": test}, run_dir=tmp_path, cfg=cfg, key="other")


def test_a_damaged_feature_cache_is_extracted_again_and_a_damaged_probe_is_named(tmp_path, caplog):
    from safetensors.torch import load, load_file, save_file

    from scaling.analysis.probe import LinearProbe
    from scaling.io import UnreadableFile

    model = vit()
    train, val, test = ToyDataset(96, seed=0), ToyDataset(48, seed=1), ToyDataset(30, seed=2)
    cfg = ProbeConfig(cs=(0.01, 1.0), batch_size=16)
    first = linear_probe(model, train, val, {"test": test}, run_dir=tmp_path, labels=["x", "y", "z"], cfg=cfg,
                         key="k")
    cached = tmp_path / "probe_features" / "train.safetensors"
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])  # a cache, so only lost work: warned about and extracted again
    with caplog.at_level("WARNING", logger="scaling.analysis.probe"):
        again = linear_probe(model, train, val, {"test": test}, run_dir=tmp_path, labels=["x", "y", "z"], cfg=cfg,
                             key="k")
    assert f"feature cache {cached} is damaged (SafetensorError: " in caplog.text
    np.testing.assert_array_equal(again.predictions["test"]["logits"], first.predictions["test"]["logits"])
    rewritten, before = load_file(cached), load(good)  # rewritten with the same features: the next call reads it
    assert rewritten.keys() == before.keys()
    for k in before:  # bit for bit (NaN = unlabelled target)
        torch.testing.assert_close(rewritten[k], before[k], rtol=0, atol=0, equal_nan=True)
    linear_probe(_exploding(), train, val, {"test": test}, run_dir=tmp_path, labels=["x", "y", "z"], cfg=cfg, key="k")

    path = tmp_path / "probe.safetensors"
    first.probe.save(path)
    loaded = LinearProbe.load(path)
    np.testing.assert_array_equal(loaded.coef, first.probe.coef)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UnreadableFile, match=rf"^{re.escape(str(path))}: cannot be read \(SafetensorError: "):
        LinearProbe.load(path)
    # readable, but not a probe (another safetensors file of the store)
    save_file({"mean": torch.zeros(2)}, str(path))
    with pytest.raises(UnreadableFile, match=rf"^{re.escape(str(path))}: not a linear probe \(KeyError: "):
        LinearProbe.load(path)

"""One-of-K tasks (``data.task: multiclass``) end to end below the study runner: class targets from sample tables
(real dermatology formats), the masked cross-entropy against PyTorch's, MixUp with unlabelled samples, accumulation
equal to one batch, and derived binary labels scored from the softmax."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from dataset_fixtures import write_fixture  # noqa: E402
from toy import NUM_LABELS, ToyDataset, resnet, vit  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.data import DataError, load_table  # noqa: E402
from scaling.data.dataset import TableDataset  # noqa: E402
from scaling.data.labels import check_derived_labels, class_targets, one_of_k_labels, select_labels  # noqa: E402

NAN = math.nan
ISIC8 = ["Melanoma", "Melanocytic Nevus", "Basal Cell Carcinoma", "Actinic Keratosis", "Squamous Cell Carcinoma",
         "Benign Keratosis", "Dermatofibroma", "Vascular Lesion"]
MALIGNANT = {"Malignant": ("Melanoma", "Basal Cell Carcinoma", "Actinic Keratosis", "Squamous Cell Carcinoma")}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("derm")
    return {n: write_fixture(n, base / n) for n in ("ham10000", "isic2019", "ddi")}


# --------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------


def test_isic2019_class_targets_follow_the_ground_truth(roots):
    df = select_labels(load_table("isic2019", roots["isic2019"], "all"), ISIC8)
    # The fixture's rows, in order: NV, NV, MEL, BCC, SCC, AK, BKL, DF, VASC (tests/dataset_fixtures.py).
    expected = ["Melanocytic Nevus", "Melanocytic Nevus", "Melanoma", "Basal Cell Carcinoma", "Squamous Cell Carcinoma",
                "Actinic Keratosis", "Benign Keratosis", "Dermatofibroma", "Vascular Lesion"]
    assert class_targets(df, ISIC8).tolist() == [ISIC8.index(c) for c in expected]
    check_derived_labels(load_table("isic2019", roots["isic2019"], "all"), ISIC8, MALIGNANT)  # the loader agrees


def test_unlabelled_rows_get_minus_one_and_two_classes_are_an_error():
    df = pd.DataFrame({"sample_id": ["a", "b", "c", "d"], "label:Melanoma": [1.0, NAN, 0.0, 1.0],
                       "label:Melanocytic Nevus": [0.0, NAN, NAN, 0.0]})
    assert class_targets(df, ["Melanoma", "Melanocytic Nevus"]).tolist() == [0, -1, -1, 0]
    # ISIC 2019's UNK rows (all NaN) and a set that only knows "not a melanoma" have no class: -1.
    two = df.assign(**{"label:Melanocytic Nevus": [0.0, NAN, NAN, 1.0]})
    with pytest.raises(DataError, match=r"isic: sample 'd' is positive for \['Melanoma', 'Melanocytic Nevus'\]; "
                                        r"a one-of-K task"):
        class_targets(two, ["Melanoma", "Melanocytic Nevus"], "isic")


def test_one_hot_completion_fills_classes_a_dataset_lacks(roots):
    # HAM10000 has no SCC column: a HAM lesion with a class is not an SCC, so SCC becomes 0 (not NaN) for it.
    ham = select_labels(load_table("ham10000", roots["ham10000"], "all"), ISIC8)
    assert ham["label:Squamous Cell Carcinoma"].isna().all()
    full = one_of_k_labels(ham, ISIC8)
    assert full["label:Squamous Cell Carcinoma"].tolist() == [0.0] * len(ham)
    assert (full[[f"label:{c}" for c in ISIC8]].sum(axis=1) == 1.0).all()
    # DDI knows only melanoma yes/no: a melanoma row is completed, a non-melanoma row stays as the data says.
    ddi = select_labels(load_table("ddi", roots["ddi"], "all"), ISIC8)
    done = one_of_k_labels(ddi, ISIC8)
    mel = ddi["label:Melanoma"] == 1.0
    assert mel.any() and (~mel).any()
    assert (done.loc[mel, [f"label:{c}" for c in ISIC8]].sum(axis=1) == 1.0).all()
    assert done.loc[~mel, "label:Melanoma"].eq(0.0).all() and done.loc[~mel, "label:Melanocytic Nevus"].isna().all()


def test_a_derived_label_that_disagrees_with_its_group_names_the_sample(roots):
    # HAM10000 loaded the MEDFAIR way (bcc not malignant) against a group that counts BCC as malignant.
    ham = load_table("ham10000", roots["ham10000"], "all", malignant=("mel", "akiec"))
    with pytest.raises(DataError, match=r"ham: sample 'ISIC_0029176' has class 'Basal Cell Carcinoma' and "
                                        r"label:Malignant=0, but data\.derived_labels\.Malignant"):
        check_derived_labels(select_labels(ham, [*ISIC8, "Malignant"]), ISIC8, MALIGNANT, "ham")
    check_derived_labels(select_labels(load_table("ham10000", roots["ham10000"], "all"), [*ISIC8, "Malignant"]),
                         ISIC8, MALIGNANT)


def test_table_dataset_serves_class_indices_and_keeps_derived_columns(roots, caplog):
    df = load_table("isic2019", roots["isic2019"], "all")
    df.loc[0, [f"label:{c}" for c in ISIC8]] = NAN  # an UNK-like row: no class
    df.loc[1, [f"label:{c}" for c in ISIC8]] = 0.0  # labelled, but none of the K classes
    with caplog.at_level(logging.WARNING, logger="scaling.data.dataset"):
        ds = TableDataset(df, ISIC8, 16, train=True, task="multiclass", keep_labels=["Malignant"])
    assert "1 of 9 training samples have labels but no positive class" in caplog.text
    assert ds.targets.dtype == torch.long and ds.targets.tolist()[:4] == [-1, -1, 0, 2]
    item = ds[(3, 7)]
    assert item["target"].dtype == torch.long and item["target"].item() == 2 and item["image"].shape[1:] == (16, 16)
    assert list(c for c in ds.table.columns if c.startswith("label:")) == [f"label:{c}" for c in ISIC8] + [
        "label:Malignant"]
    with pytest.raises(ValueError, match="task='softmax' is not one of"):
        TableDataset(df, ISIC8, 16, task="softmax")


# --------------------------------------------------------------------------------------------------------------
# Loss, MixUp, accumulation
# --------------------------------------------------------------------------------------------------------------


def test_cross_entropy_counts_labelled_samples_only():
    from scaling.engine.trainer import masked_loss_sum

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g) * 3
    target = torch.tensor([2, -1, 0, 3, -1, 1])
    s, n = masked_loss_sum(logits, target, "multiclass")
    keep = target >= 0
    assert n.item() == 4
    torch.testing.assert_close(s, F.cross_entropy(logits[keep], target[keep], reduction="sum"))
    # An unlabelled row never reaches the sum, whatever its logits (inf included).
    logits[1] = torch.tensor([math.inf, -math.inf, 0.0, 0.0])
    torch.testing.assert_close(masked_loss_sum(logits, target, "multiclass")[0], s)
    # Soft targets (MixUp): PyTorch's cross-entropy with probabilities over the rows without NaN.
    soft = torch.softmax(torch.randn(6, 4, generator=g), 1)
    soft[[1, 4]] = math.nan
    s, n = masked_loss_sum(logits, soft, "multiclass")
    assert n.item() == 4
    torch.testing.assert_close(s, F.cross_entropy(logits[keep], soft[keep], reduction="sum"))


def test_mixup_keeps_unlabelled_samples_out_of_the_loss():
    from scaling.engine.mixup import mixup
    from scaling.engine.trainer import masked_loss_sum

    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 2, 2)
    x, y = mixup(images, torch.tensor([0, -1, 2, 1]), lam=0.75, perm=torch.tensor([1, 0, 3, 2]), num_classes=3)
    # Pairs (0, 1) and (1, 0) have an unlabelled partner: NaN rows. Pairs (2, 3) and (3, 2) mix their one-hots.
    assert torch.isnan(y[:2]).all() and not torch.isnan(y[2:]).any()
    torch.testing.assert_close(y[2:], torch.tensor([[0.0, 0.25, 0.75], [0.0, 0.75, 0.25]]))
    torch.testing.assert_close(x[2, 0, 0, 0], torch.tensor(0.75 * 2 + 0.25 * 3))
    logits = torch.randn(4, 3)
    s, n = masked_loss_sum(logits, y, "multiclass")
    assert n.item() == 2
    torch.testing.assert_close(s, F.cross_entropy(logits[2:], y[2:], reduction="sum"))
    # lam = 1: no mixing, an unlabelled sample is still a NaN row.
    _, y1 = mixup(images, torch.tensor([0, -1, 2, 1]), lam=1.0, num_classes=3)
    assert torch.isnan(y1[1]).all() and y1[[0, 2, 3]].tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]


def _fit(cfg, data, model=resnet):
    from scaling.engine.trainer import Trainer

    trainer = Trainer(model(), cfg, ShardingConfig(strategy="none"), loss="multiclass")
    trainer.fit(data)
    out = [h["loss"] for h in trainer.history], trainer.full_state_dict()
    return trainer, out


def test_multiclass_accumulation_equals_one_big_batch_with_unlabelled_samples():
    # 4 micro-batches of 4 == one batch of 16 when a quarter of the samples (unevenly spread) have no class:
    # the loss is normalised by the labelled samples of the whole global batch, not per micro-batch.
    data = ToyDataset(64, multiclass=True, unlabelled=0.25)
    assert (data.labels < 0).sum() > 8
    base = dict(batch_size=16, steps=4, lr=0.02, momentum=0.0, warmup_steps=0, log_every=1, schedule="constant")
    t1, (h1, p1) = _fit(TrainConfig(**base), data, vit)
    t4, (h4, p4) = _fit(TrainConfig(**base, grad_accum=4), data, vit)
    assert h4 == pytest.approx(h1, abs=1e-6)
    assert max((p1[k] - p4[k]).abs().max().item() for k in p1) < 1e-6
    # Prediction keeps the -1 targets; the evaluation loss is the cross-entropy of the labelled samples.
    out = t1.predict(data, batch_size=32)
    keep = out["target"] >= 0
    assert out["target"].dtype == np.int64 and (~keep).sum() == (data.labels < 0).sum()
    expected = F.cross_entropy(torch.from_numpy(out["logits"][keep]), torch.from_numpy(out["target"][keep])).item()
    assert t1.evaluate(data)["loss"] == pytest.approx(expected, rel=1e-6)
    t1.close(), t4.close()


def test_multiclass_mixup_trains_with_unlabelled_samples():
    cfg = TrainConfig(batch_size=16, steps=30, lr=0.01, warmup_steps=3, log_every=10, mixup_alpha=0.2)
    trainer, (losses, _) = _fit(cfg, ToyDataset(128, multiclass=True, unlabelled=0.25), vit)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * np.log(NUM_LABELS)
    trainer.close()

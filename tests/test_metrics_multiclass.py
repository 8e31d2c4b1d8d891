"""One-of-K metrics against scikit-learn, their bootstrap replicates against explicit resampling, and the
multiclass rows of compute_run_metrics, derived binary labels (a group of classes)."""

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, brier_score_loss, log_loss, roc_auc_score,
                             top_k_accuracy_score)

from scaling.config import EvalConfig
from scaling.metrics import ClusterBootstrap, compute_run_metrics
from scaling.metrics.multiclass import (accuracy, accuracy_replicates, balanced_accuracy, balanced_accuracy_replicates,
                                        brier_multiclass, brier_multiclass_replicates, ece_top_label,
                                        ece_top_label_replicates, group_scores, nll_multiclass,
                                        nll_multiclass_replicates, top_k_accuracy, top_k_accuracy_replicates)
from scaling.metrics.run_metrics import calibrated_probabilities
from scaling.metrics.temperature import apply_softmax_temperature, fit_softmax_temperature

CLASSES = ["MEL", "NV", "BCC", "BKL"]


def _frame(seed: int, n: int, sharpness: float = 3.0) -> pd.DataFrame:
    """Patients with 1-3 lesions, imbalanced classes, over-confident logits; a few rows unlabelled."""
    rng = np.random.default_rng(seed)
    t = rng.choice(len(CLASSES), n, p=[0.2, 0.5, 0.2, 0.1])
    z = sharpness * (np.eye(len(CLASSES))[t] * 1.2 + rng.normal(size=(n, len(CLASSES))))
    y = np.eye(len(CLASSES))[t]
    y[rng.random(n) < 0.05] = np.nan  # unlabelled rows: all classes NaN
    p = softmax(z, axis=1)
    df = pd.DataFrame({"sample_id": [f"{seed}-{i}" for i in range(n)],
                       "patient_id": [f"p{seed}-{i // 2}" for i in range(n)],
                       "sex": rng.choice(["F", "M"], n)})
    for k, c in enumerate(CLASSES):
        df[f"label:{c}"], df[f"logit:{c}"], df[f"prob:{c}"] = y[:, k], z[:, k], p[:, k]
    return df


def _arrays(df):
    y = df[[f"label:{c}" for c in CLASSES]].to_numpy()
    return y, df[[f"prob:{c}" for c in CLASSES]].to_numpy(), df[[f"logit:{c}" for c in CLASSES]].to_numpy()


def _labelled(df):
    y, p, z = _arrays(df)
    keep = ~np.isnan(y).all(axis=1)
    return np.argmax(y[keep], axis=1), p[keep], z[keep], keep


def test_metrics_equal_sklearn():
    df = _frame(0, 500)
    y, p, _ = _arrays(df)
    t, pl, _, _ = _labelled(df)
    assert accuracy(y, p) == pytest.approx(accuracy_score(t, pl.argmax(1)), abs=1e-12)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(t, pl.argmax(1)), abs=1e-12)
    for k in (2, 3):
        assert top_k_accuracy(y, p, k) == pytest.approx(top_k_accuracy_score(t, pl, k=k, labels=range(4)), abs=1e-12)
    assert top_k_accuracy(y, p, 1) == accuracy(y, p) and top_k_accuracy(y, p, 4) == 1.0
    assert nll_multiclass(y, p) == pytest.approx(log_loss(t, pl, labels=range(4)), abs=1e-12)
    assert brier_multiclass(y, p) == pytest.approx(brier_score_loss(t, pl, labels=range(4)), abs=1e-12)
    # top-label ECE by hand: 10 equal-width bins of the confidence, |accuracy - confidence| weighted by bin mass
    conf, correct = pl.max(1), (pl.argmax(1) == t)
    k = np.minimum((conf * 10).astype(int), 9)
    by_hand = sum(abs(correct[k == b].sum() - conf[k == b].sum()) for b in range(10)) / t.size
    assert ece_top_label(y, p) == pytest.approx(by_hand, abs=1e-12)


def test_top_k_ties_are_ordered_like_the_argmax():
    # True class 1 tied with the earlier class 0: not the argmax (which takes the first), so outside the top 1 and
    # inside the top 2. True class 0 in the same tie is the argmax. A class ahead by probability always counts.
    y = np.eye(3)[[1, 0, 2]]
    p = np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.5, 0.3, 0.2]])
    assert top_k_accuracy(y[:1], p[:1], 1) == 0.0 and top_k_accuracy(y[:1], p[:1], 2) == 1.0
    assert top_k_accuracy(y[1:2], p[1:2], 1) == 1.0 == accuracy(y[1:2], p[1:2])
    assert top_k_accuracy(y, p, 2) == pytest.approx(2 / 3) and top_k_accuracy(y, p, 3) == 1.0
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k_accuracy(y, p, 0)


def test_replicates_equal_explicit_resampling():
    df = _frame(1, 200)
    t, p, _, keep = _labelled(df)
    y = np.eye(4)[t]
    boot = ClusterBootstrap(df["patient_id"][keep].to_numpy(), n_boot=25, seed=3)
    rows = np.arange(t.size)
    pairs = ((accuracy, accuracy_replicates), (top_k_accuracy, top_k_accuracy_replicates),
             (balanced_accuracy, balanced_accuracy_replicates),
             (nll_multiclass, nll_multiclass_replicates), (brier_multiclass, brier_multiclass_replicates),
             (ece_top_label, ece_top_label_replicates))
    for metric, replicates in pairs:
        fast = replicates(t, p, boot.counts, boot.codes)
        for b in range(boot.n_boot):
            idx = np.repeat(rows, boot.counts[b, boot.codes].astype(int))
            assert fast[b] == pytest.approx(metric(y[idx], p[idx]), abs=1e-9), metric.__name__


def test_softmax_temperature_minimises_validation_nll():
    df = _frame(2, 600)
    y, _, z = _arrays(df)
    temp = fit_softmax_temperature(y, z)
    assert temp > 1.5  # the logits were made over-confident
    t, _, zl, _ = _labelled(df)
    nll = [log_loss(t, softmax(zl / s, axis=1), labels=range(4)) for s in (temp / 1.05, temp, temp * 1.05)]
    assert nll[1] < nll[0] and nll[1] < nll[2]
    with pytest.raises(ValueError, match="row 0"):
        fit_softmax_temperature(np.array([[1.0, 1.0], [0.0, 1.0]]), np.zeros((2, 2)))


@pytest.fixture(scope="module")
def run():
    preds = {"val": _frame(10, 400), "test": _frame(11, 500), "ood": _frame(12, 300, sharpness=1.5)}
    rows, info = compute_run_metrics(preds, CLASSES, ["sex"], EvalConfig(n_boot=100), task="multiclass")
    return preds, rows, info


def _one(rows, **kw):
    sel = rows
    for k, v in kw.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, kw
    return sel.iloc[0]


def test_run_metrics_multiclass_rows(run):
    preds, rows, info = run
    assert info["task"] == "multiclass" and info["temperatures"] == {}
    temp = info["softmax_temperature"]
    assert temp == pytest.approx(fit_softmax_temperature(*_arrays(preds["val"])[::2]))
    for name in ("val", "test", "ood"):
        t, p, z, _ = _labelled(preds[name])
        pt = softmax(z / temp, axis=1)
        expected = {"accuracy": accuracy_score(t, p.argmax(1)),
                    "top3_accuracy": top_k_accuracy_score(t, p, k=3, labels=range(4)),
                    "balanced_accuracy": balanced_accuracy_score(t, p.argmax(1)),
                    "nll_multiclass": log_loss(t, p, labels=range(4)),
                    "brier_multiclass": brier_score_loss(t, p, labels=range(4)),
                    "nll_multiclass_temp": log_loss(t, pt, labels=range(4)),
                    "brier_multiclass_temp": brier_score_loss(t, pt, labels=range(4))}
        for metric, value in expected.items():
            r = _one(rows, eval_set=name, label="all", attribute="all", metric=metric)
            assert r.value == pytest.approx(value, abs=1e-12) and r.n == t.size, (name, metric)
            assert r.lo <= r.value <= r.hi
        # one-vs-rest AUROC per class and its macro = scikit-learn's multi_class="ovr"
        per_class = roc_auc_score(t, p, multi_class="ovr", average=None)
        for k, c in enumerate(CLASSES):
            assert _one(rows, eval_set=name, label=c, attribute="all", metric="auroc").value == (
                pytest.approx(per_class[k], abs=1e-12))
        macro = _one(rows, eval_set=name, label="macro", attribute="all", metric="auroc")
        assert macro.value == pytest.approx(roc_auc_score(t, p, multi_class="ovr"), abs=1e-12)
        assert macro.lo < macro.value < macro.hi
        # each class's calibration after the one softmax temperature
        brier_t = _one(rows, eval_set=name, label="NV", attribute="all", metric="brier_temp").value
        assert brier_t == pytest.approx(np.mean((pt[:, 1] - (t == 1)) ** 2), abs=1e-12)
    assert not ((rows.label == "macro") & rows.metric.isin(["accuracy", "balanced_accuracy"])).any()
    val = _one(rows, eval_set="val", label="all", attribute="all", metric="nll_multiclass_temp")
    assert val.value < _one(rows, eval_set="val", label="all", attribute="all", metric="nll_multiclass").value
    assert "nll_multiclass_temp" in info["in_sample"]["val"] and "accuracy" not in info["in_sample"]["val"]
    # calibrated_probabilities (reliability diagrams) applies the same softmax temperature
    cal = calibrated_probabilities(preds["test"], CLASSES, info)
    assert np.allclose(cal.to_numpy(), apply_softmax_temperature(_arrays(preds["test"])[2], temp))


def test_bad_multiclass_input_is_refused(run):
    preds, _, _ = run
    bad = preds["test"].copy()
    bad.loc[7, "label:MEL"], bad.loc[7, "label:NV"] = 1.0, 1.0
    with pytest.raises(ValueError, match=r"predictions\['test'\] label:<class> one-hot row 7"):
        compute_run_metrics({"val": preds["val"], "test": bad}, CLASSES, [], EvalConfig(n_boot=0), task="multiclass")
    bad = preds["test"].copy()
    bad["prob:MEL"] = 0.9  # sigmoid-style probabilities do not sum to 1
    with pytest.raises(ValueError, match=r"prob:<class> row 0 .* sum to 1"):
        compute_run_metrics({"val": preds["val"], "test": bad}, CLASSES, [], EvalConfig(n_boot=0), task="multiclass")
    with pytest.raises(ValueError, match="task="):
        compute_run_metrics(preds, CLASSES, [], EvalConfig(n_boot=0), task="ordinal")
    with pytest.raises(ValueError, match="eval.aggregate"):
        compute_run_metrics(preds, CLASSES, [], EvalConfig(n_boot=0, aggregate=("exam",)), task="multiclass")


GROUP = ["MEL", "BCC"]
"""A derived binary label: malignant = MEL or BCC."""


def _with_derived(df: pd.DataFrame, flip: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """``df`` with ``label/prob/logit:MAL`` (its label from the classes, a share ``flip`` of them flipped, as a
    dataset's own label may disagree)."""
    rng = np.random.default_rng(seed)
    y, _, z = _arrays(df)
    label = np.where(np.isnan(y).all(axis=1), np.nan, y[:, [0, 2]].sum(axis=1))
    label = np.where(rng.random(len(df)) < flip, 1.0 - label, label)
    out = df.copy()
    out["label:MAL"] = label
    out["prob:MAL"], out["logit:MAL"] = group_scores(z, [CLASSES.index(c) for c in GROUP])
    return out


def test_group_scores_are_the_summed_softmax_and_its_log_odds():
    z = np.random.default_rng(0).normal(size=(50, 4)) * 3
    p, logit = group_scores(z, [0, 2])
    np.testing.assert_allclose(p, softmax(z, axis=1)[:, [0, 2]].sum(axis=1), rtol=1e-14)
    np.testing.assert_allclose(logit, np.log(p / (1 - p)), rtol=1e-9)
    # A confident group: 1 - p rounds to 0 in float64, the log-odds keep their value (z_in - z_out = 60).
    p, logit = group_scores(np.array([[60.0, 0.0, -np.inf, 0.0]]), [0])
    assert p[0] == 1.0 and logit[0] == pytest.approx(60.0 - np.log(2.0), abs=1e-12)
    with pytest.raises(ValueError, match="one class inside and one outside"):
        group_scores(z, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def derived_run():
    # "partial": an OOD set that knows only MEL yes/no (DDI-like), and the derived label.
    partial = _with_derived(_frame(13, 300, sharpness=1.5), flip=0.1, seed=1)
    for c in CLASSES[1:]:
        partial.loc[partial["label:MEL"] == 0.0, f"label:{c}"] = np.nan
    preds = {"val": _with_derived(_frame(10, 400)), "test": _with_derived(_frame(11, 500), flip=0.05),
             "partial": partial}
    rows, info = compute_run_metrics(preds, CLASSES, ["sex"], EvalConfig(n_boot=100), task="multiclass",
                                     derived=["MAL"])
    return preds, rows, info


def test_a_derived_label_is_scored_binary_and_kept_out_of_the_macro(derived_run):
    preds, rows, info = derived_run
    test = preds["test"]
    keep = test["label:MAL"].notna()
    auroc = _one(rows, eval_set="test", label="MAL", attribute="all", metric="auroc")
    assert auroc.value == pytest.approx(roc_auc_score(test["label:MAL"][keep], test["prob:MAL"][keep]), abs=1e-12)
    # its own temperature, fitted on val like a sigmoid output; the classes keep their one softmax temperature
    assert set(info["temperatures"]) == {"MAL"} and info["derived"] == ["MAL"]
    t_mal = info["temperatures"]["MAL"]
    pt = 1 / (1 + np.exp(-test["logit:MAL"][keep] / t_mal))
    assert _one(rows, eval_set="test", label="MAL", attribute="all", metric="brier_temp").value == pytest.approx(
        np.mean((pt - test["label:MAL"][keep]) ** 2), abs=1e-12)
    cal = calibrated_probabilities(test, [*CLASSES, "MAL"], info)
    np.testing.assert_allclose(cal["MAL"], 1 / (1 + np.exp(-test["logit:MAL"] / t_mal)))
    np.testing.assert_allclose(cal[CLASSES].to_numpy(),
                               apply_softmax_temperature(_arrays(test)[2], info["softmax_temperature"]))
    # the macro is the one-vs-rest macro over the classes, without MAL
    t, p, _, _ = _labelled(test)
    assert _one(rows, eval_set="test", label="macro", attribute="all", metric="auroc").value == pytest.approx(
        roc_auc_score(t, p, multi_class="ovr"), abs=1e-12)
    macro_gap = _one(rows, eval_set="test", label="macro", attribute="sex", group="all", metric="auroc_gap").value
    gaps = [_one(rows, eval_set="test", label=c, attribute="sex", group="all", metric="auroc_gap").value
            for c in CLASSES]
    assert macro_gap == pytest.approx(np.mean(gaps), abs=1e-12)


def test_a_set_that_knows_some_classes_only_gets_no_one_of_k_rows(derived_run):
    preds, rows, info = derived_run
    assert info["multiclass_sets"]["partial"]["scored"] is False
    assert info["multiclass_sets"]["partial"]["labelled_without_class"] == int((preds["partial"]["label:MEL"] == 0).sum())
    assert info["multiclass_sets"]["test"] == {"scored": True, "labelled_without_class": 0}
    assert not ((rows.eval_set == "partial") & (rows.label == "all")).any()
    # ... but its MEL one-vs-rest AUROC, its derived label and the shift rows on both
    partial = preds["partial"]
    keep = partial["label:MEL"].notna()
    mel = _one(rows, eval_set="partial", label="MEL", attribute="all", metric="auroc")
    assert mel.value == pytest.approx(roc_auc_score(partial["label:MEL"][keep], partial["prob:MEL"][keep]), abs=1e-12)
    assert info["shift_labels"]["partial"] == ["MEL", "MAL"]
    drops = [_one(rows, eval_set="partial", label=lab, attribute="all", metric="auroc_drop").value
             for lab in ("MEL", "MAL")]
    macro = _one(rows, eval_set="partial", label="macro", attribute="all", metric="auroc_drop")
    assert macro.value == pytest.approx(np.mean(drops), abs=1e-12)

"""Breast- and exam-level evaluation: pooling per unit against pandas by hand, and the pooled rows of
compute_run_metrics against scikit-learn on the pooled predictions."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

from scaling.config import ConfigError, EvalConfig
from scaling.metrics import MetricWarning, choose_threshold, compute_run_metrics, rates_at
from scaling.metrics.exam import aggregate_predictions

LABELS = ["Suspicious", "Malignant"]


def _screening(seed: int, n_patients: int) -> pd.DataFrame:
    """One exam per patient, CC + MLO of both breasts; labels per breast, scores per image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        for side in "LR":
            y = {"Suspicious": float(rng.random() < 0.3)}
            y["Malignant"] = float(y["Suspicious"] and rng.random() < 0.5)
            for view in ("CC", "MLO"):
                row = {"sample_id": f"{seed}-{i}-{side}-{view}", "patient_id": f"p{seed}-{i}", "laterality": side,
                       "view": view}
                for lab in LABELS:
                    z = 1.5 * y[lab] - 1.0 + rng.normal()
                    row.update({f"label:{lab}": y[lab], f"logit:{lab}": z, f"prob:{lab}": expit(z)})
                rows.append(row)
    return pd.DataFrame(rows)


def test_pooling_per_breast_and_exam_by_hand():
    df = pd.DataFrame({
        "patient_id": ["a", "a", "a", "a", "b", "b", "c"],
        "laterality": ["L", "L", "R", "R", "L", "L", None],
        "label:X": [1.0, 1.0, 0.0, 0.0, np.nan, 0.0, 1.0],
        "logit:X": [0.5, -1.0, -2.0, 1.0, 0.0, 3.0, 2.0],
    })
    df["prob:X"] = expit(df["logit:X"])
    with pytest.warns(MetricWarning, match="1 image"):
        breast = aggregate_predictions(df, ["X"], "breast", "max")
    assert list(breast.sample_id) == ["a/L", "a/R", "b/L"] and list(breast.n_images) == [2, 2, 2]
    assert list(breast["label:X"]) == [1.0, 0.0, 0.0]  # b/L: one image unlabelled, the other negative
    assert np.allclose(breast["logit:X"], [0.5, 1.0, 3.0]) and np.allclose(breast["prob:X"], expit([0.5, 1.0, 3.0]))
    with pytest.warns(MetricWarning):
        mean = aggregate_predictions(df, ["X"], "breast", "mean")
    p = [expit([0.5, -1.0]).mean(), expit([-2.0, 1.0]).mean(), expit([0.0, 3.0]).mean()]
    assert np.allclose(mean["prob:X"], p) and np.allclose(mean["logit:X"], logit(p))
    exam = aggregate_predictions(df, ["X"], "exam", "mean")  # no laterality needed: c is an exam of its own
    assert list(exam.sample_id) == ["a", "b", "c"] and list(exam["label:X"]) == [1.0, 0.0, 1.0]
    assert np.allclose(exam["prob:X"], [expit([0.5, -1.0, -2.0, 1.0]).mean(), expit([0.0, 3.0]).mean(), expit(2.0)])
    # two exams of one patient (EMBED's accession numbers) are two units of the same patient
    two = df.assign(exam_id=["e1", "e1", "e2", "e2", "e3", "e3", "e4"])
    units = aggregate_predictions(two, ["X"], "exam", "max")
    assert list(units.sample_id) == ["a/e1", "a/e2", "b/e3", "c/e4"] and list(units.patient_id) == list("aabc")


def test_pooling_needs_its_columns():
    df = pd.DataFrame({"patient_id": ["a"], "label:X": [1.0], "logit:X": [0.0], "prob:X": [0.5]})
    with pytest.raises(ValueError, match="laterality"):
        aggregate_predictions(df, ["X"], "breast", "max", where="predictions['test']")
    with pytest.raises(ValueError, match=r"predictions\['test'\]\['exam_id'\] is missing in row 1"):
        aggregate_predictions(pd.concat([df.assign(exam_id="e"), df.assign(exam_id=None)], ignore_index=True),
                              ["X"], "exam", "max", where="predictions['test']")
    with pytest.raises(ValueError, match="reducer"):
        aggregate_predictions(df, ["X"], "exam", "median")
    with pytest.raises(ConfigError, match="eval.aggregate"):
        EvalConfig(aggregate=("study",))


@pytest.fixture(scope="module")
def pooled():
    preds = {"val": _screening(0, 120), "test": _screening(1, 150), "cmmd": _screening(2, 80)}
    cfg = EvalConfig(n_boot=200, aggregate=("breast", "exam"))
    return preds, cfg, compute_run_metrics(preds, LABELS, [], cfg)


def _one(rows, **kw):
    sel = rows
    for k, v in kw.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, kw
    return sel.iloc[0]


@pytest.mark.parametrize("level", ["breast", "exam"])
@pytest.mark.parametrize("reducer", ["max", "mean"])
def test_pooled_rows_equal_sklearn_on_the_pooled_predictions(pooled, level, reducer):
    preds, cfg, (rows, info) = pooled
    keys = ["patient_id", "laterality"] if level == "breast" else ["patient_id"]
    val = preds["val"].groupby(keys).agg({"label:Suspicious": "max", "prob:Suspicious": reducer})
    thr = choose_threshold(val["label:Suspicious"], val["prob:Suspicious"], "max_f1")
    assert info["pooled"][f"{level}_{reducer}"]["thresholds"]["Suspicious"] == thr  # refitted on pooled val
    for name in ("test", "cmmd"):
        unit = preds[name].groupby(keys).agg({f"{k}:{lab}": ("max" if k == "label" else reducer)
                                             for lab in LABELS for k in ("label", "prob")})
        assert info["pooled"][f"{level}_{reducer}"]["units"][name] == len(unit)
        aurocs = []
        for lab in LABELS:
            r = _one(rows, eval_set=name, label=lab, attribute="all", metric=f"auroc@{level}_{reducer}")
            aurocs.append(roc_auc_score(unit[f"label:{lab}"], unit[f"prob:{lab}"]))
            assert r.value == pytest.approx(aurocs[-1], abs=1e-12) and r.n == len(unit) and r.lo < r.value < r.hi
        macro = _one(rows, eval_set=name, label="macro", attribute="all", metric=f"auroc@{level}_{reducer}")
        assert macro.value == pytest.approx(np.mean(aurocs)) and macro.n == len(unit)
        tpr = _one(rows, eval_set=name, label="Suspicious", attribute="all", metric=f"tpr@{level}_{reducer}")
        assert tpr.value == rates_at(unit["label:Suspicious"], unit["prob:Suspicious"], thr)[0]


def test_pooling_adds_rows_and_changes_none(pooled):
    preds, cfg, (rows, _) = pooled
    image, _ = compute_run_metrics(preds, LABELS, [], dataclasses.replace(cfg, aggregate=()))
    same = rows[~rows.metric.str.contains("@")].reset_index(drop=True)
    pd.testing.assert_frame_equal(same, image)
    pooled_metrics = set(rows.metric[rows.metric.str.contains("@")])
    assert {"auroc@breast_max", "auroc@exam_mean", "ece_temp@exam_max", "fpr@breast_mean"} <= pooled_metrics
    # pooling the two views ranks breasts better than one image (two noisy looks at one label)
    test = rows[(rows.eval_set == "test") & (rows.label == "macro")].set_index("metric")["value"]
    assert test["auroc@breast_mean"] > test["auroc"]

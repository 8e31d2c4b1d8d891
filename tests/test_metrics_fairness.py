"""Thresholds and subgroup fairness against fairlearn and brute force."""

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame, equalized_odds_difference, false_positive_rate, true_positive_rate
from sklearn.metrics import f1_score

from scaling.metrics import auroc, choose_threshold, ece, rates_at, subgroup_report


def _data(seed=0, n=900):
    rng = np.random.default_rng(seed)
    groups = rng.choice(["F", "M", "X"], n, p=[0.5, 0.45, 0.05])
    y = (rng.random(n) < np.where(groups == "F", 0.3, 0.45)).astype(float)
    p = 1 / (1 + np.exp(-(1.5 * y - 0.7 + rng.normal(0, np.where(groups == "M", 1.3, 0.9)))))
    return y, np.round(p, 3), groups


def test_group_rates_and_eod_equal_fairlearn():
    y, p, groups = _data()
    thr = choose_threshold(y, p, "max_f1")
    rep = subgroup_report(y, p, groups, threshold=thr, min_group_size=10, n_boot=0)
    y_pred = (p >= thr).astype(int)
    frame = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate}, y_true=y.astype(int),
                        y_pred=y_pred, sensitive_features=groups)
    for g in ["F", "M", "X"]:
        assert rep.groups.loc[g, "tpr"] == pytest.approx(frame.by_group.loc[g, "tpr"], abs=1e-12)
        assert rep.groups.loc[g, "fpr"] == pytest.approx(frame.by_group.loc[g, "fpr"], abs=1e-12)
    eod = equalized_odds_difference(y.astype(int), y_pred, sensitive_features=groups)
    assert rep.summary.loc["eod", "value"] == pytest.approx(eod, abs=1e-12)


def test_group_aurocs_worst_gap_small_and_missing_groups():
    y, p, groups = _data(1)
    groups = groups.astype(object)
    groups[:20] = None
    rep = subgroup_report(y, p, groups, threshold=0.5, min_group_size=60, n_boot=100, cluster=np.arange(y.size))
    g = rep.groups
    assert set(g.index) == {"F", "M", "X", "missing"}
    for name in ["F", "M"]:
        rows = groups == name
        assert g.loc[name, "auroc"] == pytest.approx(auroc(y[rows], p[rows]), abs=1e-12)
        assert g.loc[name, "ece"] == pytest.approx(ece(y[rows], p[rows]), abs=1e-12)
        assert g.loc[name, "auroc_lo"] < g.loc[name, "auroc"] < g.loc[name, "auroc_hi"]
    # X is below min_group_size: true n, NaN metrics, not in the summary.
    assert g.loc["X", "small"] and g.loc["X", "n"] == (groups == "X").sum() and np.isnan(g.loc["X", "auroc"])
    assert g.loc["missing", "n"] == 20
    assert rep.summary.loc["worst_group_auroc", "value"] == pytest.approx(g.loc[["F", "M"], "auroc"].min())
    assert rep.summary.loc["auroc_gap", "value"] == pytest.approx(abs(g.loc["F", "auroc"] - g.loc["M", "auroc"]))
    assert rep.info["worst_group"] == g.loc[["F", "M"], "auroc"].idxmin()
    assert rep.info["groups_summarised"] == ["F", "M"]


def test_a_group_of_few_patients_is_small_whatever_its_image_count():
    y, p, groups = _data(3)
    patients = np.arange(y.size).astype(object)
    patients[groups == "X"] = [f"x{i % 4}" for i in range((groups == "X").sum())]  # X: 4 patients, many images
    assert (groups == "X").sum() >= 10
    rep = subgroup_report(y, p, groups, threshold=0.5, cluster=patients, n_boot=0)
    assert rep.groups.loc["X", "small"] and np.isnan(rep.groups.loc["X", "prevalence"])
    assert rep.info["min_group_patients"] == 10 and rep.info["groups_summarised"] == ["F", "M"]
    # without patient ids every sample is a patient of its own: X is then 10+ patients and gets its numbers
    rep = subgroup_report(y, p, groups, threshold=0.5, n_boot=0)
    x = groups == "X"
    assert not rep.groups.loc["X", "small"] and rep.groups.loc["X", "prevalence"] == pytest.approx(y[x].mean())


def test_underdiagnosis_rate_is_fpr_of_no_finding():
    y, p, groups = _data(2)
    rep = subgroup_report(y, p, groups, threshold=0.4, n_boot=0, underdiagnosis=True)
    assert (rep.groups["underdiagnosis_rate"].dropna() == rep.groups["fpr"].dropna()).all()
    assert rep.summary.loc["underdiagnosis_gap", "value"] == rep.summary.loc["fpr_gap", "value"]


def test_threshold_policies():
    y, p, _ = _data(3)
    p = np.round(p, 2)
    # max-F1 equals a brute-force search over every distinct score (ties: the highest threshold).
    f1 = {t: f1_score(y, p >= t) for t in np.unique(p)}
    assert choose_threshold(y, p, "max_f1") == max(f1, key=lambda t: (f1[t], t))
    # Sensitivity target: the highest threshold that still reaches it.
    t_sens = choose_threshold(y, p, "sensitivity", 0.9)
    assert rates_at(y, p, t_sens)[0] >= 0.9
    assert rates_at(y, p, p[p > t_sens].min())[0] < 0.9
    # Specificity target: the lowest threshold that still reaches it.
    t_spec = choose_threshold(y, p, "specificity", 0.9)
    assert rates_at(y, p, t_spec)[1] <= 0.1
    assert rates_at(y, p, p[p < t_spec].max())[1] > 0.1
    assert choose_threshold(y, p, "fixed", 0.3) == 0.3
    with pytest.raises(ValueError, match="policy"):
        choose_threshold(y, p, "youden")


def test_group_errors_name_the_argument():
    y, p, groups = _data(4, n=50)
    with pytest.raises(ValueError, match="groups is missing for every sample"):
        subgroup_report(y, p, [None] * 50, threshold=0.5)
    with pytest.raises(ValueError, match="groups has length 49"):
        subgroup_report(y, p, groups[:49], threshold=0.5)

"""compute_run_metrics on a small hand-made predictions dict: the rows the study runner stores."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from scaling.config import EvalConfig
from scaling.metrics import (MetricWarning, apply_temperature, choose_threshold, compute_run_metrics,
                             fit_temperature, nll, rates_at)
from scaling.metrics.schema import METRIC_COLUMNS

LABELS = ["Edema", "No Finding"]


def _frame(seed, n, with_age=True):
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, n // 2, n)
    df = pd.DataFrame({"sample_id": [f"{seed}-{i}" for i in range(n)],
                       "patient_id": [f"p{seed}-{k}" for k in patients],
                       "sex": rng.choice(["F", "M", "U"], n, p=[0.5, 0.47, 0.03])})
    if with_age:
        df["age_group"] = rng.choice(["0-40", "40-60", "60+"], n)
    for j, lab in enumerate(LABELS):
        y = (rng.random(n) < 0.35).astype(float)
        if j == 0:
            y[rng.random(n) < 0.15] = np.nan  # unlabelled for Edema only
        z = 2.5 * (1.4 * np.nan_to_num(y) - 0.6 + rng.normal(size=n))  # over-confident logits
        df[f"label:{lab}"], df[f"logit:{lab}"], df[f"prob:{lab}"] = y, z, expit(z)
    return df


@pytest.fixture(scope="module")
def preds():
    return {"val": _frame(0, 400), "test": _frame(1, 600), "ood": _frame(2, 300, with_age=False)}


@pytest.fixture(scope="module")
def result(preds):
    with pytest.warns(MetricWarning, match="age_group"):
        return compute_run_metrics(preds, LABELS, ["sex", "age_group"], EvalConfig(n_boot=100, min_group_size=25))


def _row(rows, **kw):
    sel = rows
    for k, v in kw.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, kw
    return sel.iloc[0]


def test_columns_and_eval_sets(result):
    rows, info = result
    assert tuple(rows.columns) == METRIC_COLUMNS
    assert set(rows.eval_set) == {"val", "test", "ood"}
    assert info["fitted_on"] == "val" and info["eval_sets"] == ["val", "test", "ood"]
    # on val the threshold- and temperature-dependent numbers are in-sample, and say so
    assert {"tpr", "fpr", "eod", "ece_temp", "brier_temp", "nll_temp"} <= set(info["in_sample"]["val"])
    assert "auroc" not in info["in_sample"]["val"]
    assert info["skipped_attributes"] == {"ood": ["age_group"]}
    assert not rows.duplicated(["eval_set", "label", "attribute", "group", "metric"]).any()


def test_overall_rows_equal_sklearn_with_masking(result, preds):
    rows, _ = result
    test = preds["test"]
    keep = test["label:Edema"].notna()
    y, p = test.loc[keep, "label:Edema"], test.loc[keep, "prob:Edema"]
    r = _row(rows, eval_set="test", label="Edema", attribute="all", group="all", metric="auroc")
    assert r.value == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert r.n == keep.sum() < len(test)
    assert r.lo < r.value < r.hi
    r = _row(rows, eval_set="test", label="Edema", attribute="all", group="all", metric="auprc")
    assert r.value == pytest.approx(average_precision_score(y, p), abs=1e-12)
    macro = _row(rows, eval_set="test", label="macro", attribute="all", group="all", metric="auroc")
    per_label = rows[(rows.eval_set == "test") & (rows.attribute == "all") & (rows.metric == "auroc")
                     & (rows.label != "macro")]
    assert macro.value == pytest.approx(per_label.value.mean()) and macro.n == len(test)
    assert macro.lo < macro.value < macro.hi


def test_threshold_and_temperature_are_fitted_on_val_and_applied(result, preds):
    rows, info = result
    val, test = preds["val"], preds["test"]
    for lab in LABELS:
        thr = choose_threshold(val[f"label:{lab}"], val[f"prob:{lab}"], "max_f1")
        assert info["thresholds"][lab] == thr
        tpr, fpr = rates_at(test[f"label:{lab}"], test[f"prob:{lab}"], thr)
        assert _row(rows, eval_set="test", label=lab, attribute="all", group="all", metric="tpr").value == tpr
        assert _row(rows, eval_set="test", label=lab, attribute="all", group="all", metric="fpr").value == fpr
        t = fit_temperature(val[f"label:{lab}"], val[f"logit:{lab}"])
        assert info["temperatures"][lab] == pytest.approx(t) and t > 1.5  # logits were over-confident
        calibrated = nll(test[f"label:{lab}"], apply_temperature(test[f"logit:{lab}"], t))
        r = _row(rows, eval_set="test", label=lab, attribute="all", group="all", metric="nll_temp")
        assert r.value == pytest.approx(calibrated)
        assert r.value < _row(rows, eval_set="test", label=lab, attribute="all", group="all", metric="nll").value


def test_subgroup_rows(result, preds):
    rows, _ = result
    test = preds["test"]
    sub = rows[(rows.eval_set == "test") & (rows.label == "No Finding") & (rows.attribute == "sex")]
    aurocs = {}
    for g in ["F", "M"]:
        part = test[test.sex == g]
        aurocs[g] = roc_auc_score(part["label:No Finding"], part["prob:No Finding"])
        assert _row(sub, group=g, metric="auroc").value == pytest.approx(aurocs[g], abs=1e-12)
        assert _row(sub, group=g, metric="underdiagnosis_rate").value == _row(sub, group=g, metric="fpr").value
    small = sub[sub.group == "U"]  # below min_group_size: true n, NaN values
    assert (small.n == (test.sex == "U").sum()).all() and small.value.isna().all()
    assert _row(sub, group="all", metric="worst_group_auroc").value == pytest.approx(min(aurocs.values()))
    assert result[1]["worst_groups"]["test"]["No Finding"]["sex"] == min(aurocs, key=aurocs.get)
    assert _row(sub, group="all", metric="auroc_gap").value == pytest.approx(abs(aurocs["F"] - aurocs["M"]))
    assert np.isfinite(_row(sub, group="all", metric="underdiagnosis_gap").value)
    eod = _row(sub, group="all", metric="eod").value
    assert eod == max(_row(sub, group="all", metric="tpr_gap").value, _row(sub, group="all", metric="fpr_gap").value)
    assert len(rows[(rows.label == "Edema") & rows.metric.str.startswith("underdiagnosis")]) == 0
    # the macro summaries are those of the groups' macro AUROCs (test_macro_worst_group_is_over_the_group_macros)
    macros = {g: _row(rows, eval_set="test", label="macro", attribute="sex", group=g, metric="auroc").value
              for g in ["F", "M"]}
    worst_macro = _row(rows, eval_set="test", label="macro", attribute="sex", group="all", metric="worst_group_auroc")
    assert worst_macro.value == pytest.approx(min(macros.values()), abs=1e-12)


def _crossed_groups(n_per_group=40, seed=0):
    """Two labels whose worst group differs: A separates the classes well in F and poorly in M, B the other way
    round (less so); plus a group U below the minimum size and rows without the attribute."""
    rng = np.random.default_rng(seed)
    sex = np.array(["F"] * n_per_group + ["M"] * n_per_group + ["U"] * 5 + [None] * 6, dtype=object)
    n = sex.size
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                       "sex": sex})
    for lab, strength in (("A", {"F": 2.0, "M": 0.3}), ("B", {"F": 0.8, "M": 2.5})):
        y = (rng.random(n) < 0.4).astype(float)
        y[:2], y[2:4], y[n_per_group:n_per_group + 2], y[n_per_group + 2:n_per_group + 4] = 1, 0, 1, 0
        z = np.array([strength.get(g, 1.0) for g in sex]) * y + rng.normal(size=n)
        df[f"label:{lab}"], df[f"logit:{lab}"], df[f"prob:{lab}"] = y, z, expit(z)
    return df


def test_macro_worst_group_is_over_the_group_macros():
    # Hand-made: per label the worst group differs (A: M, B: F), so the mean over labels of each label's worst
    # group lies below every group's macro AUROC. The macro rows must be the smallest group macro AUROC and the
    # spread of the group macros, as the report's group table shows them; the per-label rows stay per label.
    test = _crossed_groups()
    cfg = EvalConfig(n_boot=200, min_group_size=10)
    rows, _ = compute_run_metrics({"val": _crossed_groups(seed=1), "test": test}, ["A", "B"], ["sex"], cfg)
    ref = {(lab, g): roc_auc_score(test.loc[test.sex == g, f"label:{lab}"], test.loc[test.sex == g, f"prob:{lab}"])
           for lab in "AB" for g in "FM"}
    group_macro = {g: (ref["A", g] + ref["B", g]) / 2 for g in "FM"}
    sub = rows[(rows.eval_set == "test") & (rows.attribute == "sex")]
    for g in "FM":
        assert _row(sub, label="macro", group=g, metric="auroc").value == pytest.approx(group_macro[g], abs=1e-12)
    worst = _row(sub, label="macro", group="all", metric="worst_group_auroc")
    gap = _row(sub, label="macro", group="all", metric="auroc_gap")
    assert worst.value == pytest.approx(min(group_macro.values()), abs=1e-12)
    assert gap.value == pytest.approx(abs(group_macro["F"] - group_macro["M"]), abs=1e-12)
    # the per-label rows are unchanged: each label's own worst group and gap
    per_label_worst = {lab: min(ref[lab, "F"], ref[lab, "M"]) for lab in "AB"}
    for lab in "AB":
        assert _row(sub, label=lab, group="all", metric="worst_group_auroc").value == pytest.approx(
            per_label_worst[lab], abs=1e-12)
        assert _row(sub, label=lab, group="all", metric="auroc_gap").value == pytest.approx(
            abs(ref[lab, "F"] - ref[lab, "M"]), abs=1e-12)
    # the example tells the two definitions apart: the old macro was the mean of the labels' worst groups
    assert np.mean(list(per_label_worst.values())) < min(group_macro.values()) - 0.05
    # the interval comes from the same replicates, reduced replicate by replicate: the worst group's replicate is
    # at most each group's, so are its percentiles
    groups = {g: _row(sub, label="macro", group=g, metric="auroc") for g in "FM"}
    assert np.isfinite(worst.lo) and np.isfinite(gap.lo) and 0 <= gap.lo <= gap.hi
    assert worst.lo <= min(r.lo for r in groups.values()) and worst.hi <= min(r.hi for r in groups.values())
    # U (below min_group_size) and the rows without the attribute are not summarised
    assert np.isnan(_row(sub, label="macro", group="U", metric="auroc").value)


def _few_patients(seed):
    """Group 'A' of 30 patients with one image each and group 'B' of 3 patients with 6 images each: B passes
    eval.min_group_size (18 images) but is three people."""
    rng = np.random.default_rng(seed)
    patients = [f"a{i}" for i in range(30)] + [f"b{i // 6}" for i in range(18)]
    y = np.r_[np.tile([0.0, 1.0], 15), np.repeat([1.0, 1.0, 0.0], 6)]
    z = 2 * y - 1 + rng.normal(size=y.size)
    return pd.DataFrame({"sample_id": [f"s{i}" for i in range(y.size)], "patient_id": patients,
                         "race": ["A"] * 30 + ["B"] * 18, "label:Edema": y, "logit:Edema": z, "prob:Edema": expit(z)})


def test_a_group_of_few_patients_gets_no_metrics_however_many_images():
    """A subgroup below eval.min_group_patients patients gets its true n and NaN metrics, even when it has more
    images than eval.min_group_size: its prevalence would be those patients' findings (here 2 of 3 positive)."""
    preds = {"val": _few_patients(0), "test": _few_patients(1)}
    rows, info = compute_run_metrics(preds, ["Edema"], ["race"], EvalConfig(n_boot=0))
    test = rows[(rows.eval_set == "test") & (rows.attribute == "race")]
    few = test[(test.label == "Edema") & (test.group == "B")]
    assert len(few) == 5 and (few.n == 18).all() and few.value.isna().all()
    assert np.isnan(_row(test, label="macro", group="B", metric="auroc").value)
    t = preds["test"]
    a = t[t.race == "A"]
    assert _row(test, label="Edema", group="A", metric="auroc").value == pytest.approx(
        roc_auc_score(a["label:Edema"], a["prob:Edema"]), abs=1e-12)
    assert _row(test, label="Edema", group="all", metric="worst_group_auroc").value == pytest.approx(
        roc_auc_score(a["label:Edema"], a["prob:Edema"]), abs=1e-12)  # B is not summarised
    assert info["min_group_patients"] == 10
    # the minimum is a setting: at 0 only the image count applies and B's prevalence is its 12 positive of 18 images
    rows, _ = compute_run_metrics(preds, ["Edema"], ["race"], EvalConfig(n_boot=0, min_group_patients=0))
    assert _row(rows, eval_set="test", label="Edema", group="B", metric="prevalence").value == pytest.approx(12 / 18)


def test_config_policy_and_no_bootstrap(preds):
    cfg = dataclasses.replace(EvalConfig(), threshold="sens90", n_boot=0)
    rows, info = compute_run_metrics({"val": preds["val"], "test": preds["test"]}, LABELS, ["sex"], cfg)
    assert info["threshold_policy"] == "sens90" and info["threshold_target"] == 0.9
    val = preds["val"]
    assert info["thresholds"]["Edema"] == choose_threshold(val["label:Edema"], val["prob:Edema"], "sensitivity", 0.9)
    assert rows.lo.isna().all() and rows.hi.isna().all()


def test_bad_predictions_raise_naming_the_problem(preds):
    cfg = EvalConfig(n_boot=0)
    with pytest.raises(ValueError, match="'val'"):
        compute_run_metrics({"test": preds["test"]}, LABELS, [], cfg)
    bad = preds["test"].copy()
    bad.loc[3, "prob:Edema"] = np.nan
    with pytest.raises(ValueError, match=r"prob:Edema"):
        compute_run_metrics({"val": preds["val"], "test": bad}, LABELS, [], cfg)
    bad = preds["test"].copy()
    bad.loc[3, "label:No Finding"] = 2.0
    with pytest.raises(ValueError, match=r"label:No Finding"):
        compute_run_metrics({"val": preds["val"], "test": bad}, LABELS, [], cfg)
    bad = preds["test"].copy()
    bad.loc[5, "patient_id"] = None
    with pytest.raises(ValueError, match=r"patient_id"):
        compute_run_metrics({"val": preds["val"], "test": bad}, LABELS, [], cfg)
    with pytest.raises(ValueError, match=r"logit:Edema"):
        compute_run_metrics({"val": preds["val"], "test": preds["test"].drop(columns="logit:Edema")}, LABELS, [], cfg)


def test_label_unlabelled_in_a_set_gives_nan_rows_with_n_zero(preds):
    test = preds["test"].copy()
    test["label:Edema"] = np.nan
    with pytest.warns(MetricWarning):
        rows, _ = compute_run_metrics({"val": preds["val"], "test": test}, LABELS, ["sex"], EvalConfig(n_boot=20))
    edema = rows[(rows.label == "Edema") & (rows.eval_set == "test")]
    assert edema.value.isna().all() and (edema.n == 0).all()
    assert set(edema[edema.attribute == "sex"].group) == {"F", "M", "U", "all"}
    macro = _row(rows, eval_set="test", label="macro", attribute="all", group="all", metric="auroc")
    assert macro.value == _row(rows, eval_set="test", label="No Finding", attribute="all", group="all",
                               metric="auroc").value


def test_val_is_reported_with_its_own_threshold_and_temperature(result, preds):
    rows, info = result
    val = preds["val"]
    for lab in LABELS:
        thr, t = info["thresholds"][lab], info["temperatures"][lab]
        tpr, fpr = rates_at(val[f"label:{lab}"], val[f"prob:{lab}"], thr)
        assert _row(rows, eval_set="val", label=lab, attribute="all", group="all", metric="tpr").value == tpr
        keep = val[f"label:{lab}"].notna()
        y, z = val.loc[keep, f"label:{lab}"], val.loc[keep, f"logit:{lab}"]
        pt = apply_temperature(z, t)
        assert _row(rows, eval_set="val", label=lab, attribute="all", group="all", metric="brier_temp").value == (
            pytest.approx(brier_score_loss(y, pt)))
        assert _row(rows, eval_set="val", label=lab, attribute="all", group="all", metric="brier").value == (
            pytest.approx(brier_score_loss(y, expit(z))))
        # fitted on these very samples: the calibrated NLL is the minimum over temperatures
        nll_t = _row(rows, eval_set="val", label=lab, attribute="all", group="all", metric="nll_temp").value
        assert nll_t <= nll(y, apply_temperature(z, 1.1 * t)) and nll_t <= nll(y, apply_temperature(z, t / 1.1))
    sub = rows[(rows.eval_set == "val") & (rows.attribute == "sex") & (rows.group == "all")]
    assert {"worst_group_auroc", "auroc_gap", "eod"} <= set(sub.metric)


def test_ood_drop_uses_the_labels_both_sets_can_score(preds):
    # Edema has no positive case in this OOD set: its drop cannot be computed, and the macro drop must not mix a
    # two-label in-distribution macro with a one-label OOD macro.
    ood = preds["ood"].copy()
    ood["label:Edema"] = np.where(ood["label:Edema"].isna(), np.nan, 0.0)
    with pytest.warns(MetricWarning):
        rows, info = compute_run_metrics({"val": preds["val"], "test": preds["test"], "ood": ood}, LABELS, [],
                                         EvalConfig(n_boot=200))
    assert info["evaluable_labels"] == {"val": LABELS, "test": LABELS, "ood": ["No Finding"]}
    assert info["shift_labels"] == {"ood": ["No Finding"]}
    shift = rows[rows.metric.isin(["auroc_id", "auroc_ood", "auroc_drop"])]
    assert set(shift.eval_set) == {"ood"} and set(shift.label) == {"No Finding", "macro"}
    test, o = preds["test"], ood
    a_id = roc_auc_score(test["label:No Finding"], test["prob:No Finding"])
    a_ood = roc_auc_score(o["label:No Finding"], o["prob:No Finding"])
    for label in ("No Finding", "macro"):
        assert _row(shift, label=label, metric="auroc_id").value == pytest.approx(a_id, abs=1e-12)
        assert _row(shift, label=label, metric="auroc_ood").value == pytest.approx(a_ood, abs=1e-12)
        drop = _row(shift, label=label, metric="auroc_drop")
        assert drop.value == pytest.approx(a_id - a_ood, abs=1e-12) and drop.lo < drop.value < drop.hi
    # the whole-set macros differ: test averages two labels, the OOD set one
    test_macro = _row(rows, eval_set="test", label="macro", attribute="all", group="all", metric="auroc").value
    assert test_macro != pytest.approx(a_id)
    # the drop's interval: independent resamples of the two sets, wider than either set's own
    d = _row(shift, label="No Finding", metric="auroc_drop")
    one = _row(rows, eval_set="ood", label="No Finding", attribute="all", group="all", metric="auroc")
    assert d.hi - d.lo > one.hi - one.lo


def test_rows_do_not_depend_on_the_machines_blas_threads():
    """The bootstrap's products run on one BLAS thread whatever the process allows: with two, OpenBLAS split the
    ECE products of this set (1,300 patients x 300 replicates) and the intervals moved in their last bits."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    rng = np.random.default_rng(0)

    def frame(n, prefix):
        y = (rng.random(n) < 0.3).astype(float)
        z = 1.5 * y - 1 + rng.normal(size=n)
        return pd.DataFrame({"sample_id": [f"{prefix}{i}" for i in range(n)],
                             "patient_id": rng.integers(0, n // 9, n).astype(str),
                             "label:A": y, "logit:A": z, "prob:A": expit(z)})

    preds = {"val": frame(600, "v"), "test": frame(12_000, "t")}
    rows = {}
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            if set(blas_threads()) != {threads}:
                pytest.skip("this BLAS cannot run two threads here")
            rows[threads] = compute_run_metrics(preds, ["A"], [], EvalConfig(n_boot=300))[0]
            assert set(blas_threads()) == {threads}  # the caller's setting is back
    pd.testing.assert_frame_equal(rows[1], rows[2], check_exact=True)

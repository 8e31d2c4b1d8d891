"""The HTML report of a hand-made study: every plot and table, self-contained, nothing identifying."""

import base64
import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, softmax
from sklearn.metrics import brier_score_loss, roc_auc_score
from study_store import (BACKBONES, FRACTIONS, LABELS, PATIENTS, SAMPLES, SEEDS, TEMPERATURES, copy_store,
                         html_table, make_store, run_dir_of, shared_store, study_config)

from scaling.config import EvalConfig, GridConfig
from scaling.metrics import compute_run_metrics, delong_test, holm, or_test, or_test_macro
from scaling.study.grid import config_hash, expand_grid, run_id

from scaling.study import compare
from scaling.study.__main__ import main
from scaling.study.aggregate import load_results, summarise
from scaling.study.report import build_report, render_html
from scaling.study.store import RunStore

TABLES = ("completion", "headline", "labels", "fits_params", "data_efficiency", "ood-ood_site_b", "robustness-ood_site_b",
          "selective", "fits", "reliability", "reliability_bins", "comparisons", "comparisons-labels",
          "comparisons-subgroups", "comparisons-brier",
          *[f"{view}-{e}" for view in ("fairness", "groups", "calibration") for e in ("val", "test", "ood_site_b")])
FIGURE_IDS = ("auroc_vs_params", "auroc_vs_fraction", "id_vs_ood", "calibration", "reliability", "selective",
              *[f"fairness-{e}" for e in ("val", "test", "ood_site_b")])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root, _ = shared_store(tmp_path_factory)
    rep = build_report(root, n_boot_fit=20)
    return root, rep, render_html(rep)


def test_report_has_every_plot_and_table(report):
    _, rep, text = report
    for fid in FIGURE_IDS:
        m = re.search(rf'<figure id="fig-{fid}"><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
        assert m, f"figure {fid} missing"
        assert base64.b64decode(m.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    for tid in TABLES:
        assert re.search(rf"<table[^>]*id=\"tbl-{tid}\"", text), f"table {tid} missing"
    assert "72 of 72 runs complete" in text
    assert not re.search(r'src="(?!data:)', text), "report refers to an external file"
    assert "scoring" not in rep.notes  # the store records its scoring as the runner does: no stale-scoring note


def test_report_numbers_match_tables(report):
    root, rep, text = report
    # Data efficiency: bb_large/upstream:big beats the bb_tiny/scratch full-data baseline at the smallest fraction.
    eff = rep.tables["data_efficiency"].set_index(["pretrained", "backbone"])
    assert (eff["baseline"] == "bb_tiny / scratch / fraction 1").all()
    assert eff.loc[("upstream:big", "bb_large"), "fraction_to_match"] == 0.25
    assert eff.loc[("upstream:big", "bb_large"), "censored"] == "below"
    assert eff.loc[("upstream:big", "bb_large"), "fraction_to_match_text"] == "≤ 0.25"  # a bound, not a value
    assert ("scratch", "bb_tiny") not in eff.index  # the baseline is not compared with itself
    # upstream:small bb_tiny crosses the baseline between 0.25 and 0.5 (AUROC linear in log fraction there).
    x = eff.loc[("upstream:small", "bb_tiny")]
    assert 0.25 < x["fraction_to_match"] < 0.5 and x["censored"] == "" and x["n_seeds"] == 2
    # its interval runs past the grid on both sides (two seeds of the curve and two of the baseline): written so
    assert x["lo"] == 0.25 and x["hi"] == np.inf
    assert x["fraction_to_match_text"] == f"{x['fraction_to_match']:.2g} [≤ 0.25, > 1]"
    shown = html_table(text, "tbl-data_efficiency").set_index(["pretrained", "backbone"])
    assert shown.loc[("upstream:small", "bb_tiny"), "fraction_to_match [interval]"] == x["fraction_to_match_text"]
    assert "inf" not in shown.to_numpy().ravel().tolist() and "hi" not in shown.columns
    # The model-size fit of every source and eval set is reported, exponent close to the true 0.3 on test.
    fits = rep.tables["fits_params"]
    assert len(fits) == 6 and (fits["status"] == "ok").all()
    test = fits[fits["eval_set"] == "test"]
    assert ((test["b"] - 0.3).abs() < 0.03).all()
    for b in test["b"]:
        assert f"<td>{b:.4g}</td>" in text
    # Pairwise comparisons: every backbone vs bb_tiny per source, macro and per label, pooled over the two seeds,
    # paired on all 120 test samples, and again on the OOD set; Holm's adjustment over the whole table.
    table = rep.tables["comparisons"]
    assert sorted(set(table["fraction"]), reverse=True) == sorted(FRACTIONS, reverse=True)  # few labels too
    every = table[(table["axis"] == "backbone") & (table["fraction"] == 1.0)]
    # 3 backbones vs bb_tiny, and bb_base vs bb_small, bb_large vs bb_base: 5 per source and set
    assert len(every) == 2 * 3 * 5 * (1 + 2) and set(every["eval_set"]) == {"test", "ood_site_b"}
    # two seeds: Obuchowski–Rockette's original r − 1 = 1 degree of freedom (Hillis's is anti-conservative there)
    assert (every["n_seeds"] == 2).all() and (every["method"] == "or").all() and (every["df"] == 1).all()
    for family in (table[table["label"] == "macro"], table[table["label"] != "macro"]):  # Holm per table
        np.testing.assert_array_equal(family["p_holm"], holm(family["p_value"]))
    tested = table["p_value"].notna()
    assert (table.loc[tested, "p_holm"] >= table.loc[tested, "p_value"]).all()
    # This store's seeds shift both models' scores alike, so some differences are the same on both seeds to the last
    # bit and OR's variance estimate is 0: no test (NaN, also after Holm), where there was p = 0 before.
    assert table.loc[~tested, "p_holm"].isna().all() and (table.loc[~tested, "method"] == "or").all()
    # ... and each pretraining source against scratch (0 images) on every backbone, then the 10k-image source against
    # the 1k one (the step below it): more pretraining wins at each step.
    pre = table[(table["axis"] == "pretrained") & (table["eval_set"] == "test") & (table["label"] == "macro")
                & (table["fraction"] == 1.0)]
    assert list(zip(pre["pretrained"], pre["vs"]))[:3] == [
        ("upstream:small", "scratch"), ("upstream:big", "scratch"), ("upstream:big", "upstream:small")]
    assert len(pre) == 4 * 3 and (pre["diff"] > 0).all()
    assert len(table) == len(FRACTIONS) * 2 * (3 * 5 + 4 * 3) * (1 + 2)
    # A step's reference AUROC is the AUROC its reference has as the compared cell of the step before.
    step = pre.set_index(["backbone", "pretrained", "vs"])["auroc"]
    for bb in BACKBONES:
        assert step[bb, "upstream:big", "upstream:small"] == step[bb, "upstream:big", "scratch"]
        assert (pre.set_index(["backbone", "pretrained", "vs"]).loc[(bb, "upstream:big", "upstream:small"), "auroc_vs"]
                == step[bb, "upstream:small", "scratch"])
    chain = every[(every["eval_set"] == "test") & (every["vs"] != "bb_tiny")]
    assert set(zip(chain["backbone"], chain["vs"])) == {("bb_base", "bb_small"), ("bb_large", "bb_base")}
    dl = every[(every["eval_set"] == "test") & (every["vs"] == "bb_tiny")]
    assert len(dl) == 3 * 3 * 3 and (dl["n"] == 120).all()
    macro, dl = dl[dl["label"] == "macro"], dl[dl["label"] != "macro"]
    big = dl[dl["backbone"] == "bb_large"]
    assert (big["diff"] > 0).all() and (big["diff_lo"] < big["diff"]).all() and (big["diff"] < big["diff_hi"]).all()
    assert ((big["auroc"] - big["auroc_vs"] - big["diff"]).abs() < 1e-12).all()
    # Two images per patient: the test is clustered by patient (60 of them), recomputed here from the predictions
    # of both seeds: the mean AUROCs are the seeds' scikit-learn AUROCs averaged, the p-value or_test's.
    assert (dl["n_patients"] == 60).all()
    row = big.iloc[0]
    runs = load_results(root).query("eval_set == 'test' and fraction == 1.0")
    store = RunStore(root)
    lab = row["label"]
    preds = {}
    for bb in ("bb_large", "bb_tiny"):
        cell = runs[(runs["backbone"] == bb) & (runs["pretrained"] == row["pretrained"])]
        for seed in SEEDS:
            rid = cell[cell["seed"] == seed]["run_id"].iloc[0]
            preds[bb, seed] = store.read_predictions(rid, "test").set_index("sample_id").sort_index()
    first = preds["bb_large", SEEDS[0]]
    y, patient = first[f"label:{lab}"].to_numpy(float), first["patient_id"].to_numpy(object)
    scores = {bb: np.stack([preds[bb, s][f"prob:{lab}"].to_numpy(float) for s in SEEDS])
              for bb in ("bb_large", "bb_tiny")}
    assert row["auroc"] == pytest.approx(np.mean([roc_auc_score(y, p) for p in scores["bb_large"]]), abs=1e-12)
    ref = or_test(y, scores["bb_large"], scores["bb_tiny"], cluster=patient)
    assert (row["p_value"], row["df"]) == (pytest.approx(ref.p_value, rel=1e-12), pytest.approx(ref.df, rel=1e-12))
    # At the study's eval.alpha (here 0.1) the difference's interval is or_test's at that level, and narrower.
    ninety = compare.pairwise_comparisons(root, runs, alpha=0.1)
    r90 = ninety[(ninety["axis"] == "backbone") & (ninety["backbone"] == "bb_large") & (ninety["vs"] == "bb_tiny")
                 & (ninety["pretrained"] == row["pretrained"]) & (ninety["label"] == lab)].iloc[0]
    ref90 = or_test(y, scores["bb_large"], scores["bb_tiny"], alpha=0.1, cluster=patient)
    assert (r90["diff_lo"], r90["diff_hi"]) == (pytest.approx(ref90.lo, rel=1e-12), pytest.approx(ref90.hi, rel=1e-12))
    assert row["diff_lo"] < r90["diff_lo"] < r90["diff_hi"] < row["diff_hi"]
    unclustered = or_test(y, scores["bb_large"], scores["bb_tiny"])
    assert ref.se != pytest.approx(unclustered.se, rel=1e-3)
    # A single seed of each: DeLong's test of that pair, to the last digit.
    one = compare.pairwise_comparisons(root, runs[runs["seed"] == SEEDS[0]])
    one = one[(one["axis"] == "backbone") & (one["backbone"] == "bb_large") & (one["vs"] == "bb_tiny")
              & (one["pretrained"] == row["pretrained"]) & (one["label"] == lab) & (one["fraction"] == 1.0)]
    seed0 = delong_test(y, scores["bb_large"][0], scores["bb_tiny"][0], cluster=patient)
    assert one["method"].item() == "delong" and one["p_value"].item() == pytest.approx(seed0.p_value, rel=1e-12)
    # The macro row: scikit-learn's AUROC averaged over both labels and both seeds, tested by or_test_macro.
    mrow = macro[(macro["backbone"] == "bb_large") & (macro["pretrained"] == row["pretrained"])].iloc[0]
    y_all = first[[f"label:{k}" for k in LABELS]].to_numpy(float)
    both = {bb: np.stack([preds[bb, s][[f"prob:{k}" for k in LABELS]].to_numpy(float) for s in SEEDS])
            for bb in ("bb_large", "bb_tiny")}
    sk = [roc_auc_score(y_all[:, k], run[:, k]) for run in both["bb_large"] for k in range(len(LABELS))]
    assert mrow["auroc"] == pytest.approx(np.mean(sk), abs=1e-12) and mrow["n_patients"] == 60
    mref = or_test_macro(y_all, both["bb_large"], both["bb_tiny"], cluster=patient)
    assert mrow["p_value"] == pytest.approx(mref.p_value, rel=1e-12) and mrow["method"] == "or"
    # Selective prediction: the best model retains a higher AUROC than the smallest at every referral rate.
    sel = rep.tables["selective"].set_index("model")
    assert [m.split(":")[0] for m in sel.index] == ["best", "smallest"]
    assert "best: bb_large / upstream:big" in sel.index
    means = sel.apply(lambda col: col.str.split().str[0].astype(float))
    assert (means.iloc[0] > means.iloc[1]).all()
    assert (means.diff(axis=1).iloc[:, 1:] >= 0).all().all()  # referring the uncertain cases helps both


def test_effective_robustness_is_shown_with_its_interval(report):
    _, rep, text = report
    assert "Effective robustness" in text
    shown = rep.tables["robustness:ood_site_b"]  # seeds and test / OOD patients resampled, the trend refitted
    assert (shown["ci"] == "seeds+patients").all() and (shown["er_lo"] < shown["effective_robustness"]).all()
    assert (shown["effective_robustness"] < shown["er_hi"]).all()


def test_subgroup_comparisons_are_the_paired_tests_within_each_group(report):
    root, rep, _ = report
    table = rep.tables["subgroup_comparisons"]
    # full data only; the groups the runs' metric rows summarise (sex: F, M; age_group has no rows in this store);
    # the same 27 comparisons as the overall table (15 along backbones, 12 along pretraining) on both sets
    assert set(table["fraction"]) == {1.0} and set(zip(table["attribute"], table["group"])) == {("sex", "F"),
                                                                                                ("sex", "M")}
    assert len(table) == 27 * 2 * 2 and set(table["eval_set"]) == {"test", "ood_site_b"}
    np.testing.assert_array_equal(table["p_holm"], holm(table["p_value"]))
    overall = rep.tables["comparisons"]
    keys = ["axis", "eval_set", "pretrained", "backbone", "vs"]
    assert (set(map(tuple, table[keys].drop_duplicates().to_numpy()))
            == set(map(tuple, overall[(overall["fraction"] == 1.0)][keys].drop_duplicates().to_numpy())))
    # one row recomputed from the stored predictions: the women's images of bb_large vs bb_tiny (upstream:big)
    row = table[(table["axis"] == "backbone") & (table["backbone"] == "bb_large") & (table["vs"] == "bb_tiny")
                & (table["pretrained"] == "upstream:big") & (table["eval_set"] == "test")
                & (table["group"] == "F")].iloc[0]
    runs = load_results(root).query("eval_set == 'test' and fraction == 1.0 and pretrained == 'upstream:big'")
    store = RunStore(root)
    preds = {(bb, seed): store.read_predictions(runs[(runs["backbone"] == bb) & (runs["seed"] == seed)]["run_id"]
                                                .iloc[0], "test").set_index("sample_id").sort_index()
             for bb in ("bb_large", "bb_tiny") for seed in SEEDS}
    first = preds["bb_large", SEEDS[0]]
    women = (first["sex"] == "F").to_numpy()
    y = first[[f"label:{k}" for k in LABELS]].to_numpy(float)[women]
    scores = {bb: np.stack([preds[bb, s][[f"prob:{k}" for k in LABELS]].to_numpy(float)[women] for s in SEEDS])
              for bb in ("bb_large", "bb_tiny")}
    sk = np.mean([roc_auc_score(y[:, k], run[:, k]) for run in scores["bb_large"] for k in range(len(LABELS))])
    assert row["auroc"] == pytest.approx(sk, abs=1e-12) and row["n"] == 60 and row["n_patients"] == 60
    ref = or_test_macro(y, scores["bb_large"], scores["bb_tiny"], cluster=first["patient_id"].to_numpy(object)[women])
    assert row["p_value"] == pytest.approx(ref.p_value, rel=1e-12) and row["diff"] == pytest.approx(ref.diff)
    assert row["diff"] > 0 and row["method"] == "or"  # two seeds: OR's original r − 1 degrees of freedom


def test_cli_compare_subgroups(report, capsys, tmp_path):
    root, rep, _ = report
    assert main(["compare", str(root), "--subgroups", "--csv", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    written = pd.read_csv(tmp_path / "s.csv")
    assert len(out) == 1 + 2 + len(written) == 3 + len(rep.tables["subgroup_comparisons"])  # status, caption, header
    assert out[1].startswith("Paired comparisons of the macro AUROC within each patient subgroup, full data")
    assert set(written["group"]) == {"F", "M"}


def test_brier_comparisons_use_the_raw_and_the_validation_fitted_probabilities(report):
    root, rep, _ = report
    table = rep.tables["brier_comparisons"]
    assert len(table) == 27 * 2 * 2 and set(table["scaling"]) == {"raw", "temperature"}  # comparisons x sets x 2
    np.testing.assert_array_equal(table["p_holm"], holm(table["p_value"]))
    row = table[(table["axis"] == "backbone") & (table["backbone"] == "bb_large") & (table["vs"] == "bb_tiny")
                & (table["pretrained"] == "upstream:big") & (table["eval_set"] == "test")].set_index("scaling")
    runs = load_results(root).query("eval_set == 'test' and fraction == 1.0 and pretrained == 'upstream:big'")
    store = RunStore(root)
    preds = {(bb, seed): store.read_predictions(runs[(runs["backbone"] == bb) & (runs["seed"] == seed)]["run_id"]
                                                .iloc[0], "test").set_index("sample_id").sort_index()
             for bb in ("bb_large", "bb_tiny") for seed in SEEDS}

    def brier(bb, scaled):  # sklearn's Brier score per label, averaged; L1 at the stored temperature 2, L2 raw
        per_run = []
        for seed in SEEDS:
            p = preds[bb, seed]
            probs = {"L1": expit(p["logit:L1"] / TEMPERATURES["L1"]) if scaled else p["prob:L1"], "L2": p["prob:L2"]}
            per_run.append(np.mean([brier_score_loss(p[f"label:{k}"], probs[k]) for k in LABELS]))
        return np.mean(per_run)

    for scaled, name in ((False, "raw"), (True, "temperature")):
        assert row.loc[name, "brier"] == pytest.approx(brier("bb_large", scaled), abs=1e-12)
        assert row.loc[name, "brier_vs"] == pytest.approx(brier("bb_tiny", scaled), abs=1e-12)
    # the better-separating large backbone also has the better probabilities, tested over both seeds
    assert (row["diff"] < 0).all() and (row["method"] == "or").all() and (row["n_patients"] == 60).all()
    assert main(["compare", str(root), "--brier"]) == 0


def test_report_identifies_no_patient(report):
    root, _, text = report
    for ident in PATIENTS + SAMPLES:
        assert ident not in text
    assert str(root) not in text  # output_dir in the config is redacted


def test_cli_report_of_partial_store(tmp_path, capsys, caplog):
    # Only bb_tiny/scratch at full data has run (two seeds): the report still renders, says what is missing, and
    # refuses the views that need more cells instead of drawing them from too little.
    keep = {("bb_tiny", "scratch", 1.0, 0), ("bb_tiny", "scratch", 1.0, 1)}
    cfg = make_store(tmp_path / "s", predictions=True, skip=None, only=keep)
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "s"), "-o", str(out), "--n-boot", "5"]) == 0
    assert str(out) in capsys.readouterr().out
    # the CLI logs each long section as it ends, with its seconds (the logger is at INFO for `report`)
    progress = [r.getMessage() for r in caplog.records if r.name == "scaling.study.report"]
    assert progress[0].startswith("report: read 72 runs (") and "s in all)" in progress[0], progress
    assert any(m.startswith("report: paired comparisons (") for m in progress), progress
    assert progress[-1].startswith("report written to")
    text = out.read_text()
    assert "2 of 72 runs complete" in text and cfg.name in text
    assert 'id="fig-calibration"><img' in text and 'id="fig-selective"><img' in text
    assert re.search(r'<p class="note" id="fig-auroc_vs_fraction">[^<]*not enough data', text)
    assert re.search(r"<table[^>]*id=\"tbl-fits-refused\"", text) and "too few points: 1 distinct x" in text


def test_fairness_and_calibration_on_every_set_val_marked_in_sample(report):
    root, rep, text = report
    s = summarise(load_results(root))
    full = s[(s.fraction == 1.0) & (s.label == "macro")]
    for e in ("val", "test", "ood_site_b"):
        fair = html_table(text, f"tbl-fairness-{e}").set_index(["pretrained", "backbone"])
        cal = html_table(text, f"tbl-calibration-{e}").set_index(["pretrained", "backbone"])
        groups = html_table(text, f"tbl-groups-{e}").set_index(["pretrained", "backbone"])
        marked = e == "val"  # threshold and temperature are fitted there
        assert ("eod (in-sample)" in fair.columns) == marked and ("eod" in fair.columns) != marked
        assert ("ece_temp (in-sample)" in cal.columns) == marked and "ece" in cal.columns
        cell = full[(full.eval_set == e) & (full.backbone == "bb_base") & (full.pretrained == "upstream:big")]
        worst = cell[(cell.attribute == "sex") & (cell.metric == "worst_group_auroc")].iloc[0]
        assert fair.loc[("upstream:big", "bb_base"), "worst_group_auroc"] == (
            f"{worst['mean']:.3f} [{worst['lo']:.3f}, {worst['hi']:.3f}]")
        ece = cell[(cell.attribute == "all") & (cell.metric == "ece")].iloc[0]
        assert cal.loc[("upstream:big", "bb_base"), "ece"] == f"{ece['mean']:.3f} [{ece['lo']:.3f}, {ece['hi']:.3f}]"
        female = cell[(cell.attribute == "sex") & (cell.group == "F") & (cell.metric == "auroc")].iloc[0]
        assert groups.loc[("upstream:big", "bb_base"), "sex=F"] == (
            f"{female['mean']:.3f} [{female['lo']:.3f}, {female['hi']:.3f}] (n=60)")
        assert f"id='fairness-{e}'" in text and f"id='calibration-{e}'" in text


def _ece(y, p, n_bins=10):
    """Equal-width-bin ECE by hand (numpy only)."""
    k = np.minimum((p * n_bins).astype(int), n_bins - 1)
    return sum(abs(y[k == b].sum() - p[k == b].sum()) for b in range(n_bins)) / len(y)


def test_reliability_diagrams_pool_labels_and_seeds_per_backbone(report):
    root, rep, text = report
    cfg = study_config(root)
    shown = html_table(text, "tbl-reliability").set_index(["eval_set", "pretrained", "backbone"])
    assert set(shown.index.get_level_values("eval_set")) == {"test", "ood_site_b"}  # val: temperature in-sample
    for e in ("test", "ood_site_b"):
        ys, raw, cal = [], [], []
        for seed in SEEDS:
            rid, _ = run_dir_of(root, cfg, "bb_large", "upstream:big", 1.0, seed)
            pred = RunStore(root).read_predictions(rid, e)
            for lab in LABELS:
                t = TEMPERATURES[lab] or 1.0
                ys.append(pred[f"label:{lab}"].to_numpy())
                raw.append(pred[f"prob:{lab}"].to_numpy())
                cal.append(expit(pred[f"logit:{lab}"].to_numpy() / t))
        y, raw, cal = map(np.concatenate, (ys, raw, cal))
        row = shown.loc[(e, "upstream:big", "bb_large")]
        assert int(row["pairs"]) == len(y) == 2 * 2 * 120
        assert float(row["pooled ECE"]) == pytest.approx(_ece(y, raw), abs=5e-4)  # printed to 4 digits
        assert float(row["pooled ECE (temperature)"]) == pytest.approx(_ece(y, cal), abs=5e-4)
    bins = rep.tables["reliability_bins"]
    one = bins[(bins.eval_set == "test") & (bins.backbone == "bb_large") & (bins.pretrained == "upstream:big")]
    assert list(one.scaling.value_counts().sort_index()) == [10, 10] and one.n.sum() == 2 * 480


def test_report_of_a_one_of_k_study(tmp_path):
    # Two runs of a 3-class task scored by compute_run_metrics(task="multiclass"): the report adds the one-of-K
    # table per set (val's temperature-scaled columns in-sample) with the store's numbers, and its reliability
    # diagrams apply the softmax temperature.
    classes = ("A", "B", "C")
    cfg = dataclasses.replace(study_config(tmp_path / "s"), grid=GridConfig(
        backbones=("bb_tiny", "bb_small"), pretrained=("scratch",), fractions=(1.0,), seeds=(0,)))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=classes))
    store = RunStore(cfg.output_dir)
    for spec in expand_grid(cfg):
        rng = np.random.default_rng(len(spec.backbone))
        preds = {}
        for e, n in (("val", 150), ("test", 200), ("ood_site_b", 120)):
            t = rng.integers(0, 3, n)
            z = 2.5 * (np.eye(3)[t] + rng.normal(size=(n, 3)))
            df = pd.DataFrame({"sample_id": [f"s{e}{i}" for i in range(n)],
                               "patient_id": [f"q{e}{i // 2}" for i in range(n)]})
            for k, c in enumerate(classes):
                df[f"label:{c}"], df[f"logit:{c}"], df[f"prob:{c}"] = np.eye(3)[t][:, k], z[:, k], softmax(z, 1)[:, k]
            preds[e] = df
        rows, info = compute_run_metrics(preds, list(classes), [], EvalConfig(n_boot=50), task="multiclass")
        rid = run_id(cfg, spec)
        store.write_spec(rid, {"run_id": rid, "study": cfg.name, "config_hash": config_hash(cfg),
                               "backbone": spec.backbone, "pretrained": spec.pretrained, "fraction": 1.0, "seed": 0,
                               "n_params": int(BACKBONES[spec.backbone]), "pretrain_images": 0.0,
                               "n_train_images": 100}, "{}\n")
        for e, df in preds.items():
            store.write_predictions(rid, e, df)
        store.write_metrics(rid, rows)
        store.write_meta(rid, {"fitted_on_val": info})
        store.mark_complete(rid)
    rep = build_report(tmp_path / "s", n_boot_fit=5, n_boot_curve=5)
    text = render_html(rep)
    s = summarise(load_results(tmp_path / "s"))
    for e in ("val", "test", "ood_site_b"):
        shown = html_table(text, f"tbl-multiclass-{e}").set_index("backbone")
        temp = "nll_multiclass_temp" + (" (in-sample)" if e == "val" else "")
        for bb in ("bb_tiny", "bb_small"):
            cell = s[(s.eval_set == e) & (s.backbone == bb) & (s.label == "all")].set_index("metric")
            for col, metric in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced_accuracy"),
                                (temp, temp.split()[0])):
                r = cell.loc[metric]
                assert shown.loc[bb, col] == f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
    assert rep.tables["reliability"]["pooled ECE (temperature)"].notna().all()


def test_headline_models_name_one_cell_once_when_the_best_is_the_smallest():
    """The selective-prediction view compares the best cell with the smallest backbone of its source; when the
    smallest is the best (size did not help), it is one entry, not the same curve twice under two names."""
    from scaling.study.tables import headline_models

    def row(backbone, n_params, source, mean):
        return {"metric": "auroc", "label": "macro", "attribute": "all", "group": "all", "eval_set": "test",
                "fraction": 1.0, "backbone": backbone, "n_params": n_params, "pretrained": source,
                "pretrain_images": np.nan, "protocol": "finetune", "shots": 0, "reinit": "none", "mean": mean}

    summary = pd.DataFrame([row("small", 1e6, "scratch", 0.80), row("large", 1e8, "scratch", 0.75),
                            row("large", 1e8, "other", 0.70)])
    models = headline_models(summary)
    assert list(models) == ["best, also the smallest"] and models["best, also the smallest"]["backbone"] == "small"
    summary.loc[1, "mean"] = 0.9
    models = headline_models(summary)
    assert {k: v["backbone"] for k, v in models.items()} == {"best": "large", "smallest": "small"}
    # a set that no cell could score (too small for both classes) picks nobody, rather than failing the report
    assert headline_models(summary.assign(mean=np.nan)) == {}
    # a probe cell is never the headline model, and its runs are never seeds of the fine-tuned cell
    probe = {**row("large", 1e8, "scratch", 0.95), "protocol": "linear_probe"}
    models = headline_models(pd.concat([summary, pd.DataFrame([probe])], ignore_index=True))
    assert models["best"]["protocol"] == "finetune" and models["best"]["backbone"] == "large"
    from scaling.study.compare import cell_runs

    runs = pd.DataFrame({"run_id": ["ft0", "ft1", "lp0", "lp1"], "seed": [0, 1, 0, 1], "backbone": "large",
                         "pretrained": "scratch", "fraction": 1.0, "shots": 0, "reinit": "none",
                         "protocol": ["finetune", "finetune", "linear_probe", "linear_probe"]})
    assert list(cell_runs(runs, dict(models["best"]))["run_id"]) == ["ft0", "ft1"]


def test_selective_bands_over_seeds_combine_the_seeds_spread_with_each_run_s_patient_band(report):
    """Two seeds: each rate's interval is cell_interval of the runs' curves and their own patient-bootstrap bands
    (seed spread + test patients), as every cell interval of the report, not a t-interval of the seeds alone."""
    from scaling.study.aggregate import cell_interval
    from scaling.study.compare import _bootstrap_band, cell_runs, selective_curve, selective_curves

    root, _, _ = report
    df = load_results(root)
    cell = {"backbone": "bb_large", "pretrained": df["pretrained"].iloc[0], "fraction": 1.0}
    got = selective_curves(root, df, {"m": pd.Series(cell)}, n_boot=20).set_index("referral")
    store = RunStore(root)
    runs = cell_runs(df, cell)["run_id"].tolist()
    assert len(runs) == 2 and (got["n_seeds"] == 2).all()
    thresholds = {r: store.read_meta(r).get("fitted_on_val", {}).get("thresholds", {}) for r in runs}
    curves = np.array([selective_curve(store.read_predictions(r, "test"), thresholds=thresholds[r]) for r in runs])
    bands = np.array([_bootstrap_band(store.read_predictions(r, "test"), got.index.to_numpy(), thresholds[r], 20,
                                      0.95, seed=j) for j, r in enumerate(runs)])
    for i, rate in enumerate(got.index):
        lo, hi, _, kind = cell_interval(curves[:, i], bands[:, 0, i], bands[:, 1, i], 0.95)
        assert kind == "seeds+patients" and got.loc[rate, "mean"] == pytest.approx(curves[:, i].mean())
        assert (got.loc[rate, "lo"], got.loc[rate, "hi"]) == (pytest.approx(max(lo, 0)), pytest.approx(min(hi, 1)))


def test_an_ood_set_sharing_test_patients_says_how_its_drop_is_resampled(report, tmp_path_factory, tmp_path):
    # The runs record which OOD sets were resampled together with test (compute_run_metrics(paired=...)); the
    # report says it under that set only.
    _, rep, text = report
    assert rep.paired_sets == [] and "its drop compares images of the same people" not in text
    root, _ = copy_store(tmp_path_factory, tmp_path / "store")
    store = RunStore(root)
    rid = store.run_ids()[0]
    meta = store.read_meta(rid)
    store.write_meta(rid, {**meta, "fitted_on_val": {**meta["fitted_on_val"], "paired_shift": ["ood_site_b"]}})
    paired = build_report(root, n_boot_fit=5, n_boot_curve=5)
    html_text = render_html(paired)
    assert paired.paired_sets == ["ood_site_b"]
    section = html_text.split("<h3 id='ood-ood_site_b'>", 1)[1].split("<h", 1)[0]
    assert "It shares patients with the test set" in section


def test_report_states_the_runs_confidence_level_and_ece_bins(report):
    """The level printed is the study's (1 − eval.alpha) and the ECE binning its eval.ece_bins, not 95 % and 10."""
    _, rep, text = report
    assert rep.confidence == pytest.approx(0.95) and rep.ece_bins == 10
    assert "Intervals: 95% confidence" in text and "ECE (10 equal-width bins)" in text
    other = render_html(dataclasses.replace(rep, confidence=0.9, ece_bins=15))
    assert "95%" not in other and "10 equal-width" not in other
    assert "Intervals: 90% confidence" in other and "90% intervals resample" in other
    assert "90% interval from refitting" in other
    assert "ECE (15 equal-width bins)" in other and "in 15 equal-width bins" in other


def test_data_efficiency_of_one_seed_has_no_interval(report):
    """A one-seed study: data efficiency has nothing to resample, so its lo/hi are n/a, not the estimate twice."""
    from scaling.study.aggregate import plain_cells
    from scaling.study.tables import data_efficiency

    root, _, _ = report
    df = load_results(root)
    one = df[df["seed"] == df["seed"].min()]
    eff = data_efficiency(plain_cells(one), plain_cells(summarise(one)))
    assert len(eff) and eff["fraction_to_match"].notna().all()
    assert eff["lo"].isna().all() and eff["hi"].isna().all() and (eff["n_seeds"] == 1).all()
    two = data_efficiency(plain_cells(df), plain_cells(summarise(df)))
    assert two["lo"].notna().any()


def test_zero_variance_tests_are_one_log_line_per_table_not_a_warning_each(report, caplog):
    import warnings

    root, _, _ = report
    runs = load_results(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MetricWarning escapes, one per test
        with caplog.at_level("WARNING", logger="scaling.study.compare"):
            table = compare.pairwise_comparisons(root, runs)
    untested = int(table["p_value"].isna().sum())
    said = [r.getMessage() for r in caplog.records if r.name == "scaling.study.compare"]
    assert untested > 0 and len(said) == 1
    assert said[0].startswith(f"pairwise comparisons: {untested} paired test(s) had no variation to refer the "
                              f"difference to (variance estimate 0)")


def test_comparison_csvs_name_the_holm_family_of_every_row(report, tmp_path):
    """The store's comparison CSVs are self-describing: each row names the rows its p_holm was adjusted over, and
    the subgroup and Brier comparisons are written beside the macro and per-label ones."""
    from scaling.study.runner import COMPARISON_FILES, _write_report_files

    _, rep, _ = report
    _write_report_files(RunStore(tmp_path), rep)
    tables = {key: pd.read_csv(tmp_path / name) for key, name in COMPARISON_FILES.items()}
    assert set(COMPARISON_FILES.values()) == {"comparisons.csv", "comparisons_subgroups.csv", "comparisons_brier.csv"}
    main_table = tables["comparisons"]
    assert set(main_table["holm_family"]) == {"macro_auroc", "label_auroc"}
    assert (main_table["holm_family"] == "macro_auroc").eq(main_table["label"] == "macro").all()
    assert set(tables["subgroup_comparisons"]["holm_family"]) == {"subgroup_auroc"}
    assert set(tables["brier_comparisons"]["holm_family"]) == {"brier"}
    for table in tables.values():  # Holm's adjustment is over the rows of one family, and only those
        for _, family in table.groupby("holm_family"):
            np.testing.assert_allclose(family["p_holm"], holm(family["p_value"]), rtol=1e-12)
    assert len(tables["brier_comparisons"]) == len(rep.tables["brier_comparisons"]) == 27 * 2 * 2
    assert "holm_family" not in html_table(render_html(rep), "tbl-comparisons").columns  # one family per HTML table


def test_a_cell_with_fewer_seeds_is_marked_in_every_summary_table(tmp_path):
    """A mean over 1 of 2 seeds is never shown as a full one: not in the headline, and not in the calibration,
    fairness, subgroup and distribution-shift tables either."""
    make_store(tmp_path / "s", skip={("bb_small", "scratch", 1.0, 1)})
    rep = build_report(tmp_path / "s", n_boot_fit=5)
    for key, column in (("headline", "test"), ("calibration:test", "ece"), ("fairness:val", "worst_group_auroc"),
                        ("groups:test", "sex=F"), ("ood:ood_site_b", "ood_site_b AUROC")):
        t = rep.tables[key]
        full = t["fraction"] == 1.0 if "fraction" in t else True  # the per-group table is at full data only
        short = (t["backbone"] == "bb_small") & (t["pretrained"] == "scratch") & full
        marked = t.loc[short, column].str.contains(" (1/2 seeds)", regex=False)
        assert marked.all(), (key, t.loc[short, column].tolist())
        assert not t.loc[~short, column].str.contains("seeds").any(), key


def test_data_efficiency_figure_marks_each_crossing_as_the_table_reads_it(report):
    """A crossing inside the grid is a ``|`` at its fraction, one at the smallest fraction or below a ``<`` there
    (the table's ``≤``), one never reached a ``>`` at the largest fraction (the table's ``>``), on the baseline."""
    from scaling.study import plots
    from scaling.study.aggregate import plain_cells

    root, rep, _ = report
    eff = rep.tables["data_efficiency"]
    summary = plain_cells(summarise(load_results(root)))
    smallest, largest = min(FRACTIONS), max(FRACTIONS)
    # The hand-made store's crossings are all at the smallest fraction or inside the grid: add one never reached.
    never = eff.iloc[[0]].assign(fraction_to_match=np.nan, censored="above", fraction_to_match_text=f"> {largest:g}")
    eff = pd.concat([eff, never.assign(pretrained=eff["pretrained"].iloc[-1])], ignore_index=True)
    assert set(eff["censored"]) >= {"below", "above"}
    fig = plots.auroc_vs_fraction(summary, eff)
    base = float(eff["baseline_auroc"].iloc[0])
    drawn = sorted((ax.get_title().rsplit(": AUROC vs data", 1)[0], line.get_marker(), float(line.get_xdata()[0]))
                   for ax in fig.axes for line in ax.get_lines()
                   if line.get_marker() in ("|", "<", ">") and float(line.get_ydata()[0]) == base)
    want = sorted((r.pretrained, ">" if r.censored == "above" else "<" if r.censored == "below" else "|",
                   largest if r.censored == "above" else float(r.fraction_to_match))
                  for r in eff.itertuples(index=False))
    assert drawn == want
    assert all(x == smallest for _, m, x in drawn if m == "<")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "matches it at this fraction or less" in labels and \
        "does not match it (more than the largest fraction)" in labels

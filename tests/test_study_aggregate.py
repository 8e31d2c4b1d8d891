"""Aggregation of a hand-made run store: the tidy table, the seed summary, and bad stores (partial, failed, mixed)."""

import json
import math
import re
import shutil

import pandas as pd
import pytest
from scipy import stats
from study_store import (EVAL_SETS, LABELS, SEED_SHIFT, auroc_gap, copy_store, expected_error, run_dir_of,
                         shared_store)

from scaling.study.__main__ import main
from scaling.study.aggregate import (LOW_DF, MixedStudyError, headline_table, interval_text, load_results,
                                     load_study, run_status, summarise)
from scaling.study.grid import config_hash as cfg_hash
from scaling.study.store import RunStore

ROWS_PER_RUN = len(EVAL_SETS) * (len(LABELS) + 1) * (13 + 2 * 5 + 3) + (len(LABELS) + 1) * 3  # + OOD shift rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return shared_store(tmp_path_factory)


def _one(df, **kw):
    m = df
    for k, v in kw.items():
        m = m[m[k] == v]
    assert len(m) == 1, (kw, len(m))
    return m.iloc[0]


def test_tidy_table(store):
    root, _ = store
    df = load_results(root)
    assert len(df) == 72 * ROWS_PER_RUN
    assert {"run_id", "backbone", "n_params", "pretrained", "pretrain_images", "fraction", "n_train_images", "seed",
            "eval_set", "label", "attribute", "group", "metric", "value", "lo", "hi", "n"} <= set(df.columns)
    r = _one(df, backbone="bb_base", pretrained="upstream:big", fraction=0.5, seed=1, eval_set="test", label="macro",
             attribute="all", group="all", metric="auroc")
    assert r["n_params"] == 1.6e6 and r["pretrain_images"] == 10000 and r["n_train_images"] == 200
    assert r["value"] == pytest.approx(1 - expected_error("bb_base", "upstream:big", 0.5, 1))
    assert (load_study(root).runs["status"] == "complete").sum() == 72


def test_summary_over_seeds(store):
    root, _ = store
    s = summarise(load_results(root))
    r = _one(s, backbone="bb_base", pretrained="upstream:big", fraction=1.0, eval_set="test", label="macro",
             attribute="all", group="all", metric="auroc")
    values = [1 - expected_error("bb_base", "upstream:big", 1.0, seed) for seed in SEED_SHIFT]
    mean = sum(values) / 2
    sd = abs(values[0] - values[1]) / math.sqrt(2)
    # each run's stored patient interval is value ± 0.03: se = 0.03 / z; seeds and patients combined
    se = 0.03 / stats.norm.ppf(0.975)
    var = sd**2 / 2 + se**2
    dof = var**2 * (2 - 1) / (sd**2 / 2) ** 2
    half = stats.t.ppf(0.975, dof) * math.sqrt(var)
    assert r["mean"] == pytest.approx(mean) and r["sd"] == pytest.approx(sd)
    assert (r["lo"], r["hi"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert r["ci_kind"] == "seeds+patients" and r["ci_df"] == pytest.approx(dof)
    assert r["n_seeds"] == 2 and r["complete"]
    assert len(s) == 72 // 2 * ROWS_PER_RUN
    wide = headline_table(s)
    assert list(wide.columns[:4]) == ["pretrained", "backbone", "n_params", "fraction"]
    assert wide.columns[4] == "test" and len(wide) == 36
    assert f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]" in set(wide["test"])


def test_partial_and_failed_runs_are_reported(tmp_path_factory, tmp_path, caplog):
    root, cfg = copy_store(tmp_path_factory, tmp_path / "s")
    for cell in (("bb_tiny", "scratch", 1.0, 1), ("bb_small", "scratch", 1.0, 1), ("bb_base", "scratch", 1.0, 1)):
        shutil.rmtree(run_dir_of(root, cfg, *cell)[1])
    store = RunStore(root)
    # bb_small seed 1 failed (its error mentions an image path), bb_base seed 1 is still running.
    spec = json.loads((run_dir_of(root, cfg, "bb_tiny", "scratch", 1.0, 0)[1] / "spec.json").read_text())
    rid, _ = run_dir_of(root, cfg, "bb_small", "scratch", 1.0, 1)
    store.write_spec(rid, {**spec, "run_id": rid, "backbone": "bb_small", "seed": 1}, "{}\n")
    try:
        raise OSError("cannot decode /data/chexpert/patient77731/study1/view1_frontal.jpg")
    except OSError as e:
        store.mark_failed(rid, e)
    rid_run, _ = run_dir_of(root, cfg, "bb_base", "scratch", 1.0, 1)
    store.write_spec(rid_run, {**spec, "run_id": rid_run, "backbone": "bb_base", "seed": 1}, "{}\n")

    status = run_status(root).set_index("run_id")
    assert status.loc[rid, "status"] == "failed"
    assert "cannot decode <redacted>" in status.loc[rid, "reason"] and "patient77731" not in status.loc[rid, "reason"]
    assert status.loc[rid_run, "status"] == "partial" and "no DONE" in status.loc[rid_run, "reason"]
    assert (status["status"] == "not started").sum() == 1  # bb_tiny seed 1: no directory at all

    with caplog.at_level("WARNING"):
        df = load_results(root)
        s = summarise(df)
    assert "failed" in caplog.text and "has 1 of 2 seeds" in caplog.text
    short = _one(s, backbone="bb_small", pretrained="scratch", fraction=1.0, eval_set="test", label="macro",
                 attribute="all", group="all", metric="auroc")
    assert not short["complete"] and short["n_runs"] == 1 and short["n_seeds_expected"] == 2
    value = 1 - expected_error("bb_small", "scratch", 1.0, 0)
    assert short["ci_kind"] == "bootstrap" and short["mean"] == pytest.approx(value)
    assert (short["lo"], short["hi"]) == (pytest.approx(value - 0.03), pytest.approx(value + 0.03))
    wide = headline_table(s)
    cell = wide[(wide["backbone"] == "bb_small") & (wide["pretrained"] == "scratch") & (wide["fraction"] == 1.0)]
    assert cell["test"].iloc[0].endswith("(1/2 seeds)")


def test_mixed_studies_refused(tmp_path_factory, tmp_path, capsys):
    root, cfg = copy_store(tmp_path_factory, tmp_path / "s")
    rid, d = run_dir_of(root, cfg, "bb_tiny", "scratch", 1.0, 0)
    spec = json.loads((d / "spec.json").read_text())
    other = "bb-tiny__scratch__f1__s0__otherconf"
    RunStore(root).write_spec(other, {**spec, "run_id": other, "config_hash": "0123456789ab"}, "{}\n")
    RunStore(root).write_metrics(other, RunStore(root).read_metrics(rid))
    RunStore(root).mark_complete(other)
    with pytest.raises(MixedStudyError, match="2 study configs.*allow_mixed"):
        load_results(root)
    assert main(["summary", str(root)]) == 2
    err = capsys.readouterr().err
    # both configs with their run counts (the one of study.yaml marked), and both ways out
    assert f"{spec['config_hash']} (handmade: 72 runs, 72 complete, the config in study.yaml)" in err
    assert "0123456789ab (handmade: 1 run, 1 complete)" in err
    assert "--config-hash HASH" in err and "--allow-mixed" in err
    s = summarise(load_results(root, allow_mixed=True))
    assert set(s["config_hash"]) == {spec["config_hash"], "0123456789ab"}

    # one config chosen: its runs only, and the others named as left out
    one = load_study(root, config_hash="0123456789ab")
    assert list(one.runs["run_id"]) == [other] and set(one.results["run_id"]) == {other}
    assert one.left_out.startswith(f"{spec['config_hash']} (handmade: 72 runs")
    assert set(load_results(root, config_hash=spec["config_hash"])["run_id"]) == set(RunStore(root).run_ids()) - {
        other}
    assert main(["summary", str(root), "--config-hash", "0123456789ab"]) == 0
    assert "1/1 runs complete" in capsys.readouterr().out
    assert main(["summary", str(root), "--config-hash", "feedfacecafe"]) == 2
    err = capsys.readouterr().err
    assert "holds no run of config 'feedfacecafe'" in err and "0123456789ab (handmade: 1 run" in err


def test_a_run_with_only_its_failure_record_is_counted_once_as_its_cell(tmp_path_factory, tmp_path, capsys):
    """A run that failed before writing spec.json (a store written by an older version) is matched to the cell of
    study.yaml's grid that has its run id, not listed again as 'not started'."""
    root, cfg = copy_store(tmp_path_factory, tmp_path / "s")
    rid, d = run_dir_of(root, cfg, "bb_small", "upstream:big", 0.5, 1)
    shutil.rmtree(d)
    try:
        raise RuntimeError("cannot load hub weights: offline mode")
    except RuntimeError as e:
        RunStore(root).mark_failed(rid, e)
    assert sorted(p.name for p in d.iterdir()) == ["FAILED.json"]
    status = run_status(root)
    assert len(status) == 72 and (status["status"] == "not started").sum() == 0
    row = status.set_index("run_id").loc[rid]
    assert (row["status"], row["backbone"], row["pretrained"], row["fraction"], row["seed"]) == (
        "failed", "bb_small", "upstream:big", 0.5, 1)
    assert "offline mode" in row["reason"] and row["config_hash"] == cfg_hash(cfg)
    assert main(["summary", str(root)]) == 0
    assert "71/72 runs complete (71 complete, 1 failed)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--metric", "aucroc"], "no overall rows (attribute all) for metric 'aucroc' and label 'macro'. Metrics: "
                             "auprc, aurc, auroc, auroc_drop,"),
    (["--label", "Edmea"], "no overall rows (attribute all) for metric 'auroc' and label 'Edmea'. Labels with "
                           "auroc: L1, L2, macro."),
    (["--metric", "worst_group_auroc"], "worst_group_auroc is stored under --attribute sex."),
    (["--attribute", "race"], "no rows of attribute 'race' in the complete runs; attributes: sex (--attribute)"),
])
def test_summary_of_nothing_is_an_error_listing_what_there_is(store, capsys, args, message):
    root, _ = store
    assert main(["summary", str(root), *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Empty DataFrame" not in captured.out


def test_summary_of_subgroups(store, capsys):
    root, _ = store
    assert main(["summary", str(root), "--attribute", "sex", "--metric", "worst_group_auroc"]) == 0
    out = capsys.readouterr().out
    worst = [1 - expected_error("bb_large", "upstream:big", 1.0, seed) - auroc_gap("bb_large") / 2
             for seed in SEED_SHIFT]
    row = next(line for line in out.splitlines() if "upstream:big" in line and "bb_large" in line
               and re.search(r"\s1\.00?\s", line))
    assert f"{sum(worst) / 2:.3f} [" in row
    assert main(["summary", str(root), "--attribute", "sex"]) == 0  # auroc per group: F and M rows per cell
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("auroc (label macro, per group of sex): mean over seeds [95% interval: seeds and test "
                        "patients], one column per evaluation set; (df x): fewer than 10 degrees of freedom")
    assert lines[2].split()[:6] == ["pretrained", "backbone", "n_params", "fraction", "group", "test"]
    assert sum(" F " in line for line in lines) == 36 and sum(" M " in line for line in lines) == 36


def test_cli_summary(store, capsys):
    root, _ = store
    assert main(["summary", str(root)]) == 0
    out = capsys.readouterr().out
    assert "72/72 runs complete" in out and "ood_site_b" in out and "bb_large" in out
    assert re.search(r"bb_large\s+6400000\s", out) and "6400000.0" not in out  # parameter counts as integers
    # the table says what it shows: metric, label and the intervals' level
    assert out.splitlines()[1].startswith("auroc (label macro): mean over seeds [95% interval: seeds and test")
    assert main(["summary", str(root), "--metric", "ece", "--label", "L1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("ece (label L1): mean over seeds [95% interval")


def test_damaged_records_are_named_and_do_not_hide_the_rest_of_the_study(tmp_path_factory, tmp_path, capsys):
    """A spec.json that is not an object, a metrics.parquet that is not a metrics table and an unreadable
    FAILED.json each mark their own run (the reason names the file); summary and report still cover the rest. A
    mistyped store path is an error (exit 2), not an empty report written into a new directory."""
    import pandas as pd

    root, cfg = copy_store(tmp_path_factory, tmp_path / "s")
    bad_spec, d1 = run_dir_of(root, cfg, "bb_tiny", "scratch", 1.0, 0)
    bad_metrics, d2 = run_dir_of(root, cfg, "bb_small", "scratch", 1.0, 0)
    bad_failure, d3 = run_dir_of(root, cfg, "bb_base", "scratch", 1.0, 0)
    (d1 / "spec.json").write_text("[1, 2, 3]")
    pd.DataFrame({"x": [1.0]}).to_parquet(d2 / "metrics.parquet")
    (d3 / "DONE").unlink()
    (d3 / "FAILED.json").write_text("{not json")
    status = run_status(root).set_index("run_id")
    assert status.loc[bad_spec, "status"] == "partial" and "spec.json: expected a JSON object, got list" in \
        status.loc[bad_spec, "reason"]
    assert status.loc[bad_failure, "status"] == "failed" and "FAILED.json unreadable" in \
        status.loc[bad_failure, "reason"]
    study = load_study(root)
    assert study.runs.set_index("run_id").loc[bad_metrics, "status"] == "invalid"
    assert "not a metrics table (no column ['eval_set', 'label', 'metric', 'value'])" in \
        study.runs.set_index("run_id").loc[bad_metrics, "reason"]
    assert set(study.results["run_id"]) == set(status[status["status"] == "complete"].index) - {bad_metrics}
    assert main(["summary", str(root)]) == 0
    # the run without a readable spec is placed in its cell by its run id (study.yaml's grid): counted once
    assert "69/72 runs complete (69 complete, 1 failed, 1 invalid, 1 partial)" in capsys.readouterr().out
    assert status.loc[bad_spec, ["backbone", "pretrained", "fraction", "seed"]].tolist() == ["bb_tiny", "scratch",
                                                                                              1.0, 0]

    typo = tmp_path / "stor"
    for command in (["summary", str(typo)], ["report", str(typo)]):
        assert main(command) == 2
        assert f"{typo} is not a run store (it has neither runs/ nor study.yaml)" in capsys.readouterr().err
    assert not typo.exists()


def test_cli_compare(store, capsys, tmp_path):
    root, _ = store
    assert main(["compare", str(root), "--csv", str(tmp_path / "c.csv")]) == 0
    out = capsys.readouterr().out
    every = pd.read_csv(tmp_path / "c.csv")
    macro = every[every["label"] == "macro"]
    # the macro rows are printed, one line each (plus the header), on test and the OOD set, along both axes
    assert len(out.strip().splitlines()) == 1 + 1 + 1 + len(macro)  # status line, caption, header, rows
    assert out.splitlines()[1] == ("Paired comparisons of the macro AUROC: diff = compared cell − vs, [diff_lo, "
                                   "diff_hi] at 95%; p_holm adjusted over the rows of one holm_family (macro_auroc: "
                                   "the macro-AUROC comparisons (the study's questions: the primary family))")
    assert set(macro["axis"]) == {"backbone", "pretrained"} and set(macro["eval_set"]) == {"test", "ood_site_b"}
    assert (macro["method"] == "or").all() and f" {LABELS[0]} " not in out  # two seeds: OR's r − 1 df
    assert main(["compare", str(root), "--label", "Edema"]) == 0  # not a label of this study
    assert "no comparison" in capsys.readouterr().out


def test_common_samples_keeps_the_ids_every_run_scored_in_the_first_runs_order():
    from scaling.study.store import common_samples

    a = pd.DataFrame({"sample_id": ["s3", "s1", "s2", "s9"]})
    b = pd.DataFrame({"sample_id": ["s1", "s2", "s3", "s7"]})
    c = pd.DataFrame({"sample_id": ["s2", "s3", "s4", "s9"]})
    assert list(common_samples([a, b, c])) == ["s3", "s2"]
    assert list(common_samples([a])) == ["s3", "s1", "s2", "s9"]


def _tidy(cells) -> pd.DataFrame:
    """A hand-made tidy table: ``cells`` maps (backbone, metric) to the (value, lo, hi) of each seed's run."""
    rows = []
    for (backbone, metric), runs in cells.items():
        for seed, (value, lo, hi) in enumerate(runs):
            rows.append({"run_id": f"{backbone}-{metric}-s{seed}", "backbone": backbone, "n_params": 1e6,
                         "pretrained": "scratch", "pretrain_images": 0, "fraction": 1.0, "protocol": "finetune",
                         "shots": 0, "reinit": "none", "seed": seed, "n_train_images": 100, "eval_set": "test",
                         "label": "macro", "attribute": "all", "group": "all", "metric": metric, "value": value,
                         "lo": lo, "hi": hi, "n": 25})
    return pd.DataFrame(rows)


def _by_hand(values, lo, hi, confidence):
    """mean ± t(df)·√V, V = S²/k + mean_j se_j², se_j = (hi_j − lo_j)/(2z), df = V²(k − 1)/(S²/k)² (Satterthwaite)."""
    values, lo, hi = (pd.Series(x, dtype=float) for x in (values, lo, hi))
    k = len(values)
    z = stats.norm.ppf(0.5 + confidence / 2)
    seed_term = values.var(ddof=1) / k
    patient_term = (((hi - lo) / (2 * z)) ** 2).mean()
    var = seed_term + patient_term
    dof = var**2 * (k - 1) / seed_term**2 if seed_term > 0 else math.inf
    q = stats.t.ppf(0.5 + confidence / 2, dof) if math.isfinite(dof) else z
    return values.mean() - q * math.sqrt(var), values.mean() + q * math.sqrt(var), dof


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_summary_interval_combines_seeds_and_test_patients(confidence):
    """Several seeds scored on one test set: the interval holds the seed spread and the patient uncertainty, with
    Welch–Satterthwaite degrees of freedom; identical seeds leave the patient term alone (df = ∞, not zero width)."""
    three = [(0.70, 0.64, 0.75), (0.74, 0.69, 0.80), (0.72, 0.68, 0.76)]
    same = [(0.72398, 0.652, 0.755), (0.72391, 0.636, 0.757)]  # two seeds 7e-5 apart on 25 images
    s = summarise(_tidy({("three", "auroc"): three, ("same", "auroc"): same}), confidence)
    r = _one(s, backbone="three")
    lo, hi, dof = _by_hand(*zip(*three), confidence)
    assert r["ci_kind"] == "seeds+patients" and r["n_seeds"] == 3
    assert (r["lo"], r["hi"], r["ci_df"]) == (pytest.approx(lo), pytest.approx(hi), pytest.approx(dof))
    # by hand, written out: S² = 4e-4, V = 4e-4/3 + mean(se²), 2 ≤ df
    assert (hi - lo) > 2 * stats.t.ppf(0.5 + confidence / 2, 2) * math.sqrt(4e-4 / 3)
    r = _one(s, backbone="same")
    lo, hi, dof = _by_hand(*zip(*same), confidence)
    assert r["ci_kind"] == "seeds+patients" and r["ci_df"] > 1e6
    assert (r["lo"], r["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    # the seed-only t-interval here was [0.72353, 0.72436] (0.0008 wide) at 95 %; each run alone is ~0.11 wide
    assert r["hi"] - r["lo"] > 0.08


def test_identical_seeds_are_counted_as_one_model_and_few_degrees_of_freedom_are_shown():
    """A linear probe of pretrained features on every training image is the same model whatever the seed: the
    summary counts its distinct models and the printed cell says so; its interval stays the patient term alone.
    An interval resting on few degrees of freedom (a seed term from two seeds) is printed with them, a
    patient-dominated one is not."""
    probe = [(0.744, 0.714, 0.774), (0.744, 0.714, 0.774)]  # two seeds, one model (bit-identical runs)
    spread = [(0.49, 0.44, 0.54), (0.55, 0.50, 0.60)]  # seed term dominates: df ≈ 3
    close = [(0.700, 0.60, 0.80), (0.705, 0.605, 0.805)]  # patient term dominates: df in the thousands
    s = summarise(_tidy({("probe", "auroc"): probe, ("spread", "auroc"): spread, ("close", "auroc"): close}))
    r = _one(s, backbone="probe")
    lo, hi, dof = _by_hand(*zip(*probe), 0.95)
    assert (r["n_seeds"], r["n_models"], r["ci_kind"], r["ci_df"]) == (2, 1, "seeds+patients", math.inf)
    assert (r["lo"], r["hi"]) == (pytest.approx(lo), pytest.approx(hi)) and hi - lo == pytest.approx(0.06)
    assert (_one(s, backbone="spread")["n_models"], _one(s, backbone="close")["n_models"]) == (2, 2)
    _, _, spread_df = _by_hand(*zip(*spread), 0.95)
    _, _, close_df = _by_hand(*zip(*close), 0.95)
    assert spread_df < LOW_DF < close_df
    cells = headline_table(s).set_index("backbone")["test"]
    assert cells["probe"] == "0.744 [0.714, 0.774] (2 seeds, 1 model)"
    assert cells["spread"].endswith(f"] (df {math.floor(spread_df * 10) / 10:g})") and cells["close"].endswith("]")
    assert interval_text(0.5, 0.4, 0.6, 9.96) == "0.500 [0.400, 0.600] (df 9.9)"  # rounded down: below 10
    assert interval_text(0.5, 0.4, 0.6, math.nan) == "0.500 [0.400, 0.600]"  # one run's bootstrap: no df


def test_summary_interval_kinds_and_clipping_to_the_metric_range():
    """No bootstrap interval: the t-interval across seeds; one seed: its bootstrap interval (or none); the bounds are
    clipped to the metric's natural range, and a metric without one is not clipped."""
    nan = math.nan
    s = summarise(_tidy({
        ("noboot", "auroc"): [(0.60, nan, nan), (0.64, nan, nan)],
        ("wide", "auroc"): [(0.30, 0.10, 0.50), (0.62, 0.40, 0.85)],
        ("wide", "auroc_drop"): [(-0.9, -0.99, -0.6), (-0.3, -0.5, -0.1)],
        ("wide", "nll"): [(0.05, 0.01, 0.09), (0.60, 0.4, 0.9)],
        ("wide", "ece_temp"): [(0.02, 0.0, 0.05), (0.30, 0.2, 0.4)],
        ("wide", "odd_metric"): [(0.05, 0.01, 0.09), (0.60, 0.4, 0.9)],
        ("one", "auroc"): [(0.61, 0.55, 0.66)],
        ("bare", "auroc"): [(0.61, nan, nan)],
    }))
    r = _one(s, backbone="noboot")
    half = stats.t.ppf(0.975, 1) * (0.04 / math.sqrt(2)) / math.sqrt(2)
    assert r["ci_kind"] == "seeds" and r["ci_df"] == 1
    assert (r["lo"], r["hi"]) == (pytest.approx(0.62 - half), pytest.approx(0.62 + half))
    for metric, runs, bounds in (("auroc", [(0.30, 0.10, 0.50), (0.62, 0.40, 0.85)], (0.0, 1.0)),
                                 ("auroc_drop", [(-0.9, -0.99, -0.6), (-0.3, -0.5, -0.1)], (-1.0, 1.0)),
                                 ("ece_temp", [(0.02, 0.0, 0.05), (0.30, 0.2, 0.4)], (0.0, 1.0))):
        lo, hi, _ = _by_hand(*zip(*runs), 0.95)
        r = _one(s, backbone="wide", metric=metric)
        assert lo < bounds[0]  # the unclipped interval runs past the range
        assert (r["lo"], r["hi"]) == (bounds[0], pytest.approx(min(hi, bounds[1])))
    r = _one(s, backbone="wide", metric="nll")
    lo, hi, _ = _by_hand([0.05, 0.60], [0.01, 0.4], [0.09, 0.9], 0.95)
    assert r["lo"] == 0.0 and r["hi"] == pytest.approx(hi)  # NLL: [0, ∞)
    r = _one(s, backbone="wide", metric="odd_metric")
    assert (r["lo"], r["hi"]) == (pytest.approx(lo), pytest.approx(hi))  # no known range: not clipped
    r = _one(s, backbone="one")
    assert r["ci_kind"] == "bootstrap" and (r["lo"], r["hi"]) == (0.55, 0.66) and math.isnan(r["ci_df"])
    r = _one(s, backbone="bare")
    assert r["ci_kind"] == "none" and math.isnan(r["lo"]) and math.isnan(r["hi"])


def test_metric_ranges():
    from scaling.study.aggregate import metric_range

    assert metric_range("auroc") == metric_range("auroc@exam_max") == metric_range("ece_temp") == (0.0, 1.0)
    assert metric_range("eod") == metric_range("worst_group_auroc") == metric_range("balanced_accuracy") == (0, 1)
    assert metric_range("auroc_drop") == (-1.0, 1.0) and metric_range("brier_multiclass_temp") == (0.0, 2.0)
    assert metric_range("nll") == (0.0, math.inf) and metric_range("something_new") == (-math.inf, math.inf)


def test_the_confidence_follows_the_runs_eval_alpha(tmp_path_factory, tmp_path, capsys):
    """The runs record eval.alpha with their metrics; the summary (and the CLI) state intervals at 1 − alpha."""
    root, cfg = copy_store(tmp_path_factory, tmp_path / "s")
    assert load_study(root).confidence == pytest.approx(0.95)  # no record: study.yaml's eval.alpha (0.05)
    store = RunStore(root)
    for rid in store.run_ids():
        meta = store.read_meta(rid)
        meta["fitted_on_val"] = {**meta.get("fitted_on_val", {}), "alpha": 0.1, "ece_bins": 15}
        store.write_meta(rid, meta)
    study = load_study(root)
    assert study.confidence == pytest.approx(0.9) and study.ece_bins == 15
    assert main(["summary", str(root), "--csv", str(tmp_path / "s.csv")]) == 0
    printed = pd.read_csv(tmp_path / "s.csv")
    expected = summarise(study.results, 0.9)
    r = _one(expected, backbone="bb_base", pretrained="upstream:big", fraction=1.0, eval_set="test", label="macro",
             attribute="all", group="all", metric="auroc")
    p = _one(printed, backbone="bb_base", pretrained="upstream:big", fraction=1.0, eval_set="test", label="macro",
             attribute="all", group="all", metric="auroc")
    assert (p["lo"], p["hi"]) == (pytest.approx(r["lo"]), pytest.approx(r["hi"]))
    assert r["hi"] - r["lo"] < _one(summarise(study.results, 0.95), backbone="bb_base", pretrained="upstream:big",
                                    fraction=1.0, eval_set="test", label="macro", attribute="all", group="all",
                                    metric="auroc")[["lo", "hi"]].diff().iloc[-1]


def test_a_finished_runs_failure_is_read_from_its_records_not_from_file_times(tmp_path_factory, tmp_path):
    """A finished run whose later work failed stays ``failed`` whatever the files' times (a store copied with
    ``cp -r`` gets new times in copy order); a record written before records said ``after_done`` is judged by the
    times it was written with."""
    import os

    from scaling.study.store import RunStore

    root, cfg = copy_store(tmp_path_factory, tmp_path / "s")
    rid, d = run_dir_of(root, cfg, "bb_tiny", "scratch", 1.0, 0)
    store = RunStore(root)
    store.mark_failed(rid, RuntimeError("predicting ood_new: weights damaged"))
    assert store.read_failure(rid)["after_done"] is True and store.status(rid) == "failed"
    os.utime(d / "FAILED.json", ns=(0, 0))  # copied before DONE and evaluation.json
    assert store.status(rid) == "failed" and store.is_complete(rid)
    store.clear_failure(rid)
    assert store.status(rid) == "complete"

    legacy = d / "FAILED.json"
    legacy.write_text('{"error": "RuntimeError: old", "traceback": ""}')
    os.utime(legacy, ns=(0, 0))
    assert store.status(rid) == "complete"  # older than DONE: the work succeeded after it
    now = (d / "DONE").stat().st_mtime_ns + 10**9
    os.utime(legacy, ns=(now, now))
    assert store.status(rid) == "failed"

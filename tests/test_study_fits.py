"""Scaling-law fits recover known exponents, refuse too few points, and tabulate a hand-made study."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from study_store import B_PARAMS, shared_store

from scaling.metrics.bootstrap import ClusterBootstrap
from scaling.study.aggregate import load_results
from scaling.study.fits import FitError, fit_power_law, fit_table, patient_replicates


def test_recovers_exact_law():
    x = np.geomspace(1e5, 1e9, 6)
    y = 2.0 * x ** -0.3 + 0.07
    f = fit_power_law(x, y, n_boot=20)
    assert f.b == pytest.approx(0.3, abs=1e-3) and f.c == pytest.approx(0.07, abs=1e-3)
    assert f.a == pytest.approx(2.0, rel=1e-2) and f.rmse < 1e-6
    np.testing.assert_allclose(f.predict(x), y, atol=1e-6)


def test_recovers_exponent_from_noisy_seeds():
    rng = np.random.default_rng(0)
    x = np.repeat(np.geomspace(1e5, 2.56e7, 5), 3)  # 5 model sizes x 3 seeds
    y = 0.3 * (x / 1e5) ** -0.35 + 0.05 + rng.normal(0, 0.003, x.size)
    f = fit_power_law(x, y, n_boot=200, seed=1)
    assert abs(f.b - 0.35) < 0.05
    # Fixed data, so the interval is fixed too (b = 0.333, CI [0.316, 0.351]); the 0.01 slack keeps the check from
    # hinging on the last digit of an optimizer's convergence across scipy versions.
    assert f.b_ci[0] - 0.01 < 0.35 < f.b_ci[1] + 0.01 and f.b_ci[1] - f.b_ci[0] < 0.15
    assert abs(f.c - 0.05) < 0.02 and f.n_points == 15 and f.n_x == 5 and f.n_boot > 150


def test_widened_intervals_stay_where_the_law_is_defined():
    # No error floor (c = 0) and two noisy seeds per size: widening the bootstrap to Student's tails about its median
    # reached c < 0 (-0.139 for this draw) for an error floor that is >= 0 by definition.
    x = np.repeat([1e3, 3e3, 1e4, 3e4, 1e5], 2)
    y = 2.0 * x ** -0.3 + np.random.default_rng(6).normal(0, 0.01, x.size)
    f = fit_power_law(x, y, n_boot=100)
    assert f.c_ci[0] >= 0.0 and f.a_ci[0] >= 0.0 and 0.0 <= f.b_ci[0] <= f.b_ci[1] <= 5.0
    assert f.c_ci[0] <= f.c <= f.c_ci[1]


def test_refuses_too_few_points_and_nonpositive_x():
    with pytest.raises(FitError, match="too few points: 3 distinct x"):
        fit_power_law([1e5, 1e6, 1e7, 1e7, 1e6], [0.3, 0.2, 0.15, 0.16, 0.21])
    with pytest.raises(FitError, match="x must be > 0"):
        fit_power_law([0, 1e5, 1e6, 1e7, 1e8], [0.4, 0.3, 0.2, 0.15, 0.1])


def test_fit_table_of_handmade_study(tmp_path_factory):
    root, _ = shared_store(tmp_path_factory)
    table, laws = fit_table(load_results(root), n_boot=30)
    params = table[(table["x_axis"] == "n_params") & (table["eval_set"] == "test")].set_index("pretrained")
    assert set(params.index) == {"scratch", "upstream:small", "upstream:big"}
    assert (params["status"] == "ok").all() and (params["n_x"] == 4).all() and (params["n_runs"] == 8).all()
    np.testing.assert_allclose(params["b"], B_PARAMS, atol=0.03)
    np.testing.assert_allclose(params["c"], 0.08, atol=0.02)
    # Two pretraining sizes (scratch left out) and three fractions: too few points, refused with the reason.
    pre = table[table["x_axis"] == "pretrain_images"]
    assert len(pre) == 8 and pre["status"].str.startswith("refused: too few points: 2 distinct x").all()
    lab = table[table["x_axis"] == "n_train_images"]
    assert len(lab) == 24 and lab["status"].str.contains("3 distinct x").all()
    assert ("n_params", "scratch", "", "test") in laws and len(laws) == 6
    assert (params["ci"] == "seeds").all() and (params["at_bound"] == "").all()
    # from the store, the intervals also resample the test patients, and each contains its estimate
    with_store, _ = fit_table(load_results(root), n_boot=30, store_root=root)
    ok = with_store[with_store["status"] == "ok"]
    assert (ok["ci"] == "seeds+patients").all() and ((ok["b_lo"] <= ok["b"]) & (ok["b"] <= ok["b_hi"])).all()
    np.testing.assert_allclose(ok["b"], table[table["status"] == "ok"]["b"])  # the estimate is the same fit


def test_the_labelled_images_law_has_one_x_per_fraction_not_per_seed(tmp_path_factory):
    # Each seed draws its own patients, so the runs of one fraction hold a few images more or fewer: as x values of
    # their own, 2 fractions x 3 seeds passed for 6 sizes of a law that needs 4.
    rows = []
    for fraction, images in ((0.5, 500), (1.0, 1000)):
        for seed in range(3):
            rows.append({"run_id": f"r{fraction}-{seed}", "backbone": "b", "pretrained": "scratch", "fraction": fraction,
                         "n_params": 1e6, "pretrain_images": 0,
                         "seed": seed, "n_train_images": images + 3 * seed, "eval_set": "test", "metric": "auroc",
                         "label": "macro", "attribute": "all", "group": "all", "value": 0.7 + 0.1 * fraction})
    table, _ = fit_table(pd.DataFrame(rows), n_boot=10)
    lab = table[table["x_axis"] == "n_train_images"]
    assert len(lab) == 1 and lab["status"].iloc[0].startswith("refused: too few points: 2 distinct x value(s) (6 runs)")


def test_one_run_per_size_without_predictions_has_no_interval_to_offer():
    # Four runs at four sizes: a pairs bootstrap could only refit permutations of the same four points; the fit
    # says it has nothing to resample instead of printing a zero-width interval.
    x = np.array([3e2, 1e3, 3e3, 1e4])
    f = fit_power_law(x, 0.5 * (x / 3e2) ** -0.2 + 0.1, n_boot=50)
    assert f.ci == "none" and f.n_boot == 0 and np.isnan(f.b_ci).all()



def test_identical_seeds_without_patient_replicates_have_no_interval_to_offer():
    """Flat errors identical across seeds: every resample is the data, so no interval (NaN, ci 'none'), not a
    zero-width one around an exponent fitted to noise-free flat points; a parameter on its bound is named."""
    x = np.array([1e5, 4e5, 1.6e6, 6.4e6]).repeat(2)
    f = fit_power_law(x, np.full(8, 0.2), n_boot=50)
    assert f.ci == "none" and f.n_boot == 0
    assert np.isnan(f.a_ci).all() and np.isnan(f.b_ci).all() and np.isnan(f.c_ci).all()
    # one seed apart at one size: that stratum varies, so the seeds are resampled again
    y = np.full(8, 0.2)
    y[1] = 0.21
    assert fit_power_law(x, y, n_boot=20).ci == "seeds"
    # patient replicates that vary restore the interval; replicates that never move do not
    flat = np.full((20, 8), 0.2)
    assert fit_power_law(x, np.full(8, 0.2), n_boot=20, replicates=flat).ci == "none"
    moving = flat + np.random.default_rng(0).normal(0, 0.01, flat.shape)
    assert fit_power_law(x, np.full(8, 0.2), n_boot=20, replicates=moving).ci == "seeds+patients"
    # error rising with x: the best decreasing law is flat, b pinned at 0
    rising = fit_power_law(np.geomspace(1e5, 1e8, 4), [0.10, 0.12, 0.14, 0.16], n_boot=10)
    assert "b=0" in rising.at_bound
    exact = fit_power_law(np.geomspace(1e5, 1e9, 6), 2.0 * np.geomspace(1e5, 1e9, 6) ** -0.3 + 0.07, n_boot=10)
    assert exact.at_bound == ""


def _predictions(rng, strength, n_patients=60):
    """Store-format predictions of one run on a shared test set: 2 images per patient, 2 labels."""
    pid = np.repeat([f"p{i}" for i in range(n_patients)], 2)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(pid.size)], "patient_id": pid})
    truth = np.random.default_rng(7).integers(0, 2, (pid.size, 2)).astype(float)  # the same labels for every run
    truth[3, 1] = np.nan  # an unlabelled finding
    for j, lab in enumerate(["A", "B"]):
        df[f"label:{lab}"] = truth[:, j]
        df[f"logit:{lab}"] = strength * np.nan_to_num(truth[:, j]) + rng.normal(size=pid.size)
    return df


def test_patient_replicates_are_the_runs_scored_on_one_resample_of_patients():
    rng = np.random.default_rng(0)
    runs = [_predictions(rng, s) for s in (0.5, 1.0, 2.0)]
    runs[1] = runs[1].iloc[::-1].reset_index(drop=True)  # row order does not matter, sample ids do
    reps = patient_replicates(runs, n_boot=40, seed=3)
    assert reps.shape == (40, 3)
    # independent reference: replicate r's patient multiplicities, images repeated, scikit-learn's AUROC per label
    boot = ClusterBootstrap(runs[0].sort_values("sample_id")["patient_id"].to_numpy(), n_boot=40, seed=3)
    for r in (0, 17, 39):
        for j, run in enumerate(runs):
            run = run.sort_values("sample_id")
            idx = np.repeat(np.arange(len(run)), boot.counts[r, boot.codes].astype(int))
            aucs = []
            for lab in ("A", "B"):
                y, z = run[f"label:{lab}"].to_numpy()[idx], run[f"logit:{lab}"].to_numpy()[idx]
                ok = ~np.isnan(y)
                aucs.append(roc_auc_score(y[ok], z[ok]))
            assert reps[r, j] == pytest.approx(1 - np.mean(aucs), abs=1e-12)
    # the stronger run is better in every replicate: the resample is shared, so the runs stay paired
    assert (reps[:, 2] < reps[:, 0]).all()


def test_patient_replicates_read_stored_runs_one_at_a_time_with_the_same_result(tmp_path):
    """Loaders of stored runs (what fit_table and effective robustness pass) give the frames' replicates exactly:
    every run's sample ids are read first, then the first run whole (labels, patients), then each run's scores in
    turn — only the sample ids and the logits of the labels with both classes, one run per call."""
    from scaling.study.store import RunStore

    rng = np.random.default_rng(0)
    runs = [_predictions(rng, s) for s in (0.5, 1.0, 2.0)]
    runs[2] = runs[2].drop(index=[0, 1, 2]).iloc[::-1]  # one run lacks a patient's images: the common samples count
    store = RunStore(tmp_path)
    for j, run in enumerate(runs):
        store.write_predictions(f"r{j}", "test", run)
    calls = []

    def loader(j):
        def load(cols):
            calls.append((j, cols))
            return store.read_predictions(f"r{j}", "test", columns=cols)
        return load

    from_store = patient_replicates([loader(j) for j in range(3)], n_boot=40, seed=3)
    np.testing.assert_array_equal(from_store, patient_replicates(runs, n_boot=40, seed=3))
    assert calls == [(0, ["sample_id"]), (1, ["sample_id"]), (2, ["sample_id"]), (0, None),
                     *[(j, ["sample_id", "logit:A", "logit:B"]) for j in range(3)]]
    assert store.read_predictions("r0", "test", columns=["sample_id", "logit:Z"]).columns.tolist() == ["sample_id"]


def test_interval_resamples_seeds_within_each_size_and_patients():
    x = np.repeat([3e2, 1e3, 3e3, 1e4], 2)
    y = 0.5 * (x / 3e2) ** -0.3 + 0.1 + np.tile([0.004, -0.004], 4)
    seeds = fit_power_law(x, y, n_boot=100)
    assert seeds.ci == "seeds" and seeds.n_boot > 90 and seeds.b_ci[0] <= seeds.b <= seeds.b_ci[1]
    noise = np.random.default_rng(1).normal(0, 0.01, (100, x.size))
    both = fit_power_law(x, y, n_boot=100, replicates=y + noise)
    assert both.ci == "seeds+patients" and both.b_ci[0] <= both.b <= both.b_ci[1]
    # more noise, wider interval
    assert both.b_ci[1] - both.b_ci[0] > seeds.b_ci[1] - seeds.b_ci[0]
    with pytest.raises(ValueError, match=r"replicates must have shape \(n, 8\)"):
        fit_power_law(x, y, replicates=noise[:, :3])


@pytest.mark.parametrize("with_patients", [False, True])
def test_seed_resample_is_rescaled_about_each_sizes_mean(monkeypatch, with_patients):
    # Two seeds per size at mean ± d: a plain resample's mean of a size is m - d, m or m + d; rescaled (Rao & Wu,
    # n = 2) it is m - √2·d, m or m + √2·d, about the mean of that replicate's own patient resample when there is one.
    import scaling.study.fits as fits

    x = np.repeat([3e2, 1e3, 3e3, 1e4], 2)
    d = np.tile([0.004, -0.004], 4)
    y = 0.5 * (x / 3e2) ** -0.3 + 0.1 + d
    reps = y + np.random.default_rng(2).normal(0, 0.01, (7, x.size)) if with_patients else None
    calls = []
    real = fits._fit_many
    # the fits come in three calls, each refitting its rows at once: the data, the 40 replicates in order, then the
    # jackknife's (each of the 8 runs left out once)
    monkeypatch.setattr(fits, "_fit_many", lambda t, yb: calls.append(np.array(yb)) or real(t, yb))
    assert fit_power_law(x, y, n_boot=40, replicates=reps).n_boot == 40
    assert [c.shape for c in calls] == [(1, 8), (40, 8), (8, 7)]
    seen = calls[1]
    for r, yb in enumerate(seen):
        base = y if reps is None else reps[r % len(reps)]
        for k in range(4):  # replicate values come size by size, two per size
            centre, half = base[2 * k:2 * k + 2].mean(), abs(base[2 * k] - base[2 * k + 1]) / 2
            dev = yb[2 * k:2 * k + 2].mean() - centre
            assert min(abs(dev), abs(abs(dev) - np.sqrt(2) * half)) < 1e-12, (r, k, dev, half)


def test_scaling_views_leave_out_probe_and_reinitialised_cells(tmp_path_factory):
    """A store's results hold linear-probe, k-shot and re-initialised cells beside the fine-tuned ones (every shipped
    study has them). Pooled into a scaling law, a robustness trend or a paired comparison they would be wrong (a
    probe run is no extra seed of its cell): fit_table, effective_robustness and the comparisons use the plain
    fine-tuning cells only, as the report does, so the same call on the whole table gives the plain table's
    numbers."""
    from scaling.study.aggregate import PLAIN, summarise
    from scaling.study.compare import brier_comparisons, pairwise_comparisons, subgroup_comparisons
    from scaling.study.tables import effective_robustness

    root, _ = shared_store(tmp_path_factory)
    plain = load_results(root).assign(**PLAIN)
    other = [plain.assign(protocol="linear_probe", value=plain["value"] * 0.5),
             plain.assign(reinit="after:2", value=plain["value"] * 0.9),
             plain.assign(protocol="linear_probe", shots=5, value=plain["value"] * 0.7)]
    mixed = pd.concat([plain, *(o.assign(run_id=o["run_id"] + f"-other{i}") for i, o in enumerate(other))],
                      ignore_index=True)
    pd.testing.assert_frame_equal(fit_table(mixed, n_boot=20)[0], fit_table(plain, n_boot=20)[0])
    ood = sorted(set(plain["eval_set"]) - {"val", "test"})[0]
    er_mixed, line_mixed = effective_robustness(summarise(mixed), ood, df=mixed, n_boot=20)
    er_plain, line_plain = effective_robustness(summarise(plain), ood, df=plain, n_boot=20)
    pd.testing.assert_frame_equal(er_mixed, er_plain)
    assert line_mixed == line_plain
    for compare in (pairwise_comparisons, subgroup_comparisons, brier_comparisons):
        pd.testing.assert_frame_equal(compare(root, mixed, workers=1), compare(root, plain, workers=1))

"""Effective robustness: OOD AUROC beyond what the study's own in-distribution → OOD trend predicts."""

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from study_store import BACKBONES, FRACTIONS, SOURCES, copy_store, shared_store

from scaling.study.aggregate import load_results, plain_cells, summarise
from scaling.study.store import RunStore
from scaling.study.tables import effective_robustness


def _summary(cells):
    """A summary holding auroc_id / auroc_ood rows of the given (backbone, n_params, fraction, id, ood) cells."""
    rows = []
    for bb, n, frac, a_id, a_ood in cells:
        for metric, v in (("auroc_id", a_id), ("auroc_ood", a_ood)):
            rows.append({"pretrained": "scratch", "backbone": bb, "n_params": n, "fraction": frac, "eval_set": "ood",
                         "label": "macro", "attribute": "all", "group": "all", "metric": metric, "mean": v})
    return pd.DataFrame(rows)


def test_a_cell_off_an_exact_probit_line_is_measured_by_its_distance():
    # Three cells on Φ⁻¹(ood) = −0.2 + 0.9 Φ⁻¹(id), a fourth 0.05 above it: with a least-squares line through all
    # four the residuals are known in closed form; check against scipy's linregress on the same probits.
    ids = np.array([0.70, 0.78, 0.85, 0.80])
    ood = stats.norm.cdf(-0.2 + 0.9 * stats.norm.ppf(ids))
    ood[3] += 0.05
    cells = [(f"b{i}", 10.0 ** (i + 5), 1.0, a, o) for i, (a, o) in enumerate(zip(ids, ood))]
    table, line = effective_robustness(_summary(cells), "ood")
    fit = stats.linregress(stats.norm.ppf(ids), stats.norm.ppf(ood))
    assert line["slope"] == pytest.approx(fit.slope, rel=1e-10) and line["intercept"] == pytest.approx(fit.intercept)
    assert line["r2"] == pytest.approx(fit.rvalue**2, rel=1e-10) and line["n_cells"] == 4
    trend = stats.norm.cdf(fit.intercept + fit.slope * stats.norm.ppf(ids))
    np.testing.assert_allclose(table["effective_robustness"], ood - trend, atol=1e-12)
    assert table["effective_robustness"].idxmax() == 3 and table.loc[3, "effective_robustness"] > 0.02


def test_too_few_cells_or_no_spread_gives_no_trend():
    two = [("a", 1e5, 1.0, 0.7, 0.6), ("b", 1e6, 1.0, 0.8, 0.7)]
    table, line = effective_robustness(_summary(two), "ood")
    assert line is None and table.empty
    flat = [(f"b{i}", 1e5 * (i + 1), 1.0, 0.75, 0.6 + 0.01 * i) for i in range(4)]
    assert effective_robustness(_summary(flat), "ood")[1] is None


def test_report_fits_the_trend_to_every_fraction_and_shows_full_data_cells(tmp_path_factory):
    root, _ = shared_store(tmp_path_factory)
    summary = plain_cells(summarise(load_results(root)))
    table, line = effective_robustness(summary, "ood_site_b")
    cells = len(BACKBONES) * len(SOURCES)
    assert line["n_cells"] == cells * len(FRACTIONS) and len(table) == cells and (table["fraction"] == 1.0).all()
    # independent: the seed means of the runs' own auroc_id / auroc_ood rows, a probit line by numpy least squares
    df = load_results(root)
    rows = df[(df["eval_set"] == "ood_site_b") & (df["label"] == "macro") & (df["attribute"] == "all")]
    means = rows.pivot_table(index=["backbone", "pretrained", "fraction"], columns="metric", values="value")
    b, a = np.polyfit(stats.norm.ppf(means["auroc_id"]), stats.norm.ppf(means["auroc_ood"]), 1)
    full = means.xs(1.0, level="fraction")
    want = full["auroc_ood"] - stats.norm.cdf(a + b * stats.norm.ppf(full["auroc_id"]))
    got = table.set_index(["backbone", "pretrained"])["effective_robustness"]
    np.testing.assert_allclose(got.sort_index().to_numpy(), want.sort_index().to_numpy(), atol=1e-12)
    # the report shows it with its interval (tests/test_study_report.py, which builds the report of this store)


def _tidy(cells, seeds):
    """A tidy table of per-run auroc_id / auroc_ood rows: ``cells`` as (backbone, n_params, fraction), ``seeds`` maps
    each cell to its runs' (id, ood) AUROCs."""
    rows = []
    for (bb, n, frac), runs in zip(cells, seeds):
        for s, (a_id, a_ood) in enumerate(runs):
            for metric, v in (("auroc_id", a_id), ("auroc_ood", a_ood)):
                rows.append({"run_id": f"{bb}-{frac}-{s}", "pretrained": "scratch", "backbone": bb, "n_params": n,
                             "fraction": frac, "seed": s, "eval_set": "ood", "label": "macro", "attribute": "all",
                             "group": "all", "metric": metric, "value": v, "lo": np.nan, "hi": np.nan, "n": 100,
                             "n_train_images": 400})
    return pd.DataFrame(rows)


def _er(a_id, a_ood):
    """Effective robustness of each cell from its seed means, by numpy's own least squares in probit space."""
    b, a = np.polyfit(stats.norm.ppf(a_id), stats.norm.ppf(a_ood), 1)
    return np.asarray(a_ood) - stats.norm.cdf(a + b * stats.norm.ppf(a_id))


def test_seed_interval_matches_the_exact_bootstrap_distribution():
    # Four cells, two seeds each: a seed resample of a cell is (s0, s0), (s1, s1) or one of each (probability 1/2),
    # so the whole bootstrap distribution is 3^4 = 81 weighted outcomes, enumerated here without the library. Each
    # drawn mean lies √(2/1) as far from the cell's mean as the draw (Rao & Wu's rescaling, n = 2 seeds); then each
    # cell's outcomes are widened about their median by t(ν)/z, ν from the delete-one-seed jackknife (Satterthwaite),
    # computed here by hand: leaving a seed out of a cell of two leaves the other seed.
    cells = [("b0", 1e5, 1.0), ("b1", 1e6, 1.0), ("b2", 1e7, 1.0), ("b3", 1e8, 1.0)]
    seeds = [[(0.70, 0.60), (0.72, 0.61)], [(0.78, 0.66), (0.77, 0.69)], [(0.85, 0.73), (0.86, 0.72)],
             [(0.80, 0.71), (0.81, 0.75)]]
    df = _tidy(cells, seeds)
    table, _ = effective_robustness(summarise(df), "ood", df=df, n_boot=4000, seed=3)
    assert (table["ci"] == "seeds").all()
    outcomes, weights = [], []
    for choice in itertools.product(range(3), repeat=4):  # 0: seed 0 twice, 1: seed 1 twice, 2: one of each
        centre = np.mean(seeds, axis=1)  # (cells, 2): each cell's seed mean
        drawn = np.array([runs[c] if c < 2 else mid for runs, c, mid in zip(seeds, choice, centre)])
        means = centre + np.sqrt(2) * (drawn - centre)
        outcomes.append(_er(means[:, 0], means[:, 1]))
        weights.append(np.prod([0.5 if c == 2 else 0.25 for c in choice]))
    outcomes, weights = np.array(outcomes), np.array(weights)
    centre = np.mean(seeds, axis=1)
    parts = []
    for c in range(4):  # V_c = (n-1)/n · Σ (θ_(i) - mean)², n = 2
        left_out = []
        for i in range(2):
            m = centre.copy()
            m[c] = seeds[c][1 - i]
            left_out.append(_er(m[:, 0], m[:, 1]))
        parts.append(0.5 * ((np.array(left_out) - np.mean(left_out, axis=0)) ** 2).sum(axis=0))
    parts = np.array(parts)
    nu = parts.sum(axis=0) ** 2 / (parts**2).sum(axis=0)  # each part has n - 1 = 1 degree of freedom
    widen = stats.t.ppf(0.975, nu) / stats.norm.ppf(0.975)
    assert (widen > 1.5).all()  # two seeds per cell: few degrees of freedom, a much wider interval
    for k in range(4):
        order = np.argsort(outcomes[:, k])
        median = outcomes[order[np.searchsorted(np.cumsum(weights[order]), 0.5)], k]
        outcomes[:, k] = median + widen[k] * (outcomes[:, k] - median)
        order = np.argsort(outcomes[:, k])
        cdf = np.cumsum(weights[order])
        at = lambda v: cdf[np.searchsorted(outcomes[order, k], v, side="right") - 1]  # noqa: E731
        # the interval's ends sit at the exact distribution's 2.5 % and 97.5 % points (up to one outcome's mass)
        assert at(table.loc[k, "er_lo"] - 1e-12) <= 0.025 + 0.02 and at(table.loc[k, "er_hi"]) >= 0.975 - 0.02
        assert table.loc[k, "er_lo"] <= table.loc[k, "effective_robustness"] <= table.loc[k, "er_hi"]


def test_one_seed_without_predictions_has_no_interval_and_equal_seeds_a_point():
    cells = [("b0", 1e5, 1.0), ("b1", 1e6, 1.0), ("b2", 1e7, 1.0)]
    one = _tidy(cells, [[(0.70, 0.60)], [(0.78, 0.66)], [(0.85, 0.75)]])
    table, _ = effective_robustness(summarise(one), "ood", df=one, n_boot=50)
    assert (table["ci"] == "none").all() and table["er_lo"].isna().all() and table["er_hi"].isna().all()
    same = _tidy(cells, [[(0.70, 0.60)] * 2, [(0.78, 0.66)] * 2, [(0.85, 0.75)] * 2])
    table, _ = effective_robustness(summarise(same), "ood", df=same, n_boot=50)
    np.testing.assert_allclose(table["er_lo"], table["effective_robustness"], atol=1e-12)
    np.testing.assert_allclose(table["er_hi"], table["effective_robustness"], atol=1e-12)


def test_seed_interval_covers_the_true_effective_robustness():
    # 200 simulated studies: six cells on a probit line, one 0.03 above it, five seeds each with N(0, 0.01) noise on
    # both AUROCs. The truth is the effective robustness of the noise-free cell means.
    rng = np.random.default_rng(0)
    ids = np.array([0.68, 0.72, 0.76, 0.80, 0.84, 0.88])
    ood = stats.norm.cdf(-0.3 + 0.95 * stats.norm.ppf(ids))
    ood[2] += 0.03
    truth = _er(ids, ood)
    cells = [(f"b{i}", 10.0 ** (i + 5), 1.0) for i in range(6)]
    covered = []
    for _ in range(200):
        seeds = [[(a + rng.normal(0, 0.01), o + rng.normal(0, 0.01)) for _ in range(5)] for a, o in zip(ids, ood)]
        means = np.mean(seeds, axis=1)
        summary = _summary([(bb, n, frac, a, o) for (bb, n, frac), (a, o) in zip(cells, means)])
        table, _ = effective_robustness(summary, "ood", df=_tidy(cells, seeds), n_boot=200,
                                        seed=int(rng.integers(1 << 30)))
        covered.append((table["er_lo"] <= truth) & (truth <= table["er_hi"]))
    coverage = np.mean(covered, axis=0)
    # Measured 0.915-0.97 per cell (mean 0.945). The plain percentile bootstrap covered 0.86-0.905 (mean 0.884): a
    # resample of five seeds varies 4/5 as much as their mean; rescaled (Rao & Wu) but not widened to Student's
    # tails, 0.895-0.935 (mean 0.921). An interval without the seed noise would cover ~0.
    assert (coverage > 0.9).all() and coverage.mean() > 0.93, coverage


def test_report_interval_resamples_seeds_and_patients(tmp_path_factory):
    root, _ = shared_store(tmp_path_factory)
    df = plain_cells(load_results(root))
    summary = summarise(df)
    seeds_only, _ = effective_robustness(summary, "ood_site_b", df=df, n_boot=60)
    both, _ = effective_robustness(summary, "ood_site_b", df=df, store_root=root, n_boot=60)
    assert (seeds_only["ci"] == "seeds").all() and (both["ci"] == "seeds+patients").all()
    np.testing.assert_array_equal(both["effective_robustness"], seeds_only["effective_robustness"])
    # the stored predictions carry patient variance on top of the seeds': wider intervals
    assert ((both["er_hi"] - both["er_lo"]) > (seeds_only["er_hi"] - seeds_only["er_lo"])).mean() > 0.8
    assert (both["er_lo"] < both["er_hi"]).all()


def test_a_set_of_the_test_patients_is_resampled_with_test(tmp_path_factory, tmp_path):
    # The OOD set holds the test images themselves: resampled patient by patient with test, every replicate has
    # OOD AUROC = test AUROC in every cell, the refitted trend is the identity and the interval collapses to 0.
    # Resampled as an independent sample, it would not.
    root, _ = copy_store(tmp_path_factory, tmp_path / "store")
    store = RunStore(root)
    df = plain_cells(load_results(root))
    for rid in df["run_id"].unique():
        store.write_predictions(rid, "ood_site_b", store.read_predictions(rid, "test"))
    summary = summarise(df)
    apart, _ = effective_robustness(summary, "ood_site_b", df=df, store_root=root, n_boot=40)
    for rid in df["run_id"].unique():
        meta = store.read_meta(rid)
        meta["fitted_on_val"]["paired_shift"] = ["ood_site_b"]
        store.write_meta(rid, meta)
    together, _ = effective_robustness(summary, "ood_site_b", df=df, store_root=root, n_boot=40)
    np.testing.assert_allclose(together[["er_lo", "er_hi"]].to_numpy(float), 0.0, atol=1e-9)
    assert ((apart["er_hi"] - apart["er_lo"]) > 0.01).all()

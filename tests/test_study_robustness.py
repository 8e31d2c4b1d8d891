"""Effective robustness: OOD AUROC beyond what the study's own in-distribution → OOD trend predicts."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from study_store import BACKBONES, FRACTIONS, SOURCES, shared_store

from scaling.study.aggregate import load_results, plain_cells, summarise
from scaling.study.report import build_report, render_html
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
    rep = build_report(root, n_boot_fit=10)
    assert "robustness:ood_site_b" in rep.tables and "Effective robustness" in render_html(rep)

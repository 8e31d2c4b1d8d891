"""ECE/MCE against a reference implementation and known values; Brier/NLL; temperature scaling; reliability."""

import matplotlib
import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from scaling.metrics import (apply_temperature, brier, ece, fit_temperature, mce, nll, plot_reliability,
                             reliability_diagram)

matplotlib.use("Agg")


def _reference_ece(y, p, n_bins, strategy):
    """Straightforward loop over bins (no shared code with the library)."""
    if strategy == "uniform":
        edges = [k / n_bins for k in range(n_bins + 1)]
    else:
        edges = [0.0] + [float(np.quantile(p, k / n_bins)) for k in range(1, n_bins)] + [1.0]
    total, worst = 0.0, 0.0
    for k in range(n_bins):
        last = k == n_bins - 1
        in_bin = [(yi, pi) for yi, pi in zip(y, p) if edges[k] <= pi and (pi < edges[k + 1] or (last and pi <= 1))]
        if in_bin:
            gap = abs(sum(yi for yi, _ in in_bin) / len(in_bin) - sum(pi for _, pi in in_bin) / len(in_bin))
            total += len(in_bin) / len(y) * gap
            worst = max(worst, gap)
    return total, worst


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_ece_mce_equal_reference(strategy, n_bins):
    rng = np.random.default_rng(n_bins)
    p = rng.beta(0.8, 1.5, 700)
    p[:5] = [0.0, 1.0, 0.5, 0.2, 0.2]  # edges and ties
    y = (rng.random(700) < p ** 1.3).astype(float)
    ref_ece, ref_mce = _reference_ece(y, p, n_bins, strategy)
    assert ece(y, p, n_bins=n_bins, strategy=strategy) == pytest.approx(ref_ece, abs=1e-12)
    assert mce(y, p, n_bins=n_bins, strategy=strategy) == pytest.approx(ref_mce, abs=1e-12)


def test_calibrated_predictor_has_ece_near_zero_and_known_miscalibration_known_value():
    rng = np.random.default_rng(0)
    q = rng.uniform(0.1, 0.8, 200_000)
    y = (rng.random(q.size) < q).astype(float)
    assert ece(y, q) < 0.005
    assert ece(y, q, strategy="quantile") < 0.005
    # Every probability 0.1 too high: ECE = 0.1 (up to sampling noise).
    assert ece(y, q + 0.1) == pytest.approx(0.1, abs=0.005)
    # Exact: constant 0.7 for a set with 50 % positives → ECE = MCE = 0.2.
    y_half = np.r_[np.ones(500), np.zeros(500)]
    assert ece(y_half, np.full(1000, 0.7)) == pytest.approx(0.2, abs=1e-12)
    assert mce(y_half, np.full(1000, 0.7)) == pytest.approx(0.2, abs=1e-12)


def test_brier_and_nll_equal_sklearn_and_mask_nan_labels():
    rng = np.random.default_rng(3)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(float)
    assert brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert nll(y, p) == pytest.approx(log_loss(y, p), abs=1e-12)
    y_nan = y.copy()
    y_nan[::3] = np.nan
    keep = ~np.isnan(y_nan)
    assert brier(y_nan, p) == pytest.approx(brier_score_loss(y[keep], p[keep]), abs=1e-12)


def test_temperature_scaling_lowers_held_out_nll():
    rng = np.random.default_rng(4)

    def sample(n):
        z = rng.normal(0, 1.5, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
        return y, 3.0 * z  # over-confident logits: the right temperature is 3

    y_val, z_val = sample(4000)
    y_test, z_test = sample(4000)
    t = fit_temperature(y_val, z_val)
    assert t == pytest.approx(3.0, rel=0.1)
    before = nll(y_test, apply_temperature(z_test, 1.0))
    after = nll(y_test, apply_temperature(z_test, t))
    assert after < before - 0.05
    assert ece(y_test, apply_temperature(z_test, t)) < ece(y_test, apply_temperature(z_test, 1.0))
    # Per-label: one temperature per column, NaN labels masked.
    y2 = np.c_[y_val, y_val]
    y2[::5, 1] = np.nan
    both = fit_temperature(y2, np.c_[z_val, z_val / 3.0])
    assert both[0] == pytest.approx(t) and both[1] == pytest.approx(1.0, rel=0.1)


def test_reliability_diagram_and_plot():
    rng = np.random.default_rng(5)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(float)
    data = reliability_diagram(y, p, n_bins=10)
    assert data["n"].sum() == 300 and len(data) == 10
    weighted_gap = (data["n"] * data["gap"].abs()).sum() / 300
    assert weighted_gap == pytest.approx(ece(y, p), abs=1e-12)
    ax = plot_reliability(data=data, label="model")
    assert len(ax.lines) == 2


def test_a_temperature_on_its_search_bound_is_warned_about():
    import warnings

    from scaling.metrics.temperature import T_BOUNDS, fit_softmax_temperature
    from scaling.metrics.validation import MetricWarning

    y = np.array([0, 0, 0, 1, 1, 1])
    separated = np.array([-2.0, -1.5, -1.0, 1.0, 1.5, 2.0])  # perfectly separable: the NLL falls as T -> 0
    with pytest.warns(MetricWarning, match=r"search bound 0.01 \(the validation logits separate the classes"):
        t = fit_temperature(y, separated)
    assert t == pytest.approx(T_BOUNDS[0], rel=1e-3)
    with pytest.warns(MetricWarning, match=r"search bound 0.01"):
        fit_softmax_temperature(np.eye(2)[y], np.c_[-separated, separated])
    noise = np.array([5.0, -5.0, 5.0, -5.0, 5.0, -5.0])  # anti-informative on balanced labels: T -> infinity
    with pytest.warns(MetricWarning, match=r"search bound 100 \(the validation logits carry no signal"):
        assert fit_temperature(np.array([0, 1, 0, 1, 0, 1]), noise) == pytest.approx(T_BOUNDS[1], rel=1e-3)
    # an interior optimum says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetricWarning)
        t = fit_temperature(y, np.array([-2.0, 1.0, -1.0, 1.0, -1.5, 2.0]))
    assert T_BOUNDS[0] * 1.01 < t < T_BOUNDS[1] / 1.01


def test_bootstrap_counts_are_converted_once_per_matrix_and_freed_with_it():
    """The weighted means multiply a bootstrap's float32 counts with float64 sums: the float64 copy is made once per
    count matrix (not once per product), gives the products of the matrix itself, and goes when the matrix goes."""
    import gc

    from scaling.metrics.bootstrap import ClusterBootstrap
    from scaling.metrics.calibration import _FLOAT64_COUNTS, float64_counts, weighted_mean_replicates

    rng = np.random.default_rng(0)
    patients = rng.integers(0, 50, 300)
    boot = ClusterBootstrap(patients, n=300, n_boot=40, seed=1)
    values = rng.random(300)
    first = float64_counts(boot.counts)
    assert first.dtype == np.float64 and np.array_equal(first, boot.counts)
    assert float64_counts(boot.counts) is first and float64_counts(boot.subset(values > 0.5).counts) is first
    means = weighted_mean_replicates(values, boot.counts, boot.codes)
    weights = boot.counts[:, boot.codes].astype(np.float64)  # each replicate's weight of every sample, by hand
    np.testing.assert_allclose(means, (weights * values).sum(axis=1) / weights.sum(axis=1), rtol=1e-12)
    entries = len(_FLOAT64_COUNTS)
    del boot, first
    gc.collect()
    assert len(_FLOAT64_COUNTS) == entries - 1

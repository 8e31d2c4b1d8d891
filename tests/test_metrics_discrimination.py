"""AUROC / AUPRC against scikit-learn, masking of unlabelled rows, one-class labels, per-label and macro."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scaling.metrics import MetricWarning, auprc, auroc, macro_average, per_label
from scaling.metrics.discrimination import auprc_replicates, auroc_replicates


@pytest.mark.parametrize("seed", range(6))
def test_auroc_auprc_equal_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 3000))
    y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(float)
    y[:2] = [0.0, 1.0]
    p = np.round(rng.random(n) * 0.7 + 0.3 * y, int(rng.integers(1, 3)))  # rounding makes many ties
    assert abs(auroc(y, p) - roc_auc_score(y, p)) < 1e-9
    assert abs(auprc(y, p) - average_precision_score(y, p)) < 1e-9


def test_weighted_replicates_equal_sklearn_sample_weight():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.random(n) < 0.3
    p = np.round(rng.random(n), 1)
    counts = rng.integers(0, 4, size=(3, n)).astype(float)
    codes = np.arange(n)
    for b in range(3):
        w = counts[b]
        assert abs(auroc_replicates(y, p, counts, codes)[b] - roc_auc_score(y, p, sample_weight=w)) < 1e-9
        assert abs(auprc_replicates(y, p, counts, codes)[b] - average_precision_score(y, p, sample_weight=w)) < 1e-9


def test_nan_labels_are_masked_for_that_label_only():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.4).astype(float)
    p = rng.random(300)
    y_masked = y.copy()
    y_masked[::7] = np.nan
    keep = ~np.isnan(y_masked)
    assert auroc(y_masked, p) == pytest.approx(roc_auc_score(y[keep], p[keep]), abs=1e-12)
    assert auprc(y_masked, p) == pytest.approx(average_precision_score(y[keep], p[keep]), abs=1e-12)


def test_one_class_label_is_nan_with_warning_and_kept_in_per_label():
    y = pd.DataFrame({"A": [0.0, 1.0, 0.0, 1.0], "B": [0.0, 0.0, np.nan, 0.0]})
    p = pd.DataFrame({"A": [0.1, 0.8, 0.3, 0.6], "B": [0.2, 0.4, 0.9, 0.1]})
    with pytest.warns(MetricWarning, match="undefined"):
        values = per_label(auroc, y, p)
    assert list(values.index) == ["A", "B"]
    with pytest.warns(MetricWarning):
        swapped = per_label(auroc, y, p[["B", "A"]])  # aligned by column name, not position
    assert swapped["A"] == 1.0
    assert values["A"] == 1.0 and np.isnan(values["B"])
    assert macro_average(values) == 1.0
    with pytest.warns(MetricWarning):
        assert np.isnan(macro_average([np.nan, np.nan]))


def test_auprc_replicates_of_a_bootstraps_float32_counts_are_exact():
    """A bootstrap's float32 counts are cumulated in float32 (exact for small integers): the same numbers, to the
    last bit, as with the counts in float64, and scikit-learn's weighted average precision, ties included."""
    from scaling.metrics.bootstrap import ClusterBootstrap

    rng = np.random.default_rng(3)
    n = 2000
    y = rng.random(n) < 0.2
    p = np.round(rng.random(n) * 0.8 + 0.2 * y, 2)  # many ties
    boot = ClusterBootstrap(rng.integers(0, 400, n), n=n, n_boot=50, seed=0)
    assert boot.counts.dtype == np.float32
    single = auprc_replicates(y, p, boot.counts, boot.codes)
    np.testing.assert_array_equal(single, auprc_replicates(y, p, boot.counts.astype(np.float64), boot.codes))
    for b in range(0, 50, 7):
        w = boot.counts[b, boot.codes].astype(np.float64)
        assert abs(single[b] - average_precision_score(y, p, sample_weight=w)) < 1e-9

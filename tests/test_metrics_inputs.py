"""Bad input raises ValueError naming the argument; nothing is computed from silently dropped rows."""

import numpy as np
import pytest

from scaling.metrics import (auprc, auroc, bootstrap_ci, brier, choose_threshold, ece, fit_temperature, nll,
                             paired_bootstrap_diff, subgroup_report)

Y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
P = np.array([0.1, 0.8, 0.3, 0.6, 0.4])


@pytest.mark.parametrize("metric", [auroc, auprc, brier, nll, ece])
def test_metric_input_errors(metric):
    with pytest.raises(ValueError, match="same length"):
        metric(Y, P[:4])
    with pytest.raises(ValueError, match=r"p must be finite; element 2"):
        metric(Y, np.where(np.arange(5) == 2, np.nan, P))
    with pytest.raises(ValueError, match=r"y must hold 0, 1 or NaN"):
        metric(np.array([0.0, 1.0, 2.0, 1.0, 0.0]), P)


def test_probabilities_outside_unit_interval_and_other_functions():
    with pytest.raises(ValueError, match="p must be probabilities"):
        ece(Y, P + 0.5)
    with pytest.raises(ValueError, match="cluster"):
        bootstrap_ci("auroc", Y, P, cluster=[1, 2, 3])
    with pytest.raises(ValueError, match="p_b"):
        paired_bootstrap_diff("auroc", Y, P, np.r_[P[:4], np.nan])
    with pytest.raises(ValueError, match="metric='kappa'"):
        bootstrap_ci("kappa", Y, P)
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(Y, np.r_[P[:4], np.inf])
    with pytest.raises(ValueError, match="target"):
        choose_threshold(Y, P, "sensitivity")
    with pytest.raises(ValueError, match="groups is missing for every sample"):
        subgroup_report(Y, P, [np.nan] * 5, threshold=0.5)


def test_nan_label_rows_are_masked_not_errors():
    y = np.r_[Y, np.nan]
    p = np.r_[P, 0.99]
    assert auroc(y, p) == auroc(Y, P)
    assert brier(y, p) == brier(Y, P)

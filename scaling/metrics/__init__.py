"""Trustworthy evaluation from stored per-sample predictions.

* discrimination: :func:`auroc`, :func:`auprc`, :func:`per_label`, :func:`macro_average`
* uncertainty: :func:`bootstrap_ci` (patient-level cluster bootstrap, vectorised), :func:`paired_bootstrap_diff`,
  :func:`delong_ci`, :func:`delong_test` (fast DeLong, Sun & Xu 2014; by patient with ``cluster``: Obuchowski 1997),
  :func:`or_test`, :func:`or_test_macro`, :func:`or_test_labels`, :func:`or_test_brier` (two models over several
  seeds and patients: Obuchowski–Rockette; Hillis's degrees of freedom from 5 seeds), :func:`holm` (p-values
  adjusted for the number of tests)
* calibration: :func:`ece`, :func:`mce`, :func:`brier`, :func:`nll`, :func:`fit_temperature`,
  :func:`apply_temperature`, :func:`reliability_diagram`, :func:`plot_reliability`
* operating points and fairness: :func:`choose_threshold`, :func:`rates_at`, :func:`subgroup_report`
* selective prediction: :func:`referral_curve`, :func:`referral_area`, :func:`aurc`
* data efficiency: :func:`fraction_to_reach`, :func:`data_efficiency`
* wiring: :func:`compute_run_metrics` (the rows stored with every run; conventions in ``run_metrics``)

Labels are 1/0/NaN; NaN = not labelled, masked per label (``n`` always says how many rows a number rests on).
Probabilities must be finite. Bad input raises ValueError naming the argument.
"""

from scaling.metrics.bootstrap import (BootstrapResult, ClusterBootstrap, PairedBootstrapResult, bootstrap_ci,
                                       paired_bootstrap_diff, percentile_interval, rescale_resample,
                                       satterthwaite_widening)
from scaling.metrics.calibration import (bin_edges, brier, ece, mce, nll, plot_reliability,
                                         reliability_diagram)
from scaling.metrics.delong import DelongCI, DelongTest, delong_ci, delong_components, delong_test
from scaling.metrics.discrimination import auprc, auroc, macro_average, per_label
from scaling.metrics.efficiency import DataEfficiency, data_efficiency, fraction_to_reach
from scaling.metrics.fairness import SubgroupReport, subgroup_report
from scaling.metrics.multiple_testing import holm
from scaling.metrics.mrmc import ORTest, or_hillis, or_test, or_test_brier, or_test_labels, or_test_macro
from scaling.metrics.run_metrics import compute_run_metrics
from scaling.metrics.selective import aurc, referral_area, referral_curve
from scaling.metrics.temperature import apply_temperature, fit_temperature
from scaling.metrics.thresholds import choose_threshold, rates_at
from scaling.metrics.validation import MetricWarning

__all__ = [
    "BootstrapResult", "ClusterBootstrap", "DataEfficiency", "DelongCI", "DelongTest", "MetricWarning", "ORTest",
    "PairedBootstrapResult", "SubgroupReport", "apply_temperature", "aurc", "auprc", "auroc", "bin_edges",
    "bootstrap_ci", "brier", "choose_threshold", "compute_run_metrics", "data_efficiency", "delong_ci",
    "delong_components", "delong_test", "ece", "fit_temperature", "fraction_to_reach", "holm", "macro_average", "mce",
    "nll", "or_hillis", "or_test", "or_test_brier", "or_test_labels", "or_test_macro", "paired_bootstrap_diff",
    "per_label", "percentile_interval", "plot_reliability", "rates_at", "referral_area", "referral_curve",
    "reliability_diagram", "rescale_resample", "satterthwaite_widening", "subgroup_report",
]

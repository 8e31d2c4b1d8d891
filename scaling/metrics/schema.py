"""The tidy metric-row schema: what :func:`scaling.metrics.run_metrics.compute_run_metrics` returns and what the run
store (:mod:`scaling.study.store`) writes to ``metrics.parquet``.

One row per (evaluation set, label, attribute, group, metric): ``label`` is a label name or ``macro``;
``attribute``/``group`` are ``all`` for the whole set, else a subgroup column and one of its values; ``lo``/``hi``
bound the value's confidence interval (NaN where none is computed); ``n`` counts the samples behind the value.
"""

METRIC_COLUMNS = ("eval_set", "label", "attribute", "group", "metric", "value", "lo", "hi", "n")
"""Columns of a metric row, in their stored order."""

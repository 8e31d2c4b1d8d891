"""Adjusting p-values for the number of tests: a report that runs many comparisons (every backbone, label, seed and
evaluation set) would otherwise show some "significant" ones by chance alone."""

from __future__ import annotations

import numpy as np


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjustment of ``p_values`` (NaN entries are no test: left NaN, not counted).

    With the m defined p-values sorted increasingly, the i-th (0-based) becomes ``max over j <= i of
    min(1, (m - j) p_(j))``; rejecting where the adjusted value is below alpha controls the family-wise error rate
    at alpha under any dependence between the tests.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    defined = np.flatnonzero(np.isfinite(p))
    if defined.size:
        order = defined[np.argsort(p[defined], kind="stable")]
        m = order.size
        out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out

"""Breast- and exam-level predictions from per-image predictions (mammography).

A screening mammogram is read per exam — two views (CC, MLO) of each breast — and recalled or not per exam, so a
per-image AUROC answers a question nobody asks in the clinic. Models trained per image are evaluated per breast
and per exam by pooling the image scores: the *max* (a finding visible in one view flags the breast; McKinney et
al. 2020, "International evaluation of an AI system for breast cancer screening", Nature 577:89, score the case
by its most suspicious region) and the *mean* (evidence averaged over views; Wu et al. 2020, "Deep Neural Networks
Improve Radiologists' Performance in Breast Cancer Screening", IEEE TMI 39:1184, average the CC and MLO
predictions of a breast).

Units:

* ``exam``: the ``exam_id`` column when the set has one (EMBED's accession), else ``patient_id`` (VinDr-Mammo,
  CBIS-DDSM and CMMD hold one exam per patient in each split);
* ``breast``: exam × ``laterality``; images without a laterality cannot be placed and are left out (warned).

A unit's label is the maximum of its images' labels (positive if any image is; NaN only when none is labelled):
VinDr-Mammo's breast-level BI-RADS is the same on both views of a breast, and an exam is positive when either
breast is. The pooled probability is the max or the mean of the image probabilities; its logit is the logit of
that probability (for the max, simply the largest image logit), so validation-fitted temperatures apply to units
as they do to images. ``patient_id`` is kept, so the bootstrap still resamples patients.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from scaling.metrics.validation import MetricWarning

LEVELS = ("breast", "exam")
"""Units predictions can be pooled into."""
REDUCERS = ("max", "mean")
"""How the image probabilities of a unit are pooled."""
EXAM_COLUMN = "exam_id"
"""Column naming the exam of an image, when a dataset has more than one exam per patient."""
LATERALITY_COLUMN = "laterality"
"""Column naming the breast (L/R) of an image."""

_CLIP = 1e-12


def unit_ids(df: pd.DataFrame, level: str, where: str = "predictions") -> pd.Series:
    """The unit (exam, or exam + breast) of every image as a string, NaN for images that belong to no unit.

    ``where`` names the frame in error messages. Raises ValueError when the columns a level needs are absent.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not allowed; choose one of {list(LEVELS)}")
    if EXAM_COLUMN in df.columns and df[EXAM_COLUMN].notna().any():
        if df[EXAM_COLUMN].isna().any():
            i = int(np.flatnonzero(df[EXAM_COLUMN].isna().to_numpy())[0])
            raise ValueError(f"{where}[{EXAM_COLUMN!r}] is missing in row {i}; every image needs its exam")
        exam = df["patient_id"].astype(str) + "/" + df[EXAM_COLUMN].astype(str)
    else:
        exam = df["patient_id"].astype(str)
    if level == "exam":
        return exam
    if LATERALITY_COLUMN not in df.columns:
        raise ValueError(f"{where} has no {LATERALITY_COLUMN!r} column: breast-level evaluation needs the side of "
                         "every image")
    side = df[LATERALITY_COLUMN]
    if side.isna().any():
        warnings.warn(f"{where}: {int(side.isna().sum())} image(s) without {LATERALITY_COLUMN} are left out of the "
                      "breast-level evaluation", MetricWarning, stacklevel=2)
    return (exam + "/" + side.astype(str)).where(side.notna())


def aggregate_predictions(df: pd.DataFrame, labels, level: str, reducer: str,
                          where: str = "predictions") -> pd.DataFrame:
    """Per-image predictions (``patient_id``, ``label:<L>``, ``logit:<L>``, ``prob:<L>``) pooled per unit.

    Returns one row per ``level`` unit (``breast`` or ``exam``) with ``sample_id`` = the unit, ``patient_id``,
    ``n_images`` and, per label, ``label:<L>`` (max over images), ``prob:<L>`` (the ``reducer`` — ``max`` or
    ``mean`` — of the image probabilities) and ``logit:<L>`` (its logit). Rows are sorted by unit.
    """
    if reducer not in REDUCERS:
        raise ValueError(f"reducer={reducer!r} is not allowed; choose one of {list(REDUCERS)}")
    units = unit_ids(df, level, where)
    keep = units.notna().to_numpy()
    d = df.loc[keep, ["patient_id"]].assign(unit=units[keep].to_numpy())
    for lab in labels:
        d[f"label:{lab}"] = df.loc[keep, f"label:{lab}"].to_numpy(np.float64)
        d[f"prob:{lab}"] = df.loc[keep, f"prob:{lab}"].to_numpy(np.float64)
        d[f"logit:{lab}"] = df.loc[keep, f"logit:{lab}"].to_numpy(np.float64)
    g = d.groupby("unit", sort=True)
    patients = g["patient_id"].nunique()
    if (patients > 1).any():
        raise ValueError(f"{where}: unit {patients.index[patients > 1][0]!r} spans several patients")
    out = pd.DataFrame({"sample_id": g.size().index.to_numpy(), "patient_id": g["patient_id"].first().to_numpy(),
                        "n_images": g.size().to_numpy()})
    for lab in labels:
        out[f"label:{lab}"] = g[f"label:{lab}"].max().to_numpy()  # NaN only when no image is labelled
        p = g[f"prob:{lab}"].agg(reducer).to_numpy()
        out[f"prob:{lab}"] = p
        if reducer == "max":  # the sigmoid is monotone: the most probable image has the largest logit
            out[f"logit:{lab}"] = g[f"logit:{lab}"].max().to_numpy()
        else:
            q = np.clip(p, _CLIP, 1.0 - _CLIP)
            out[f"logit:{lab}"] = np.log(q) - np.log1p(-q)
    return out

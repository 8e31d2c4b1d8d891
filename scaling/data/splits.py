"""Patient-level splits, nested data fractions and k-shot subsets, seeded and stratified.

Everything here works on patients, never images: all images of a patient land in the same split and subset, so no
patient leaks between train and test and fractions count patients (docs/design.md, "Patient-level everything").

One seeded, stratified *ordering* of patients drives everything:

1. each patient gets a stratum: the rarest label (by patient prevalence) among the labels it is positive for,
   or ``none`` (no positive, or no labels);
2. within each stratum the patients are permuted by the seed, and the j-th of n gets the key ``(j + u) / n`` with
   ``u`` uniform in [0, 1); sorting all patients by key interleaves the strata, so *every prefix* of the order
   holds each stratum in about its overall proportion.

Splits cut the order into consecutive blocks; a data fraction ``f`` is the first ``round(f * n)`` patients of the
order, so for one seed the 1 % subset is inside the 10 % subset inside the 100 % set (nested). A fraction subset
then adds, for each label that has positives (resp. negatives) in the table but none in the prefix, the earliest
such patient in the order. That keeps at least one positive and one negative per label wherever the table has
one, and it stays nested: if a larger prefix has a positive for a label, it contains the earliest one.

Patients are sorted by id before permuting, so the result depends on the seed and the set of patients, not on
row order. Splits and fractions use different random streams (``salt``), so the same seed does not correlate them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from scaling.data.table import LABEL_PREFIX, DataError, label_names

log = logging.getLogger(__name__)

_SALT = {"split": 0x5B1, "fraction": 0xF4C, "kshot": 0xC5E}


def _patient_labels(df: pd.DataFrame, labels: Sequence[str] | None) -> pd.DataFrame:
    """Per patient (sorted by id): 1.0 if any image is positive, 0.0 if any is negative and none positive, NaN else."""
    names = list(labels) if labels is not None else label_names(df)
    cols = [LABEL_PREFIX + n for n in names]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"stratification labels {missing} are not columns of the table")
    if "patient_id" not in df.columns:
        raise DataError("table has no 'patient_id' column")
    grouped = df[["patient_id", *cols]].groupby("patient_id", sort=True)
    return grouped.max() if cols else pd.DataFrame(index=sorted(df["patient_id"].unique()))


def patient_order(df: pd.DataFrame, seed: int, labels: Sequence[str] | None = None, salt: str = "fraction") -> np.ndarray:
    """The seeded, stratified order of the table's patient ids (see the module docstring)."""
    per_patient = _patient_labels(df, labels)
    patients = per_patient.index.to_numpy()
    pos = per_patient.to_numpy(dtype=float) == 1.0
    prevalence = pos.sum(axis=0)
    # Stratum = rarest positive label; labels ordered by prevalence, ties by column order.
    rank = np.argsort(np.where(prevalence > 0, prevalence, np.iinfo(np.int64).max), kind="stable")
    stratum = np.full(len(patients), -1)
    for j in rank[::-1]:  # rarest last, so it wins
        stratum[pos[:, j]] = j
    rng = np.random.default_rng([seed, _SALT[salt]])
    key = np.empty(len(patients))
    for s in np.unique(stratum):
        members = np.flatnonzero(stratum == s)
        perm = rng.permutation(members)
        key[perm] = (np.arange(len(perm)) + rng.random(len(perm))) / len(perm)
    return patients[np.argsort(key, kind="stable")]


def _rows_of(df: pd.DataFrame, patients) -> pd.DataFrame:
    return df[df["patient_id"].isin(set(patients))].reset_index(drop=True)


def patient_split(
    df: pd.DataFrame,
    fractions: Mapping[str, float],
    seed: int = 0,
    labels: Sequence[str] | None = None,
    rest: str = "train",
) -> dict[str, pd.DataFrame]:
    """Split a table by patient into named parts, e.g. ``{"test": 0.2, "val": 0.1}``; the remainder is ``rest``.

    Fractions are of patients, must be finite numbers in [0, 1] and sum to at most 1; when they sum to less than 1
    the remaining patients form the part named ``rest`` (default ``train``). Patient counts use largest remainders,
    and every part with a non-zero fraction gets at least one patient when there are enough. Stratified by the labels
    (default: all label columns). Use a study-wide seed so that every run of a study sees the same test patients.
    """
    parts_frac = dict(fractions)
    for name, f in parts_frac.items():  # NaN fails every comparison, so it must be caught here or it empties a split
        if isinstance(f, bool) or not isinstance(f, (int, float, np.number)) or not math.isfinite(f) or not 0 <= f <= 1:
            raise DataError(f"split fraction {name!r} = {f!r} must be a finite number in [0, 1]")
    total = sum(parts_frac.values())
    if total > 1.0 + 1e-9:
        raise DataError(f"split fractions {parts_frac} must be >= 0 and sum to at most 1 (they sum to {total})")
    if total < 1.0 - 1e-9:
        if rest in parts_frac:
            raise DataError(f"split fractions {parts_frac} name {rest!r} but do not sum to 1")
        parts_frac[rest] = 1.0 - total
    order = patient_order(df, seed, labels, salt="split")
    n = len(order)
    exact = np.array([f * n for f in parts_frac.values()])
    counts = np.floor(exact + 1e-9).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    for i, f in enumerate(parts_frac.values()):  # a requested part is never empty while another can spare a patient
        if f > 0 and counts[i] == 0 and counts.max() > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    bounds = np.concatenate([[0], np.cumsum(counts)])
    parts = {name: _rows_of(df, order[bounds[i] : bounds[i + 1]]) for i, name in enumerate(parts_frac)}
    log.info("patient split (seed %d): %s", seed, {k: f"{v['patient_id'].nunique()} patients" for k, v in parts.items()})
    return parts


def check_disjoint(tables: Mapping[str, pd.DataFrame]) -> None:
    """Raise DataError if a patient appears in two of the named tables."""
    seen: dict[str, str] = {}
    for name, t in tables.items():
        for p in t["patient_id"].unique():
            if p in seen:
                raise DataError(f"patient {p!r} is in both split {seen[p]!r} and split {name!r}")
            seen[p] = name


def _first_with(order: np.ndarray, per_patient: pd.DataFrame, value: float) -> dict[str, str]:
    """For each label, the earliest patient in ``order`` whose per-patient label equals ``value``."""
    ranked = per_patient.loc[order]
    out = {}
    for col in ranked.columns:
        hits = np.flatnonzero(ranked[col].to_numpy(dtype=float) == value)
        if len(hits):
            out[col] = order[hits[0]]
    return out


def fraction_subset(
    df: pd.DataFrame, fraction: float, seed: int = 0, labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """The nested, seeded, stratified ``fraction`` of the table's patients (all their images).

    Keeps at least one positive and one negative patient per label wherever the table has one (see the module
    docstring); for tiny fractions this can make the subset slightly larger than ``round(fraction * n)``.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"data fraction {fraction} must be in (0, 1]")
    order = patient_order(df, seed, labels, salt="fraction")
    n_keep = max(1, round(fraction * len(order)))
    chosen = list(order[:n_keep])
    per_patient = _patient_labels(df, labels)
    have = per_patient.loc[chosen]
    for value in (1.0, 0.0):
        for col, patient in _first_with(order, per_patient, value).items():
            if not (have[col].to_numpy(dtype=float) == value).any():
                chosen.append(patient)
    chosen = list(dict.fromkeys(chosen))
    if len(chosen) > n_keep:
        log.info("fraction %.4g: added %d patient(s) so every label keeps a positive and a negative", fraction, len(chosen) - n_keep)
    return _rows_of(df, chosen)


BIT_SHOTS = (1, 5, 10, 25)
"""The few-shot sizes of BiT's transfer protocol (Kolesnikov et al. 2020, §4.1: 1, 5, 10 and 25 examples per class)."""


def kshot_subset(df: pd.DataFrame, k: int, seed: int = 0, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """A patient-level k-shot subset: for each label, the first ``k`` positive and first ``k`` negative patients.

    BiT's k examples per class (Kolesnikov et al. 2020, §4.1, shots :data:`BIT_SHOTS`) for multi-label tasks, where
    each label is a binary task with two classes. Examples are patients, with all their images (no patient is split
    across train and test). "First" is in the seeded order of :func:`patient_order` (its own random stream), so for
    one seed the subsets are nested in ``k`` (the 5-shot set contains the 1-shot set) and independent of row order.
    A patient unlabelled for a label (NaN) never counts for it. A label can end up with more than ``k`` positive or
    negative patients (picked for another label) but never fewer than ``k`` unless the table has fewer, which is
    logged.
    """
    if k < 1:
        raise DataError(f"k-shot k={k} must be >= 1")
    order = patient_order(df, seed, labels, salt="kshot")
    ranked = _patient_labels(df, labels).loc[order]
    chosen: list[str] = []
    for col in ranked.columns:
        values = ranked[col].to_numpy(dtype=float)
        for value, kind in ((1.0, "positive"), (0.0, "negative")):
            hits = np.flatnonzero(values == value)
            if len(hits) < k:
                log.warning("%d-shot: label %r has only %d %s patient(s)", k, col.removeprefix(LABEL_PREFIX),
                            len(hits), kind)
            chosen.extend(order[hits[:k]])
    return _rows_of(df, dict.fromkeys(chosen))

"""Canonical label names, per-dataset harmonisation, CheXpert-style uncertainty / blank policies, one-of-K targets.

Canonical names are CheXpert's 14 observation names for chest X-ray (Irvin et al. 2019), extended with the NIH
ChestX-ray14 findings CheXpert lacks, plus dermatology and mammography targets. Every loader names its label
columns ``label:<Canonical Name>`` so that a model trained on one dataset is evaluated on another on the labels
they share; :func:`select_labels` adds NaN columns for labels a dataset lacks (NaN = not labelled, so the missing
label is excluded from metrics rather than counted as negative, as in torchxrayvision's ``relabel_dataset``).

Raw CheXpert-style values are ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain and blank (not mentioned).
Two independent rules turn them into 1/0/NaN:

* the **uncertainty policy** for ``-1.0`` (CheXpert paper §4.1): ``ignore`` (U-Ignore, NaN), ``zeros`` (U-Zeros, 0),
  ``ones`` (U-Ones, 1), a ``{label: policy}`` dict (unlisted labels: ``ignore``), or ``best`` (the per-task mapping
  the paper found best on validation: U-Ones for Atelectasis/Edema/Pleural Effusion, U-Zeros for
  Cardiomegaly/Consolidation; ``ignore`` for the other labels);
* the **blank rule**: ``zero`` (default; "not mentioned in the report" = negative, the CheXpert competition
  convention) or ``nan`` (not labelled, torchxrayvision's convention). Under ``nan`` a row whose ``No Finding`` is
  1.0 still gets 0.0 for every blank pathology except ``Support Devices``, because "no finding" is an explicit
  negative statement about them (torchxrayvision ``CheX_Dataset``).

A one-of-K task (``data.task: multiclass``, e.g. the ISIC 2019 diagnosis) reads the same ``label:<class>`` columns:
a sample's class is its one positive column (:func:`class_targets`). Because the classes exclude each other, a
positive also says the sample is none of the others, so :func:`one_of_k_labels` fills the other classes with 0
where a dataset left them blank (HAM10000 has no SCC column, ISIC 2019 does). A sample with no positive class is
not labelled for the task (ISIC 2019's UNK rows are all NaN; DDI knows only whether a lesion is a melanoma).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from scaling.data.table import LABEL_PREFIX, DataError, OptionError, label_names

log = logging.getLogger(__name__)

CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
"""CheXpert's 14 observations, in train.csv column order."""

COMPETITION_TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
"""The 5 CheXpert competition tasks."""

NIH_EXTRA_LABELS = ("Infiltration", "Emphysema", "Fibrosis", "Pleural Thickening", "Nodule", "Mass", "Hernia")
"""NIH ChestX-ray14 findings with no CheXpert counterpart."""

DERM_LABELS = (
    "Malignant",
    "Melanoma",
    "Melanocytic Nevus",
    "Basal Cell Carcinoma",
    "Actinic Keratosis",
    "Squamous Cell Carcinoma",
    "Benign Keratosis",
    "Dermatofibroma",
    "Vascular Lesion",
)
"""Dermatology targets: binary malignancy and the ISIC 2019 diagnostic classes."""

MAMMO_LABELS = ("Malignant", "Suspicious")
"""Mammography targets: biopsy-proven malignancy, and BI-RADS-based suspicion (BI-RADS 4/5/6 = 1, 1/2 = 0)."""

CANONICAL_LABELS = tuple(dict.fromkeys(CHEXPERT_LABELS + NIH_EXTRA_LABELS + DERM_LABELS + MAMMO_LABELS))
"""Every canonical label name a ``label:<name>`` column may carry."""

# Source label name -> canonical name, per dataset. Names absent from a dataset's map are not labelled there.
HARMONISATION: dict[str, dict[str, str]] = {
    "chexpert": {n: n for n in CHEXPERT_LABELS},
    # MIMIC-CXR's chexpert.csv/negbio.csv come from the same labeler, hence the same 14 names.
    "mimic_cxr": {n: n for n in CHEXPERT_LABELS},
    "nih_cxr14": {
        "No Finding": "No Finding",
        "Atelectasis": "Atelectasis",
        "Cardiomegaly": "Cardiomegaly",
        "Consolidation": "Consolidation",
        "Edema": "Edema",
        "Effusion": "Pleural Effusion",
        "Pneumonia": "Pneumonia",
        "Pneumothorax": "Pneumothorax",
        "Infiltration": "Infiltration",
        "Emphysema": "Emphysema",
        "Fibrosis": "Fibrosis",
        "Pleural_Thickening": "Pleural Thickening",
        "Nodule": "Nodule",
        "Mass": "Mass",
        "Hernia": "Hernia",
    },
    "ham10000": {
        "mel": "Melanoma",
        "nv": "Melanocytic Nevus",
        "bcc": "Basal Cell Carcinoma",
        "akiec": "Actinic Keratosis",
        "bkl": "Benign Keratosis",
        "df": "Dermatofibroma",
        "vasc": "Vascular Lesion",
    },
    "isic2019": {
        "MEL": "Melanoma",
        "NV": "Melanocytic Nevus",
        "BCC": "Basal Cell Carcinoma",
        "AK": "Actinic Keratosis",
        "SCC": "Squamous Cell Carcinoma",
        "BKL": "Benign Keratosis",
        "DF": "Dermatofibroma",
        "VASC": "Vascular Lesion",
    },
}

UNCERTAINTY_POLICIES = ("ignore", "zeros", "ones")
BEST_UNCERTAINTY = {
    "Atelectasis": "ones",
    "Cardiomegaly": "zeros",
    "Consolidation": "zeros",
    "Edema": "ones",
    "Pleural Effusion": "ones",
}
"""Per-task best policy of the CheXpert paper (``CHEXPERT_UNCERTAIN_MAPPINGS`` in public code)."""
BLANK_RULES = ("zero", "nan")



def check_label_names(names: Sequence[str], setting: str = "labels", also: Sequence[str] = ()) -> None:
    """Raise :class:`~scaling.data.table.OptionError` (a DataError) for a name that is neither canonical nor one of
    ``also`` (a loader's own label names), suggesting the closest valid names (``setting`` says which setting named
    it: ``labels``, or ``options`` for a policy)."""
    valid = [*CANONICAL_LABELS, *(a for a in also if a not in CANONICAL_LABELS)]
    for n in names:
        if n not in valid:
            close = difflib.get_close_matches(n, valid, n=3)
            own = f"; the dataset's own labels: {list(also)}" if also else ""
            hint = f"closest names: {close}{own}" if close else f"canonical names: {list(CANONICAL_LABELS)}{own}"
            raise OptionError(f"unknown label {n!r}; {hint}", setting)


PADCHEST_TERMS: dict[str, tuple[str, ...]] = {
    "No Finding": ("normal",),
    "Atelectasis": ("atelectasis",),
    "Cardiomegaly": ("cardiomegaly",),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Edema": ("edema",),
    "Pleural Effusion": ("effusion",),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax",),
    "Fracture": ("fracture",),
    "Infiltration": ("infiltration", "infiltrates", "interstitial pattern", "ground glass pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern", "alveolar pattern",
                     "consolidation", "air bronchogram"),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("fibrosis",),
    "Pleural Thickening": ("pleural thickening",),
    "Nodule": ("nodule",),
    "Mass": ("mass",),
    "Hernia": ("hernia",),
}
"""PadChest's findings (about 190 lower-case terms of a hierarchy: ``laminar atelectasis``, ``callus rib fracture``,
``pulmonary mass``, ``loculated pleural effusion``, ``multiple nodules`` …) per canonical label. As in
torchxrayvision's ``PC_Dataset`` (``datasets.py``), which Cohen et al. 2020 evaluate PadChest with, a label is
positive when one of its terms is **part of** a finding, so a child term counts for its parent; the synonym lists are
torchxrayvision's. Like there, ``effusion`` includes pericardial effusion and ``pneumothorax`` hydropneumothorax.
``No Finding`` is the finding ``normal`` itself (``abnormal …`` is not normal)."""


def padchest_labels(findings: Sequence[str]) -> dict[str, float]:
    """1.0/0.0 per canonical label of :data:`PADCHEST_TERMS` for one image's findings (lower-case, stripped)."""
    out = {}
    for name, terms in PADCHEST_TERMS.items():
        if name == "No Finding":
            hit = any(f in terms for f in findings)
        else:
            hit = any(t in f for f in findings for t in terms)
        out[name] = float(hit)
    return out


def harmonise(dataset: str, source_name: str) -> str | None:
    """Canonical name of ``source_name`` in ``dataset``; None when the dataset's label has no canonical counterpart."""
    if dataset not in HARMONISATION:
        raise DataError(f"no harmonisation table for dataset {dataset!r}; known: {sorted(HARMONISATION)}")
    return HARMONISATION[dataset].get(source_name)


def parse_raw_labels(cells: pd.Series, source: str, column: str, lines: np.ndarray | None = None) -> np.ndarray:
    """Parse CheXpert-style cell text (``'1.0'``, ``'0.0'``, ``'-1.0'``, blank) into 1/0/-1/NaN floats.

    ``lines`` are the file line numbers of the cells (default: position + 2, i.e. right after a header), so
    errors name the line a user sees in an editor.
    """
    # Parse each distinct cell text once (a column has a handful), then index: 10x faster than per-cell parsing.
    codes, uniques = pd.factorize(cells.fillna("").astype(str), use_na_sentinel=False)
    parsed = np.array([_parse_cell(u) for u in uniques], dtype=float)
    bad_codes = np.flatnonzero(parsed == _BAD)
    if len(bad_codes):
        i = int(np.flatnonzero(np.isin(codes, bad_codes))[0])
        raise DataError(
            f"{source}: line {i + 2 if lines is None else lines[i]}, column {column!r}: unparseable label value "
            f"{str(cells.iloc[i]).strip()!r} (expected 1.0, 0.0, -1.0 or blank)"
        )
    return parsed[codes]


_BAD = -99.0


def _parse_cell(text: str) -> float:
    """One CheXpert-style cell: blank → NaN, 1/0/-1 (any float spelling) → value, anything else → _BAD."""
    text = text.strip()
    if not text:
        return np.nan
    try:
        value = float(text)
    except ValueError:
        return _BAD
    return value if value in (1.0, 0.0, -1.0) else _BAD


def uncertainty_for(label: str, policy: str | Mapping[str, str]) -> str:
    """The uncertainty policy (``ignore``/``zeros``/``ones``) that applies to ``label`` under ``policy``."""
    if isinstance(policy, str):
        if policy == "best":
            return BEST_UNCERTAINTY.get(label, "ignore")
        if policy not in UNCERTAINTY_POLICIES:
            raise OptionError(
                f"uncertainty policy {policy!r} is not allowed; choose one of {list(UNCERTAINTY_POLICIES) + ['best']}"
                " or a {label: policy} mapping", "options"
            )
        return policy
    check_label_names(list(policy), setting="options")
    choice = policy.get(label, "ignore")
    if choice not in UNCERTAINTY_POLICIES:
        raise OptionError(f"uncertainty policy for {label!r} is {choice!r}; choose one of {list(UNCERTAINTY_POLICIES)}",
                          "options")
    return choice


def apply_label_policy(
    raw: Mapping[str, np.ndarray],
    uncertainty: str | Mapping[str, str] = "ignore",
    blank: str = "zero",
) -> dict[str, np.ndarray]:
    """Map raw 1/0/-1/NaN arrays (keyed by canonical name) to 1/0/NaN under the uncertainty policy and blank rule.

    See the module docstring for the rules. ``No Finding`` itself never carries -1 in CheXpert; if it does, the
    policy applies to it like to any other label.
    """
    if blank not in BLANK_RULES:
        raise OptionError(f"blank rule {blank!r} is not allowed; choose one of {list(BLANK_RULES)}", "options")
    no_finding = raw.get("No Finding")
    out = {}
    for name, values in raw.items():
        v = np.asarray(values, dtype=float).copy()
        blank_mask = np.isnan(v)
        if blank == "zero":
            v[blank_mask] = 0.0
        elif no_finding is not None and name not in ("No Finding", "Support Devices"):
            v[blank_mask & (np.asarray(no_finding) == 1.0)] = 0.0
        mode = uncertainty_for(name, uncertainty)
        v[v == -1.0] = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[mode]
        out[name] = v
    return out


def select_labels(df: pd.DataFrame, names: Sequence[str], source: str | None = "this dataset",
                  known: Sequence[str] = ()) -> pd.DataFrame:
    """Return ``df`` with exactly the label columns ``label:<name>`` for ``names``, in that order.

    Labels the dataset lacks become all-NaN columns (never 0), and a warning naming ``source`` lists them (none
    when ``source`` is None); other label columns are dropped. A name must be canonical, a label of ``df`` itself
    (a loader of your own may name its labels freely) or one of ``known`` (e.g. the study's training labels, which
    another dataset lacks).
    """
    names = list(names)
    present = set(label_names(df))
    check_label_names([n for n in names if n not in present and n not in known])
    missing = [n for n in names if n not in present]
    if missing and source is not None:
        log.warning("labels %s are not in %s; they are NaN (excluded from loss and metrics)", missing, source)
    keep = [c for c in df.columns if not c.startswith(LABEL_PREFIX)]
    out = df[keep].copy()
    for n in names:
        out[LABEL_PREFIX + n] = df[LABEL_PREFIX + n].astype(float) if n in present else np.nan
    return out


def class_targets(df: pd.DataFrame, classes: Sequence[str], source: str = "sample table") -> np.ndarray:
    """One-of-K targets: the index in ``classes`` of each row's positive ``label:<class>`` (int64), -1 for a row
    with no positive class (unlabelled for the task: excluded from the loss and the class metrics).

    A row positive for two or more classes is a DataError naming ``source`` and the sample.
    """
    y = df[[LABEL_PREFIX + c for c in classes]].to_numpy(dtype=float)
    positive = y == 1.0
    several = positive.sum(axis=1) > 1
    if several.any():
        i = int(np.flatnonzero(several)[0])
        sample = df["sample_id"].iloc[i] if "sample_id" in df.columns else f"row {i}"
        hot = [c for c, p in zip(classes, positive[i]) if p]
        raise DataError(f"{source}: sample {sample!r} is positive for {hot}; a one-of-K task (data.task="
                        f"'multiclass') needs at most one positive class among {list(classes)} per sample")
    return np.where(positive.any(axis=1), positive.argmax(axis=1), -1).astype(np.int64)


def one_of_k_labels(df: pd.DataFrame, classes: Sequence[str], source: str = "sample table") -> pd.DataFrame:
    """``df`` with the class columns of every row that has a positive class completed to a one-hot (0.0 in the
    classes it left blank: the classes exclude each other); other rows are unchanged. Two positives: DataError."""
    k = class_targets(df, classes, source)
    out = df.copy()
    known = k >= 0
    for j, c in enumerate(classes):
        out.loc[known, LABEL_PREFIX + c] = (k[known] == j).astype(float)
    return out


def check_derived_labels(df: pd.DataFrame, classes: Sequence[str], derived: Mapping[str, Sequence[str]],
                         source: str = "sample table") -> None:
    """Every row whose class and derived label are both known agrees with the grouping: ``label:<name>`` is 1
    exactly when the class is one of ``derived[name]``. A disagreement (e.g. HAM10000 loaded with
    ``malignant=("mel", "akiec")`` against a group that includes BCC) is a DataError naming the sample: the
    derived probability would be scored against a label that means something else."""
    k = class_targets(df, classes, source)
    for name, group in derived.items():
        column = LABEL_PREFIX + name
        if column not in df.columns:
            continue
        label = df[column].to_numpy(dtype=float)
        member = np.isin(k, [list(classes).index(c) for c in group])
        bad = (k >= 0) & ~np.isnan(label) & ((label == 1.0) != member)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{source}: sample {df['sample_id'].iloc[i]!r} has class {classes[k[i]]!r} and {column}="
                f"{label[i]:g}, but data.derived_labels.{name} = {list(group)} says {float(member[i]):g}; make the "
                f"group match how the dataset defines {name!r} (or its loader options)")

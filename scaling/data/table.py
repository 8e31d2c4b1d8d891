"""The sample table: one row per image, the contract every dataset loader returns.

Columns (required):
    sample_id   str    unique, stable across runs (derived from the dataset's own ids/paths)
    patient_id  str    patient identifier (splits, fractions and bootstrap are by patient)
    path        str    absolute image path
    label:<Canonical Name>   float  1.0 / 0.0 / NaN (NaN = not labelled; excluded from loss and metrics)
    sex         str    'F' / 'M' / missing (None)
    age         float  years, NaN when unknown
Optional, dataset-specific attribute columns: view, race, site, manufacturer, skin_type, density, ...
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

LABEL_PREFIX = "label:"
REQUIRED_COLUMNS = ("sample_id", "patient_id", "path", "sex", "age")


class DataError(ValueError):
    """A dataset file, row or field is invalid; the message names the file and the row or sample id."""


class OptionError(DataError):
    """A setting names something the dataset does not have: a split, a loader option or its value, a label.

    ``setting`` says which (``"split"``, ``"options"``, ``"labels"`` or ``"root"``), so a study can name the config
    field (``data.test_split``, ``data.ood.0.options`` …) and the file or override that set it."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


def label_columns(df: pd.DataFrame) -> list[str]:
    """The ``label:<name>`` columns of a sample table, in order."""
    return [c for c in df.columns if c.startswith(LABEL_PREFIX)]


def label_names(df: pd.DataFrame) -> list[str]:
    """Canonical label names present in a sample table."""
    return [c[len(LABEL_PREFIX):] for c in label_columns(df)]


def blank_cells(values: pd.Series) -> np.ndarray:
    """Where a column of ids or file names is missing or blank (whitespace only)."""
    return (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()


def check_ids(df: pd.DataFrame, source: str) -> None:
    """DataError naming ``source`` and the row when a ``sample_id`` or ``patient_id`` is missing or blank.

    A missing patient id would silently drop the row from every patient-level split (pandas groups skip NaN).
    """
    for col in ("sample_id", "patient_id"):
        blank = blank_cells(df[col])
        if blank.any():
            i = int(np.flatnonzero(blank)[0])
            sample = "" if col == "sample_id" else f" (sample {df['sample_id'].iloc[i]!r})"
            raise DataError(f"{source}: row {i}{sample}: {col} is missing or blank")


def id_spelling(value) -> str:
    """The patient an id names, whatever its export spelling: surrounding whitespace and the leading zeros of an
    all-digit id dropped (``' 0012 '``, ``'0012'``, ``'12'`` and the integer 12 all give ``'12'``)."""
    text = str(value).strip()
    return (text.lstrip("0") or "0") if text.isdigit() else text


def check_patient_spellings(df: pd.DataFrame, source: str) -> None:
    """DataError naming ``source``, two ids and a sample of each when two different ``patient_id`` values differ
    only by whitespace or leading zeros (:func:`id_spelling`). Exports from a PACS or a spreadsheet write one
    patient as ``00123``, ``123`` or `` 00123``; as different ids the patient's images would be split across train
    and test and counted as several patients in every interval."""
    ids = pd.Series(df["patient_id"].unique())
    spelling = ids.map(id_spelling)
    clash = spelling.duplicated(keep=False)
    if clash.any():
        first = spelling[clash].iloc[0]
        a, b = ids[spelling == first].iloc[:2]
        sample = {v: df.loc[df["patient_id"] == v, "sample_id"].iloc[0] for v in (a, b)}
        raise DataError(f"{source}: patient ids {a!r} (sample {sample[a]!r}) and {b!r} (sample {sample[b]!r}) differ "
                        f"only by whitespace or leading zeros ({int(clash.sum())} ids are such spellings): as two "
                        f"patients, one person's images would land in train and test. Give every patient one spelling "
                        f"in the loader (scaling.data.table.id_spelling)")


def validate_table(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check the sample-table contract; raise DataError naming ``source`` and the offending column/row."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{source}: sample table lacks required column(s) {missing}")
    if not label_columns(df):
        raise DataError(f"{source}: sample table has no 'label:<name>' column")
    check_ids(df, source)
    check_patient_spellings(df, source)
    dup = df["sample_id"].duplicated()
    if dup.any():
        raise DataError(f"{source}: duplicate sample_id {df.loc[dup, 'sample_id'].iloc[0]!r}")
    dup = df["path"].duplicated(keep=False)
    if dup.any():  # one image under two sample ids (or two patients) would be trained and tested on
        first = df.loc[dup, ["sample_id", "path"]]
        again = first[first["path"] == first["path"].iloc[0]]["sample_id"]
        raise DataError(f"{source}: image {first['path'].iloc[0]!r} is listed as samples {list(again)}; list each "
                        f"image once")
    for c in label_columns(df):
        vals = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
        unparsed = np.isnan(vals) & df[c].notna().to_numpy()
        if unparsed.any():
            i = int(np.flatnonzero(unparsed)[0])
            raise DataError(f"{source}: column {c!r} must hold 1.0/0.0/NaN; sample {df['sample_id'].iloc[i]!r} has "
                            f"{df[c].iloc[i]!r} (map words such as 'yes' to numbers in the loader)")
        bad = ~(np.isnan(vals) | (vals == 0.0) | (vals == 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{source}: column {c!r} must hold 1.0/0.0/NaN; sample {df['sample_id'].iloc[i]!r} has {vals[i]!r}"
            )
    bad_sex = ~df["sex"].isin(["F", "M"]) & df["sex"].notna()
    if bad_sex.any():
        raise DataError(f"{source}: sex must be 'F', 'M' or missing; got {df.loc[bad_sex, 'sex'].iloc[0]!r}")
    return df


def apply_filters(df: pd.DataFrame, filters: dict, source: str) -> pd.DataFrame:
    """Keep rows whose attribute columns match ``filters`` ({column: value or list}); log how many were removed."""
    for col, want in (filters or {}).items():
        if col not in df.columns:
            raise DataError(f"{source}: filter column {col!r} not in table (columns: {list(df.columns)})")
        values = want if isinstance(want, (list, tuple)) else [want]
        before = len(df)
        df = df[df[col].isin(values)]
        log.info("%s: filter %s in %s removed %d of %d rows", source, col, values, before - len(df), before)
    return df.reset_index(drop=True)


def add_age_group(df: pd.DataFrame, bins) -> pd.DataFrame:
    """Add ``age_group`` (e.g. '40-60', '80+') from ``age`` with left-closed bin edges; NaN age → missing."""
    edges = list(bins)
    names = [f"{int(a)}-{int(b)}" for a, b in itertools.pairwise(edges)]
    if len(edges) >= 2 and edges[-1] >= 120:
        names[-1] = f"{int(edges[-2])}+"
    out = df.copy()
    out["age_group"] = pd.cut(out["age"], edges, right=False, labels=names).astype(object)
    out.loc[out["age"].isna(), "age_group"] = None
    return out

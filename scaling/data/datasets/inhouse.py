"""A hospital's own images, listed in one CSV or Excel export (a PACS/RIS query): no loader code to write.

Layout: ``root`` holds the export and the images, named by the export relative to ``root`` (or absolute)::

    <root>/export.csv        PatientID,AccessionNumber,ImagePath,PatientSex,PatientAge,Cardiomegaly,Effusion,...
    <root>/images/0012345/ACC1/img0.png    <root>/dicom/0012345/ACC2/series1/IM0000.dcm ...

The ``data.options`` say which column is what (``file``, ``image_column``, ``patient_column``, ``label_columns``,
optional ``sex_column``, ``age_column``, ``attribute_columns``); every cell is read as text, so an id keeps its zero
padding whatever pandas would have guessed. What an export holds, and what this loader makes of it:

* patient ids: surrounding whitespace and the leading zeros of an all-digit id dropped
  (:func:`scaling.data.table.id_spelling`: ``' 0012'``, ``'0012'`` and ``'12'`` are one patient), the count logged;
* image paths: Windows ``\\`` separators read as ``/``; a path that exists only under another letter case
  (``IMAGES/IMG0.PNG`` for ``images/img0.png``) resolved to the file on disk, logged; the same image listed twice is
  an error naming both lines. ``sample_id`` is the path below ``root``;
* labels: ``1``, ``1.0``, ``yes``, ``y``, ``true``, ``positive``, ``pos`` → 1; ``0``, ``0.0``, ``no``, ``n``,
  ``false``, ``negative``, ``neg`` → 0; ``-1``, ``-1.0``, ``uncertain`` → the ``uncertainty`` policy (default
  ``ignore``: NaN); blank → the ``blank`` rule (default ``nan``: not labelled), any case and spacing;
* sex: ``M``/``Male``, ``F``/``Female`` (any case) → ``M``/``F``; blank, ``O``, ``Other``, ``U``, ``Unknown`` →
  missing;
* attributes: one spelling per value up to case and spacing (``SIEMENS``/``Siemens`` → one subgroup), logged;
* age: years, or a DICOM Age String (``089Y``, ``006M``, ``012W``, ``003D``), under the ages policy of every loader
  (:func:`scaling.data.datasets.readers.parse_ages`);
* any other value is a :class:`~scaling.data.table.DataError` naming the file, the line and the column; no row is
  dropped.

Splits: ``all`` only; a study carves patient-level validation and test sets (``data.train_split: all``). A second
site is a second export under its own root, read as an OOD set with the same options (docs/data.md, "A hospital's
own data").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from scaling.data.datasets.readers import (dicom_age_years, finish, line_of, map_values, parse_ages, read_csv,
                                          read_excel, require_ids)
from scaling.data.labels import apply_label_policy
from scaling.data.table import LABEL_PREFIX, REQUIRED_COLUMNS, DataError, OptionError, id_spelling

log = logging.getLogger(__name__)

SPLITS = ("all",)
FREE_LABEL_NAMES = True
"""Labels are named by ``label_columns``, not by the canonical table: a study accepts any name it lists."""

LABEL_VALUES = {
    **dict.fromkeys(("1", "yes", "y", "true", "positive", "pos"), 1.0),
    **dict.fromkeys(("0", "no", "n", "false", "negative", "neg"), 0.0),
    **dict.fromkeys(("-1", "uncertain"), -1.0),
}
"""Label cells (lower case; numbers in any float spelling, ``1.0``, are read as numbers first) → 1 / 0 / -1."""
SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": None, "OTHER": None, "U": None, "UNKNOWN": None}
"""Sex cells (upper case) → the sample table's ``M`` / ``F`` / missing."""


def load(root: str | Path, split: str = "all", *, file: str = "", image_column: str = "", patient_column: str = "",
         label_columns: Mapping[str, str] | None = None, sex_column: str = "", age_column: str = "",
         attribute_columns: Mapping[str, str] | None = None, uncertainty: str | Mapping[str, str] = "ignore",
         blank: str = "nan", verify_files: bool = False) -> pd.DataFrame:
    """Load an export as a sample table (one row per image).

    Args:
        file: the CSV (``.csv``, ``.csv.gz``) or Excel workbook (``.xlsx``, first sheet), relative to ``root``.
        image_column, patient_column: the columns of the image path and the patient id.
        label_columns: ``{label name: column}``, e.g. ``{Pleural Effusion: Effusion}``; the name is what
            ``data.labels`` lists and the report shows.
        sex_column, age_column: optional; without them sex and age are missing (no sex or age subgroups).
        attribute_columns: ``{attribute: column}`` kept as text (blank → missing), e.g. ``{manufacturer:
            Manufacturer, study_id: AccessionNumber}``: subgroups and ``filters`` use these names.
        uncertainty, blank: what ``-1`` and a blank label cell mean (docs/data.md, "Labels").
    """
    root = Path(root)
    if split not in SPLITS:
        raise OptionError(f"inhouse({root}): unknown split {split!r}; an export has only 'all' (set "
                          f"data.train_split: all; the study carves validation and test patients)", "split")
    named = {"file": file, "image_column": image_column, "patient_column": patient_column,
             "label_columns": label_columns}
    unset = [k for k, v in named.items() if not v]
    if unset:
        raise OptionError(f"inhouse({root}): data.options must set {unset} (the export file and which of its columns "
                          f"hold the image path, the patient id and each label)", "options")
    attributes = dict(attribute_columns or {})
    clash = [a for a in attributes if a in REQUIRED_COLUMNS or a.startswith(LABEL_PREFIX)]
    if clash:
        raise OptionError(f"inhouse({root}): attribute_columns {clash} would replace a column of the sample table "
                          f"{list(REQUIRED_COLUMNS)}; name them otherwise", "options")
    path = root / file
    columns = [image_column, patient_column, *label_columns.values(), *attributes.values(),
               *(c for c in (sex_column, age_column) if c)]
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        raw = read_excel(path, columns, dtype=str).fillna("")
    else:
        raw = read_csv(path, columns, dtype=str, keep_default_na=False)
    for column in (image_column, patient_column):
        require_ids(raw[column], path, column)
    rel = image_paths(raw[image_column], root, path, image_column)
    text = {c: raw[c].str.strip() for c in columns}
    patients = text[patient_column].map(id_spelling)
    respelled = int((patients != raw[patient_column]).sum())
    if respelled:
        log.info("%s: %d patient ids in column %r respelled without whitespace or leading zeros (e.g. %r → %r)", path,
                 respelled, patient_column, *next((a, b) for a, b in zip(raw[patient_column], patients) if a != b))
    df = pd.DataFrame({"sample_id": rel, "patient_id": patients, "path": [str((root / r).absolute()) for r in rel]})
    raw_labels = {name: label_values(text[column], path, column) for name, column in label_columns.items()}
    for name, values in apply_label_policy(raw_labels, uncertainty, blank).items():
        df[LABEL_PREFIX + name] = values
    df["sex"] = map_values(text[sex_column].str.upper(), SEX, rel, path, sex_column) if sex_column else None
    df["age"] = ages(text[age_column], rel, path, age_column) if age_column else np.nan
    for name, column in attributes.items():
        df[name] = one_spelling(raw[column], path, column)
    return finish(df, f"inhouse({path})", verify_files)


def image_paths(cells: pd.Series, root: Path, source: Path, column: str) -> pd.Series:
    """Each image's path below ``root`` (``/`` separators), resolved to the file on disk when only its letter case
    differs; DataError naming both lines when two rows name the same image."""
    rel = cells.str.strip().str.replace("\\", "/", regex=False)
    absolute = rel.map(os.path.isabs)
    rel[absolute] = rel[absolute].map(lambda p: os.path.relpath(p, root))
    rel = rel.map(os.path.normpath).map(lambda p: p.replace(os.sep, "/"))
    missing = ~(root.as_posix() + "/" + rel).map(os.path.isfile)
    if missing.any():
        on_disk = {}
        for folder, _, files in os.walk(root):
            for f in files:
                found = (Path(folder) / f).relative_to(root).as_posix()
                on_disk.setdefault(found.lower(), found)
        case = missing & rel.str.lower().isin(on_disk)
        if case.any():
            log.info("%s: %d image paths in column %r matched a file on disk under another letter case (e.g. %r → "
                     "%r)", source, int(case.sum()), column, rel[case].iloc[0], on_disk[rel[case].iloc[0].lower()])
            rel[case] = rel[case].str.lower().map(on_disk)
    twice = rel.duplicated(keep=False)
    if twice.any():
        first = np.flatnonzero(twice.to_numpy())
        second = next(j for j in first[1:] if rel.iloc[j] == rel.iloc[first[0]])
        raise DataError(f"{source}: lines {line_of(source, int(first[0]))} and {line_of(source, int(second))}, column "
                        f"{column!r}: the same image {rel.iloc[first[0]]!r} is listed twice ({int(twice.sum())} rows "
                        f"name an image another row names); list each image once")
    return rel


def one_spelling(cells: pd.Series, source: Path, column: str) -> pd.Series:
    """Attribute text with one spelling per value up to case and spacing (``SIEMENS``, ``Siemens``, `` siemens``
    → the most frequent of them), logged, so a subgroup is not split by how a scanner or a clerk wrote it; blank →
    missing. Different names for one thing (``GE MEDICAL SYSTEMS``, ``GE Healthcare``) stay apart."""
    text = cells.str.split().str.join(" ")
    key = text.str.casefold()
    given = text != ""
    spelling = text[given].groupby(key[given]).agg(lambda s: s.value_counts().index[0])
    out = key.map(spelling).where(given, None)
    changed = given & (out != text)
    if changed.any():
        log.info("%s: %d cells of column %r written in one spelling per value up to case and spacing (e.g. %r → %r)",
                 source, int(changed.sum()), column, text[changed].iloc[0], out[changed].iloc[0])
    return out


def label_values(cells: pd.Series, source: Path, column: str) -> np.ndarray:
    """Label cells (stripped) as 1 / 0 / -1 (uncertain) / NaN (blank); any other value is a DataError naming the
    line and the column."""
    number = pd.to_numeric(cells, errors="coerce").map({1.0: 1.0, 0.0: 0.0, -1.0: -1.0})
    words = cells.str.lower().map(LABEL_VALUES)
    values = number.fillna(words)
    bad = values.isna() & (cells != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{source}: line {line_of(source, i)}, column {column!r}: unexpected label value "
                        f"{cells.iloc[i]!r} (expected 1/0/-1, yes/no, positive/negative, true/false, uncertain or "
                        f"blank)")
    return values.to_numpy(dtype=float)


def ages(cells: pd.Series, ids: pd.Series, source: Path, column: str) -> pd.Series:
    """Age cells in years: a number, or a DICOM Age String (``089Y``, ``006M``) converted; then the shared ages
    policy (:func:`scaling.data.datasets.readers.parse_ages`: blank → NaN, a non-number or negative age a
    DataError naming the row (``ids``: the image paths) and the column, above 120 → NaN, logged)."""
    years = dicom_age_years(cells)
    return parse_ages(cells.where(years.isna(), years), ids, source, column)

"""Shared reading helpers for the dataset loaders: files, columns, strict value maps, image look-up, the final table.

Every loader reads a released metadata file whose columns and encodings are fixed by the dataset's authors
(see each loader's docstring for its release). These helpers make the failure modes uniform: a missing file or column, an
unexpected value, or a missing image is a :class:`~scaling.data.table.DataError` that names the file and the row
or sample id, never a KeyError deep inside pandas.

Every CSV goes through :func:`read_csv`, which first checks that each data row has as many fields as the header:
pandas pads a short row with blanks (which a CheXpert blank rule then reads as "negative") and, when the first
data row is the long one, turns its leading fields into the index and shifts every column.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import logging
import lzma
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from scaling.data.table import (LABEL_PREFIX, REQUIRED_COLUMNS, DataError, OptionError, blank_cells, check_ids,
                                 validate_table)

log = logging.getLogger(__name__)


def find_file(root: str | Path, names: Sequence[str]) -> Path:
    """The first of ``names`` (relative to ``root``) that exists; DataError listing every name tried otherwise."""
    root = Path(root)
    for name in names:
        if (root / name).is_file():
            return root / name
    raise no_expected_file(root, names)


def no_expected_file(root: Path, names: Sequence[str], what: str = "files") -> DataError:
    """The error for a dataset root holding none of ``names``, with a hint when the folder above or one of the
    folders directly inside holds one (the most common mistake: a root one level off)."""
    root = Path(root)
    near = [root.parent] if root.parent != root else []
    try:
        near += sorted(p for p in root.iterdir() if p.is_dir())[:100]
    except OSError:
        pass
    found = next((d for d in near for n in names if (d / n).is_file()), None)
    hint = f"; {found} has them: is that the dataset root?" if found is not None else ""
    return DataError(f"{root}: none of the expected {what} exist: {list(names)}{hint}")


_DECOMPRESS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}
"""Compressions pandas infers from these suffixes (the releases ship ``.csv`` and ``.csv.gz``)."""


def read_csv(path: str | Path, required: Iterable[str], **kwargs) -> pd.DataFrame:
    """Read a CSV (compression by extension) and check that it has the ``required`` columns; DataError names the file.

    Every data row must have as many fields as the header (:func:`check_row_lengths`); ``kwargs`` go to pandas,
    which parses the bytes that check read and decompressed (the file is read once).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = _bytes(path)
    check_row_lengths(path, data)
    try:
        df = pd.read_csv(io.BytesIO(data), **kwargs)
    except (ValueError, OSError, EOFError) as e:  # ParserError, EmptyDataError and UnicodeDecodeError included
        raise DataError(f"{path}: cannot be read as CSV: {e}") from e
    check_columns(df, required, path)
    return df


def _bytes(path: Path) -> bytes:
    """The decompressed bytes of a CSV; DataError naming the file."""
    try:
        data = path.read_bytes()
        decompress = _DECOMPRESS.get(path.suffix.lower())
        return decompress(data) if decompress is not None else data
    except (OSError, EOFError, lzma.LZMAError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read: {e}") from e


def _text(path: Path, data: bytes | None = None) -> str:
    """The UTF-8 text of a CSV (``data``: its decompressed bytes, read here when None); DataError naming the file
    (and the line of a bad byte)."""
    data = _bytes(path) if data is None else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start:e.start + 1]!r}): {e.reason}") from e


def _is_blank(row: list[str]) -> bool:
    """A line pandas skips: empty, or whitespace only."""
    return not row or (len(row) == 1 and not row[0].strip())


def check_row_lengths(path: str | Path, data: bytes | None = None) -> None:
    """DataError naming the file and line of the first data row whose field count differs from the header's.

    One pass of the csv module, whose default dialect splits and quotes as pandas does; blank and whitespace-only
    lines are skipped, as pandas skips them. The file must be UTF-8 (pandas' default). ``data``: the file's
    decompressed bytes when the caller has them.
    """
    path = Path(path)
    text = _text(path, data)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((row for row in reader if row), None)  # pandas skips blank lines above the header too
        if header is None:
            raise DataError(f"{path}: empty file (no header row)")
        n = len(header)
        if set(map(len, reader)) <= {0, n}:  # the common case, at C speed: every row has the header's length
            return
        reader = csv.reader(io.StringIO(text, newline=""))
        next(row for row in reader if row)
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if len(row) != n and not _is_blank(row):
                # A record that spans lines up to the end of the file is an unclosed quote, not a short row.
                unclosed = end > start and next(reader, None) is None
                hint = " (an unclosed quote runs to the end of the file)" if unclosed else ""
                raise DataError(f"{path}: line {start}: {len(row)} field(s), but the header has {n}{hint}")
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: cannot be read as CSV: {e}") from e


def line_of(path: str | Path, row: int) -> int:
    """The line of ``path`` on which data row ``row`` (0-based, as pandas reads the file) starts.

    Rescans the file, so it is meant for error messages: quoted fields may span lines (CBIS-DDSM's paths end in a
    newline) and blank lines are skipped, so the line is not always ``row + 2``. Sheets (``.xlsx``) have no such
    lines: there it is ``row + 2``, the sheet's row number.
    """
    path = Path(path)
    if ".csv" not in path.name.lower() or not path.is_file():
        return row + 2
    try:
        reader = csv.reader(io.StringIO(_text(path), newline=""))
        next(r for r in reader if r)
        end, k = reader.line_num, -1
        for record in reader:
            start, end = end + 1, reader.line_num
            if not _is_blank(record):
                k += 1
                if k == row:
                    return start
    except (DataError, csv.Error, StopIteration):  # unreadable now: the plain count is the best answer
        pass
    return row + 2


def read_excel(path: str | Path, required: Iterable[str], **kwargs) -> pd.DataFrame:
    """Read the first sheet of an ``.xlsx`` and check its ``required`` columns; DataError names the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_excel(path, **kwargs)
    except ImportError:  # openpyxl not installed: an environment problem, not a bad file
        raise
    except Exception as e:  # a damaged workbook raises BadZipFile, KeyError, ValueError ... from openpyxl or zipfile
        raise DataError(f"{path}: cannot be read as an Excel workbook: {type(e).__name__}: {e}") from e
    check_columns(df, required, path)
    return df


def check_columns(df: pd.DataFrame, required: Iterable[str], source: str | Path) -> None:
    """DataError naming ``source`` when ``df`` lacks any of the ``required`` columns."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing required column(s) {missing}; found {list(df.columns)}")


def require_ids(values: pd.Series, source: str | Path, column: str) -> None:
    """DataError naming the file, line and column of the first blank cell of an id or file-name column.

    ``values`` is a column of the file ``source`` in file order. A blank image name would become a path ending in
    ``nan``, a blank id the string ``'nan'``, and a blank patient id drops its images from every patient-level
    split, so none is allowed.
    """
    blank = blank_cells(values)
    if blank.any():
        i = int(np.flatnonzero(blank)[0])
        raise DataError(f"{source}: line {line_of(source, i)}, column {column!r}: blank")


def map_values(
    values: pd.Series, mapping: Mapping, ids: pd.Series, source: str | Path, column: str, blank=None
) -> pd.Series:
    """Map every cell of ``values`` through ``mapping``; a blank cell becomes ``blank``.

    A non-blank value absent from ``mapping`` is a DataError naming the file, the column, the row's id and the
    value, so a new or misspelled encoding is never silently turned into "missing".
    """
    raw = values.astype(object).where(values.notna(), None)
    text = raw.map(lambda v: v.strip() if isinstance(v, str) else v)
    is_blank = text.isna() | (text == "")
    known = text.isin(list(mapping))
    bad = ~is_blank & ~known
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: row {ids.iloc[i]!r}, column {column!r}: unexpected value {text.iloc[i]!r} "
            f"(expected one of {sorted(map(str, mapping))} or blank)"
        )
    out = pd.Series([blank] * len(text), index=text.index, dtype=object)
    out[known] = text[known].map(mapping)
    return out


def parse_numbers(values: pd.Series, ids: pd.Series, source: str | Path, column: str) -> pd.Series:
    """Cells as float (blank → NaN); a non-numeric cell is a DataError naming the file, column and row id."""
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna() & values.notna() & (values.astype(str).str.strip() != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{source}: row {ids.iloc[i]!r}, column {column!r}: not a number: {values.iloc[i]!r}")
    return num.astype(float)


MAX_AGE = 120
"""Ages above this are data-entry errors (NIH's 2017 file has ages up to 414) and become NaN in every loader."""


def _examples(ids: pd.Series, k: int = 5) -> str:
    shown = ", ".join(repr(v) for v in ids.iloc[:k])
    return shown + (", ..." if len(ids) > k else "")


DICOM_AGE_PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
"""Units of a DICOM Age String (PS3.5 §6.2, VR ``AS``: three digits and a unit, ``089Y``) per year."""


def dicom_age_years(text: pd.Series) -> pd.Series:
    """DICOM Age Strings (``053Y``, ``006M``, ``012W``, ``003D``; any case and surrounding space) in years, NaN for
    any cell that is not one (the caller decides whether that is blank, a plain number or an error)."""
    parts = text.fillna("").astype(str).str.strip().str.upper().str.extract(r"^(\d{1,3})([YMWD])$")
    return (parts[0].astype(float) / parts[1].map(DICOM_AGE_PER_YEAR)).astype(float)


def drop_implausible_ages(age: pd.Series, ids: pd.Series, source: str | Path, column: str) -> pd.Series:
    """``age`` with the ages above :data:`MAX_AGE` set to NaN, logged with the file, column, count and example rows
    (``ids``: the row ids, aligned with ``age``), so an age group never holds a 414-year-old."""
    implausible = (age > MAX_AGE).to_numpy()
    if implausible.any():
        log.info("%s: %d implausible ages (> %d) set to NaN in column %r, e.g. row %s", source,
                 int(implausible.sum()), MAX_AGE, column, _examples(ids[implausible]))
    return age.where(~implausible)


def computed_ages(age: pd.Series, ids: pd.Series, source: str | Path, how: str) -> pd.Series:
    """Ages a loader computes from dates (``how``, e.g. ``StudyDate_DICOM − PatientBirth``): one outside
    [0, :data:`MAX_AGE`] comes from a wrong date, not an age someone entered, so it becomes NaN, logged with the
    file, the count and example rows, rather than refusing the release for one date."""
    implausible = ((age < 0) | (age > MAX_AGE)).to_numpy()
    if implausible.any():
        log.info("%s: %d computed ages (%s) outside [0, %d] set to NaN, e.g. row %s", source, int(implausible.sum()),
                 how, MAX_AGE, _examples(ids[implausible]))
    return age.where(~implausible)


def parse_ages(values: pd.Series, ids: pd.Series, source: str | Path, column: str, *,
               in_file_order: bool = True) -> pd.Series:
    """Age cells as years under the policy every loader shares: blank → NaN; a non-number or a negative age is a
    DataError naming the file, the row (its line too when ``values`` are in ``source``'s row order) and ``column``;
    an age above :data:`MAX_AGE` → NaN, logged (:func:`drop_implausible_ages`). A negative age is no placeholder
    any release uses, so it means a broken export, and it would silently fall out of every age group."""
    age = parse_numbers(values, ids, source, column)
    negative = (age < 0).to_numpy()
    if negative.any():
        i = int(np.flatnonzero(negative)[0])
        where = f"line {line_of(source, i)}, row {ids.iloc[i]!r}" if in_file_order else f"row {ids.iloc[i]!r}"
        raise DataError(f"{source}: {where}, column {column!r}: negative age {str(values.iloc[i]).strip()!r}")
    return drop_implausible_ages(age, ids, source, column)


def select_split(df: pd.DataFrame, split: str, splits: Sequence[str], source: str | Path) -> pd.DataFrame:
    """Rows of ``df`` whose ``split`` column equals ``split`` (one of ``splits``); ``all`` keeps every row."""
    if split not in splits:
        raise OptionError(f"{source}: unknown split {split!r}; choose one of {list(splits)}", "split")
    if split == "all":
        return df.reset_index(drop=True)
    return df[df["split"] == split].reset_index(drop=True)


def only_all_split(split: str, dataset: str) -> None:
    """DataError unless ``split`` is ``all`` (for datasets released without an official split: ``SPLITS = ("all",)``)."""
    if split != "all":
        raise OptionError(
            f"{dataset} has no official split; load split='all' and let scaling.data.splits make a patient-level one"
            f" (got split={split!r})", "split"
        )


def chest_view(position: pd.Series, frontal: Iterable[str], lateral: Iterable[str]) -> pd.Series:
    """``frontal`` / ``lateral`` / None from a dataset's view-position codes (CheXpert's ``view`` convention)."""
    frontal, lateral = set(frontal), set(lateral)
    return position.map(lambda v: "frontal" if v in frontal else "lateral" if v in lateral else None).astype(object)


def filter_views(df: pd.DataFrame, views: Sequence[str] | None, source: str) -> pd.DataFrame:
    """Keep rows whose ``view`` or ``view_position`` is in ``views`` (e.g. ``["frontal"]``, ``["PA"]``); logged."""
    if views is None:
        return df
    keep = df["view"].isin(list(views)) | df["view_position"].isin(list(views))
    return filter_rows(df, keep, source, f"views={list(views)}")


def filter_rows(df: pd.DataFrame, keep: pd.Series, source: str, what: str) -> pd.DataFrame:
    """Keep the rows where ``keep`` is true and log how many ``what`` removed (every filter is explicit)."""
    before = len(df)
    out = df[keep.to_numpy(dtype=bool)].reset_index(drop=True)
    log.info("%s: %s removed %d of %d rows", source, what, before - len(out), before)
    return out


def index_images(dirs: Iterable[str | Path], suffixes: Sequence[str]) -> dict[str, str]:
    """File name → absolute path for the files with ``suffixes`` directly inside each existing directory of ``dirs``.

    Released image folders are flat (NIH ``images_00X/images``, HAM10000 ``part_1/2``), so one ``scandir`` per
    folder finds every image without a per-row ``stat``.
    """
    found: dict[str, str] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        with os.scandir(d) as it:
            for entry in it:
                if entry.name.endswith(tuple(suffixes)) and entry.is_file():
                    found.setdefault(entry.name, os.path.abspath(entry.path))
    return found


def locate(names: pd.Series, found: Mapping[str, str], default_dir: str | Path, source: str | Path,
           column: str = "image name") -> pd.Series:
    """Absolute path of each file name: where :func:`index_images` found it, else under ``default_dir``.

    ``source`` is the metadata file the names come from, in its order; a blank name is a DataError naming the file,
    the line and ``column``.
    """
    require_ids(names, source, column)
    default_dir = Path(default_dir).absolute()
    paths = names.map(lambda n: found.get(n) or str(default_dir / n))
    missing = (~names.isin(list(found))).sum()
    if missing:
        log.info("%s: %d of %d images not found on disk; their paths point into %s", source, missing, len(names), default_dir)
    return paths


def verify_paths(df: pd.DataFrame, source: str) -> None:
    """DataError naming the missing image files (up to 10, with their sample ids) and how many are missing."""
    exists = df["path"].map(os.path.isfile)
    if not exists.all():
        miss = df.loc[~exists, ["sample_id", "path"]]
        shown = "; ".join(f"{s}: {p}" for s, p in miss.head(10).itertuples(index=False))
        raise DataError(f"{source}: {len(miss)} of {len(df)} image files are missing, e.g. {shown}")


def finish(df: pd.DataFrame, source: str, verify_files: bool) -> pd.DataFrame:
    """Order the columns (required, labels, attributes), check the sample-table contract, optionally the files."""
    labels = [c for c in df.columns if c.startswith(LABEL_PREFIX)]
    rest = [c for c in df.columns if c not in REQUIRED_COLUMNS and c not in labels]
    out = df[list(REQUIRED_COLUMNS) + labels + rest].reset_index(drop=True)
    for c in labels:
        out[c] = out[c].astype(float)
    out["age"] = out["age"].astype(float)
    check_ids(out, source)  # before the text conversion, which would turn a missing id into 'nan'
    out["sample_id"] = out["sample_id"].astype(str)
    out["patient_id"] = out["patient_id"].astype(str)
    for c in rest + ["sex"]:
        # Text attributes: plain objects with None for missing, whatever pandas inferred (pandas 3 infers `str`).
        if not pd.api.types.is_numeric_dtype(out[c]) and not pd.api.types.is_bool_dtype(out[c]):
            col = out[c].astype(object)
            out[c] = col.where(col.notna() & (col != ""), None)
    validate_table(out, source)
    if verify_files:
        verify_paths(out, source)
    return out


BIRADS3_POLICIES = ("negative", "nan")


def suspicion(birads: pd.Series, birads3: str, source: str) -> pd.Series:
    """The ``Suspicious`` label from a BI-RADS assessment category (0–6) per image.

    4, 5 and 6 are suspicious (1.0) and 1–2 are not (0.0), the binary target of VinDr-Mammo/INbreast loaders
    (ACR BI-RADS Atlas, 5th ed., 2013). 3 ("probably benign") is 0.0 under ``birads3='negative'`` (the ``BI-RADS ≥ 4``
    reading) or NaN under ``'nan'``; 0 (incomplete, needs more imaging) and missing are NaN.
    """
    if birads3 not in BIRADS3_POLICIES:
        raise OptionError(f"{source}: birads3 {birads3!r} is not allowed; choose one of {list(BIRADS3_POLICIES)}",
                          "options")
    b = birads.astype(float)
    out = pd.Series(np.nan, index=b.index)
    out[b >= 4] = 1.0
    out[(b == 1) | (b == 2)] = 0.0
    if birads3 == "negative":
        out[b == 3] = 0.0
    return out


DENSITY = {"1": "A", "2": "B", "3": "C", "4": "D", "A": "A", "B": "B", "C": "C", "D": "D"}
"""BI-RADS breast density (numeric 1–4 or letter A–D) → the letter every mammography loader reports."""

"""CheXpert and CheXpert-small (Irvin et al. 2019) in their released on-disk layout.

Layout (``root`` is the ``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/`` directory, or the directory holding it)::

    train.csv  valid.csv                        19 columns: Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>
    train/patient00001/study1/view1_frontal.jpg ...
    CHEXPERT DEMO.xlsx (or .csv)                optional, Stanford AIMI demographics: PATIENT, PRIMARY_RACE, ...

``Path`` values carry the release's directory name as a prefix (``CheXpert-v1.0-small/train/...``); it is stripped
and the rest joined with the dataset directory, as torchxrayvision does. Rows: one per image.

Splits: ``train`` (train.csv) and ``valid`` (valid.csv, 234 radiologist-consensus images). With
``split_file=`` (e.g. chexploration's ``chexpert_split_2021_08_20.csv``, columns ``,index,split``, ``index`` =
row of train.csv) the splits are ``train`` / ``validate`` / ``test`` of train.csv rows; unlisted rows are dropped
(logged), and any other split value, or an index listed twice, is an error. Otherwise carve patient-level splits
from ``train`` with :mod:`scaling.data.splits`.

Columns produced: ``sample_id`` (path below the release directory, e.g. ``train/patient00001/study1/view1_frontal.jpg``),
``patient_id`` (``patient00001``), ``study_id`` (``patient00001/study1``), ``path``, ``sex`` (``Unknown`` → None),
``age`` (0 → NaN, the release's placeholder; above 120 → NaN, as for NIH; negative is an error), ``view``
(``frontal``/``lateral``), ``view_position`` (``AP``/``PA``/``LL``/``RL``, None for laterals), ``race``/``ethnicity``
when a demographics file is found, and ``label:<name>`` for the 14 observations under the uncertainty policy and
blank rule of :mod:`scaling.data.labels`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from scaling.data.datasets.readers import drop_implausible_ages, read_csv, read_excel
from scaling.data.labels import CHEXPERT_LABELS, apply_label_policy, parse_raw_labels
from scaling.data.table import LABEL_PREFIX, DataError, OptionError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
"""Splits of the release; with ``split_file`` the splits are :data:`OFFICIAL_SPLITS` instead."""
OFFICIAL_SPLITS = ("train", "validate", "test")
"""Split names in chexploration's ``chexpert_split_2021_08_20.csv`` (Gichoya et al.)."""
RELEASE_DIRS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
COLUMNS = META_COLUMNS + CHEXPERT_LABELS
DEMOGRAPHICS_FILES = ("CHEXPERT DEMO.xlsx", "CHEXPERT DEMO.csv")
_SEX = {"Female": "F", "Male": "M", "Unknown": None}
_VIEW = {"Frontal": "frontal", "Lateral": "lateral"}
_VIEW_POSITIONS = ("AP", "PA", "LL", "RL")
_PATIENT_STUDY = r"(?:^|/)(?P<patient>patient\d+)/(?P<study>study\d+)/"


def dataset_dir(root: str | Path) -> Path:
    """The directory holding train.csv/valid.csv: ``root`` itself or its ``CheXpert-v1.0(-small)`` child."""
    root = Path(root).expanduser()
    for cand in (root, *(root / d for d in RELEASE_DIRS)):
        if (cand / "train.csv").is_file() or (cand / "valid.csv").is_file():
            return cand.resolve()
    raise DataError(
        f"{root}: no CheXpert train.csv/valid.csv here or in {' / '.join(RELEASE_DIRS)} below it"
    )


def read_csv_text(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV keeping every cell as text (blank stays ''), and check ``required`` columns are present.

    Through :func:`~scaling.data.datasets.readers.read_csv`: a row with fewer or more fields than the header is a
    DataError naming its line, never a row padded with blanks (which the blank rule would turn into negatives).
    """
    return read_csv(path, required, dtype=str, keep_default_na=False)


def _race(primary_race: pd.Series) -> pd.Series:
    """White / Black / Asian / Other from free-text PRIMARY_RACE by substring (chexploration order: Black first)."""
    text = primary_race.fillna("").astype(str)
    out = pd.Series("Other", index=text.index, dtype=object)
    unknown = text.str.strip().isin(["", "Unknown", "Patient Refused", "Declined", "Not Recorded"])
    for needle in ("Asian", "White", "Black"):  # reverse order: the last assignment wins, so Black has priority
        out[text.str.contains(needle, regex=False)] = needle
    out[unknown] = None
    return out


def _ethnicity(values: pd.Series) -> pd.Series:
    """Hispanic / Non-Hispanic from ETHNICITY strings; 'Unknown' and others → None."""
    mapping = {"Non-Hispanic/Non-Latino": "Non-Hispanic", "Not Hispanic": "Non-Hispanic", "Hispanic/Latino": "Hispanic"}
    return values.fillna("").astype(str).str.strip().map(mapping).astype(object).where(lambda s: s.notna(), None)


def read_demographics(path: Path) -> pd.DataFrame:
    """Read ``CHEXPERT DEMO.xlsx``/``.csv`` into ``patient_id, race, ethnicity`` (one row per patient)."""
    read = read_excel if path.suffix.lower() in (".xlsx", ".xls") else read_csv
    raw = read(path, ("PATIENT", "PRIMARY_RACE"), dtype=str, keep_default_na=False)
    out = pd.DataFrame({"patient_id": raw["PATIENT"].str.strip(), "race": _race(raw["PRIMARY_RACE"])})
    out["ethnicity"] = _ethnicity(raw["ETHNICITY"]) if "ETHNICITY" in raw.columns else None
    return out.drop_duplicates("patient_id", keep="first")


def _find_demographics(ddir: Path, demographics) -> Path | None:
    if demographics is False:
        return None
    if demographics not in (None, True):
        p = Path(demographics).expanduser()
        if not p.is_absolute():
            p = ddir / p
        if not p.is_file():
            raise DataError(f"{p}: demographics file not found")
        return p
    for d in (ddir, ddir.parent):
        for name in DEMOGRAPHICS_FILES:
            if (d / name).is_file():
                return d / name
    if demographics is True:
        raise DataError(f"{ddir}: no demographics file {list(DEMOGRAPHICS_FILES)} here or in its parent")
    return None


def parse_rows(raw: pd.DataFrame, ddir: Path, source: str) -> pd.DataFrame:
    """Turn the text cells of a CheXpert CSV into sample-table columns (raw label values kept as 1/0/-1/NaN)."""
    line = raw.index.to_numpy() + 2  # file line numbers for error messages (line 1 = header; index = file row)
    rel = raw["Path"].str.strip()
    for prefix in RELEASE_DIRS:
        rel = rel.str.removeprefix(prefix + "/")
    # pyarrow's vectorised regex: pandas' str.extract runs a Python loop (seconds on the 223k-row train.csv).
    match = pc.extract_regex(pa.array(rel.to_numpy(dtype=object), pa.string()), _PATIENT_STUDY)
    bad = ~match.is_valid().to_numpy(zero_copy_only=False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: line {line[i]}: Path {raw['Path'].iloc[i]!r} has no patientNNNNN/studyN component")

    def mapped(column: str, mapping: dict) -> pd.Series:
        text = raw[column].str.strip()
        ok = text.isin(list(mapping)).to_numpy()
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise DataError(
                f"{source}: line {line[i]}, column {column!r}: unexpected value {text.iloc[i]!r} (expected one of {list(mapping)})"
            )
        return text.map(mapping).astype(object).where(lambda s: s.notna(), None)

    patient = pd.Series(match.field("patient").to_pylist(), index=raw.index, dtype=str)
    age_text = raw["Age"].str.strip()
    age = pd.to_numeric(age_text, errors="coerce")
    bad_age = (age.isna() & (age_text != "")).to_numpy()
    if bad_age.any():
        i = int(np.flatnonzero(bad_age)[0])
        raise DataError(f"{source}: line {line[i]}, column 'Age': unparseable value {age_text.iloc[i]!r}")
    negative = (age < 0).to_numpy()
    if negative.any():
        i = int(np.flatnonzero(negative)[0])
        raise DataError(f"{source}: line {line[i]}, column 'Age': negative age {age_text.iloc[i]!r}")
    age = drop_implausible_ages(age, rel, source, "Age")  # > 120: entry errors, as in NIH's 2017 file
    view_pos = raw["AP/PA"].str.strip()
    bad_vp = ~(view_pos.isin(_VIEW_POSITIONS) | (view_pos == "")).to_numpy()
    if bad_vp.any():
        i = int(np.flatnonzero(bad_vp)[0])
        raise DataError(
            f"{source}: line {line[i]}, column 'AP/PA': unexpected value {view_pos.iloc[i]!r} (expected {list(_VIEW_POSITIONS)} or blank)"
        )
    out = pd.DataFrame(
        {
            "sample_id": rel,
            "patient_id": patient,
            "study_id": patient + "/" + pd.Series(match.field("study").to_pylist(), index=raw.index, dtype=str),
            "path": str(ddir) + "/" + rel,  # string concat: Path joins cost ~50 s per million rows
            "sex": mapped("Sex", _SEX),
            # Age 0 is the release's placeholder for "unknown" (3 rows in train.csv), not a newborn.
            "age": age.where(age > 0).astype(float),
            "view": mapped("Frontal/Lateral", _VIEW),
            "view_position": view_pos.astype(object).where(view_pos != "", None),
        }
    )
    for name in CHEXPERT_LABELS:
        out["raw:" + name] = parse_raw_labels(raw[name], source, name, lines=line)
    return out


def load(
    root: str | Path,
    split: str = "train",
    *,
    uncertainty: str | Mapping[str, str] = "ignore",
    blank: str = "zero",
    views: Sequence[str] | None = None,
    unique_patients: bool = False,
    demographics: str | bool | None = None,
    split_file: str | None = None,
    csv: str | None = None,
) -> pd.DataFrame:
    """Load a CheXpert split as a sample table.

    Args:
        root: the release directory or its parent.
        split: ``train`` / ``valid``; with ``split_file``: ``train`` / ``validate`` / ``test``.
        uncertainty: policy for -1.0 (``ignore``, ``zeros``, ``ones``, ``best`` or ``{label: policy}``).
        blank: ``zero`` or ``nan`` for blank cells (see :mod:`scaling.data.labels`).
        views: keep rows whose ``view`` or ``view_position`` is listed (e.g. ``["frontal"]``, ``["PA"]``); off by default.
        unique_patients: keep the first image (file order) of each patient; off by default.
        demographics: None = use ``CHEXPERT DEMO.xlsx/.csv`` if present; a path; True = required; False = never.
        split_file: official split CSV (``,index,split``), relative paths are taken from the dataset directory.
        csv: label file to read instead of ``train.csv`` (e.g. ``train_cheXbert.csv``, a re-labelling of the training
            images); the ``valid`` split is always ``valid.csv`` (its radiologists' labels), so one ``data.options``
            serves a study's train and valid splits.
    """
    ddir = dataset_dir(root)
    allowed = OFFICIAL_SPLITS if split_file else SPLITS
    if split not in allowed:
        raise OptionError(f"chexpert: unknown split {split!r}; choose one of {list(allowed)}", "split")
    if csv and split == "valid":
        log.info("chexpert: csv=%r re-labels the training images; the valid split is read from valid.csv", csv)
    csv_name = "valid.csv" if split == "valid" else csv or "train.csv"
    csv_path = ddir / csv_name
    raw = read_csv_text(csv_path, COLUMNS)
    if split_file:
        raw = _select_official_split(raw, ddir, split_file, split, csv_path)
    df = parse_rows(raw, ddir, str(csv_path))

    labels = apply_label_policy({n: df.pop("raw:" + n).to_numpy() for n in CHEXPERT_LABELS}, uncertainty, blank)
    for name, values in labels.items():
        df[LABEL_PREFIX + name] = values

    demo_path = _find_demographics(ddir, demographics)
    if demo_path is not None:
        demo = read_demographics(demo_path)
        df = df.merge(demo, on="patient_id", how="left")
        df[["race", "ethnicity"]] = df[["race", "ethnicity"]].astype(object).where(df[["race", "ethnicity"]].notna(), None)
        log.info(
            "chexpert: demographics from %s cover %d of %d rows (race known for %d)",
            demo_path, int(df["patient_id"].isin(set(demo["patient_id"])).sum()), len(df), int(df["race"].notna().sum()),
        )

    if views:
        before = len(df)
        keep = df["view"].isin(list(views)) | df["view_position"].isin(list(views))
        df = df[keep]
        log.info("chexpert: views filter %s removed %d of %d rows", list(views), before - len(df), before)
    if unique_patients:
        before = len(df)
        df = df.drop_duplicates("patient_id", keep="first")
        log.info("chexpert: unique_patients removed %d of %d rows", before - len(df), before)
    return df.reset_index(drop=True)


def _select_official_split(raw: pd.DataFrame, ddir: Path, split_file: str, split: str, csv_path: Path) -> pd.DataFrame:
    """Rows of train.csv assigned to ``split`` by a chexploration-style split CSV (``index`` = train.csv row)."""
    path = Path(split_file).expanduser()
    if not path.is_absolute():
        path = ddir / path
    table = read_csv_text(path, ("index", "split"))
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or (index >= len(raw)).any() or (index < 0).any():
        i = int(np.flatnonzero((index.isna() | (index >= len(raw)) | (index < 0)).to_numpy())[0])
        raise DataError(f"{path}: line {i + 2}: index {table['index'].iloc[i]!r} is not a row of {csv_path} ({len(raw)} rows)")
    values = table["split"].str.strip()
    unknown = ~values.isin(OFFICIAL_SPLITS)
    if unknown.any():  # a misspelled split would otherwise drop its rows from every split
        i = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{path}: line {i + 2}, column 'split': unexpected value {values.iloc[i]!r} "
                        f"(expected one of {list(OFFICIAL_SPLITS)})")
    repeated = index.duplicated(keep=False).to_numpy()
    if repeated.any():  # one image in two splits would be trained on and tested on; twice in one, loaded twice
        first = index.iloc[int(np.flatnonzero(repeated)[0])]
        lines = np.flatnonzero((index == first).to_numpy())
        raise DataError(f"{path}: lines {', '.join(str(i + 2) for i in lines)}: index {int(first)} (a row of "
                        f"{csv_path}) is listed {len(lines)} times, as {', '.join(repr(values.iloc[i]) for i in lines)}"
                        f"; a row belongs to one split ({int(repeated.sum())} lines repeat an index)")
    rows = index[values == split].astype(int).to_numpy()
    log.info("chexpert: %s assigns %d of %d train.csv rows to %r", path.name, len(rows), len(raw), split)
    return raw.iloc[np.sort(rows)]

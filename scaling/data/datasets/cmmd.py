"""CMMD — The Chinese Mammography Database (Cui et al. 2021, TCIA): Siemens FFDM, biopsy-confirmed per breast.

Layout (as released on TCIA, CMMD; Cui et al. 2021)::

    <root>/CMMD_clinicaldata_revision.xlsx   (or .csv)   ID1,LeftRight,Age,number,abnormality,classification,subtype
    <root>/CMMD/D1-0001/<study-folder>/<series-folder>/1-1.dcm, 1-2.dcm, …   (TCIA/NBIA download)

The clinical table has one row per breast (``ID1`` + ``LeftRight``), but the image files are named only by their
order in the series, so which breast and view an image shows is read from its DICOM header (``ImageLaterality``,
``ViewPosition`` or ``ViewCodeSequence``). CMMD therefore needs the DICOM files (headers only, no pixels) to list
its images; a patient whose folder is absent is logged and has no rows. ``classification`` is Benign/Malignant;
``subtype`` (Luminal A/B, HER2-positive, triple negative) exists for some D2 cases. No official split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from scaling.data.datasets.readers import (finish, map_values, only_all_split, parse_ages, read_csv, read_excel,
                                          no_expected_file, require_ids)
from scaling.data.table import LABEL_PREFIX, DataError

log = logging.getLogger(__name__)

SPLITS = ("all",)
CLINICAL_FILES = ("CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv")
CLASSIFICATION = {"Malignant": 1.0, "Benign": 0.0}
VIEW_MEANINGS = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO", "medio-lateral": "ML",
                 "latero-medial": "LM"}
"""``ViewCodeSequence`` code meanings (DICOM CID 4014) → view codes."""
HEADER_TAGS = ["ImageLaterality", "Laterality", "ViewPosition", "ViewCodeSequence", "Manufacturer", "PatientID"]


def _clinical(root: Path) -> tuple[pd.DataFrame, Path]:
    path = next((root / n for n in CLINICAL_FILES if (root / n).is_file()), None)
    if path is None:
        raise no_expected_file(root, CLINICAL_FILES)
    read = read_excel if path.suffix == ".xlsx" else read_csv
    raw = read(path, ["ID1", "LeftRight", "Age", "abnormality", "classification"], dtype=str)
    if raw.empty:
        raise DataError(f"{path}: no rows")
    return raw, path


def _header(path: Path, base: Path) -> dict:
    """Laterality, view and manufacturer of one DICOM file, from its header only."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable DICOM file: {e}") from e
    side = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).strip() or None
    view = str(ds.get("ViewPosition", "") or "").strip() or None
    if view is None and ds.get("ViewCodeSequence"):
        view = VIEW_MEANINGS.get(str(ds.ViewCodeSequence[0].get("CodeMeaning", "")).strip().lower())
    return {"sample_id": path.relative_to(base).as_posix(), "path": str(path.absolute()), "laterality": side,
            "view": view, "manufacturer": str(ds.get("Manufacturer", "") or "").strip() or None}


def load(root: str | Path, split: str = "all", *, verify_files: bool = False) -> pd.DataFrame:
    """Load CMMD as a sample table (one row per DICOM; headers are read to find each image's breast and view).

    Labels: ``Malignant`` (``classification``) of the image's breast; an image whose breast has no clinical row
    has NaN. ``sample_id`` is the file's path below the ``CMMD`` folder. Attributes: ``laterality``, ``view``,
    ``manufacturer``, ``abnormality`` (calcification/mass/both), ``subtype``, ``cohort`` (``D1``/``D2``).
    """
    root = Path(root)
    source = f"cmmd({root})"
    only_all_split(split, "cmmd")
    raw, path = _clinical(root)
    require_ids(raw["ID1"], path, "ID1")
    ids = raw["ID1"].str.strip() + "/" + raw["LeftRight"].fillna("").str.strip()
    clinical = pd.DataFrame({
        "patient_id": raw["ID1"].str.strip(),
        "laterality": map_values(raw["LeftRight"], {"L": "L", "R": "R"}, ids, path, "LeftRight"),
        "age": parse_ages(raw["Age"], ids, path, "Age"),
        LABEL_PREFIX + "Malignant": map_values(raw["classification"], CLASSIFICATION, ids, path, "classification",
                                               blank=float("nan")).astype(float),
        "abnormality": raw["abnormality"].str.strip(),
        "subtype": raw["subtype"] if "subtype" in raw.columns else None,
    })
    if clinical.duplicated(["patient_id", "laterality"]).any():
        raise DataError(f"{path}: breast {ids[clinical.duplicated(['patient_id', 'laterality'])].iloc[0]!r} has two rows")

    base = root / "CMMD" if (root / "CMMD").is_dir() else root
    images, absent = [], []
    for patient in sorted(clinical["patient_id"].unique()):
        files = sorted((base / patient).rglob("*.dcm")) if (base / patient).is_dir() else []
        if not files:
            absent.append(patient)
        images += [{**_header(f, base), "patient_id": patient} for f in files]
    if absent:
        log.warning("%s: %d of %d patients have no DICOM folder under %s (e.g. %s); they have no rows",
                    source, len(absent), clinical["patient_id"].nunique(), base, absent[0])
    if not images:
        raise DataError(f"{source}: no DICOM files under {base}/<ID1>/; CMMD needs the DICOM headers to list its images")
    df = pd.DataFrame(images)
    # A study folder may hold both breasts; any image must say which one it shows.
    no_side = df["laterality"].isna()
    if no_side.any():
        raise DataError(f"{df.loc[no_side, 'path'].iloc[0]}: no ImageLaterality/Laterality in the DICOM header")
    per_patient = clinical.drop_duplicates("patient_id")[["patient_id", "age"]]
    df = df.merge(clinical.drop(columns=["age"]), on=["patient_id", "laterality"], how="left")
    df = df.merge(per_patient, on="patient_id", how="left")
    unmatched = df[LABEL_PREFIX + "Malignant"].isna().sum()
    if unmatched:
        log.info("%s: %d images show a breast without a clinical row; their labels are NaN", source, unmatched)
    df["sex"] = None
    df["cohort"] = df["patient_id"].str.split("-").str[0]
    return finish(df, source, verify_files)

"""PadChest (BIMCV, Bustos et al. 2020): 16-bit PNGs and list-in-string labels.

Layout (PadChest release of BIMCV; Bustos et al. 2020)::

    <root>/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv   (or .csv.gz, as torchxrayvision ships it)
    <root>/<ImageDir>/<ImageID>.png      (the release's zip folders 0 … 54), or flat: <root>/images/<ImageID>

``Labels`` holds the string of a Python list of lower-case findings (``"['pleural effusion', ' cardiomegaly']"``,
some with a leading space) from a hierarchy of about 190 terms; a canonical label is positive when one of its terms
is part of a finding (``laminar atelectasis`` → Atelectasis, ``callus rib fracture`` → Fracture), as in
torchxrayvision (:data:`scaling.data.labels.PADCHEST_TERMS`), and 0.0 otherwise. A row with no ``Labels`` is not
labelled (NaN). A cell that is not a list of strings is an error naming the ImageID. There is no official split.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from scaling.data import labels as L
from scaling.data.datasets.readers import (chest_view, computed_ages, filter_views, find_file, finish, index_images,
                                          map_values, only_all_split, parse_numbers, read_csv, require_ids)
from scaling.data.table import LABEL_PREFIX, DataError

log = logging.getLogger(__name__)

CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
             "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
SPLITS = ("all",)
FRONTAL = ("PA", "AP", "AP_horizontal")
LATERAL = ("L",)
"""``Projection`` codes per view; COSTAL (rib views), EXCLUDE and UNK have no view."""
CANONICAL = tuple(L.PADCHEST_TERMS)


def _findings(cell, image: str, source: Path) -> list[str] | None:
    """The finding strings of one ``Labels`` cell; None for a blank cell (not labelled)."""
    if not isinstance(cell, str) or not cell.strip():
        return None
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError) as e:
        raise DataError(f"{source}: row {image!r}, column 'Labels': not a Python list: {cell!r}") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{source}: row {image!r}, column 'Labels': expected a list of strings, got {cell!r}")
    return [v.strip().lower() for v in value if v.strip()]


def load(
    root: str | Path,
    split: str = "all",
    *,
    views: list[str] | None = None,
    verify_files: bool = False,
) -> pd.DataFrame:
    """Load PadChest as a sample table (one row per 16-bit PNG).

    ``split``: ``all`` only (no official split). ``views``: keep rows whose ``view`` or ``view_position`` is
    listed (``["frontal"]``, ``["PA"]``; filter, logged). Age = study year − ``PatientBirth`` (NaN when the birth
    year is blank). Attributes: ``view`` (``frontal``/``lateral``/None), ``view_position`` (``Projection``:
    ``PA``, ``AP``, ``AP_horizontal``, ``L``, ``COSTAL``, …), ``manufacturer`` (Manufacturer_DICOM), ``study_id``.
    """
    root = Path(root)
    source = f"padchest({root})"
    only_all_split(split, "padchest")
    path = find_file(root, CSV_NAMES)
    required = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                "PatientSex_DICOM", "Projection", "Labels"]
    raw = read_csv(path, required, dtype={"ImageID": str, "PatientID": str, "StudyID": str, "Labels": str,
                                          "ImageDir": str}, low_memory=False)
    for col in ("ImageID", "PatientID"):
        require_ids(raw[col], path, col)
    ids = raw["ImageID"]
    if ids.duplicated().any():
        raise DataError(f"{path}: duplicate ImageID {ids[ids.duplicated()].iloc[0]!r}")

    findings = [_findings(cell, image, path) for cell, image in zip(raw["Labels"], ids)]
    cache: dict[tuple[str, ...], dict[str, float]] = {}  # a third of the release is "['normal']"
    per_image = [None if f is None else cache.setdefault(tuple(f), L.padchest_labels(f)) for f in findings]
    labels = {LABEL_PREFIX + name: [np.nan if p is None else p[name] for p in per_image] for name in CANONICAL}

    birth = parse_numbers(raw["PatientBirth"], ids, path, "PatientBirth")
    year = parse_numbers(raw["StudyDate_DICOM"], ids, path, "StudyDate_DICOM") // 10000
    df = pd.DataFrame({
        "sample_id": ids,
        "patient_id": raw["PatientID"],
        "sex": map_values(raw["PatientSex_DICOM"], {"M": "M", "F": "F", "O": None}, ids, path, "PatientSex_DICOM"),
        "age": computed_ages(year - birth, ids, path, "StudyDate_DICOM year − PatientBirth"),
        **labels,
        "view": chest_view(raw["Projection"], FRONTAL, LATERAL),
        "view_position": raw["Projection"],
        "manufacturer": raw.get("Manufacturer_DICOM"),
        "study_id": raw["StudyID"],
    })
    folders = sorted({str(d) for d in raw["ImageDir"].dropna()})
    found = index_images([root / "images", *(root / d for d in folders)], (".png",))
    default_dirs = raw["ImageDir"].fillna("images")
    df["path"] = [found.get(i) or str((root / d / i).absolute()) for i, d in zip(ids, default_dirs)]
    missing = (~ids.isin(list(found))).sum()
    if missing:
        log.info("%s: %d of %d images not found on disk; their paths point into <root>/<ImageDir>", source, missing, len(ids))
    df = filter_views(df, views, source)
    return finish(df, source, verify_files)

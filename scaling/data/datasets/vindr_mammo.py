"""VinDr-Mammo (Nguyen et al. 2023, PhysioNet): Vietnamese FFDM with breast-level BI-RADS and density.

Layout (VinDr-Mammo 1.0.0 on PhysioNet; Nguyen et al. 2023)::

    <root>/breast-level_annotations.csv   study_id,series_id,image_id,laterality,view_position,height,width,
                                          breast_birads,breast_density,split
    <root>/finding_annotations.csv        (boxes; not needed for image-level labels)
    <root>/metadata.csv                   DICOM tags with English headers: SOP Instance UID, Patient's Age, Manufacturer…
    <root>/images/<study_id>/<image_id>.dicom

Values are strings: ``BI-RADS 1`` … ``BI-RADS 5``, ``DENSITY A`` … ``DENSITY D``, ``split`` ∈ {``training``,
``test``} (4,000 / 1,000 studies). There are no pathology labels: the target is ``Suspicious`` (BI-RADS ≥ 4). Each
study is one patient's exam and the release has no separate patient id, so ``patient_id`` is the ``study_id``.
Some detectors write MONOCHROME1 DICOMs; :func:`scaling.data.dicom.read_dicom` inverts them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scaling.data.datasets.readers import (dicom_age_years, drop_implausible_ages, finish, map_values, read_csv,
                                          require_ids, select_split, suspicion)
from scaling.data.table import LABEL_PREFIX, DataError

SPLITS = ("train", "test", "all")
SPLIT_VALUES = {"training": "train", "test": "test"}
"""The release's ``split`` strings → this library's split names."""
BIRADS = {f"BI-RADS {k}": float(k) for k in range(1, 6)}
DENSITY = {f"DENSITY {x}": x for x in "ABCD"}


def _age(values: pd.Series, ids: pd.Series, source: Path) -> pd.Series:
    """DICOM Age String (``053Y``; also ``M``/``W``/``D`` units) → years; blank and above 120 (``999Y``) → NaN."""
    text = values.fillna("").astype(str).str.strip()
    years = dicom_age_years(text)
    bad = (text != "") & years.isna()
    if bad.any():
        raise DataError(f"{source}: row {ids[bad].iloc[0]!r}, column \"Patient's Age\": not a DICOM age {text[bad].iloc[0]!r}")
    return drop_implausible_ages(years, ids, source, "Patient's Age")


def load(
    root: str | Path,
    split: str = "train",
    *,
    birads3: str = "negative",
    malignant_from_birads: bool = False,
    verify_files: bool = False,
) -> pd.DataFrame:
    """Load VinDr-Mammo as a sample table (one row per DICOM).

    ``split``: ``train`` (``training``), ``test`` or ``all``. Labels: ``Suspicious`` (BI-RADS 4/5 = 1, 1/2 = 0,
    3 per ``birads3``: ``negative`` or ``nan``). ``malignant_from_birads``: also emit ``Malignant`` equal to
    ``Suspicious`` — a proxy (BI-RADS 4/5 as "suspicious for malignancy", ACR BI-RADS Atlas, 5th ed.) for evaluating
    against pathology-labelled sets (CBIS-DDSM, CMMD); off by default because BI-RADS is not pathology. Attributes: ``laterality``,
    ``view``, ``density`` (A–D), ``birads``, ``split``, and from ``metadata.csv`` when present ``age``
    (``Patient's Age``) and ``manufacturer``.
    """
    root = Path(root)
    source = f"vindr_mammo({root})"
    path = root / "breast-level_annotations.csv"
    raw = read_csv(path, ["study_id", "series_id", "image_id", "laterality", "view_position", "breast_birads",
                          "breast_density", "split"], dtype=str)
    if raw.empty:
        raise DataError(f"{path}: no rows")
    for col in ("study_id", "image_id", "split"):
        require_ids(raw[col], path, col)
    ids = raw["image_id"]
    if ids.duplicated().any():
        raise DataError(f"{path}: duplicate image_id {ids[ids.duplicated()].iloc[0]!r}")
    birads = map_values(raw["breast_birads"], BIRADS, ids, path, "breast_birads").astype(float)
    df = pd.DataFrame({
        "sample_id": ids,
        "patient_id": raw["study_id"],
        "path": [str((root / "images" / s / f"{i}.dicom").absolute()) for s, i in zip(raw["study_id"], ids)],
        "sex": None,
        "age": np.nan,
        LABEL_PREFIX + "Suspicious": suspicion(birads, birads3, source),
        "laterality": map_values(raw["laterality"], {"L": "L", "R": "R"}, ids, path, "laterality"),
        "view": raw["view_position"],
        "density": map_values(raw["breast_density"], DENSITY, ids, path, "breast_density"),
        "birads": birads,
        "split": map_values(raw["split"], SPLIT_VALUES, ids, path, "split"),
    })
    if malignant_from_birads:
        df[LABEL_PREFIX + "Malignant"] = df[LABEL_PREFIX + "Suspicious"]
    meta_path = root / "metadata.csv"
    if meta_path.is_file():
        meta = read_csv(meta_path, ["SOP Instance UID"], dtype=str).drop_duplicates("SOP Instance UID")
        meta = meta.set_index("SOP Instance UID").reindex(ids).reset_index(drop=True)
        if "Patient's Age" in meta.columns:
            df["age"] = _age(meta["Patient's Age"], ids, meta_path).to_numpy()
        if "Manufacturer" in meta.columns:
            df["manufacturer"] = meta["Manufacturer"].to_numpy()
    df = select_split(df, split, SPLITS, source)
    return finish(df, source, verify_files)

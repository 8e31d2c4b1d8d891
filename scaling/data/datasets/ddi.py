"""DDI — Diverse Dermatology Images (Daneshjou et al. 2022, Stanford AIMI): biopsy-proven, skin tone in 3 groups.

Layout (Daneshjou et al. 2022, as ``DDI-Code/ddi_dataset.py`` reads it)::

    <root>/ddi_metadata.csv      [unnamed index],DDI_ID,DDI_file,skin_tone,malignant,disease
    <root>/images/000001.png …   (the AIMI download is flat: PNGs directly in <root> are found too)

``skin_tone`` ∈ {12, 34, 56} = Fitzpatrick I–II / III–IV / V–VI; ``malignant`` is True/False (an older release
names it ``malignancy(malig=1)`` with 1/0). The release has no patient id, age or sex: ``patient_id`` is the
``DDI_ID`` (656 images of 570 patients, so a few patients span two ids — DDI is an evaluation-only set, which is how
the DDI paper uses it). No official split.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scaling.data.datasets.readers import (finish, index_images, locate, map_values, only_all_split, read_csv,
                                          require_ids)
from scaling.data.table import LABEL_PREFIX, DataError

SPLITS = ("all",)
SKIN_GROUPS = {"12": "I-II", "34": "III-IV", "56": "V-VI"}
"""``skin_tone`` → the Fitzpatrick group name shared with :mod:`scaling.data.datasets.fitzpatrick17k`'s ``skin_group``."""
MALIGNANT = {"True": 1.0, "False": 0.0, "TRUE": 1.0, "FALSE": 0.0, "1": 1.0, "0": 0.0}
MALIGNANT_COLUMNS = ("malignant", "malignancy(malig=1)")


def load(root: str | Path, split: str = "all", *, verify_files: bool = False) -> pd.DataFrame:
    """Load DDI as a sample table (one row per PNG).

    Labels: ``Malignant`` and ``Melanoma`` (``disease`` names a melanoma, e.g. ``melanoma-in-situ``,
    ``nodular-melanoma``). Attributes: ``skin_group`` (``I-II``/``III-IV``/``V-VI``), ``disease``.
    """
    root = Path(root)
    source = f"ddi({root})"
    only_all_split(split, "ddi")
    path = root / "ddi_metadata.csv"
    raw = read_csv(path, ["DDI_ID", "DDI_file", "skin_tone", "disease"], dtype=str)
    col = next((c for c in MALIGNANT_COLUMNS if c in raw.columns), None)
    if col is None:
        raise DataError(f"{path}: missing required column 'malignant' (or 'malignancy(malig=1)'); found {list(raw.columns)}")
    for c in ("DDI_file", "DDI_ID"):
        require_ids(raw[c], path, c)
    ids = raw["DDI_file"]
    if ids.duplicated().any():
        raise DataError(f"{path}: duplicate DDI_file {ids[ids.duplicated()].iloc[0]!r}")
    malignant = map_values(raw[col], MALIGNANT, ids, path, col, blank=float("nan"))
    skin = map_values(raw["skin_tone"], SKIN_GROUPS, ids, path, "skin_tone")
    disease = raw["disease"].fillna("").str.strip()
    df = pd.DataFrame({
        "sample_id": ids,
        "patient_id": raw["DDI_ID"],
        "sex": None,
        "age": float("nan"),
        LABEL_PREFIX + "Malignant": malignant.astype(float),
        LABEL_PREFIX + "Melanoma": disease.str.contains("melanoma").astype(float),
        "skin_group": skin,
        "disease": disease,
    })
    found = index_images([root / "images", root], (".png",))
    df["path"] = locate(ids, found, root / "images", path, "DDI_file")
    return finish(df, source, verify_files)

"""ISIC 2020 (SIIM-ISIC Melanoma Classification) training set: patients, melanoma target.

Layout (ISIC 2020 challenge release; Rotemberg et al. 2021)::

    <root>/ISIC_2020_Training_GroundTruth.csv  (or _v2.csv with lesion_id; Kaggle's train.csv has the same columns)
    <root>/train/ISIC_2637011.jpg              (or ISIC_2020_Training_JPEG/train/, Kaggle's jpeg/train/)

Columns ``image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target``;
``target`` 1 = malignant (584 melanomas of 33,126 images). ``target`` must agree with ``benign_malignant``.
Labels are released for the training set only (``split='all'``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scaling.data.datasets.readers import (find_file, finish, index_images, locate, map_values, only_all_split,
                                          parse_ages, read_csv, require_ids)
from scaling.data.table import LABEL_PREFIX, DataError

SPLITS = ("all",)
GROUND_TRUTH = ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv", "train.csv")
IMAGE_DIRS = ("train", "ISIC_2020_Training_JPEG/train", "ISIC_2020_Training_JPEG", "jpeg/train")
SEX = {"male": "M", "female": "F"}


def load(root: str | Path, split: str = "all", *, verify_files: bool = False) -> pd.DataFrame:
    """Load the ISIC 2020 training set as a sample table (one row per JPEG).

    Labels: ``Malignant`` (``target``) and ``Melanoma`` (``diagnosis == 'melanoma'``). Attributes:
    ``anatom_site`` (``anatom_site_general_challenge``), ``diagnosis``, ``lesion_id`` (v2 file only).
    """
    root = Path(root)
    source = f"isic2020({root})"
    only_all_split(split, "isic2020")
    path = find_file(root, GROUND_TRUTH)
    raw = read_csv(path, ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
                          "diagnosis", "benign_malignant", "target"], dtype=str)
    for col in ("image_name", "patient_id"):
        require_ids(raw[col], path, col)
    ids = raw["image_name"]
    if ids.duplicated().any():
        raise DataError(f"{path}: duplicate image_name {ids[ids.duplicated()].iloc[0]!r}")
    target = map_values(raw["target"], {"1": 1.0, "0": 0.0}, ids, path, "target")
    if target.isna().any():
        raise DataError(f"{path}: row {ids[target.isna()].iloc[0]!r}, column 'target': blank")
    bm = map_values(raw["benign_malignant"], {"malignant": 1.0, "benign": 0.0}, ids, path, "benign_malignant")
    disagree = bm.notna() & (bm != target)
    if disagree.any():
        raise DataError(f"{path}: row {ids[disagree].iloc[0]!r}: target disagrees with benign_malignant")
    df = pd.DataFrame({
        "sample_id": ids,
        "patient_id": raw["patient_id"],
        "sex": map_values(raw["sex"], SEX, ids, path, "sex"),
        "age": parse_ages(raw["age_approx"], ids, path, "age_approx"),
        LABEL_PREFIX + "Malignant": target.astype(float),
        LABEL_PREFIX + "Melanoma": (raw["diagnosis"].str.strip().str.lower() == "melanoma").astype(float),
        "anatom_site": raw["anatom_site_general_challenge"],
        "diagnosis": raw["diagnosis"],
    })
    if "lesion_id" in raw.columns:
        df["lesion_id"] = raw["lesion_id"]
    found = index_images([root / d for d in IMAGE_DIRS], (".jpg",))
    df["path"] = locate(ids + ".jpg", found, root / "train", path, "image_name")
    return finish(df, source, verify_files)

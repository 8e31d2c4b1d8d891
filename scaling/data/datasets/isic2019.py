"""ISIC 2019 training set: one-hot ground truth with UNK, metadata, and the source site from ``lesion_id``.

Layout (ISIC 2019 challenge release)::

    <root>/ISIC_2019_Training_GroundTruth.csv    image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK   (one-hot 1.0/0.0)
    <root>/ISIC_2019_Training_Metadata.csv       image,age_approx,anatom_site_general,lesion_id,sex
    <root>/ISIC_2019_Training_Input/ISIC_0000000.jpg, ISIC_0000002_downsampled.jpg, …

The 4-character prefix of ``lesion_id`` names the contributing archive — ``HAM_`` (HAM10000, Vienna/Queensland),
``BCN_`` (Hospital Clínic Barcelona), ``MSK…`` (Memorial Sloan Kettering) — the site shift FLamby's Fed-ISIC2019
uses; ``ham_metadata`` splits HAM into its four acquisition sites as FLamby does (6 centres). ISIC 2019 contains the
HAM10000 images: drop them with ``exclude_ham`` before mixing with :mod:`scaling.data.datasets.ham10000`. There is no
patient id; ``patient_id`` is the ``lesion_id`` (the image id when it is blank). Labels are only released for the
training set (``split='all'``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scaling.data import labels as L
from scaling.data.datasets.readers import (filter_rows, finish, map_values, only_all_split, parse_ages, read_csv,
                                          require_ids)
from scaling.data.table import LABEL_PREFIX, DataError

SPLITS = ("all",)
CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
MALIGNANT = ("MEL", "BCC", "AK", "SCC")
"""Classes counted as malignant; AK is included because HAM10000's ``akiec`` (incl. Bowen's disease) became AK."""
SEX = {"male": "M", "female": "F"}


def _site(lesion_id: pd.Series) -> pd.Series:
    """``HAM``/``BCN``/``MSK`` (or the id's prefix before ``_``) from ``lesion_id``; None when it is blank."""
    def one(v):
        if not isinstance(v, str) or not v.strip():
            return None
        if v.startswith("MSK"):  # MSK1_ … MSK5_: one institution, several sub-archives
            return "MSK"
        return v.split("_")[0]
    return lesion_id.map(one).astype(object)


def load(
    root: str | Path,
    split: str = "all",
    *,
    ham_metadata: str | Path | None = None,
    exclude_ham: bool = False,
    verify_files: bool = False,
) -> pd.DataFrame:
    """Load the ISIC 2019 training set as a sample table (one row per JPEG).

    Labels: one per class under canonical names (MEL → ``Melanoma``, NV → ``Melanocytic Nevus``, BCC, AK →
    ``Actinic Keratosis``, BKL, DF, VASC, SCC → ``Squamous Cell Carcinoma``) and ``Malignant`` (MEL/BCC/AK/SCC);
    a row whose one-hot class is UNK has every label NaN. ``ham_metadata``: path of ``HAM10000_metadata.csv``
    (absolute or relative to ``root``) to refine site ``HAM`` into ``HAM_<dataset>``. ``exclude_ham``: drop the
    HAM10000 images (filter, logged). Attributes: ``site``, ``anatom_site``, ``lesion_id``.
    """
    root = Path(root)
    source = f"isic2019({root})"
    only_all_split(split, "isic2019")
    gt_path = root / "ISIC_2019_Training_GroundTruth.csv"
    gt = read_csv(gt_path, ["image", *CLASSES], dtype=str)
    require_ids(gt["image"], gt_path, "image")
    ids = gt["image"]
    if ids.duplicated().any():
        raise DataError(f"{gt_path}: duplicate image {ids[ids.duplicated()].iloc[0]!r}")
    onehot = {c: map_values(gt[c], {"1.0": 1.0, "0.0": 0.0, "1": 1.0, "0": 0.0}, ids, gt_path, c)
              for c in CLASSES}
    hot = pd.DataFrame(onehot).astype(float)
    not_one = hot.sum(axis=1) != 1.0
    if not_one.any():
        raise DataError(f"{gt_path}: row {ids[not_one].iloc[0]!r}: expected exactly one 1.0 among {list(CLASSES)}")
    unk = hot["UNK"] == 1.0

    meta_path = root / "ISIC_2019_Training_Metadata.csv"
    meta = read_csv(meta_path, ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
                    dtype={"image": str, "lesion_id": str, "sex": str})
    require_ids(meta["image"], meta_path, "image")
    meta = gt[["image"]].merge(meta, on="image", how="left", indicator=True)
    if (meta["_merge"] != "both").any():
        raise DataError(f"{meta_path}: no metadata row for image {meta.loc[meta['_merge'] != 'both', 'image'].iloc[0]!r}")

    labels = {LABEL_PREFIX + L.harmonise("isic2019", c): hot[c] for c in CLASSES if c != "UNK"}
    labels[LABEL_PREFIX + "Malignant"] = hot[list(MALIGNANT)].max(axis=1)
    labels = pd.DataFrame(labels).mask(unk, axis=0)
    lesion = meta["lesion_id"].astype(object).where(meta["lesion_id"].notna() & (meta["lesion_id"] != ""), None)
    site = _site(meta["lesion_id"])
    if ham_metadata is not None:
        ham = read_csv(root / ham_metadata, ["image_id", "dataset"], dtype=str)
        ham_site = ids.map(dict(zip(ham["image_id"], "HAM_" + ham["dataset"])))
        site = site.where(~((site == "HAM") & ham_site.notna()), ham_site)
    df = pd.DataFrame({
        "sample_id": ids,
        "patient_id": lesion.where(lesion.notna(), ids),
        "path": [str((root / "ISIC_2019_Training_Input" / f"{i}.jpg").absolute()) for i in ids],
        "sex": map_values(meta["sex"], SEX, ids, meta_path, "sex"),
        "age": parse_ages(meta["age_approx"], ids, meta_path, "age_approx", in_file_order=False),  # gt's order
        **labels,
        "site": site,
        "anatom_site": meta["anatom_site_general"],
        "lesion_id": lesion,
    })
    if exclude_ham:
        df = filter_rows(df, ~df["site"].fillna("").str.startswith("HAM"), source, "exclude_ham")
    return finish(df, source, verify_files)

"""HAM10000 (Tschandl et al. 2018; = ISIC 2018 Task 3 training set), with its acquisition site.

Layout (Tschandl et al. 2018, Harvard Dataverse release)::

    <root>/HAM10000_metadata.csv          (or HAM10000_metadata without extension, as FLamby ships it)
    <root>/HAM10000_images_part_1/ISIC_0024306.jpg …   <root>/HAM10000_images_part_2/…   (or merged HAM10000_images/)

Columns ``lesion_id,image_id,dx,dx_type,age,sex,localization,dataset``. ``dataset`` is the acquisition site
(vidir_molemax, vidir_modern, rosendahl, vienna_dias) — the within-dataset site shift. The release has no patient
id; several images show the same lesion, so ``patient_id`` is the ``lesion_id`` and patient-level splits keep a
lesion's images together (the grouping MEDFAIR uses). ``age`` has 5-year steps and 0.0 is a real value (infants);
blank age and ``sex == 'unknown'`` are missing; a negative age is an error and one above 120 becomes NaN (logged), as
in the chest loaders. No official split (``split='all'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from scaling.data import labels as L
from scaling.data.datasets.readers import (find_file, finish, index_images, locate, map_values, only_all_split,
                                          parse_ages, read_csv, require_ids)
from scaling.data.table import LABEL_PREFIX, DataError

SPLITS = ("all",)
DX = tuple(L.HARMONISATION["ham10000"])
MALIGNANT_DX = ("mel", "bcc", "akiec")
"""Default ``dx`` codes counted as malignant: melanoma, basal cell carcinoma and akiec (actinic keratosis /
intraepithelial carcinoma, i.e. Bowen's disease). MEDFAIR's ``binaryLabel`` counts only ``mel`` and ``akiec``; pass
``malignant=("mel", "akiec")`` to reproduce it."""
SEX = {"male": "M", "female": "F", "unknown": None}
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images")


def load(
    root: str | Path,
    split: str = "all",
    *,
    malignant: Sequence[str] = MALIGNANT_DX,
    verify_files: bool = False,
) -> pd.DataFrame:
    """Load HAM10000 as a sample table (one row per JPEG).

    Labels: ``Malignant`` (``dx`` in ``malignant``) and one label per diagnosis under its canonical name
    (``mel`` → ``Melanoma``, ``nv`` → ``Melanocytic Nevus``, ``bcc``, ``akiec`` → ``Actinic Keratosis``, ``bkl``,
    ``df``, ``vasc``). Attributes: ``site`` (the ``dataset`` column), ``anatom_site`` (``localization``),
    ``diagnosis`` (``dx``), ``dx_type``, ``lesion_id``.
    """
    root = Path(root)
    source = f"ham10000({root})"
    only_all_split(split, "ham10000")
    unknown = [d for d in malignant if d not in DX]
    if unknown:
        raise DataError(f"{source}: malignant codes {unknown} are not HAM10000 dx codes {list(DX)}")
    path = find_file(root, ["HAM10000_metadata.csv", "HAM10000_metadata"])
    raw = read_csv(path, ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"],
                   dtype={"lesion_id": str, "image_id": str, "dx": str, "sex": str})
    for col in ("image_id", "lesion_id"):
        require_ids(raw[col], path, col)
    ids = raw["image_id"]
    if ids.duplicated().any():
        raise DataError(f"{path}: duplicate image_id {ids[ids.duplicated()].iloc[0]!r}")
    dx = map_values(raw["dx"], {d: d for d in DX}, ids, path, "dx")
    if dx.isna().any():
        raise DataError(f"{path}: row {ids[dx.isna()].iloc[0]!r}, column 'dx': blank diagnosis")
    df = pd.DataFrame({
        "sample_id": ids,
        "patient_id": raw["lesion_id"],
        "sex": map_values(raw["sex"], SEX, ids, path, "sex"),
        "age": parse_ages(raw["age"], ids, path, "age"),
        LABEL_PREFIX + "Malignant": dx.isin(list(malignant)).astype(float),
        **{LABEL_PREFIX + L.harmonise("ham10000", d): (dx == d).astype(float) for d in DX},
        "site": raw["dataset"],
        "anatom_site": raw["localization"],
        "diagnosis": dx,
        "dx_type": raw["dx_type"],
        "lesion_id": raw["lesion_id"],
    })
    names = ids + ".jpg"
    found = index_images([root / d for d in IMAGE_DIRS], (".jpg",))
    df["path"] = locate(names, found, root / "HAM10000_images", path, "image_id")
    return finish(df, source, verify_files)

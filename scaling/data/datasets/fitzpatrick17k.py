"""Fitzpatrick17k (Groh et al. 2021): clinical photos with Fitzpatrick skin type, −1 = unknown.

Layout (Groh et al. 2021; github.com/mattgroh/fitzpatrick17k, ``fitzpatrick17k.csv``)::

    <root>/fitzpatrick17k.csv      md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,
                                   three_partition_label,qc,url,url_alphanum   (16,577 rows, public on GitHub)
    <root>/images/<md5hash>.jpg    (images are obtained separately from the urls)

``fitzpatrick_scale`` is 1–6, with −1 for unknown (565 rows) → ``skin_type`` None; old code calls the column
``fitzpatrick``, both are accepted. ``three_partition_label`` is non-neoplastic / benign / malignant. The image
host (``url``: dermaamin.com or atlasdermatologico.com.br, 41 blank) is the source shift of Groh et al.'s
``dermaamin``/``br`` holdouts. There is no patient id: ``patient_id`` is the image's md5hash. No official split.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from scaling.data.datasets.readers import check_columns, finish, map_values, only_all_split, read_csv, require_ids
from scaling.data.table import LABEL_PREFIX, DataError

SPLITS = ("all",)
SKIN_TYPES = {"1": "I", "2": "II", "3": "III", "4": "IV", "5": "V", "6": "VI", "-1": None}
"""``fitzpatrick_scale`` → Fitzpatrick skin type; −1 (unknown) → None."""
SKIN_GROUPS = {"I": "I-II", "II": "I-II", "III": "III-IV", "IV": "III-IV", "V": "V-VI", "VI": "V-VI"}
"""Skin type → the three groups DDI reports (``skin_tone`` 12/34/56), so the two datasets share an attribute."""
THREE = {"malignant": 1.0, "benign": 0.0, "non-neoplastic": 0.0}
NINE = ("inflammatory", "malignant epidermal", "genodermatoses", "benign dermal", "benign epidermal",
        "malignant melanoma", "benign melanocyte", "malignant cutaneous lymphoma", "malignant dermal")


def _host(url) -> str | None:
    """``dermaamin`` / ``atlasdermatologico`` (the two source atlases) or the url's host; None when blank."""
    if not isinstance(url, str) or not url.strip():
        return None
    host = urlparse(url.strip()).netloc.lower()
    for name in ("dermaamin", "atlasdermatologico"):
        if name in host:
            return name
    return host or None


def load(root: str | Path, split: str = "all", *, verify_files: bool = False) -> pd.DataFrame:
    """Load Fitzpatrick17k as a sample table (one row per image).

    Labels: ``Malignant`` (``three_partition_label == 'malignant'``) and ``Melanoma``
    (``nine_partition_label == 'malignant melanoma'``). Attributes: ``skin_type`` (``I``…``VI``, None for −1),
    ``skin_group`` (``I-II``/``III-IV``/``V-VI``), ``site`` (image host), ``condition`` (``label``, 114 values),
    ``category`` (``nine_partition_label``), ``qc``. Age and sex are not in the release (NaN/None).
    """
    root = Path(root)
    source = f"fitzpatrick17k({root})"
    only_all_split(split, "fitzpatrick17k")
    path = root / "fitzpatrick17k.csv"
    raw = read_csv(path, ["md5hash", "label", "nine_partition_label", "three_partition_label"], dtype=str)
    # The current CSV names the column fitzpatrick_scale; the code of the original paper reads `fitzpatrick`.
    scale_col = "fitzpatrick_scale" if "fitzpatrick_scale" in raw.columns else "fitzpatrick"
    check_columns(raw, [scale_col], path)
    require_ids(raw["md5hash"], path, "md5hash")
    ids = raw["md5hash"]
    if ids.duplicated().any():
        raise DataError(f"{path}: duplicate md5hash {ids[ids.duplicated()].iloc[0]!r}")
    scale = raw[scale_col].str.strip().str.replace(r"\.0$", "", regex=True)
    skin = map_values(scale, SKIN_TYPES, ids, path, scale_col)
    malignant = map_values(raw["three_partition_label"], THREE, ids, path, "three_partition_label", blank=float("nan"))
    nine = map_values(raw["nine_partition_label"], {n: n for n in NINE}, ids, path, "nine_partition_label")
    df = pd.DataFrame({
        "sample_id": ids,
        "patient_id": ids,
        "path": [str((root / "images" / f"{i}.jpg").absolute()) for i in ids],
        "sex": None,
        "age": float("nan"),
        LABEL_PREFIX + "Malignant": malignant.astype(float),
        LABEL_PREFIX + "Melanoma": (nine == "malignant melanoma").astype(float).where(nine.notna()),
        "skin_type": skin,
        "skin_group": skin.map(SKIN_GROUPS),
        "site": raw["url"].map(_host) if "url" in raw.columns else None,
        "condition": raw["label"],
        "category": nine,
        "qc": raw["qc"] if "qc" in raw.columns else None,
    })
    return finish(df, source, verify_files)

"""CBIS-DDSM (Lee et al. 2017, TCIA): scanned-film mammograms with per-abnormality pathology.

Layout (as released on TCIA, CBIS-DDSM; Lee et al. 2017, Sci. Data 4:170177)::

    <root>/{mass,calc}_case_description_{train,test}_set.csv        one row per abnormality
    <root>/CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/<uid>/<uid>/000000.dcm   (the CSVs' ``image file path``)
    <root>/CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/<date-desc>/<series-desc>/1-1.dcm   (NBIA download: found by
                                                                               the path's first component)

Traps handled: the mass CSVs spell the density column ``breast_density`` and the calc CSVs ``breast density``; the
path columns may end with a newline inside the quotes. One mammogram (patient, side, view) can carry several
abnormalities, in the mass CSV, the calc CSV or both (TCIA stores a copy of the image under each), so rows are
aggregated per mammogram: ``Malignant`` if any abnormality is MALIGNANT (BENIGN_WITHOUT_CALLBACK is benign), the
BI-RADS ``assessment`` is the maximum, and the image is the mass copy when there is one. The mass and calc splits
were drawn separately, so a mammogram can have abnormalities in a train and a test CSV: it is one test image. The
CSVs carry neither age nor sex.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from scaling.data.datasets.readers import (DENSITY, finish, map_values, parse_numbers, read_csv, require_ids,
                                          suspicion)
from scaling.data.table import LABEL_PREFIX, DataError, OptionError

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
ABNORMALITIES = ("both", "mass", "calc")
PATHOLOGY = {"MALIGNANT": 1.0, "BENIGN": 0.0, "BENIGN_WITHOUT_CALLBACK": 0.0}
DENSITY_COLUMNS = ("breast_density", "breast density")
REQUIRED = ("patient_id", "left or right breast", "image view", "abnormality id", "abnormality type", "assessment",
            "pathology", "image file path")


def _read(path: Path, split: str) -> pd.DataFrame:
    """One case-description CSV with the density column under one name, whichever spelling the file uses."""
    raw = read_csv(path, REQUIRED, dtype=str)
    col = next((c for c in DENSITY_COLUMNS if c in raw.columns), None)
    if col is None:
        raise DataError(f"{path}: missing required column 'breast_density' (mass CSVs) or 'breast density' (calc CSVs)")
    for c in ("patient_id", "image file path"):
        require_ids(raw[c], path, c)
    ids = raw["patient_id"].str.strip() + "_" + raw["left or right breast"].str.strip() + "_" + \
        raw["image view"].str.strip() + "#" + raw["abnormality id"].astype(str)
    # Density 0 occurs in the released calc CSVs; it is not a BI-RADS density, so it is unknown.
    density = map_values(raw[col].str.strip().str.replace(r"\.0$", "", regex=True), {**DENSITY, "0": None},
                         ids, path, col)
    return pd.DataFrame({
        "patient_id": raw["patient_id"].str.strip(),
        "side": map_values(raw["left or right breast"], {"LEFT": "LEFT", "RIGHT": "RIGHT"}, ids, path,
                           "left or right breast"),
        "view": map_values(raw["image view"], {"CC": "CC", "MLO": "MLO"}, ids, path, "image view"),
        "abnormality": raw["abnormality type"].str.strip(),
        "birads": parse_numbers(raw["assessment"], ids, path, "assessment"),
        "malignant": map_values(raw["pathology"], PATHOLOGY, ids, path, "pathology"),
        "density": density,
        "image": raw["image file path"].str.strip(),
        "split": split,
        "file": path.name,
    })


def _resolve(base: Path, image: str) -> str:
    """The DICOM of ``image`` under ``base``; for an NBIA download, the single DICOM under its subject folder."""
    path = base / image
    if not path.is_file():
        subject = base / image.split("/")[0]
        if subject.is_dir():
            found = sorted(subject.rglob("*.dcm"))
            if len(found) == 1:
                return str(found[0].absolute())
    return str(path.absolute())


def load(
    root: str | Path,
    split: str = "train",
    *,
    abnormality: str = "both",
    birads3: str = "negative",
    verify_files: bool = False,
) -> pd.DataFrame:
    """Load CBIS-DDSM as a sample table (one row per full mammogram).

    ``split``: ``train`` (``*_train_set.csv``), ``test`` or ``all``. ``abnormality``: ``both`` (default), ``mass``
    or ``calc`` CSVs. Labels: ``Malignant`` (pathology) and ``Suspicious`` (max BI-RADS assessment ≥ 4; see
    :func:`scaling.data.datasets.readers.suspicion` for 3 and 0). ``sample_id`` is ``<split>/<patient>_<SIDE>_<VIEW>``.
    Attributes: ``laterality`` (L/R), ``view`` (CC/MLO), ``density`` (A–D), ``birads``, ``abnormality``
    (``mass``, ``calcification`` or both joined by ``+``), ``split``.
    """
    root = Path(root)
    source = f"cbis_ddsm({root})"
    if abnormality not in ABNORMALITIES:
        raise OptionError(f"{source}: abnormality {abnormality!r} is not allowed; choose one of {list(ABNORMALITIES)}",
                          "options")
    if split not in SPLITS:
        raise OptionError(f"{source}: unknown split {split!r}; choose one of {list(SPLITS)}", "split")
    kinds = ("mass", "calc") if abnormality == "both" else (abnormality,)
    # Both splits are read whatever ``split`` is: the mass and calc splits were drawn separately, so one mammogram
    # can have an abnormality in a train CSV and another in a test CSV. It is one film with one label, and it
    # belongs to the test split (the training split must not hold a film the test split scores).
    rows = pd.concat([_read(root / f"{k}_case_description_{s}_set.csv", s) for s in ("train", "test") for k in kinds],
                     ignore_index=True)
    key = ["patient_id", "side", "view"]
    df = rows.groupby(key, sort=False).agg(
        split=("split", lambda s: "test" if (s == "test").any() else "train"),
        n_splits=("split", "nunique"),
        density=("density", "first"), birads=("birads", "max"), malignant=("malignant", "max"),
        abnormality=("abnormality", lambda a: "+".join(sorted(set(a)))),
    ).reset_index()
    mass_first = rows.sort_values("abnormality", key=lambda a: a != "mass", kind="stable")
    image = mass_first.groupby(key, sort=False)["image"].first()
    df["image"] = image.reindex(pd.MultiIndex.from_frame(df[key])).to_numpy()
    df = df.sort_values("split", key=lambda s: s == "test", kind="stable").reset_index(drop=True)  # train, then test
    both = df[df["n_splits"] > 1]
    if len(both):
        first = both.iloc[0]
        log.warning("%s: %d mammograms have abnormalities in both a train and a test CSV (e.g. %s %s %s); each is "
                    "one test image whose labels take every abnormality, and none is a training image", source,
                    len(both), first["patient_id"], first["side"], first["view"])
    if split != "all":
        df = df[df["split"] == split].reset_index(drop=True)
    base = root / "CBIS-DDSM" if (root / "CBIS-DDSM").is_dir() else root
    out = pd.DataFrame({
        "sample_id": df["split"] + "/" + df["patient_id"] + "_" + df["side"] + "_" + df["view"],
        "patient_id": df["patient_id"],
        "path": [_resolve(base, i) for i in df["image"]],
        "sex": None,
        "age": float("nan"),
        LABEL_PREFIX + "Malignant": df["malignant"].astype(float),
        LABEL_PREFIX + "Suspicious": suspicion(df["birads"], birads3, source),
        "laterality": df["side"].str[0],
        "view": df["view"],
        "density": df["density"],
        "birads": df["birads"],
        "abnormality": df["abnormality"],
        "split": df["split"],
    })
    log.info("%s: %d abnormalities -> %d mammograms", source, len(rows), len(out))
    return finish(out, source, verify_files)

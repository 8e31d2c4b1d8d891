"""EMBED Open Data (Jeong et al. 2023, AWS Open Data): Emory mammograms with race, density and outcomes.

Layout (Jeong et al. 2023; ``EMBED_Open_Data/README.md``)::

    <root>/tables/EMBED_OpenData_clinical.csv    one row per finding (or _reduced)
    <root>/tables/EMBED_OpenData_metadata.csv    one row per image (or _reduced)
    <root>/images/cohort_1/<empi_anon>/<acc_anon>/<SOPInstanceUID>.dcm

``anon_dicom_path`` carries a release-specific prefix; the ``cohort_N/…`` tail is joined with ``<root>/images``.
Findings join images on ``empi_anon``, ``acc_anon`` **and laterality** (README VIII): a finding with ``side`` L or
R belongs to that breast's images, ``B`` or blank to both. ``asses`` is a letter code — A(0, incomplete) N(1) B(2)
P(3) S(4) M(5) K(6) — and the image's BI-RADS is the highest of its findings. ``path_severity`` 0/1 = invasive /
non-invasive cancer, 2–5 = high-risk … negative, 6 = non-breast cancer. ``tissueden`` 1–4 = density A–D and
**5 = normal male**. ``RACE_DESC`` is matched with whitespace collapsed, because the release spells
``African American  or Black`` with two spaces. The two cohorts are patient-disjoint halves of the release.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from scaling.data.datasets.readers import (filter_rows, find_file, finish, map_values, parse_ages, parse_numbers,
                                  read_csv, require_ids, select_split, suspicion)
from scaling.data.table import LABEL_PREFIX, DataError

log = logging.getLogger(__name__)

SPLITS = ("all", "cohort_1", "cohort_2")
ASSESSMENT = {"A": 0.0, "N": 1.0, "B": 2.0, "P": 3.0, "S": 4.0, "M": 5.0, "K": 6.0}
"""``asses`` letter → BI-RADS category."""
RACE = {
    "Caucasian or White": "White",
    "African American or Black": "Black",  # released as "African American  or Black" (two spaces)
    "Asian": "Asian",
    "Native Hawaiian or Other Pacific Islander": "Pacific Islander",
    "American Indian or Alaskan Native": "American Indian/Alaska Native",
    "Multiple": "Multiple",
    "Unknown, Unavailable or Unreported": None,
}
DENSITY = {"1": "A", "2": "B", "3": "C", "4": "D", "5": None}
SIDES = {"L": "L", "R": "R", "B": "B"}


def _race(text: pd.Series, source: Path) -> pd.Series:
    """``RACE_DESC`` → White/Black/Asian/…, None when unknown; a value outside the released vocabulary is kept
    verbatim (and logged) rather than failing the whole dataset over a demographic string."""
    known = text.isin(list(RACE))
    other = text.notna() & ~known
    if other.any():
        log.warning("%s: RACE_DESC values outside the released vocabulary kept verbatim: %s", source,
                    sorted(text[other].unique()))
    return text.map(RACE).where(known, text).astype(object)


def _findings(clinical: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One row per (exam, breast) finding with its BI-RADS and malignancy (1/0/NaN), B/blank sides duplicated."""
    ids = clinical["empi_anon"] + "/" + clinical["acc_anon"]
    side = map_values(clinical["side"], SIDES, ids, path, "side")
    birads = map_values(clinical["asses"], ASSESSMENT, ids, path, "asses", blank=np.nan).astype(float)
    severity = parse_numbers(clinical["path_severity"], ids, path, "path_severity")
    bad = severity.notna() & ~severity.isin(range(7))
    if bad.any():
        raise DataError(f"{path}: row {ids[bad].iloc[0]!r}, column 'path_severity': expected 0-6, got {severity[bad].iloc[0]}")
    # Cancer on pathology = 1; other pathology, or a negative/benign screen without biopsy = 0; else unknown.
    malignant = np.where(severity <= 1, 1.0, np.where(severity >= 2, 0.0, np.where(birads.isin([1.0, 2.0]), 0.0, np.nan)))
    one = pd.DataFrame({"empi_anon": clinical["empi_anon"], "acc_anon": clinical["acc_anon"], "side": side,
                        "birads": birads, "malignant": malignant})
    both = one[one["side"].isna() | (one["side"] == "B")]
    return pd.concat([one[one["side"].isin(["L", "R"])], both.assign(side="L"), both.assign(side="R")],
                     ignore_index=True)


def load(
    root: str | Path,
    split: str = "all",
    *,
    image_types: Sequence[str] | None = None,
    exclude_spot_mag: bool = False,
    birads3: str = "negative",
    verify_files: bool = False,
) -> pd.DataFrame:
    """Load EMBED Open Data as a sample table (one row per image of the metadata table).

    ``split``: ``all``, ``cohort_1`` or ``cohort_2``. ``image_types``: keep these ``FinalImageType`` values
    (e.g. ``["2D"]``; C-view images are synthetic 2D from tomosynthesis); ``exclude_spot_mag``: drop spot
    compression / magnification views. Both filters are logged. Labels: ``Suspicious`` (highest BI-RADS of the
    breast's findings ≥ 4; 3 per ``birads3``) and ``Malignant`` (1 if a finding's pathology is cancer, 0 if every
    finding has non-cancer pathology or a negative/benign assessment, else NaN); images of a breast without
    findings have NaN labels. Attributes: ``race``, ``ethnicity``, ``density``, ``birads``, ``laterality``,
    ``view``, ``image_type``, ``spot_mag``, ``manufacturer`` (``Manufacturer``) and ``device_model``
    (``ManufacturerModelName``) where the metadata has those columns, ``exam_id``, ``cohort``.
    """
    root = Path(root)
    source = f"embed({root})"
    tables = [f"{d}EMBED_OpenData_{{}}{s}.csv" for d in ("tables/", "") for s in ("", "_reduced")]
    clin_path = find_file(root, [t.format("clinical") for t in tables])
    meta_path = find_file(root, [t.format("metadata") for t in tables])
    clinical = read_csv(clin_path, ["empi_anon", "acc_anon", "side", "asses", "tissueden", "path_severity",
                                    "RACE_DESC", "age_at_study"], dtype=str, low_memory=False)
    meta = read_csv(meta_path, ["empi_anon", "acc_anon", "anon_dicom_path", "ImageLateralityFinal", "ViewPosition",
                                "FinalImageType"], dtype=str, low_memory=False)
    for table, path in ((clinical, clin_path), (meta, meta_path)):
        if table.empty:
            raise DataError(f"{path}: no rows")
        for col in ("empi_anon", "acc_anon"):
            require_ids(table[col], path, col)
    require_ids(meta["anon_dicom_path"], meta_path, "anon_dicom_path")

    tail = meta["anon_dicom_path"].str.extract(r"(cohort_\d+/.*)$")[0]
    if tail.isna().any():
        bad = meta.loc[tail.isna(), "anon_dicom_path"].iloc[0]
        raise DataError(f"{meta_path}: anon_dicom_path {bad!r} has no cohort_N/ component")
    sop = tail.str.rsplit("/", n=1).str[-1].str.replace(r"\.dcm$", "", regex=True)
    df = pd.DataFrame({
        "sample_id": sop,
        "patient_id": meta["empi_anon"],
        "path": [str((root / "images" / t).absolute()) for t in tail],
        "exam_id": meta["acc_anon"],
        "laterality": map_values(meta["ImageLateralityFinal"], {"L": "L", "R": "R"}, sop, meta_path,
                                 "ImageLateralityFinal"),
        "view": meta["ViewPosition"],
        "image_type": meta["FinalImageType"],
        "spot_mag": meta["spot_mag"].notna() & (meta["spot_mag"].astype(str).str.strip() != "")
        if "spot_mag" in meta.columns else False,
        "cohort": tail.str.split("/").str[0],
        "split": tail.str.split("/").str[0],
        "sex": map_values(meta["PatientSex"], {"F": "F", "M": "M", "O": None}, sop, meta_path, "PatientSex")
        if "PatientSex" in meta.columns else None,
    })
    if df["sample_id"].duplicated().any():
        raise DataError(f"{meta_path}: image {df.loc[df['sample_id'].duplicated(), 'sample_id'].iloc[0]!r} listed twice")
    # Device attributes only where the metadata has them: a column of None would make a manufacturer subgroup or
    # filter silently empty, whereas a missing one is refused naming the attributes there are.
    devices = {"manufacturer": "Manufacturer", "device_model": "ManufacturerModelName"}
    for attribute, column in devices.items():
        if column in meta.columns:
            df[attribute] = meta[column].to_numpy()
    if not set(devices.values()) & set(meta.columns):
        log.warning("%s has neither a Manufacturer nor a ManufacturerModelName column: the images have no device "
                    "attribute", meta_path)

    # Exam-level attributes (same on every finding row of an exam): race, ethnicity, age, density.
    exam_ids = clinical["empi_anon"] + "/" + clinical["acc_anon"]
    # Match on collapsed whitespace so the released double space and a re-typed single space both map.
    race_text = clinical["RACE_DESC"].str.replace(r"\s+", " ", regex=True)
    ethnic_col = next((c for c in ("ETHNIC_GROUP_DESC", "ETHNICITY_DESC") if c in clinical.columns), None)
    density_raw = clinical["tissueden"].str.strip().str.replace(r"\.0$", "", regex=True)
    exams = pd.DataFrame({
        "empi_anon": clinical["empi_anon"], "acc_anon": clinical["acc_anon"],
        "race": _race(race_text, clin_path),
        "ethnicity": clinical[ethnic_col] if ethnic_col else None,
        "age": parse_ages(clinical["age_at_study"], exam_ids, clin_path, "age_at_study"),
        "density": map_values(density_raw, DENSITY, exam_ids, clin_path, "tissueden"),
        "male": density_raw == "5",
    }).drop_duplicates(["empi_anon", "acc_anon"])
    keys = pd.DataFrame({"empi_anon": meta["empi_anon"], "acc_anon": meta["acc_anon"]})
    exam = keys.merge(exams, on=["empi_anon", "acc_anon"], how="left")
    for c in ("race", "ethnicity", "age", "density"):
        df[c] = exam[c].to_numpy()
    # An exam without a clinical row has no `male` flag (NaN): not male, and its images get NaN labels below.
    df["sex"] = df["sex"].where(~exam["male"].eq(True).to_numpy(), "M")

    findings = _findings(clinical, clin_path)
    per_breast = findings.groupby(["empi_anon", "acc_anon", "side"]).agg(
        birads=("birads", "max"),
        malignant=("malignant", lambda m: 1.0 if (m == 1.0).any() else 0.0 if (m == 0.0).all() else np.nan),
    ).reset_index()
    keys["side"] = df["laterality"].to_numpy()
    labels = keys.merge(per_breast, on=["empi_anon", "acc_anon", "side"], how="left")
    df["birads"] = labels["birads"].to_numpy()
    df[LABEL_PREFIX + "Suspicious"] = suspicion(labels["birads"], birads3, source).to_numpy()
    df[LABEL_PREFIX + "Malignant"] = labels["malignant"].to_numpy()
    no_finding = labels["birads"].isna() & labels["malignant"].isna()
    if no_finding.any():
        log.info("%s: %d images show a breast without a matching finding row; their labels are NaN", source, no_finding.sum())

    df = select_split(df, split, SPLITS, source)
    if image_types is not None:
        df = filter_rows(df, df["image_type"].isin(list(image_types)), source, f"image_types={list(image_types)}")
    if exclude_spot_mag:
        df = filter_rows(df, ~df["spot_mag"], source, "exclude_spot_mag")
    return finish(df, source, verify_files)

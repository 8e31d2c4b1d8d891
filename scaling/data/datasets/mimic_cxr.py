"""MIMIC-CXR-JPG (PhysioNet v2.0.0/v2.1.0): metadata + CheXpert/NegBio labels + official split, MIMIC-IV demographics.

Layout (MIMIC-CXR-JPG 2.0.0 on PhysioNet; Johnson et al. 2019)::

    <root>/mimic-cxr-2.0.0-{metadata,chexpert,negbio,split}.csv.gz
    <root>/files/p10/p10000032/s50414267/<dicom_id>.jpg

Labels are study-level (joined on ``subject_id, study_id``) in the CheXpert encoding, so the uncertainty policy
and blank rule of :mod:`scaling.data.labels` apply exactly as for CheXpert. An image whose study has no label row
gets NaN for every label (not labelled). The release has no demographics: sex, age and race come from MIMIC-IV
``hosp/patients`` and ``hosp/admissions`` when their paths are given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from scaling.data import labels as L
from scaling.data.datasets.readers import (chest_view, computed_ages, filter_views, find_file, finish, map_values,
                                          parse_numbers, read_csv, require_ids, select_split)
from scaling.data.table import LABEL_PREFIX, DataError, OptionError

log = logging.getLogger(__name__)

SPLITS = ("train", "validate", "test", "all")
"""split.csv's ``split`` values, plus ``all``."""
FRONTAL = ("PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD")
LATERAL = ("LATERAL", "LL", "RL", "XTABLE LATERAL")
"""``ViewPosition`` codes per view; oblique (LAO, RAO, LPO), SWIMMERS and blank have no view."""
LABELERS = ("chexpert", "negbio")
RACE_POLICIES = ("unique", "first")


def _table(root: Path, kind: str) -> Path:
    # PhysioNet ships gzip; users often decompress in place, so accept both.
    return find_file(root, [f"mimic-cxr-2.0.0-{kind}.csv.gz", f"mimic-cxr-2.0.0-{kind}.csv"])


def _study_year(dates: pd.Series, ids: pd.Series, source: Path) -> pd.Series:
    """The year of each ``StudyDate`` (``YYYYMMDD``, shifted into 2100-2200 by de-identification); blank → NaN."""
    number = parse_numbers(dates, ids, source, "StudyDate")
    month, day = number // 100 % 100, number % 100
    valid = number.isna() | ((number % 1 == 0) & (number >= 1000_01_01) & (number <= 9999_12_31)
                             & month.between(1, 12) & day.between(1, 31))
    if not valid.all():
        i = int(np.flatnonzero(~valid.to_numpy())[0])
        raise DataError(f"{source}: row {ids.iloc[i]!r}, column 'StudyDate': not a YYYYMMDD date: {dates.iloc[i]!r}")
    return number // 10000


def map_race(value) -> str | None:
    """MIMIC-IV ``race`` (v2+) / ``ethnicity`` (v1.0) string → White/Black/Asian/Hispanic/Other, None if unknown.

    v2+ uses fine strings (``WHITE - OTHER EUROPEAN``, ``ASIAN - CHINESE``, ``HISPANIC/LATINO - PUERTO RICAN``),
    so the mapping is by substring (the approach of chexploration / CXR_Fairness), unknowns first.
    """
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.upper()
    if any(s in v for s in ("UNKNOWN", "UNABLE TO OBTAIN", "DECLINED")):
        return None
    if "BLACK" in v:
        return "Black"
    if "WHITE" in v or v == "PORTUGUESE":
        return "White"
    if "ASIAN" in v:
        return "Asian"
    if "HISPANIC" in v or "LATINO" in v or v == "SOUTH AMERICAN":
        return "Hispanic"
    return "Other"


def _demographics(root: Path, patients: str | Path | None, admissions: str | Path | None, race_policy: str):
    """Per-subject sex/anchor age (patients) and race/insurance (admissions); None for a file not given."""
    demo = None
    if patients is not None:
        path = root / patients
        p = read_csv(path, ["subject_id", "gender", "anchor_age", "anchor_year"], dtype={"subject_id": str})
        require_ids(p["subject_id"], path, "subject_id")
        p = p.drop_duplicates("subject_id")
        sex = p["gender"].map({"F": "F", "M": "M"})
        if (sex.isna() & p["gender"].notna()).any():
            bad = p.loc[sex.isna() & p["gender"].notna()].iloc[0]
            raise DataError(f"{path}: subject {bad['subject_id']}: unexpected gender {bad['gender']!r}")
        demo = pd.DataFrame({"subject_id": p["subject_id"], "sex": sex.astype(object),
                             "anchor_age": parse_numbers(p["anchor_age"], p["subject_id"], path, "anchor_age"),
                             "anchor_year": parse_numbers(p["anchor_year"], p["subject_id"], path, "anchor_year")})
    races = None
    if admissions is not None:
        path = root / admissions
        a = read_csv(path, ["subject_id", "admittime"])
        # MIMIC-IV v1.0 names the column `ethnicity`; v2.0 renamed it `race`.
        col = "race" if "race" in a.columns else "ethnicity" if "ethnicity" in a.columns else None
        if col is None:
            raise DataError(f"{path}: missing required column 'race' (MIMIC-IV v2+) or 'ethnicity' (v1.0)")
        a = a.sort_values(["subject_id", "admittime"], kind="stable")
        a["race"] = a[col].map(map_race)
        known = a.dropna(subset=["race"])
        if race_policy == "first":
            race = known.groupby("subject_id")["race"].first()
        else:
            # Subjects whose admissions disagree (after mapping) get no race rather than an arbitrary one,
            # following chexploration's exclusion of multi-race subjects.
            n = known.groupby("subject_id")["race"].nunique()
            race = known.groupby("subject_id")["race"].first().where(n == 1)
            if (n > 1).any():
                log.info("%s: %d subjects have conflicting race across admissions; race set to None", path, (n > 1).sum())
        # Every subject with an admission, so insurance is kept where race is unknown (None).
        races = pd.DataFrame(index=pd.Index(a["subject_id"].unique(), name="subject_id"))
        races["race"] = race.astype(object).reindex(races.index)
        if "insurance" in a.columns:
            races["insurance"] = a.groupby("subject_id")["insurance"].first()
        races = races.reset_index()
    return demo, races


def load(
    root: str | Path,
    split: str = "train",
    *,
    labeler: str = "chexpert",
    uncertainty: str | Mapping[str, str] = "ignore",
    blank: str = "zero",
    patients: str | Path | None = None,
    admissions: str | Path | None = None,
    race_policy: str = "unique",
    views: list[str] | None = None,
    verify_files: bool = False,
) -> pd.DataFrame:
    """Load MIMIC-CXR-JPG as a sample table (one row per JPEG).

    ``split``: ``train``, ``validate``, ``test`` (split.csv) or ``all``. ``labeler``: ``chexpert`` or
    ``negbio`` label file. ``uncertainty``/``blank``: see :func:`scaling.data.labels.apply_label_policy`.
    ``patients``/``admissions``: MIMIC-IV ``hosp/patients.csv(.gz)`` / ``hosp/admissions.csv(.gz)`` (absolute or
    relative to ``root``) for ``sex``, ``age`` (anchor_age + study year − anchor_year, as chexploration),
    ``race`` and ``insurance``; ``race_policy``: ``unique`` (subjects with conflicting races get None) or
    ``first`` (first admission's race, as CXR_Fairness). ``views``: keep rows whose ``view`` or
    ``view_position`` is listed (e.g. ``["frontal"]`` or ``["PA", "AP"]``; filter, logged). Attributes: ``view``
    (``frontal``/``lateral``/None, CheXpert's convention), ``view_position`` (``ViewPosition``), ``study_id``,
    ``split``, ``race``, ``insurance``.
    """
    root = Path(root)
    source = f"mimic_cxr({root})"
    if labeler not in LABELERS:
        raise OptionError(f"{source}: labeler {labeler!r} is not allowed; choose one of {list(LABELERS)}", "options")
    if race_policy not in RACE_POLICIES:
        raise OptionError(f"{source}: race_policy {race_policy!r} is not allowed; choose one of {list(RACE_POLICIES)}",
                          "options")
    ids = {"subject_id": str, "study_id": str, "dicom_id": str}
    meta_path, split_path = _table(root, "metadata"), _table(root, "split")
    meta = read_csv(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"],
                    dtype={**ids, "ViewPosition": str})
    splits = read_csv(split_path, ["dicom_id", "split"], dtype=ids)
    label_path = _table(root, labeler)
    lab = read_csv(label_path, ["subject_id", "study_id", *L.CHEXPERT_LABELS], dtype=str, keep_default_na=False)
    for table, path, cols in ((meta, meta_path, ("dicom_id", "subject_id", "study_id")),
                              (splits, split_path, ("dicom_id", "split")),
                              (lab, label_path, ("subject_id", "study_id"))):
        for col in cols:
            require_ids(table[col], path, col)
        if "dicom_id" in cols and table["dicom_id"].duplicated().any():
            raise DataError(f"{path}: dicom_id {table.loc[table['dicom_id'].duplicated(), 'dicom_id'].iloc[0]!r} "
                            "is listed twice")
    # A misspelled split would otherwise drop its images from every split.
    splits["split"] = map_values(splits["split"], {s: s for s in SPLITS if s != "all"}, splits["dicom_id"], split_path,
                                 "split")

    df = meta.merge(splits[["dicom_id", "split"]], on="dicom_id", how="left", validate="one_to_one")
    if df["split"].isna().any():
        raise DataError(f"{split_path}: image {df.loc[df['split'].isna(), 'dicom_id'].iloc[0]!r} "
                        "of the metadata file has no split row")
    df = select_split(df, split, SPLITS, source)

    # Study-level labels: parse the text cells (line numbers refer to the label file), then apply the policy.
    raw = {n: L.parse_raw_labels(lab[n], str(label_path), n) for n in L.CHEXPERT_LABELS}
    policy = L.apply_label_policy(raw, uncertainty, blank)
    labels = pd.DataFrame({LABEL_PREFIX + n: v for n, v in policy.items()})
    labels["subject_id"], labels["study_id"] = lab["subject_id"], lab["study_id"]
    if labels.duplicated(["subject_id", "study_id"]).any():
        raise DataError(f"{label_path}: study {labels.loc[labels.duplicated(['subject_id', 'study_id']), 'study_id'].iloc[0]}"
                        " has more than one label row")
    df = df.merge(labels, on=["subject_id", "study_id"], how="left")
    unlabelled = ~df["study_id"].isin(labels["study_id"])
    if unlabelled.any():
        log.info("%s: %d images belong to studies without a label row; their labels are NaN", source, unlabelled.sum())

    subject = df["subject_id"]
    df["sample_id"] = df["dicom_id"]
    df["patient_id"] = subject
    df["path"] = [
        str((root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg").absolute())
        for s, st, d in zip(subject, df["study_id"], df["dicom_id"])
    ]
    df["view_position"] = df["ViewPosition"]
    df["view"] = chest_view(df["ViewPosition"], FRONTAL, LATERAL)
    df["sex"], df["age"] = None, np.nan

    demo, races = _demographics(root, patients, admissions, race_policy)
    if demo is not None:
        demo["subject_id"] = demo["subject_id"].astype(str)
        df = df.drop(columns=["sex"]).merge(demo, on="subject_id", how="left")
        study_year = _study_year(df["StudyDate"], df["dicom_id"], meta_path)
        df["age"] = computed_ages(df["anchor_age"] + study_year - df["anchor_year"], df["dicom_id"], meta_path,
                                  "anchor_age + StudyDate year − anchor_year")
    if races is not None:
        races["subject_id"] = races["subject_id"].astype(str)
        df = df.merge(races, on="subject_id", how="left")

    df = filter_views(df, views, source)
    keep = ["sample_id", "patient_id", "path", "sex", "age", "view", "view_position", "study_id", "split"]
    keep += [c for c in ("race", "insurance") if c in df.columns]
    out = df[keep + [c for c in df.columns if c.startswith(LABEL_PREFIX)]]
    return finish(out, source, verify_files)

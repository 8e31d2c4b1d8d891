"""Chest X-ray loaders (MIMIC-CXR-JPG, NIH ChestX-ray14, PadChest) on fixtures in their released formats.

Every expectation below is written by hand from the fixture rows (``scaling/data/fixtures.py``) and the dataset
documentation, never from the loader's own output.
"""

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scaling.data.datasets import mimic_cxr, nih_cxr14, padchest
from dataset_fixtures import write_fixture
from scaling.data.table import DataError

NAN = float("nan")


def same(a, b):
    """Equality that treats NaN == NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def row(df, sample_id):
    return df.set_index("sample_id").loc[sample_id]


def assert_labels(df, sample_id, expected: dict):
    r = row(df, sample_id)
    for name, value in expected.items():
        assert same(float(r[f"label:{name}"]), value), (sample_id, name, r[f"label:{name}"], value)


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory):
    return write_fixture("mimic_cxr", tmp_path_factory.mktemp("mimic"))


@pytest.fixture(scope="module")
def nih_root(tmp_path_factory):
    return write_fixture("nih_cxr14", tmp_path_factory.mktemp("nih"))


@pytest.fixture(scope="module")
def padchest_root(tmp_path_factory):
    return write_fixture("padchest", tmp_path_factory.mktemp("padchest"))


# --------------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# --------------------------------------------------------------------------------------------------------------

A = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"  # 10000032 / 50414267 PA  (Cardiomegaly 1, Effusion -1, Edema 0)
B = "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"  # same study, LATERAL
C = "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"  # 10000032 / 53189527 AP  (No Finding 1)
D = "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4"  # 10000764 / 57375967 blank view, validate
E = "1a3b4a28-3c7b5d05-4b6e1a32-9b7c1f1e-23ab5cd1"  # 10000898 / 50771383 PA test (Pneumothorax 1)
F = "4f2b1c9e-8d3a7b60-2c1e4f5a-6b7d8e9f-0a1b2c3d"  # same study, LL
G = "5e6f7a8b-9c0d1e2f-3a4b5c6d-7e8f9a0b-1c2d3e4f"  # 10001884 / 56668612, study without a label row
H = "6f7a8b9c-0d1e2f3a-4b5c6d7e-8f9a0b1c-2d3e4f5a"  # 10002428 / 59258269 AP test


def test_mimic_rows_paths_views_and_splits(mimic_root):
    df = mimic_cxr.load(mimic_root, "all", verify_files=True)
    assert list(df["sample_id"]) == [A, B, C, D, E, F, G, H]
    assert list(df["patient_id"]) == ["10000032"] * 3 + ["10000764", "10000898", "10000898", "10001884", "10002428"]
    assert list(df["split"]) == ["train", "train", "train", "validate", "test", "test", "train", "test"]
    assert list(df["view_position"]) == ["PA", "LATERAL", "AP", None, "PA", "LL", "PA", "AP"]
    assert list(df["view"]) == ["frontal", "lateral", "frontal", None, "frontal", "lateral", "frontal", "frontal"]
    assert row(df, A)["path"] == str(mimic_root / "files/p10/p10000032/s50414267" / f"{A}.jpg")
    # No demographics in the release: sex/age missing, no race column unless MIMIC-IV files are given.
    assert df["sex"].isna().all() and df["age"].isna().all() and "race" not in df.columns
    assert list(mimic_cxr.load(mimic_root, "train")["sample_id"]) == [A, B, C, G]
    assert list(mimic_cxr.load(mimic_root, "validate")["sample_id"]) == [D]
    assert list(mimic_cxr.load(mimic_root, "test")["sample_id"]) == [E, F, H]


def test_mimic_labels_default_policy_ignore_uncertain_blank_zero(mimic_root):
    df = mimic_cxr.load(mimic_root, "all")
    assert len([c for c in df.columns if c.startswith("label:")]) == 14
    # Study-level labels shared by both images of the study; -1.0 -> NaN (U-Ignore), blank -> 0.
    for image in (A, B):
        assert_labels(df, image, {"Cardiomegaly": 1.0, "Edema": 0.0, "Pleural Effusion": NAN, "Atelectasis": 0.0,
                                  "No Finding": 0.0, "Support Devices": 0.0})
    assert_labels(df, C, {"No Finding": 1.0, "Cardiomegaly": 0.0})
    assert_labels(df, D, {"Atelectasis": NAN, "Pleural Effusion": 1.0, "Support Devices": 1.0, "Edema": 0.0})
    assert_labels(df, E, {"Pneumothorax": 1.0, "Atelectasis": 1.0, "Edema": 1.0, "Cardiomegaly": 0.0,
                          "Pleural Effusion": 0.0, "Consolidation": 0.0})
    assert_labels(df, H, {"Cardiomegaly": 1.0, "Consolidation": 1.0, "Pleural Effusion": 1.0, "Support Devices": NAN,
                          "Atelectasis": 0.0, "Edema": 0.0})
    # A study with no label row is not labelled at all: NaN, never 0.
    assert row(df, G)[[c for c in df.columns if c.startswith("label:")]].isna().all()


def test_mimic_uncertainty_blank_and_labeler_options(mimic_root):
    ones = mimic_cxr.load(mimic_root, "all", uncertainty="ones")
    assert_labels(ones, A, {"Pleural Effusion": 1.0})
    assert_labels(ones, D, {"Atelectasis": 1.0})
    per_label = mimic_cxr.load(mimic_root, "all", uncertainty={"Atelectasis": "zeros"})
    assert_labels(per_label, D, {"Atelectasis": 0.0})
    assert_labels(per_label, A, {"Pleural Effusion": NAN})
    nan_blank = mimic_cxr.load(mimic_root, "all", blank="nan")
    assert_labels(nan_blank, A, {"Atelectasis": NAN, "Cardiomegaly": 1.0, "Edema": 0.0})
    # No Finding = 1 is an explicit negative for every pathology except Support Devices (torchxrayvision rule).
    assert_labels(nan_blank, C, {"Atelectasis": 0.0, "Support Devices": NAN})
    negbio = mimic_cxr.load(mimic_root, "all", labeler="negbio")
    assert_labels(negbio, A, {"Pleural Effusion": 1.0})
    with pytest.raises(DataError, match="labeler"):
        mimic_cxr.load(mimic_root, "all", labeler="chexbert")


def test_mimic_demographics_from_mimic_iv(mimic_root):
    df = mimic_cxr.load(mimic_root, "all", patients="hosp/patients.csv.gz",
                        admissions=mimic_root / "hosp/admissions.csv.gz")
    assert list(df["sex"]) == ["F", "F", "F", "M", "F", "F", None, "M"]
    # age = anchor_age + study year - anchor_year: 52+2180-2180, 52+2181-2180, 86, 40+2156-2154, unknown subject,
    # 70+2151-2150.
    assert list(df["age"].fillna(-1)) == [52.0, 52.0, 53.0, 86.0, 42.0, 42.0, -1, 71.0]
    # WHITE + WHITE - OTHER EUROPEAN -> White; UNKNOWN + BLACK/AFRICAN AMERICAN -> Black;
    # ASIAN - CHINESE + HISPANIC/LATINO - PUERTO RICAN conflict -> None under the default 'unique' policy.
    assert list(df["race"]) == ["White", "White", "White", "Black", None, None, None, "Other"]
    assert list(df["insurance"]) == ["Other", "Other", "Other", "Medicare", "Other", "Other", None, "Medicare"]
    first = mimic_cxr.load(mimic_root, "all", admissions="hosp/admissions.csv.gz", race_policy="first")
    assert list(first["race"]) == ["White", "White", "White", "Black", "Asian", "Asian", None, "Other"]


def test_mimic_iv_v1_ethnicity_column(mimic_root, tmp_path):
    adm = pd.read_csv(mimic_root / "hosp/admissions.csv.gz").rename(columns={"race": "ethnicity"})
    adm["ethnicity"] = adm["ethnicity"].replace({"WHITE - OTHER EUROPEAN": "WHITE", "ASIAN - CHINESE": "ASIAN"})
    adm.to_csv(tmp_path / "admissions_v1.csv", index=False)
    df = mimic_cxr.load(mimic_root, "all", admissions=tmp_path / "admissions_v1.csv")
    assert list(df["race"]) == ["White", "White", "White", "Black", None, None, None, "Other"]


def test_mimic_insurance_is_kept_where_race_is_unknown(mimic_root, tmp_path):
    adm = pd.read_csv(mimic_root / "hosp/admissions.csv.gz")
    adm.loc[adm["subject_id"] == 10000764, "race"] = "UNABLE TO OBTAIN"  # no admission of this subject has a race
    adm.to_csv(tmp_path / "admissions.csv", index=False)
    df = mimic_cxr.load(mimic_root, "all", admissions=tmp_path / "admissions.csv")
    assert list(df["race"]) == ["White", "White", "White", None, None, None, None, "Other"]
    assert list(df["insurance"]) == ["Other", "Other", "Other", "Medicare", "Other", "Other", None, "Medicare"]


@pytest.mark.parametrize("value, expected", [
    ("WHITE", "White"), ("WHITE - RUSSIAN", "White"), ("PORTUGUESE", "White"), ("BLACK/CAPE VERDEAN", "Black"),
    ("ASIAN - SOUTH EAST ASIAN", "Asian"), ("HISPANIC OR LATINO", "Hispanic"), ("SOUTH AMERICAN", "Hispanic"),
    ("AMERICAN INDIAN/ALASKA NATIVE", "Other"), ("MULTIPLE RACE/ETHNICITY", "Other"), ("OTHER", "Other"),
    ("UNKNOWN", None), ("UNABLE TO OBTAIN", None), ("PATIENT DECLINED TO ANSWER", None), (NAN, None),
])
def test_mimic_race_mapping(value, expected):
    assert mimic_cxr.map_race(value) == expected


def test_mimic_views_filter(mimic_root, caplog):
    with caplog.at_level("INFO"):
        df = mimic_cxr.load(mimic_root, "all", views=["PA", "AP"])
    assert list(df["sample_id"]) == [A, C, E, G, H]
    assert "removed 3 of 8 rows" in caplog.text
    assert list(mimic_cxr.load(mimic_root, "all", views=["lateral"])["sample_id"]) == [B, F]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_mimic_bad_inputs(mimic_root, tmp_path):
    root = _copy(mimic_root, tmp_path / "m")
    lab = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
    bad = lab.copy()
    bad.loc[1, "Edema"] = "2.0"  # file line 3
    bad.to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    with pytest.raises(DataError, match=r"chexpert\.csv\.gz: line 3, column 'Edema'.*'2\.0'"):
        mimic_cxr.load(root, "all")
    lab.drop(columns=["Edema"]).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    with pytest.raises(DataError, match=r"chexpert\.csv\.gz: missing required column\(s\) \['Edema'\]"):
        mimic_cxr.load(root, "all")
    lab.to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    (root / "files/p10/p10000898/s50771383" / f"{F}.jpg").unlink()
    mimic_cxr.load(root, "all")  # metadata only: images need not exist
    with pytest.raises(DataError, match=f"1 of 8 image files are missing.*{F}"):
        mimic_cxr.load(root, "all", verify_files=True)
    with pytest.raises(DataError, match="unknown split 'valid'"):
        mimic_cxr.load(root, "valid")


# --------------------------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# --------------------------------------------------------------------------------------------------------------

NIH_EXPECTED = {  # image -> (patient, age, sex, view, positive canonical labels)
    "00000001_000.png": ("1", 57.0, "M", "PA", {"Cardiomegaly"}),
    "00000001_001.png": ("1", 58.0, "M", "PA", {"Atelectasis", "Cardiomegaly", "Emphysema"}),
    "00000002_000.png": ("2", 81.0, "M", "PA", {"No Finding"}),
    "00000003_000.png": ("3", NAN, "F", "AP", {"Consolidation", "Edema", "Pleural Effusion",  # age 414 -> NaN
                                               "Pleural Thickening"}),
    "00000004_000.png": ("4", 82.0, "F", "AP", {"Atelectasis", "Cardiomegaly", "Hernia", "Mass", "Nodule"}),
    "00000005_000.png": ("5", 69.0, "F", "PA", {"Consolidation", "Edema", "Pleural Effusion", "Infiltration",
                                               "Pneumothorax"}),
    "00000006_000.png": ("6", 35.0, "M", "PA", {"No Finding"}),
}
NIH_LABELS = {"No Finding", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumonia",
              "Pneumothorax", "Infiltration", "Emphysema", "Fibrosis", "Pleural Thickening", "Nodule", "Mass",
              "Hernia"}


def test_nih_fixture_has_the_bracketed_header_and_trailing_column(nih_root):
    header = (nih_root / "Data_Entry_2017.csv").read_text().splitlines()[0]
    assert header.endswith("OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def test_nih_rows_labels_and_attributes(nih_root):
    df = nih_cxr14.load(nih_root, "all", verify_files=True)
    assert list(df["sample_id"]) == list(NIH_EXPECTED)
    assert {c[len("label:"):] for c in df.columns if c.startswith("label:")} == NIH_LABELS
    assert not any(c.startswith("Unnamed") for c in df.columns)
    for image, (patient, age, sex, view, positives) in NIH_EXPECTED.items():
        r = row(df, image)
        assert (r["patient_id"], r["sex"], r["view"], r["view_position"]) == (patient, sex, "frontal", view)
        assert same(float(r["age"]), age)
        assert {n for n in NIH_LABELS if r[f"label:{n}"] == 1.0} == positives
        assert all(r[f"label:{n}"] == 0.0 for n in NIH_LABELS - positives)  # no uncertainty: absent = 0
    assert row(df, "00000001_000.png")["path"] == str(nih_root / "images_001/images/00000001_000.png")
    assert row(df, "00000005_000.png")["path"] == str(nih_root / "images_002/images/00000005_000.png")


def test_nih_official_split_lists(nih_root):
    train = nih_cxr14.load(nih_root, "train")
    assert list(train["sample_id"]) == list(NIH_EXPECTED)[:4]
    test = nih_cxr14.load(nih_root, "test")
    assert list(test["sample_id"]) == ["00000004_000.png", "00000005_000.png", "00000006_000.png"]
    assert not set(train["patient_id"]) & set(test["patient_id"])  # the official lists are patient-disjoint
    for task in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"):
        assert set(train[f"label:{task}"]) == set(test[f"label:{task}"]) == {0.0, 1.0}


def test_nih_flat_layout_and_v2020_file(nih_root, tmp_path):
    root = _copy(nih_root, tmp_path / "n")
    (root / "images").mkdir()
    for png in root.glob("images_*/images/*.png"):
        shutil.move(png, root / "images" / png.name)
    # The v2020 re-release: no trailing empty column; preferred over the 2017 file when both exist.
    lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    v2020 = [line[:-1] for line in lines]
    v2020[4] = v2020[4].replace(",414,", ",41,")
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(v2020) + "\n")
    df = nih_cxr14.load(root, "all", verify_files=True)
    assert row(df, "00000003_000.png")["age"] == 41.0
    assert row(df, "00000005_000.png")["path"] == str(root / "images/00000005_000.png")
    old = nih_cxr14.load(root, "all", entry_file="Data_Entry_2017.csv")
    assert math.isnan(row(old, "00000003_000.png")["age"])


def test_nih_views_filter(nih_root):
    assert list(nih_cxr14.load(nih_root, "all", views=["AP"])["sample_id"]) == ["00000003_000.png", "00000004_000.png"]
    assert len(nih_cxr14.load(nih_root, "all", views=["frontal"])) == 7


def test_nih_bad_inputs(nih_root, tmp_path):
    root = _copy(nih_root, tmp_path / "n")
    good = (root / "Data_Entry_2017.csv").read_text()
    (root / "Data_Entry_2017.csv").write_text(good.replace("Edema|Effusion|Pleural_Thickening", "Edema|Effusions|Pleural_Thickening"))
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv: row '00000003_000\.png'.*unknown finding 'Effusions'"):
        nih_cxr14.load(root, "all")
    (root / "Data_Entry_2017.csv").write_text(good.replace("Patient Gender", "Gender"))
    with pytest.raises(DataError, match=r"missing required column\(s\) \['Patient Gender'\]"):
        nih_cxr14.load(root, "all")
    (root / "Data_Entry_2017.csv").write_text(good.replace(",58,M,", ",58,X,"))
    with pytest.raises(DataError, match=r"row '00000001_001\.png', column 'Patient Gender'.*'X'"):
        nih_cxr14.load(root, "all")
    (root / "Data_Entry_2017.csv").write_text(good)
    (root / "test_list.txt").unlink()
    with pytest.raises(DataError, match=r"test_list\.txt: official split list not found"):
        nih_cxr14.load(root, "test")
    (root / "images_002/images/00000004_000.png").unlink()
    with pytest.raises(DataError, match=r"1 of 7 image files are missing.*00000004_000\.png"):
        nih_cxr14.load(root, "all", verify_files=True)


# --------------------------------------------------------------------------------------------------------------
# PadChest
# --------------------------------------------------------------------------------------------------------------

P1 = "216840111366964012819207061112010307142602253_04-014-084.png"
P2 = "216840111366964012819207061112010307142602254_04-014-085.png"
P3 = "216840111366964012989926673512011074122523403_00-163-058.png"
P4 = "216840111366964013076187734852011291090445391_00-196-188.png"
P5 = "216840111366964013076187734852011291090445392_00-196-189.png"
P6 = "216840111366964013076187734852011291090445393_00-196-190.png"


def test_padchest_rows_labels_and_attributes(padchest_root):
    df = padchest.load(padchest_root, "all", verify_files=True)
    assert list(df["sample_id"]) == [P1, P2, P3, P4, P5, P6]
    assert list(df["patient_id"]) == ["p1", "p1", "p2", "p3", "p3", "p4"]
    assert list(df["sex"]) == ["M", "M", "F", None, None, "F"]
    # age = study year - PatientBirth: 2015-1939, blank birth year, 2011-1975, 2011-1950.
    assert list(df["age"].fillna(-1)) == [76.0, 76.0, -1, 36.0, 36.0, 61.0]
    assert list(df["view_position"]) == ["PA", "L", "AP_horizontal", "PA", "PA", "PA"]
    assert list(df["view"]) == ["frontal", "lateral", "frontal", "frontal", "frontal", "frontal"]
    assert list(df["manufacturer"]) == ["PhilipsMedicalSystems"] * 2 + ["Agfa"] * 4
    assert row(df, P4)["path"] == str(padchest_root / "1" / P4)
    assert_labels(df, P1, {"No Finding": 1.0, "Cardiomegaly": 0.0, "Pleural Effusion": 0.0})
    # "['cardiomegaly', ' pleural effusion']": the leading space is part of the released strings.
    assert_labels(df, P2, {"No Finding": 0.0, "Cardiomegaly": 1.0, "Pleural Effusion": 1.0})
    assert_labels(df, P3, {"Pneumonia": 1.0, "Infiltration": 1.0, "Pleural Effusion": 0.0})
    assert row(df, P4)[[c for c in df.columns if c.startswith("label:")]].isna().all()  # blank Labels
    assert_labels(df, P5, {"Atelectasis": 1.0, "Nodule": 1.0, "Hernia": 1.0, "Mass": 0.0})
    # a child term of PadChest's hierarchy is a positive of its parent (torchxrayvision PC_Dataset's substring rule)
    assert_labels(df, P6, {"Atelectasis": 1.0, "Fracture": 1.0, "Mass": 1.0, "Pleural Effusion": 1.0, "Nodule": 1.0,
                           "Pleural Thickening": 1.0, "Infiltration": 1.0, "Consolidation": 1.0, "No Finding": 0.0,
                           "Cardiomegaly": 0.0, "Edema": 0.0, "Pneumonia": 0.0, "Hernia": 0.0})


def test_computed_ages_outside_0_to_120_come_from_a_wrong_date(padchest_root, tmp_path, caplog):
    root = _copy(padchest_root, tmp_path / "p")
    csv = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    table = pd.read_csv(csv, dtype=str)
    table.loc[0, "PatientBirth"] = "2016.0"  # born after the 2015 study
    table.loc[5, "PatientBirth"] = "1850.0"  # 161 at the 2011 study
    table.to_csv(csv, index=False)
    with caplog.at_level("INFO"):
        df = padchest.load(root, "all")
    assert list(df["age"].fillna(-1)) == [-1, 76.0, -1, 36.0, 36.0, -1]
    assert "2 computed ages (StudyDate_DICOM year − PatientBirth) outside [0, 120] set to NaN" in caplog.text


def test_padchest_images_are_16_bit_png(padchest_root):
    img = Image.open(padchest_root / "0" / P1)
    assert img.mode == "I;16" and np.asarray(img).dtype == np.uint16 and np.asarray(img).max() > 255


def test_padchest_bad_inputs(padchest_root, tmp_path):
    with pytest.raises(DataError, match="no official split"):
        padchest.load(padchest_root, "train")
    root = _copy(padchest_root, tmp_path / "p")
    csv = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    text = csv.read_text()
    csv.write_text(text.replace("['normal']", "normal"))
    with pytest.raises(DataError, match=f"row '{P1}', column 'Labels': not a Python list"):
        padchest.load(root, "all")
    csv.write_text(text.replace("Projection", "Proj"))
    with pytest.raises(DataError, match=r"missing required column\(s\) \['Projection'\]"):
        padchest.load(root, "all")
    csv.write_text(text)
    (root / "0" / P3).unlink()
    with pytest.raises(DataError, match=f"1 of 6 image files are missing.*{P3}"):
        padchest.load(root, "all", verify_files=True)


def test_chest_fixtures_grow_with_n_and_keep_both_classes(tmp_path):
    nih = nih_cxr14.load(write_fixture("nih_cxr14", tmp_path / "nih", n=20), "all", verify_files=True)
    assert len(nih) == 21 and nih["sample_id"].is_unique
    assert set(nih["label:Pleural Effusion"]) == {0.0, 1.0}
    mimic = mimic_cxr.load(write_fixture("mimic_cxr", tmp_path / "mimic", n=16), "all", verify_files=True,
                           patients="hosp/patients.csv.gz")
    assert len(mimic) == 16 and mimic["patient_id"].nunique() == 10
    pc = padchest.load(write_fixture("padchest", tmp_path / "pc", n=12), "all", verify_files=True)
    assert len(pc) == 12 and pc["patient_id"].nunique() == 8

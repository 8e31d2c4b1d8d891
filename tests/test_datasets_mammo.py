"""Mammography loaders (CBIS-DDSM, VinDr-Mammo, CMMD, EMBED) on DICOM fixtures in their released layouts.

Expectations are hand-written from the fixture rows (``scaling/data/fixtures.py``) and the datasets' documentation.
"""

import math
import shutil

import pandas as pd
import pydicom
import pytest

from scaling.data.datasets import cbis_ddsm, cmmd, embed, vindr_mammo
from scaling.data.dicom import read_dicom
from dataset_fixtures import write_fixture
from scaling.data.table import DataError, apply_filters


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("mammo")
    return {n: write_fixture(n, base / n) for n in ("cbis_ddsm", "vindr_mammo", "cmmd", "embed")}


def values(series):
    return [None if isinstance(v, float) and math.isnan(v) else v for v in series]


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------------------------
# CBIS-DDSM
# --------------------------------------------------------------------------------------------------------------

CBIS_ALL = ["train/P_00001_LEFT_CC", "train/P_00001_LEFT_MLO", "train/P_00004_RIGHT_MLO", "train/P_00005_RIGHT_CC",
            "test/P_00016_LEFT_CC", "test/P_00038_LEFT_MLO", "test/P_00038_RIGHT_CC"]


def test_cbis_fixture_has_both_density_spellings(roots):
    mass = (roots["cbis_ddsm"] / "mass_case_description_train_set.csv").read_text().splitlines()[0]
    calc = (roots["cbis_ddsm"] / "calc_case_description_train_set.csv").read_text().splitlines()[0]
    assert mass.startswith("patient_id,breast_density,") and calc.startswith("patient_id,breast density,")


def test_cbis_rows_are_mammograms_with_aggregated_labels(roots):
    root = roots["cbis_ddsm"]
    df = cbis_ddsm.load(root, "all", verify_files=True)
    assert list(df["sample_id"]) == CBIS_ALL
    assert list(df["patient_id"]) == ["P_00001", "P_00001", "P_00004", "P_00005", "P_00016", "P_00038", "P_00038"]
    # P_00001 LEFT CC: a MALIGNANT mass (BI-RADS 4) and a BENIGN_WITHOUT_CALLBACK calcification (2) -> 1, max 4.
    # P_00005 RIGHT CC: MALIGNANT (3) + BENIGN_WITHOUT_CALLBACK (2) calcifications -> malignant, BI-RADS 3.
    assert values(df["label:Malignant"]) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert values(df["birads"]) == [4.0, 4.0, 3.0, 3.0, 5.0, 0.0, 2.0]
    assert values(df["label:Suspicious"]) == [1.0, 1.0, 0.0, 0.0, 1.0, None, 0.0]  # BI-RADS 0 = incomplete
    assert list(df["density"]) == ["C", "C", "C", "C", "D", "B", "B"]
    assert list(df["laterality"]) == ["L", "L", "R", "R", "L", "L", "R"]
    assert list(df["view"]) == ["CC", "MLO", "MLO", "CC", "CC", "MLO", "CC"]
    assert list(df["abnormality"]) == ["calcification+mass", "mass", "mass", "calcification", "mass",
                                       "calcification", "calcification"]
    assert df["sex"].isna().all() and df["age"].isna().all()
    assert "/CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/" in df.loc[0, "path"]  # the mass copy of the image
    assert "/CBIS-DDSM/Calc-Test_P_00038_RIGHT_CC/" in df.loc[6, "path"]
    assert read_dicom(df.loc[0, "path"]).shape == (64, 48)


def test_cbis_splits_abnormality_and_birads3(roots):
    root = roots["cbis_ddsm"]
    assert list(cbis_ddsm.load(root, "train")["sample_id"]) == CBIS_ALL[:4]
    assert list(cbis_ddsm.load(root, "test")["sample_id"]) == CBIS_ALL[4:]
    mass = cbis_ddsm.load(root, "train", abnormality="mass")
    assert list(mass["sample_id"]) == CBIS_ALL[:3] and set(mass["abnormality"]) == {"mass"}
    calc = cbis_ddsm.load(root, "train", abnormality="calc")
    assert list(calc["sample_id"]) == ["train/P_00005_RIGHT_CC", "train/P_00001_LEFT_CC"]
    assert values(calc["label:Malignant"]) == [1.0, 0.0] and values(calc["birads"]) == [3.0, 2.0]
    assert "/Calc-Training_P_00001_LEFT_CC/" in calc.loc[1, "path"]
    strict = cbis_ddsm.load(root, "train", birads3="nan")
    assert values(strict["label:Suspicious"]) == [1.0, 1.0, None, None]


def test_cbis_a_mammogram_with_abnormalities_in_both_splits_is_one_test_image(roots, tmp_path, caplog):
    root = copy(roots["cbis_ddsm"], tmp_path / "c")
    csv = root / "calc_case_description_test_set.csv"
    calc = pd.read_csv(csv, dtype=str)
    # the train CSVs hold a benign mass on P_00004 RIGHT MLO; a malignant calcification of that film sits in a test CSV
    calc.loc[0, ["patient_id", "left or right breast", "image view", "pathology"]] = ["P_00004", "RIGHT", "MLO",
                                                                                     "MALIGNANT"]
    calc.to_csv(csv, index=False)
    with caplog.at_level("WARNING"):
        train = cbis_ddsm.load(root, "train")
    assert "1 mammograms have abnormalities in both a train and a test CSV (e.g. P_00004 RIGHT MLO)" in caplog.text
    assert list(train["sample_id"]) == [CBIS_ALL[0], CBIS_ALL[1], CBIS_ALL[3]]  # not trained on
    test = cbis_ddsm.load(root, "test").set_index("sample_id")
    film = test.loc["test/P_00004_RIGHT_MLO"]
    assert film["label:Malignant"] == 1.0 and film["abnormality"] == "calcification+mass"
    assert "/Mass-Training_P_00004_RIGHT_MLO/" in film["path"]  # the mass copy of the image
    every = cbis_ddsm.load(root, "all")
    assert every["sample_id"].str.endswith("P_00004_RIGHT_MLO").sum() == 1 and every["sample_id"].is_unique


def test_cbis_nbia_layout_and_newline_in_paths(roots, tmp_path):
    root = copy(roots["cbis_ddsm"], tmp_path / "c")
    csv = root / "mass_case_description_test_set.csv"
    mass = pd.read_csv(csv, dtype=str)
    original = root / "CBIS-DDSM" / mass.loc[0, "image file path"]
    nbia = root / "CBIS-DDSM" / "Mass-Test_P_00016_LEFT_CC" / "10-04-2016-DDSM-NA-09887" / "1.000000-full mammogram-24515"
    nbia.mkdir(parents=True)
    shutil.move(original, nbia / "1-1.dcm")
    shutil.rmtree(root / "CBIS-DDSM" / mass.loc[0, "image file path"].split("/")[0] / original.parent.parent.name)
    mass.loc[0, "image file path"] += "\n"
    mass.to_csv(csv, index=False)
    df = cbis_ddsm.load(root, "test", verify_files=True)
    assert df.loc[0, "path"] == str(nbia / "1-1.dcm")


def test_cbis_bad_inputs(roots, tmp_path):
    root = copy(roots["cbis_ddsm"], tmp_path / "c")
    path = root / "calc_case_description_train_set.csv"
    calc = pd.read_csv(path, dtype=str)
    bad = calc.copy()
    bad.loc[0, "pathology"] = "MALIGN"
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"calc_case_description_train_set\.csv: row 'P_00005_RIGHT_CC#1', column 'pathology'"):
        cbis_ddsm.load(root, "train")
    calc.drop(columns=["breast density"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"calc_case_description_train_set\.csv: missing required column 'breast_density'"):
        cbis_ddsm.load(root, "train")
    calc.to_csv(path, index=False)
    dcm = root / "CBIS-DDSM" / calc.loc[0, "image file path"]
    dcm.unlink()
    with pytest.raises(DataError, match=r"1 of 4 image files are missing.*train/P_00005_RIGHT_CC"):
        cbis_ddsm.load(root, "train", verify_files=True)
    with pytest.raises(DataError, match="unknown split 'training'"):
        cbis_ddsm.load(root, "training")


# --------------------------------------------------------------------------------------------------------------
# VinDr-Mammo
# --------------------------------------------------------------------------------------------------------------

S1, S2, S3, S4 = ("5a54d4ed8d2a4ac2b15d5fc8d3d2d1a1", "6b65e5fe9e3b5bd3c26e6ad9e4e3e2b2",
                  "7c76f6af0f4c6ce4d37f7bea05f4f3c3", "8d87a7b01a5d7df5e48a8cfb1605a4d4")


def test_vindr_fixture_uses_the_released_strings(roots):
    raw = pd.read_csv(roots["vindr_mammo"] / "breast-level_annotations.csv")
    assert set(raw["breast_birads"]) == {"BI-RADS 1", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5"}
    assert set(raw["breast_density"]) == {"DENSITY A", "DENSITY B", "DENSITY C", "DENSITY D"}
    assert set(raw["split"]) == {"training", "test"}


def test_vindr_rows_labels_and_metadata(roots):
    root = roots["vindr_mammo"]
    df = vindr_mammo.load(root, "all", verify_files=True)
    assert list(df["patient_id"]) == [S1] * 4 + [S2] * 2 + [S3] * 2 + [S4] * 2
    assert list(df["laterality"]) == ["L", "L", "R", "R", "L", "L", "R", "R", "L", "L"]
    assert list(df["view"]) == ["CC", "MLO"] * 5
    assert values(df["birads"]) == [4.0, 4.0, 1.0, 1.0, 3.0, 3.0, 5.0, 5.0, 4.0, 4.0]
    assert values(df["label:Suspicious"]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert list(df["density"]) == ["C"] * 4 + ["B"] * 2 + ["A"] * 2 + ["D"] * 2
    assert list(df["split"]) == ["train"] * 4 + ["test"] * 2 + ["train"] * 2 + ["test"] * 2
    assert values(df["age"]) == [53.0] * 4 + [41.0] * 2 + [None] * 2 + [67.0] * 2  # "053Y", blank
    assert list(df["manufacturer"]) == ["SIEMENS"] * 6 + ["Planmed"] * 2 + ["IMS GIOTTO S.p.A."] * 2
    assert "label:Malignant" not in df.columns  # BI-RADS is not pathology
    assert df.loc[0, "path"] == str(root / "images" / S1 / f"{df.loc[0, 'sample_id']}.dicom")


def test_vindr_splits_and_options(roots):
    root = roots["vindr_mammo"]
    assert list(vindr_mammo.load(root, "train")["patient_id"]) == [S1] * 4 + [S3] * 2
    test = vindr_mammo.load(root, "test")
    assert list(test["patient_id"]) == [S2] * 2 + [S4] * 2
    assert set(test["label:Suspicious"]) == {0.0, 1.0}  # the OOD/ID test set has both classes
    assert values(vindr_mammo.load(root, "test", birads3="nan")["label:Suspicious"]) == [None, None, 1.0, 1.0]
    proxy = vindr_mammo.load(root, "all", malignant_from_birads=True)
    assert values(proxy["label:Malignant"]) == values(proxy["label:Suspicious"])
    with pytest.raises(DataError, match="unknown split 'training'"):
        vindr_mammo.load(root, "training")


def test_vindr_monochrome1_image_is_inverted_to_bright_tissue(roots):
    df = vindr_mammo.load(roots["vindr_mammo"], "test")
    path = df.loc[df["patient_id"] == S4, "path"].iloc[0]
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw, shown = ds.pixel_array.astype(float), read_dicom(path)
    center, corner = (slice(28, 36), slice(20, 28)), (slice(0, 8), slice(0, 8))
    assert raw[center].mean() < raw[corner].mean()  # stored dark: the lesion disc has low values
    assert shown[center].mean() > shown[corner].mean()  # displayed bright


def test_vindr_bad_inputs(roots, tmp_path):
    root = copy(roots["vindr_mammo"], tmp_path / "v")
    path = root / "breast-level_annotations.csv"
    raw = pd.read_csv(path, dtype=str)
    for column, value, pattern in [("breast_birads", "BIRADS 4", "breast_birads"),
                                   ("breast_density", "DENSITY E", "breast_density"),
                                   ("split", "train", "split")]:
        bad = raw.copy()
        bad.loc[2, column] = value
        bad.to_csv(path, index=False)
        with pytest.raises(DataError, match=f"row '{raw.loc[2, 'image_id']}', column '{pattern}'"):
            vindr_mammo.load(root, "all")
    raw.to_csv(path, index=False)
    meta = pd.read_csv(root / "metadata.csv", dtype=str)
    meta.loc[0, "Patient's Age"] = "53 years"
    meta.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"metadata\.csv: row .*not a DICOM age '53 years'"):
        vindr_mammo.load(root, "all")
    raw.drop(columns=["breast_birads"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"missing required column\(s\) \['breast_birads'\]"):
        vindr_mammo.load(root, "all")


# --------------------------------------------------------------------------------------------------------------
# CMMD
# --------------------------------------------------------------------------------------------------------------

SERIES = "07-18-2010-NA-NA-79377/1.000000-NA-70244"


def test_cmmd_rows_from_dicom_headers(roots):
    root = roots["cmmd"]
    df = cmmd.load(root, "all", verify_files=True)
    assert list(df["sample_id"]) == [f"D1-0001/{SERIES}/1-1.dcm", f"D1-0001/{SERIES}/1-2.dcm"] + \
        [f"D1-0002/{SERIES}/1-{i}.dcm" for i in range(1, 5)] + [f"D2-0001/{SERIES}/1-1.dcm", f"D2-0001/{SERIES}/1-2.dcm"]
    assert list(df["patient_id"]) == ["D1-0001"] * 2 + ["D1-0002"] * 4 + ["D2-0001"] * 2
    assert list(df["laterality"]) == ["R", "R", "L", "L", "R", "R", "L", "L"]
    # D1-* record the view in ViewCodeSequence, D2-0001 in ViewPosition.
    assert list(df["view"]) == ["CC", "MLO"] * 4
    # Per breast: D1-0001 R benign, D1-0002 L malignant / R benign, D2-0001 L malignant.
    assert values(df["label:Malignant"]) == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert values(df["age"]) == [44.0, 44.0, 51.0, 51.0, 51.0, 51.0, 60.0, 60.0]
    assert values(df["subtype"]) == [None] * 6 + ["Luminal B"] * 2
    assert list(df["cohort"]) == ["D1"] * 6 + ["D2"] * 2
    assert set(df["manufacturer"]) == {"SIEMENS"}
    assert df.loc[0, "path"] == str(root / "CMMD" / "D1-0001" / SERIES / "1-1.dcm")


def test_cmmd_csv_clinical_table_and_missing_patient(roots, tmp_path, caplog):
    root = copy(roots["cmmd"], tmp_path / "c")
    pd.read_excel(root / "CMMD_clinicaldata_revision.xlsx").to_csv(root / "CMMD_clinicaldata_revision.csv", index=False)
    (root / "CMMD_clinicaldata_revision.xlsx").unlink()
    shutil.rmtree(root / "CMMD" / "D1-0001")
    with caplog.at_level("WARNING"):
        df = cmmd.load(root, "all")
    assert list(df["patient_id"]) == ["D1-0002"] * 4 + ["D2-0001"] * 2
    assert "1 of 3 patients have no DICOM folder" in caplog.text
    assert values(df["label:Malignant"]) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_cmmd_bad_inputs(roots, tmp_path):
    root = copy(roots["cmmd"], tmp_path / "c")
    clinical = pd.read_excel(root / "CMMD_clinicaldata_revision.xlsx", dtype=str)
    bad = clinical.copy()
    bad.loc[0, "classification"] = "Malign"
    bad.to_excel(root / "CMMD_clinicaldata_revision.xlsx", index=False)
    with pytest.raises(DataError, match=r"row 'D1-0001/R', column 'classification'.*'Malign'"):
        cmmd.load(root)
    clinical.drop(columns=["LeftRight"]).to_excel(root / "CMMD_clinicaldata_revision.xlsx", index=False)
    with pytest.raises(DataError, match=r"missing required column\(s\) \['LeftRight'\]"):
        cmmd.load(root)
    clinical.to_excel(root / "CMMD_clinicaldata_revision.xlsx", index=False)
    corrupt = root / "CMMD" / "D1-0002" / SERIES / "1-3.dcm"
    corrupt.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=r"D1-0002/.*/1-3\.dcm: not a readable DICOM file"):
        cmmd.load(root)
    shutil.rmtree(root / "CMMD")
    with pytest.raises(DataError, match="CMMD needs the DICOM headers"):
        cmmd.load(root)


# --------------------------------------------------------------------------------------------------------------
# EMBED
# --------------------------------------------------------------------------------------------------------------


def test_embed_fixture_has_the_double_spaced_race_and_letter_codes(roots):
    clinical = pd.read_csv(roots["embed"] / "tables" / "EMBED_OpenData_clinical.csv", dtype=str)
    assert "African American  or Black" in set(clinical["RACE_DESC"])
    assert set(clinical["asses"]) == {"N", "S", "B", "P", "M"} and "5" in set(clinical["tissueden"])


def test_embed_join_on_exam_and_laterality(roots):
    root = roots["embed"]
    df = embed.load(root, "all", verify_files=True)
    assert list(df["patient_id"]) == ["10000879"] * 5 + ["10001234"] * 4 + ["10005678"] * 2 + ["10009999"] * 2
    assert list(df["laterality"]) == ["L", "L", "R", "R", "L", "L", "L", "R", "L", "L", "R", "R", "L"]
    assert list(df["image_type"]) == ["2D"] * 4 + ["C-view"] + ["2D"] * 8
    # 10000879: screening N, blank side -> both breasts negative. 10001234: L = S with invasive cancer, R = B.
    # 10005678: P on both sides, no pathology -> malignancy unknown. 10009999: R = M with benign pathology, and
    # its L image has no finding row -> NaN.
    assert values(df["birads"]) == [1.0] * 5 + [4.0, 4.0, 2.0, 4.0, 3.0, 3.0, 5.0, None]
    assert values(df["label:Suspicious"]) == [0.0] * 5 + [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, None]
    assert values(df["label:Malignant"]) == [0.0] * 5 + [1.0, 1.0, 0.0, 1.0, None, None, 0.0, None]
    assert values(df["race"]) == ["Black"] * 5 + ["White"] * 4 + ["Asian"] * 2 + [None] * 2
    assert values(df["density"]) == ["B"] * 5 + ["C"] * 4 + [None] * 2 + ["A"] * 2  # tissueden 5 = male
    assert list(df["sex"]) == ["F"] * 9 + ["M"] * 2 + ["F"] * 2
    assert values(df["age"]) == [56.3] * 5 + [64.0] * 4 + [71.9] * 2 + [None] * 2
    assert list(df["spot_mag"]) == [False] * 8 + [True] + [False] * 4
    assert list(df["cohort"]) == ["cohort_1"] * 9 + ["cohort_2"] * 4
    sop = df.loc[0, "sample_id"]
    assert df.loc[0, "path"] == str(root / "images" / "cohort_1" / "10000879" / "6117700412478730" / f"{sop}.dcm")
    assert read_dicom(df.loc[0, "path"]).shape == (64, 48)


def test_embed_race_single_space_and_unlisted_values(roots, tmp_path, caplog):
    root = copy(roots["embed"], tmp_path / "e")
    clin_path = root / "tables" / "EMBED_OpenData_clinical.csv"
    clinical = pd.read_csv(clin_path, dtype=str)
    clinical["RACE_DESC"] = clinical["RACE_DESC"].replace({"African American  or Black": "African American or Black",
                                                           "Asian": "Not Recorded"})
    clinical.to_csv(clin_path, index=False)
    with caplog.at_level("WARNING"):
        race = embed.load(root)["race"]
    assert values(race) == ["Black"] * 5 + ["White"] * 4 + ["Not Recorded"] * 2 + [None] * 2
    assert "kept verbatim: ['Not Recorded']" in caplog.text


def test_embed_cohorts_filters_and_male_without_sex_column(roots, tmp_path, caplog):
    root = roots["embed"]
    assert len(embed.load(root, "cohort_1")) == 9 and len(embed.load(root, "cohort_2")) == 4
    with caplog.at_level("INFO"):
        two_d = embed.load(root, "all", image_types=["2D"], exclude_spot_mag=True)
    assert len(two_d) == 11 and set(two_d["image_type"]) == {"2D"} and not two_d["spot_mag"].any()
    assert "image_types=['2D'] removed 1 of 13 rows" in caplog.text and "exclude_spot_mag removed 1 of 12" in caplog.text
    other = copy(root, tmp_path / "e")
    meta = pd.read_csv(other / "tables" / "EMBED_OpenData_metadata.csv", dtype=str)
    meta.drop(columns=["PatientSex"]).to_csv(other / "tables" / "EMBED_OpenData_metadata.csv", index=False)
    assert values(embed.load(other)["sex"]) == [None] * 9 + ["M"] * 2 + [None] * 2  # only tissueden 5 says M


def test_embed_device_attributes_come_from_the_columns_the_metadata_has(roots, tmp_path, caplog):
    df = embed.load(roots["embed"])
    assert list(df["manufacturer"]) == ["HOLOGIC, Inc."] * 9 + ["GE MEDICAL SYSTEMS"] * 4
    assert list(df["device_model"]) == ["Selenia Dimensions"] * 9 + ["Senographe Pristina"] * 4
    root = copy(roots["embed"], tmp_path / "e")
    meta_path = root / "tables" / "EMBED_OpenData_metadata.csv"
    meta = pd.read_csv(meta_path, dtype=str)
    meta.drop(columns=["Manufacturer"]).to_csv(meta_path, index=False)
    only_model = embed.load(root)
    # no column of None: a manufacturer subgroup or filter is refused naming the attributes there are
    assert "manufacturer" not in only_model.columns and only_model["device_model"].iloc[-1] == "Senographe Pristina"
    with pytest.raises(DataError, match="manufacturer"):
        apply_filters(only_model, {"manufacturer": "HOLOGIC, Inc."}, "embed")
    meta.drop(columns=["Manufacturer", "ManufacturerModelName"]).to_csv(meta_path, index=False)
    with caplog.at_level("WARNING"):
        neither = embed.load(root)
    assert not {"manufacturer", "device_model"} & set(neither.columns)
    assert "has neither a Manufacturer nor a ManufacturerModelName column" in caplog.text


def test_embed_bad_inputs(roots, tmp_path):
    root = copy(roots["embed"], tmp_path / "e")
    clin_path = root / "tables" / "EMBED_OpenData_clinical.csv"
    clinical = pd.read_csv(clin_path, dtype=str)
    bad = clinical.copy()
    bad.loc[1, "asses"] = "X"
    bad.to_csv(clin_path, index=False)
    with pytest.raises(DataError, match=r"row '10001234/7000000000000001', column 'asses'.*'X'"):
        embed.load(root)
    clinical.to_csv(clin_path, index=False)
    meta_path = root / "tables" / "EMBED_OpenData_metadata.csv"
    meta = pd.read_csv(meta_path, dtype=str)
    meta.drop(columns=["ImageLateralityFinal"]).to_csv(meta_path, index=False)
    with pytest.raises(DataError, match=r"missing required column\(s\) \['ImageLateralityFinal'\]"):
        embed.load(root)
    bad = meta.copy()
    bad.loc[2, "anon_dicom_path"] = "/mnt/x/1.2.3.dcm"
    bad.to_csv(meta_path, index=False)
    with pytest.raises(DataError, match=r"'/mnt/x/1\.2\.3\.dcm' has no cohort_N/ component"):
        embed.load(root)
    meta.to_csv(meta_path, index=False)
    first = embed.load(root)
    (root / "images" / first.loc[3, "path"].split("/images/")[1]).unlink()
    with pytest.raises(DataError, match=f"1 of 13 image files are missing.*{first.loc[3, 'sample_id']}"):
        embed.load(root, verify_files=True)


def test_mammo_fixtures_grow_with_n(tmp_path):
    cbis = cbis_ddsm.load(write_fixture("cbis_ddsm", tmp_path / "c", n=14), "all", verify_files=True)
    assert len(cbis) == 14 and cbis["sample_id"].is_unique
    vindr = vindr_mammo.load(write_fixture("vindr_mammo", tmp_path / "v", n=20), "all", verify_files=True)
    assert len(vindr) == 20 and vindr["patient_id"].nunique() == 8
    assert len(cmmd.load(write_fixture("cmmd", tmp_path / "m", n=16), verify_files=True)) == 16
    big = embed.load(write_fixture("embed", tmp_path / "e", n=26), verify_files=True)
    assert len(big) == 26 and big["sample_id"].is_unique and big["patient_id"].nunique() == 8

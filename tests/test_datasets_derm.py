"""Dermatology loaders (HAM10000, ISIC 2019, ISIC 2020, Fitzpatrick17k, DDI) on exact-format fixtures and on the
real public Fitzpatrick17k metadata. Expectations are hand-written from the fixture rows and the dataset papers."""

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scaling.data.datasets import ddi, fitzpatrick17k, ham10000, isic2019, isic2020
from dataset_fixtures import write_fixture
from scaling.data.table import DataError

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_metadata"
DIAGNOSES = ("Melanoma", "Melanocytic Nevus", "Basal Cell Carcinoma", "Actinic Keratosis", "Benign Keratosis",
             "Dermatofibroma", "Vascular Lesion")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("derm")
    return {n: write_fixture(n, base / n) for n in ("ham10000", "isic2019", "isic2020", "fitzpatrick17k", "ddi")}


def labels_of(df, name):
    return [None if math.isnan(v) else v for v in df[f"label:{name}"]]


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------------------------
# HAM10000
# --------------------------------------------------------------------------------------------------------------

HAM_IDS = ["ISIC_0027419", "ISIC_0025030", "ISIC_0026769", "ISIC_0031633", "ISIC_0029176", "ISIC_0025837",
           "ISIC_0025276", "ISIC_0029396"]


def test_ham10000_rows_labels_and_site(roots):
    root = roots["ham10000"]
    df = ham10000.load(root, "all", verify_files=True)
    assert list(df["sample_id"]) == HAM_IDS
    assert list(df["patient_id"]) == ["HAM_0000118", "HAM_0000118", "HAM_0002730", "HAM_0001466", "HAM_0002761",
                                      "HAM_0005132", "HAM_0001396", "HAM_0004234"]
    assert list(df["sex"]) == ["M", "M", "F", None, "F", "M", "F", "M"]  # 'unknown' -> None
    assert list(df["age"].fillna(-1)) == [80.0, 80.0, 60.0, 0.0, -1, 45.0, 55.0, 70.0]  # 0.0 is a real age
    assert list(df["site"]) == ["vidir_modern", "vidir_modern", "rosendahl", "vidir_molemax", "vienna_dias",
                                "rosendahl", "vidir_modern", "vidir_modern"]
    # mel, bcc and akiec are malignant by default.
    assert labels_of(df, "Malignant") == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert labels_of(df, "Melanoma") == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert labels_of(df, "Benign Keratosis") == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert labels_of(df, "Actinic Keratosis") == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert df[[f"label:{d}" for d in DIAGNOSES]].sum(axis=1).tolist() == [1.0] * 8  # one-hot diagnosis
    assert df.loc[0, "path"] == str(root / "HAM10000_images_part_1" / "ISIC_0027419.jpg")
    assert df.loc[7, "path"] == str(root / "HAM10000_images_part_2" / "ISIC_0029396.jpg")
    assert list(df["anatom_site"])[:3] == ["scalp", "scalp", "face"]
    medfair = ham10000.load(root, "all", malignant=("mel", "akiec"))  # MEDFAIR's binaryLabel
    assert labels_of(medfair, "Malignant") == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_ham10000_images_are_600x450_aspect_rgb_jpegs(roots):
    img = Image.open(roots["ham10000"] / "HAM10000_images_part_1" / "ISIC_0027419.jpg")
    assert img.format == "JPEG" and img.mode == "RGB" and img.size[0] / img.size[1] == pytest.approx(600 / 450)


def test_ham10000_bad_inputs(roots, tmp_path):
    root = copy(roots["ham10000"], tmp_path / "h")
    csv = root / "HAM10000_metadata.csv"
    text = csv.read_text()
    csv.write_text(text.replace("ISIC_0031633,nv", "ISIC_0031633,naevus"))
    with pytest.raises(DataError, match=r"HAM10000_metadata\.csv: row 'ISIC_0031633', column 'dx'.*'naevus'"):
        ham10000.load(root)
    csv.write_text(text.replace(",dataset", ",site"))
    with pytest.raises(DataError, match=r"missing required column\(s\) \['dataset'\]"):
        ham10000.load(root)
    csv.write_text(text)
    (root / "HAM10000_images_part_2" / "ISIC_0029176.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 8 image files are missing.*ISIC_0029176"):
        ham10000.load(root, verify_files=True)
    with pytest.raises(DataError, match="no official split"):
        ham10000.load(root, "train")


# --------------------------------------------------------------------------------------------------------------
# ISIC 2019
# --------------------------------------------------------------------------------------------------------------

ISIC19_IDS = ["ISIC_0000000", "ISIC_0000002_downsampled", "ISIC_0026769", "ISIC_0053453", "ISIC_0053454",
              "ISIC_0053455", "ISIC_0027419", "ISIC_0053460", "ISIC_0053461"]


def test_isic2019_rows_labels_and_sites(roots):
    root = roots["isic2019"]
    df = isic2019.load(root, "all", verify_files=True)
    assert list(df["sample_id"]) == ISIC19_IDS
    # No patient id in ISIC 2019: lesion_id, or the image id when lesion_id is blank.
    assert list(df["patient_id"]) == ["ISIC_0000000", "MSK4_0011169", "HAM_0002730", "BCN_0003925", "BCN_0003926",
                                      "BCN_0003927", "HAM_0000118", "BCN_0000019", "BCN_0000020"]
    assert list(df["site"]) == [None, "MSK", "HAM", "BCN", "BCN", "BCN", "HAM", "BCN", "BCN"]
    assert list(df["sex"]) == ["F", "F", "F", "M", None, "F", "M", "F", "M"]
    assert list(df["age"].fillna(-1)) == [55.0, 60.0, 60.0, 70.0, -1, 80.0, 80.0, 35.0, 40.0]
    assert labels_of(df, "Malignant") == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # MEL, BCC, SCC, AK
    assert labels_of(df, "Squamous Cell Carcinoma") == [0, 0, 0, 0, 1.0, 0, 0, 0, 0]
    assert labels_of(df, "Melanocytic Nevus") == [1.0, 1.0, 0, 0, 0, 0, 0, 0, 0]
    assert "label:UNK" not in df.columns and "label:Unknown" not in df.columns
    assert df.loc[1, "path"] == str(root / "ISIC_2019_Training_Input" / "ISIC_0000002_downsampled.jpg")


def test_isic2019_ham_sites_unk_and_exclusion(roots, tmp_path, caplog):
    root = roots["isic2019"]
    fed = isic2019.load(root, ham_metadata=roots["ham10000"] / "HAM10000_metadata.csv")
    assert list(fed["site"]) == [None, "MSK", "HAM_rosendahl", "BCN", "BCN", "BCN", "HAM_vidir_modern", "BCN", "BCN"]
    with caplog.at_level("INFO"):
        no_ham = isic2019.load(root, exclude_ham=True)
    assert "ISIC_0026769" not in set(no_ham["sample_id"]) and len(no_ham) == 7
    assert "exclude_ham removed 2 of 9 rows" in caplog.text
    # UNK (never positive in the real training data) means "no diagnosis": every label NaN.
    other = copy(root, tmp_path / "i")
    gt = pd.read_csv(other / "ISIC_2019_Training_GroundTruth.csv", dtype=str)
    gt.loc[0, ["NV", "UNK"]] = ["0.0", "1.0"]
    gt.to_csv(other / "ISIC_2019_Training_GroundTruth.csv", index=False)
    unk = isic2019.load(other)
    assert unk.loc[0, [c for c in unk.columns if c.startswith("label:")]].isna().all()


def test_isic2019_bad_inputs(roots, tmp_path):
    root = copy(roots["isic2019"], tmp_path / "i")
    path = root / "ISIC_2019_Training_GroundTruth.csv"
    gt = pd.read_csv(path, dtype=str)
    bad = gt.copy()
    bad.loc[3, "BCC"] = "yes"
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"GroundTruth\.csv: row 'ISIC_0053453', column 'BCC'.*'yes'"):
        isic2019.load(root)
    bad = gt.copy()
    bad.loc[3, "MEL"] = "1.0"  # two classes
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"row 'ISIC_0053453': expected exactly one 1\.0"):
        isic2019.load(root)
    gt.drop(columns=["UNK"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"missing required column\(s\) \['UNK'\]"):
        isic2019.load(root)


# --------------------------------------------------------------------------------------------------------------
# ISIC 2020
# --------------------------------------------------------------------------------------------------------------


def test_isic2020_rows_labels_and_patients(roots):
    root = roots["isic2020"]
    df = isic2020.load(root, "all", verify_files=True)
    assert list(df["sample_id"]) == ["ISIC_2637011", "ISIC_0015719", "ISIC_0052212", "ISIC_0068279", "ISIC_0149568",
                                     "ISIC_0074268", "ISIC_0076262"]
    assert list(df["patient_id"]) == ["IP_7279968", "IP_3075186", "IP_2842074", "IP_6890425", "IP_0962375",
                                      "IP_6890425", "IP_5075533"]
    assert list(df["sex"]) == ["M", "F", "F", "F", "F", "F", None]
    assert list(df["age"].fillna(-1)) == [45.0, 45.0, 50.0, 45.0, 55.0, 45.0, -1]
    assert labels_of(df, "Malignant") == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert labels_of(df, "Melanoma") == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert list(df["anatom_site"]) == ["head/neck", "upper extremity", "lower extremity", "head/neck",
                                       "upper extremity", None, "torso"]
    assert df.loc[0, "path"] == str(root / "train" / "ISIC_2637011.jpg")


def test_isic2020_bad_inputs(roots, tmp_path):
    root = copy(roots["isic2020"], tmp_path / "i")
    path = root / "ISIC_2020_Training_GroundTruth.csv"
    text = path.read_text()
    path.write_text(text.replace("melanoma,malignant,1", "melanoma,benign,1", 1))
    with pytest.raises(DataError, match=r"row 'ISIC_0149568': target disagrees with benign_malignant"):
        isic2020.load(root)
    path.write_text(text.replace("nevus,benign,0", "nevus,benign,0.5"))
    with pytest.raises(DataError, match=r"row 'ISIC_0052212', column 'target'.*'0\.5'"):
        isic2020.load(root)


# --------------------------------------------------------------------------------------------------------------
# Fitzpatrick17k
# --------------------------------------------------------------------------------------------------------------


def test_fitzpatrick17k_fixture_rows(roots):
    root = roots["fitzpatrick17k"]
    df = fitzpatrick17k.load(root, "all", verify_files=True)
    assert list(df["sample_id"]) == ["5e82a45bc5d78bd24ae9202d194423f8", "0b9d9c1d1d7d0e6a6b2f2a55b2b1c3d4",
                                     "1c6e5f1a2b3c4d5e6f708192a3b4c5d6", "2d7f6a2b3c4d5e6f708192a3b4c5d6e7",
                                     "3e8a7b3c4d5e6f708192a3b4c5d6e7f8", "4f9b8c4d5e6f708192a3b4c5d6e7f809"]
    assert list(df["skin_type"]) == ["III", "I", None, "VI", "V", "II"]  # -1 -> unknown
    assert list(df["skin_group"]) == ["III-IV", "I-II", None, "V-VI", "V-VI", "I-II"]
    assert labels_of(df, "Malignant") == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert labels_of(df, "Melanoma") == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert list(df["site"]) == ["dermaamin", "atlasdermatologico", "dermaamin", None, "dermaamin",
                                "atlasdermatologico"]
    assert list(df["qc"]) == [None, "1 Diagnostic", None, None, "3 Wrongly labelled", None]
    assert df["sex"].isna().all() and df["age"].isna().all()
    assert df.loc[0, "path"] == str(root / "images" / "5e82a45bc5d78bd24ae9202d194423f8.jpg")


def test_fitzpatrick17k_old_column_name_and_bad_inputs(roots, tmp_path):
    root = copy(roots["fitzpatrick17k"], tmp_path / "f")
    path = root / "fitzpatrick17k.csv"
    text = path.read_text()
    path.write_text(text.replace("fitzpatrick_scale", "fitzpatrick"))
    assert list(fitzpatrick17k.load(root)["skin_type"]) == ["III", "I", None, "VI", "V", "II"]
    path.write_text(text.replace("5e82a45bc5d78bd24ae9202d194423f8,3,", "5e82a45bc5d78bd24ae9202d194423f8,7,"))
    with pytest.raises(DataError, match=r"row '5e82a45bc5d78bd24ae9202d194423f8', column 'fitzpatrick_scale'.*'7'"):
        fitzpatrick17k.load(root)
    path.write_text(text.replace(",non-neoplastic,3 Wrongly", ",neoplastic,3 Wrongly"))
    with pytest.raises(DataError, match=r"row '3e8a7b3c4d5e6f708192a3b4c5d6e7f8', column 'three_partition_label'"):
        fitzpatrick17k.load(root)
    path.write_text(text.replace("three_partition_label", "three_partition"))
    with pytest.raises(DataError, match=r"fitzpatrick17k\.csv: missing required column\(s\) \['three_partition_label'\]"):
        fitzpatrick17k.load(root)


@pytest.mark.skipif(not (REAL / "fitzpatrick17k.csv").is_file(), reason="shared real metadata not present")
def test_fitzpatrick17k_real_metadata_counts():
    df = fitzpatrick17k.load(REAL, "all")
    raw = pd.read_csv(REAL / "fitzpatrick17k.csv")  # plain pandas: the independent reference
    assert len(df) == len(raw) == 16577
    assert df["sample_id"].is_unique
    by_scale = raw["fitzpatrick_scale"].value_counts().to_dict()
    roman = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI"}
    got = df["skin_type"].value_counts().to_dict()
    assert got == {roman[k]: v for k, v in by_scale.items() if k != -1}
    assert df["skin_type"].isna().sum() == by_scale[-1] == 565
    # Totals computed once over the real file (github.com/mattgroh/fitzpatrick17k).
    assert got == {"I": 2947, "II": 4808, "III": 3308, "IV": 2781, "V": 1533, "VI": 635}
    assert df["label:Malignant"].sum() == (raw["three_partition_label"] == "malignant").sum() == 2263
    assert (df["label:Malignant"] == 0).sum() == 12080 + 2234
    assert df["label:Melanoma"].sum() == (raw["nine_partition_label"] == "malignant melanoma").sum() == 573
    assert df["site"].value_counts(dropna=False).to_dict() == {"dermaamin": 12631, "atlasdermatologico": 3905, None: 41}
    assert df["qc"].value_counts().to_dict() == {"1 Diagnostic": 348, "5 Potentially": 97, "2 Characteristic": 32,
                                                 "3 Wrongly labelled": 17, "4 Other": 10}
    assert df["condition"].nunique() == 114
    assert df["skin_group"].value_counts().to_dict() == {"I-II": 2947 + 4808, "III-IV": 3308 + 2781, "V-VI": 1533 + 635}


# --------------------------------------------------------------------------------------------------------------
# DDI
# --------------------------------------------------------------------------------------------------------------


def test_ddi_rows_labels_and_skin_groups(roots):
    root = roots["ddi"]
    df = ddi.load(root, "all", verify_files=True)
    assert list(df["sample_id"]) == [f"{i:06d}.png" for i in range(1, 7)]
    assert list(df["patient_id"]) == ["1", "2", "3", "4", "5", "6"]
    assert list(df["skin_group"]) == ["V-VI", "V-VI", "I-II", "III-IV", "I-II", "III-IV"]  # 56, 56, 12, 34, 12, 34
    assert labels_of(df, "Malignant") == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert labels_of(df, "Melanoma") == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert df.loc[0, "path"] == str(root / "images" / "000001.png")
    assert not any(c.startswith("Unnamed") for c in df.columns)


def test_ddi_flat_download_old_column_and_bad_inputs(roots, tmp_path):
    root = copy(roots["ddi"], tmp_path / "d")
    for png in (root / "images").glob("*.png"):
        shutil.move(png, root / png.name)  # the AIMI download is flat
    path = root / "ddi_metadata.csv"
    meta = pd.read_csv(path, dtype=str)
    old = meta.rename(columns={"malignant": "malignancy(malig=1)"})
    old["malignancy(malig=1)"] = old["malignancy(malig=1)"].map({"True": "1", "False": "0"})
    old.to_csv(path, index=False)
    df = ddi.load(root, verify_files=True)
    assert labels_of(df, "Malignant") == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert df.loc[2, "path"] == str(root / "000003.png")
    bad = meta.copy()
    bad.loc[3, "skin_tone"] = "45"
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"row '000004\.png', column 'skin_tone'.*'45'"):
        ddi.load(root)
    meta.drop(columns=["malignant"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"ddi_metadata\.csv: missing required column 'malignant'"):
        ddi.load(root)


def test_derm_fixtures_grow_with_n(tmp_path):
    ham = ham10000.load(write_fixture("ham10000", tmp_path / "h", n=20, seed=3), verify_files=True)
    assert len(ham) == 24 and ham["sample_id"].is_unique and set(ham["label:Malignant"]) == {0.0, 1.0}
    fitz = fitzpatrick17k.load(write_fixture("fitzpatrick17k", tmp_path / "f", n=12), verify_files=True)
    assert len(fitz) == 12 and fitz["sample_id"].is_unique
    isic = isic2019.load(write_fixture("isic2019", tmp_path / "i", n=18), verify_files=True)
    assert len(isic) == 18 and isic["sample_id"].is_unique
    assert ddi.load(write_fixture("ddi", tmp_path / "d", n=12), verify_files=True)["sample_id"].is_unique
    assert isic2020.load(write_fixture("isic2020", tmp_path / "j", n=14), verify_files=True)["sample_id"].is_unique
    pixels = np.asarray(Image.open(tmp_path / "d" / "images" / "000001.png"))
    assert pixels.shape == (48, 64, 3)

"""A hospital's own export (the ``inhouse`` loader) and a study over two sites: every spelling an export holds is
read as the patient, image, label, sex and age it means, anything else is an error naming the file, line or row and
column, and a launch that refuses writes nothing."""

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dataset_fixtures import LOADER_OPTIONS, write_fixture

from scaling.config import load_config
from scaling.data import DataError, load_table
from scaling.data.images import decode
from scaling.data.table import OptionError
from scaling.study.data import load_study_data
from scaling.study.runner import plan, run_study

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "inhouse_cxr.yaml"
OPTIONS = LOADER_OPTIONS["inhouse"]  # the column names of recipes/configs/inhouse_cxr.yaml


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return write_fixture("inhouse", tmp_path_factory.mktemp("inhouse") / "site_a")


def copy(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    return to


def edit(root: Path, line: int, column: str, value: str) -> None:
    """Set one cell of the export (``line`` as an editor counts: the header is line 1)."""
    df = pd.read_csv(root / "export.csv", dtype=str, keep_default_na=False)
    df.loc[line - 2, column] = value
    df.to_csv(root / "export.csv", index=False)


def test_every_spelling_of_the_export_reads_as_what_it_means(site, caplog):
    with caplog.at_level(logging.INFO):
        df = load_table("inhouse", site, "all", verify_files=True, **OPTIONS)
    # one patient under 0076101, " 0076101" and 76101: one id, so one side of every split
    assert list(df.patient_id) == ["76101"] * 3 + ["76102"] * 2 + ["76103"] * 2 + ["76104"]
    assert "7 patient ids in column 'PatientID' respelled" in caplog.text
    # Windows separators read as folders; an export's IMAGES/.../IMG0.PNG is the file images/.../img0.png on disk
    assert list(df.sample_id) == [
        "images/0076101/A176101/img0.png", "images/0076101/A176101/img1.png",
        "dicom/0076101/A276101/series1/IM0000.dcm", "images/0076102/a376102/img0.png",
        "dicom/0076102/A376102/series1/IM0000.dcm", "dicom/0076103/A476103/series2/IM0001.dcm",
        "images/0076103/A576103/img0.png", "images/0076104/A676104/img0.png"]
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in df.path)
    assert "1 image paths in column 'ImagePath' matched a file on disk under another letter case" in caplog.text
    # 1 / yes / positive, 0 / no / 0.0, -1 (uncertain: ignore) and blank (not labelled) → 1, 0, NaN
    np.testing.assert_array_equal(df["label:Cardiomegaly"], [1, 1, 1, 0, 0, np.nan, 0, np.nan])
    np.testing.assert_array_equal(df["label:Pleural Effusion"], [0, np.nan, 1, 1, 1, 0, 0, 1])
    assert list(df.sex) == ["M", "M", "M", "F", "F", None, "F", None]  # M/Male/male; blank and O (other): missing
    np.testing.assert_array_equal(df.age, [61, 61, 61, 45, 45, 89, np.nan, 0.5])  # 061Y, 61, 045, 089Y, 006M
    assert list(df.manufacturer) == ["GE Healthcare"] * 8 and df.study_id.iloc[2] == "A276101"  # "ge  HEALTHCARE" too
    assert "1 cells of column 'Manufacturer' written in one spelling" in caplog.text
    # the positive images (bright centre) stay brighter in the centre whatever the format: 8/16-bit PNG, DICOM
    # MONOCHROME1 (stored inverted), MONOCHROME2 with and without a VOI window
    for path, label in zip(df.path, df["label:Cardiomegaly"]):
        img = decode(path, 16).astype(float).squeeze()
        img = img / img.max()
        if not np.isnan(label):
            assert (img[6:10, 6:10].mean() - img[:3, :3].mean() > 0.25) == bool(label), path


def test_policies_for_uncertain_and_blank_labels(site):
    ones = load_table("inhouse", site, "all", **OPTIONS, uncertainty="ones", blank="zero")
    np.testing.assert_array_equal(ones["label:Cardiomegaly"], [1, 1, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(ones["label:Pleural Effusion"], [0, 0, 1, 1, 1, 0, 0, 1])


def test_an_excel_export_reads_as_its_csv(site, tmp_path):
    root = copy(site, tmp_path / "x")
    raw = pd.read_csv(root / "export.csv", dtype=str, keep_default_na=False)
    raw["PatientID"] = raw["PatientID"].str.strip().astype(int)  # Excel stores the ids as numbers: no padding left
    number = pd.to_numeric(raw["Effusion"], errors="coerce")  # 1.0 / 0 as numeric cells, words as text
    raw["Effusion"] = raw["Effusion"].astype(object).where(number.isna(), number)
    raw.to_excel(root / "export.xlsx", index=False)
    xlsx = load_table("inhouse", root, "all", **{**OPTIONS, "file": "export.xlsx"})
    pd.testing.assert_frame_equal(xlsx, load_table("inhouse", root, "all", **OPTIONS))


@pytest.mark.parametrize("line, column, value, message", [
    (6, "Cardiomegaly", "maybe", r"line 6, column 'Cardiomegaly': unexpected label value 'maybe'"),
    (3, "Effusion", "2", r"line 3, column 'Effusion': unexpected label value '2'"),
    (3, "PatientSex", "X", r"row 'images/0076101/A176101/img1.png', column 'PatientSex': unexpected value 'X'"),
    (3, "PatientAge", "6l", r"row 'images/0076101/A176101/img1.png', column 'PatientAge': not a number: '6l'"),
    (3, "PatientAge", "-4", r"line 3, row 'images/0076101/A176101/img1.png', column 'PatientAge': negative age"),
    (4, "PatientID", " ", r"line 4, column 'PatientID': blank"),
    (4, "ImagePath", "images/0076101/A176101/IMG0.PNG",
     r"lines 2 and 4, column 'ImagePath': the same image 'images/0076101/A176101/img0.png' is listed twice"),
])
def test_a_bad_cell_names_the_file_the_row_and_the_column(site, tmp_path, line, column, value, message):
    root = copy(site, tmp_path / "x")
    edit(root, line, column, value)
    with pytest.raises(DataError, match=re.escape(str(root / "export.csv")) + ": " + message):
        load_table("inhouse", root, "all", **OPTIONS)


def test_a_wrong_column_or_missing_option_is_named(site):
    with pytest.raises(DataError, match=r"export.csv: missing required column\(s\) \['Effusions'\]; found \[.*'Eff"):
        load_table("inhouse", site, "all", **{**OPTIONS, "label_columns": {"Pleural Effusion": "Effusions"}})
    with pytest.raises(OptionError, match=r"data.options must set \['patient_column'\]"):
        load_table("inhouse", site, "all", **{**OPTIONS, "patient_column": ""})
    with pytest.raises(OptionError, match=r"attribute_columns \['sex'\] would replace a column"):
        load_table("inhouse", site, "all", **{**OPTIONS, "attribute_columns": {"sex": "PatientSex"}})


def _two_sites(tmp: Path, n: int = 80) -> list[str]:
    a = write_fixture("inhouse", tmp / "site_a", seed=0, n=n)
    b = write_fixture("inhouse", tmp / "site_b", seed=1, n=n // 2)
    return [f"output_dir={tmp / 'store'}", f"data.root={a}", f"data.ood.0.root={b}", "data.image_size=32"]


def test_the_shipped_config_plans_both_sites(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    for arch in ("50x1", "101x1"):  # offline: the BiT weights the dry run asks for, as empty files
        (tmp_path / "weights" / f"BiT-S-R{arch}.npz").write_bytes(b"")
        (tmp_path / "weights" / f"resnetv2_{arch}_bit.goog_in21k.safetensors").write_bytes(b"")
    cfg = load_config(CONFIG, _two_sites(tmp_path))
    assert cfg.data.options == OPTIONS
    p = plan(cfg)
    assert len(p) == 2 * 3 * 2 * 3 and set(p.status) == {"missing"}
    data = load_study_data(cfg)
    assert data.train.patient_id.nunique() + data.val.patient_id.nunique() + data.test.patient_id.nunique() == 40
    assert len(data.ood["site_b"]) == 40 and set(data.ood["site_b"].manufacturer) == {"GE Healthcare", "SIEMENS"}
    assert not (tmp_path / "store" / "runs").exists()


def test_a_patient_of_both_sites_is_refused_or_dropped(tmp_path):
    # Two sites of one hospital group share its patient numbers: site B's patients seen in training are refused.
    base = _two_sites(tmp_path)
    b = tmp_path / "site_b" / "export.csv"
    export = pd.read_csv(b, dtype=str, keep_default_na=False)
    export.loc[:2, "PatientID"] = "0076101"  # site A's first patient
    export.to_csv(b, index=False)
    cfg = load_config(CONFIG, base)
    data = load_study_data(load_config(CONFIG, [*base, "data.ood.0.patients=unseen"]))
    seen = "76101" in set(data.train.patient_id) | set(data.val.patient_id)
    assert seen and "76101" not in set(data.ood["site_b"].patient_id) and len(data.ood["site_b"]) == 37
    with pytest.raises(DataError, match=r"eval set 'site_b' holds 3 images of 1 patients that the study trains or "
                                        r"validates on .*another root"):
        load_study_data(cfg)


def test_a_missing_image_stops_the_launch_before_anything_is_written(tmp_path):
    base = _two_sites(tmp_path, n=16)
    gone = tmp_path / "site_a" / "dicom" / "0076103" / "A476103" / "series2" / "IM0001.dcm"
    gone.unlink()
    cfg = load_config(CONFIG, [*base, "grid.backbones=[resnetv2_tiny]", "grid.pretrained=[scratch]",
                               "grid.fractions=[1.0]", "grid.seeds=[0]", "train.hyperrule=off", "train.steps=1"])
    with pytest.raises(DataError, match=r"1 of \d+ image files are missing: .*IM0001.dcm \(sample 'dicom/0076103/"):
        run_study(cfg)
    assert not (tmp_path / "store").exists()

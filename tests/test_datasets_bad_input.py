"""Bad input to the dataset loaders and readers: every case is a DataError naming the file and the line, row or field,
never a silently changed table or a raw pandas/numpy/Pillow error. Each case mutates a fixture in its released
format (``dataset_fixtures.write_fixture``) or the hand-written CheXpert CSV of ``test_data_core``."""

import csv
import gzip
import io
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from dataset_fixtures import write_dicom, write_fixture, write_gray
from scaling.data import load_table
from scaling.data.dataset import TableDataset
from scaling.data.datasets import cmmd, embed, mimic_cxr, readers
from scaling.data.dicom import read_dicom
from scaling.data.images import decode
from scaling.data.splits import patient_split
from scaling.data.table import DataError, validate_table
from test_data_core import HEADER, ROWS, write_chexpert

FIXTURES = ("mimic_cxr", "nih_cxr14", "padchest", "ham10000", "isic2020", "fitzpatrick17k", "ddi", "cbis_ddsm",
            "vindr_mammo", "embed")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    return {n: write_fixture(n, base / n) for n in FIXTURES}


def copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_rows(path: Path) -> list[list[str]]:
    text = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
    return list(csv.reader(io.StringIO(text, newline="")))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(out.getvalue())
    else:
        path.write_text(out.getvalue())


def names(path: Path, where: str) -> str:
    """A regex for a message that starts with the file's full path and names ``where`` (e.g. 'line 3')."""
    return re.escape(f"{path}: {where}")


def set_cell(path: Path, row: int, column: str, value: str) -> None:
    """Set one cell of data row ``row`` (0-based) of a CSV, keeping every other cell's text."""
    rows = read_rows(path)
    rows[row + 1][rows[0].index(column)] = value
    write_rows(path, rows)


# --------------------------------------------------------------------------------------------------------------
# Row length: every data row has as many fields as the header
# --------------------------------------------------------------------------------------------------------------


def test_chexpert_short_row_is_an_error_not_blank_labels(tmp_path):
    # Before: the 14 missing label fields were read as blank, which blank='zero' turns into negatives.
    short = ",".join(ROWS[1].split(",")[:5])
    write_chexpert(tmp_path, rows=[ROWS[0], short, ROWS[2]])
    path = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    with pytest.raises(DataError, match=names(path, "line 3: 5 field(s), but the header has 19")):
        load_table("chexpert", tmp_path, "train")


def test_chexpert_extra_fields_in_the_first_row_do_not_shift_columns(tmp_path):
    write_chexpert(tmp_path, rows=[ROWS[0] + ",extra,more", *ROWS[1:]])
    path = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    with pytest.raises(DataError, match=names(path, "line 2: 21 field(s), but the header has 19")):
        load_table("chexpert", tmp_path, "train")


@pytest.mark.parametrize("name, file", [
    ("mimic_cxr", "mimic-cxr-2.0.0-chexpert.csv.gz"),
    ("mimic_cxr", "mimic-cxr-2.0.0-metadata.csv.gz"),
    ("padchest", "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"),
    ("fitzpatrick17k", "fitzpatrick17k.csv"),
    ("vindr_mammo", "breast-level_annotations.csv"),
    ("nih_cxr14", "Data_Entry_2017.csv"),
    ("ham10000", "HAM10000_metadata.csv"),
    ("embed", "tables/EMBED_OpenData_clinical.csv"),
])
@pytest.mark.parametrize("change", ["short", "long"])
def test_every_loader_rejects_rows_of_the_wrong_length(roots, tmp_path, name, file, change):
    root = copy(roots[name], tmp_path / name)
    path = root / file
    rows = read_rows(path)
    n = len(rows[0])
    # Short: the first 2 fields of line 3. Long: two more fields on line 2, where pandas would make an index of them.
    line, fields = (3, rows[2][:2]) if change == "short" else (2, rows[1] + ["x", "y"])
    rows[line - 1] = fields
    write_rows(path, rows)
    with pytest.raises(DataError, match=names(path, f"line {line}: {len(fields)} field(s), but the header has {n}")):
        load_table(name, root, "all")


def test_line_numbers_count_quoted_newlines_and_blank_lines(roots, tmp_path):
    # CBIS-DDSM's path cells end with a newline inside the quotes, so a record can span two lines.
    root = copy(roots["cbis_ddsm"], tmp_path / "c")
    path = root / "mass_case_description_train_set.csv"
    rows = read_rows(path)
    spans = [1 + sum(cell.count("\n") for cell in r) for r in rows]
    rows[3] = rows[3][:4]
    write_rows(path, rows)
    text = path.read_text()
    path.write_text(text.replace("\n", "\n\n", 1))  # a blank line after the header, which pandas skips
    line = 1 + 1 + spans[1] + spans[2] + 1
    with pytest.raises(DataError, match=names(path, f"line {line}: 4 field(s)")):
        load_table("cbis_ddsm", root, "train")


def test_blank_lines_and_trailing_whitespace_lines_still_load(tmp_path):
    write_chexpert(tmp_path)
    path = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    reference = load_table("chexpert", tmp_path, "train")
    path.write_text(path.read_text().replace(ROWS[1] + "\n", ROWS[1] + "\n\n   \n") + "\n")
    pd.testing.assert_frame_equal(load_table("chexpert", tmp_path, "train"), reference)


def test_row_length_check_leaves_the_fixture_tables_unchanged(roots):
    # The check reads the file a second time and never changes what pandas reads: the tables equal pandas' own.
    for path, kwargs in [(roots["padchest"] / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", {"dtype": str}),
                         (roots["mimic_cxr"] / "mimic-cxr-2.0.0-metadata.csv.gz", {}),
                         (roots["cbis_ddsm"] / "calc_case_description_test_set.csv", {"dtype": str}),
                         (roots["nih_cxr14"] / "Data_Entry_2017.csv", {"keep_default_na": False})]:
        pd.testing.assert_frame_equal(readers.read_csv(path, [], **kwargs), pd.read_csv(path, **kwargs))


# --------------------------------------------------------------------------------------------------------------
# Files pandas, openpyxl or zipfile cannot parse
# --------------------------------------------------------------------------------------------------------------


def test_chexpert_unparseable_csv_names_the_file(tmp_path):
    ddir = write_chexpert(tmp_path)
    path = ddir / "train.csv"
    path.write_text("\n".join([HEADER, ROWS[0], '"' + ROWS[1], ROWS[2]]) + "\n")
    with pytest.raises(DataError, match=names(path, "line 3: 1 field(s), but the header has 19 (an unclosed quote")):
        load_table("chexpert", tmp_path, "train")
    path.write_text("\n".join([HEADER, ROWS[0][:-3] + '"1.0', ROWS[1]]) + "\n")  # unclosed in the last field
    with pytest.raises(DataError, match=re.escape(str(path)) + r": cannot be read as CSV: .*EOF inside string"):
        load_table("chexpert", tmp_path, "train")
    path.write_text("")
    with pytest.raises(DataError, match=names(path, "empty file (no header row)")):
        load_table("chexpert", tmp_path, "train")
    path.write_bytes("\n".join([HEADER, *ROWS]).replace("Female", "F\xe4male", 2).encode("latin-1"))
    with pytest.raises(DataError, match=names(path, "line 2: not UTF-8 text (byte b'\\xe4')")):
        load_table("chexpert", tmp_path, "train")
    gz = ddir / "labels.csv.gz"
    gz.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=names(gz, "cannot be read")):
        load_table("chexpert", tmp_path, "train", csv="labels.csv.gz")


def test_corrupt_demographics_workbook_names_the_file(tmp_path):
    ddir = write_chexpert(tmp_path)
    for content in (b"not a workbook", b"PK\x03\x04garbage" * 10):
        (ddir / "CHEXPERT DEMO.xlsx").write_bytes(content)
        with pytest.raises(DataError, match=names(ddir / "CHEXPERT DEMO.xlsx", "cannot be read as an Excel workbook")):
            load_table("chexpert", tmp_path, "train")
    (ddir / "CHEXPERT DEMO.xlsx").unlink()
    (ddir / "CHEXPERT DEMO.csv").write_text("PATIENT,PRIMARY_RACE\npatient00001,White,extra\n")
    with pytest.raises(DataError, match=names(ddir / "CHEXPERT DEMO.csv", "line 2: 3 field(s)")):
        load_table("chexpert", tmp_path, "train")


def test_cmmd_workbook_that_is_not_a_zip_names_the_file(tmp_path):
    root = write_fixture("cmmd", tmp_path / "m")
    path = root / "CMMD_clinicaldata_revision.xlsx"
    assert path.is_file()
    path.write_bytes(b"PK\x03\x04garbage" * 10)  # a zip signature, then nothing of a zip: zipfile.BadZipFile
    with pytest.raises(DataError, match=names(path, "cannot be read as an Excel workbook: BadZipFile")):
        cmmd.load(root)


# --------------------------------------------------------------------------------------------------------------
# Blank image names and ids
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, file, column", [
    ("ham10000", "HAM10000_metadata.csv", "image_id"),
    ("isic2020", "ISIC_2020_Training_GroundTruth.csv", "image_name"),
    ("ddi", "ddi_metadata.csv", "DDI_file"),
    ("nih_cxr14", "Data_Entry_2017.csv", "Image Index"),
    ("nih_cxr14", "Data_Entry_2017.csv", "Patient ID"),  # before: loaded, then dropped by every patient split
    ("vindr_mammo", "breast-level_annotations.csv", "study_id"),
    ("vindr_mammo", "breast-level_annotations.csv", "image_id"),
    ("vindr_mammo", "breast-level_annotations.csv", "split"),
    ("padchest", "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", "PatientID"),
    ("embed", "tables/EMBED_OpenData_metadata.csv", "empi_anon"),
])
def test_blank_image_name_or_id_names_file_line_and_column(roots, tmp_path, name, file, column):
    root = copy(roots[name], tmp_path / name)
    set_cell(root / file, 1, column, "")
    with pytest.raises(DataError, match=names(root / file, f"line 3, column '{column}': blank")):
        load_table(name, root, "all")


def test_locate_rejects_a_blank_name():
    with pytest.raises(DataError, match=r"meta\.csv: line 3, column 'image_id': blank"):
        readers.locate(pd.Series(["a.jpg", np.nan]), {}, "/images", "meta.csv", "image_id")


@pytest.mark.parametrize("column, value", [("patient_id", None), ("patient_id", float("nan")), ("patient_id", " "),
                                           ("sample_id", "")])
def test_validate_table_rejects_missing_ids(column, value):
    df = pd.DataFrame({"sample_id": ["a", "b"], "patient_id": ["p1", "p2"], "path": ["/a", "/b"], "sex": [None, None],
                       "age": [np.nan, np.nan], "label:Edema": [1.0, 0.0]}).astype({column: object})
    df.loc[1, column] = value
    with pytest.raises(DataError, match=rf"nih:all at /data: row 1.*: {column} is missing or blank"):
        validate_table(df, "nih:all at /data")


@pytest.mark.parametrize("other", ["00123", " 123", "123 ", 123])
def test_validate_table_rejects_one_patient_under_two_spellings(other):
    # A PACS export writes one patient as 00123, 123 or " 123": as different ids, patient_split puts the same
    # person's images into train and test.
    df = pd.DataFrame({"sample_id": ["a", "b", "c"], "patient_id": ["123", other, "9"], "path": ["/a", "/b", "/c"],
                       "sex": [None] * 3, "age": [np.nan] * 3, "label:Edema": [1.0, 0.0, 1.0]})
    with pytest.raises(DataError, match=rf"site_a: patient ids '123' \(sample 'a'\) and {other!r} \(sample 'b'\) "
                                        r"differ only by whitespace or leading zeros"):
        validate_table(df, "site_a")
    distinct = df.assign(patient_id=["123", "1230", "P0123"])  # other patients: no clash
    assert validate_table(distinct, "site_a") is distinct


def test_validate_table_rejects_one_image_listed_twice():
    # An export that attaches one image to two accessions (or two patients) would train on it and test on it.
    df = pd.DataFrame({"sample_id": ["A1/x.png", "A2/x.png", "A3/y.png"], "patient_id": ["1", "2", "3"],
                       "path": ["/d/x.png", "/d/x.png", "/d/y.png"], "sex": [None] * 3, "age": [np.nan] * 3,
                       "label:Edema": [1.0, 1.0, 0.0]})
    with pytest.raises(DataError, match=r"site_a: image '/d/x.png' is listed as samples \['A1/x.png', 'A2/x.png'\]"):
        validate_table(df, "site_a")


def test_validate_table_names_the_column_of_a_label_word():
    df = pd.DataFrame({"sample_id": ["a", "b"], "patient_id": ["1", "2"], "path": ["/a", "/b"], "sex": [None] * 2,
                       "age": [np.nan] * 2, "label:Edema": ["1.0", "yes"]})
    with pytest.raises(DataError, match=r"site_a: column 'label:Edema' must hold 1.0/0.0/NaN; sample 'b' has 'yes'"):
        validate_table(df, "site_a")


# --------------------------------------------------------------------------------------------------------------
# EMBED, MIMIC-CXR, VinDr-Mammo specifics
# --------------------------------------------------------------------------------------------------------------


def test_embed_image_without_clinical_row_gets_nan_labels(roots, tmp_path):
    root = copy(roots["embed"], tmp_path / "e")
    path = root / "tables" / "EMBED_OpenData_clinical.csv"
    clinical = pd.read_csv(path, dtype=str)
    gone = clinical["empi_anon"].iloc[0]
    clinical[clinical["empi_anon"] != gone].to_csv(path, index=False)
    full = embed.load(roots["embed"])
    df = embed.load(root)  # before: TypeError "Boolean array expected"
    orphan = df["patient_id"] == gone
    assert orphan.any() and df["sample_id"].tolist() == full["sample_id"].tolist()
    assert df.loc[orphan, ["label:Suspicious", "label:Malignant", "age", "birads"]].isna().all().all()
    assert df.loc[orphan, "sex"].tolist() == full.loc[orphan, "sex"].tolist()  # from PatientSex, not made 'M'
    others = df.loc[~orphan].drop(columns="path")
    assert others.equals(full.loc[~orphan].drop(columns="path"))


@pytest.mark.parametrize("name, file", [("vindr_mammo", "breast-level_annotations.csv"),
                                        ("embed", "tables/EMBED_OpenData_clinical.csv"),
                                        ("embed", "tables/EMBED_OpenData_metadata.csv")])
def test_header_only_annotation_file_is_an_error(roots, tmp_path, name, file):
    root = copy(roots[name], tmp_path / name)
    write_rows(root / file, read_rows(root / file)[:1])
    with pytest.raises(DataError, match=names(root / file, "no rows")):
        load_table(name, root, "all")


def test_header_only_cmmd_clinical_table_is_an_error(tmp_path):
    root = write_fixture("cmmd", tmp_path / "m")
    path = root / "CMMD_clinicaldata_revision.xlsx"
    pd.read_excel(path, dtype=str).iloc[:0].to_excel(path, index=False)
    with pytest.raises(DataError, match=names(path, "no rows")):
        cmmd.load(root)


MIMIC_IV = {"patients": "hosp/patients.csv.gz", "admissions": "hosp/admissions.csv.gz"}


@pytest.mark.parametrize("file, change, message", [
    ("hosp/patients.csv.gz", ("anchor_age", "abc"), "row '10000032', column 'anchor_age': not a number: 'abc'"),
    ("hosp/patients.csv.gz", ("anchor_year", "20x0"), "row '10000032', column 'anchor_year': not a number"),
    ("mimic-cxr-2.0.0-metadata.csv.gz", ("StudyDate", "21801399"), "column 'StudyDate': not a YYYYMMDD date"),
    ("mimic-cxr-2.0.0-metadata.csv.gz", ("StudyDate", "May 5"), "column 'StudyDate': not a number: 'May 5'"),
    ("mimic-cxr-2.0.0-split.csv.gz", ("split", "trian"), "column 'split': unexpected value 'trian'"),
    ("mimic-cxr-2.0.0-metadata.csv.gz", "duplicate", "dicom_id '02aa804e-bde0afdd-112c0b34-7bc16630-4e384014' is "
                                                     "listed twice"),
    ("mimic-cxr-2.0.0-split.csv.gz", "duplicate", "dicom_id '02aa804e-bde0afdd-112c0b34-7bc16630-4e384014' is listed"),
])
def test_mimic_bad_values_name_the_file_and_row(roots, tmp_path, file, change, message):
    root = copy(roots["mimic_cxr"], tmp_path / "m")
    path = root / file
    if change == "duplicate":
        rows = read_rows(path)
        write_rows(path, rows + [rows[1]])
    else:
        set_cell(path, 0, *change)
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        mimic_cxr.load(root, "all", **MIMIC_IV)


def test_mimic_blank_study_date_is_unknown_age(roots, tmp_path):
    root = copy(roots["mimic_cxr"], tmp_path / "m")
    set_cell(root / "mimic-cxr-2.0.0-metadata.csv.gz", 0, "StudyDate", "")
    full = mimic_cxr.load(roots["mimic_cxr"], "all", **MIMIC_IV)
    df = mimic_cxr.load(root, "all", **MIMIC_IV)
    assert full["age"].iloc[0] == 52.0 and math.isnan(df["age"].iloc[0])
    pd.testing.assert_series_equal(df["age"].iloc[1:], full["age"].iloc[1:])


# --------------------------------------------------------------------------------------------------------------
# CheXpert split file and ages; patient_split fractions
# --------------------------------------------------------------------------------------------------------------


def test_chexpert_misspelled_split_value_is_an_error(tmp_path):
    ddir = write_chexpert(tmp_path)
    (ddir / "split.csv").write_text(",index,split\n0,0,train\n1,1,trian\n2,2,test\n3,3,validate\n")
    with pytest.raises(DataError, match=names(ddir / "split.csv", "line 3, column 'split': unexpected value 'trian'")):
        load_table("chexpert", ddir, "train", split_file="split.csv")


def test_chexpert_split_file_giving_one_row_two_splits_is_an_error(tmp_path):
    # Before: row 1 loaded into both 'train' and 'test', so the study tested on an image it trained on.
    ddir = write_chexpert(tmp_path)
    (ddir / "split.csv").write_text(",index,split\n0,0,train\n1,1,train\n2,2,test\n3,3,validate\n4,1,test\n")
    message = (f"lines 3, 6: index 1 (a row of {ddir / 'train.csv'}) is listed 2 times, as 'train', 'test'; a row "
               f"belongs to one split (2 lines repeat an index)")
    for split in ("train", "test", "validate"):
        with pytest.raises(DataError, match=names(ddir / "split.csv", message)):
            load_table("chexpert", ddir, split, split_file="split.csv")
    # the same row twice under one split is a damaged file too (it would load the image twice)
    (ddir / "split.csv").write_text(",index,split\n0,0,train\n1,2,test\n2,2.0,test\n")
    with pytest.raises(DataError, match=names(ddir / "split.csv", "lines 3, 4: index 2 (a row of")):
        load_table("chexpert", ddir, "train", split_file="split.csv")


def test_chexpert_implausible_age_is_nan_and_negative_age_an_error(tmp_path, caplog):
    write_chexpert(tmp_path, rows=[ROWS[0].replace(",68,", ",670,"), *ROWS[1:]])
    with caplog.at_level("INFO"):
        df = load_table("chexpert", tmp_path, "train")
    assert math.isnan(df["age"].iloc[0]) and df["age"].iloc[1] == 87.0  # as NIH: ages above 120 are entry errors
    path = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    assert (f"{path}: 1 implausible ages (> 120) set to NaN in column 'Age', e.g. row "
            f"'train/patient00001/study1/view1_frontal.jpg'") in caplog.text and readers.MAX_AGE == 120
    write_chexpert(tmp_path, rows=[ROWS[0], ROWS[1].replace(",87,", ",-67,")])
    with pytest.raises(DataError, match=names(path, "line 3, column 'Age': negative age '-67'")):
        load_table("chexpert", tmp_path, "train")


# NIH lists: train_val_list.txt = 00000001_000, 00000001_001, 00000002_000, 00000003_000 (lines 1-4);
# test_list.txt = 00000004_000, 00000005_000, 00000006_000 (lines 1-3).


def test_nih_image_in_both_official_lists_is_an_error(roots, tmp_path):
    # Before: the image silently stayed in train only.
    root = copy(roots["nih_cxr14"], tmp_path / "n")
    with open(root / "test_list.txt", "a") as f:
        f.write("00000002_000.png\n")
    message = (f"{root / 'train_val_list.txt'} (line 3) and {root / 'test_list.txt'} (line 4) both list image "
               f"'00000002_000.png' (1 image(s) in both lists: '00000002_000.png'); an image belongs to one official "
               f"split")
    for split in ("train", "test", "all"):
        with pytest.raises(DataError, match=re.escape(message)):
            load_table("nih_cxr14", root, split)


def test_nih_list_entry_naming_no_row_is_an_error_when_a_split_is_loaded(roots, tmp_path, caplog):
    # Before: the misspelt entry was ignored and the test set was one image smaller without a word.
    root = copy(roots["nih_cxr14"], tmp_path / "n")
    path = root / "test_list.txt"
    path.write_text(path.read_text().replace("00000004_000.png", "00000004_000.PNG"))
    message = (f"{path}: 1 of its 3 entries name no row of {root / 'Data_Entry_2017.csv'}, e.g. '00000004_000.PNG' "
               f"(line 1); the release's lists and label file match exactly")
    for split in ("train", "test"):
        with pytest.raises(DataError, match=re.escape(message)):
            load_table("nih_cxr14", root, split)
    with caplog.at_level("WARNING", logger="scaling.data.datasets.nih_cxr14"):
        every = load_table("nih_cxr14", root, "all")  # the lists only fill the split column here
    assert message in caplog.text
    assert len(every) == 7 and every.set_index("sample_id").loc["00000004_000.png", "split"] is None


def test_nih_rows_in_neither_list_are_logged_with_examples(roots, tmp_path, caplog):
    # Before: the row silently dropped out of every split.
    root = copy(roots["nih_cxr14"], tmp_path / "n")
    path = root / "train_val_list.txt"
    path.write_text(path.read_text().replace("00000001_000.png\n", ""))
    with caplog.at_level("WARNING", logger="scaling.data.datasets.nih_cxr14"):
        train = load_table("nih_cxr14", root, "train")
    assert list(train["sample_id"]) == ["00000001_001.png", "00000002_000.png", "00000003_000.png"]
    assert (f"{root / 'Data_Entry_2017.csv'}: 1 of its 7 rows are in neither train_val_list.txt nor test_list.txt "
            f"and are left out of every split, e.g. '00000001_000.png'") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scaling.data.datasets.nih_cxr14"):
        assert len(load_table("nih_cxr14", roots["nih_cxr14"], "train")) == 4  # the release's lists: no message
    assert caplog.text == ""


# (dataset, file, age column, row ids of data rows 0 and 3 as the loader names them, whether errors give the line,
#  the age in data row 3)
AGE_CASES = [
    ("ham10000", "HAM10000_metadata.csv", "age", ("ISIC_0027419", "ISIC_0031633"), True, 0.0),
    ("isic2020", "ISIC_2020_Training_GroundTruth.csv", "age_approx", ("ISIC_2637011", "ISIC_0068279"), True, 45.0),
    # the metadata rows are taken in the ground-truth file's order, so only the image names the row
    ("isic2019", "ISIC_2019_Training_Metadata.csv", "age_approx", ("ISIC_0000000", "ISIC_0053453"), False, 70.0),
    ("embed", "tables/EMBED_OpenData_clinical.csv", "age_at_study",
     ("10000879/6117700412478730", "10005678/8000000000000002"), True, 71.9),
    ("cmmd", "CMMD_clinicaldata_revision.csv", "Age", ("D1-0001/R", "D2-0001/L"), True, 60.0),
]


@pytest.mark.parametrize("name, file, column, ids, lines, age", AGE_CASES)
def test_derm_and_mammo_ages_follow_the_chest_policy(tmp_path, caplog, name, file, column, ids, lines, age):
    # Before: -5 and 999 were kept as ages (and silently fell out of every age group).
    root = write_fixture(name, tmp_path / name)
    if name == "cmmd":  # the CSV form of the clinical table, which the loader also reads, is easier to edit
        sheet = root / "CMMD_clinicaldata_revision.xlsx"
        pd.read_excel(sheet, dtype=str).to_csv(root / file, index=False)
        sheet.unlink()
    path = root / file
    before = load_table(name, root, "all")
    set_cell(path, 3, column, "999")
    with caplog.at_level("INFO", logger="scaling.data.datasets.readers"):
        after = load_table(name, root, "all")
    assert f"{path}: 1 implausible ages (> 120) set to NaN in column {column!r}, e.g. row {ids[1]!r}" in caplog.text
    now_nan = after["age"].isna() & before["age"].notna()
    assert now_nan.any() and set(before.loc[now_nan, "age"]) == {age}  # that row's image(s): its exam, its breast
    pd.testing.assert_series_equal(after.loc[~now_nan, "age"], before.loc[~now_nan, "age"])
    set_cell(path, 0, column, "-5.0")
    where = f"line 2, row {ids[0]!r}" if lines else f"row {ids[0]!r}"
    with pytest.raises(DataError, match=names(path, f"{where}, column {column!r}: negative age '-5.0'")):
        load_table(name, root, "all")


def test_ham10000_ages_from_the_audit(roots, tmp_path):
    root = copy(roots["ham10000"], tmp_path / "h")
    path = root / "HAM10000_metadata.csv"
    set_cell(path, 1, "age", "999.0")
    df = load_table("ham10000", root, "all").set_index("sample_id")
    assert math.isnan(df.loc["ISIC_0025030", "age"]) and df.loc["ISIC_0027419", "age"] == 80.0
    assert df.loc["ISIC_0031633", "age"] == 0.0  # an infant, not a placeholder: kept
    set_cell(path, 0, "age", "-5.0")
    with pytest.raises(DataError, match=names(path, "line 2, row 'ISIC_0027419', column 'age': negative age '-5.0'")):
        load_table("ham10000", root, "all")


def test_vindr_dicom_age_above_120_is_nan_and_logged(roots, tmp_path, caplog):
    root = copy(roots["vindr_mammo"], tmp_path / "v")
    path = root / "metadata.csv"
    sop = read_rows(path)[1][0]
    set_cell(path, 0, "Patient's Age", "999Y")
    with caplog.at_level("INFO", logger="scaling.data.datasets.readers"):
        df = load_table("vindr_mammo", root, "all")
    ages = dict(zip(df["sample_id"].str.rsplit("/", n=1).str[-1], df["age"]))
    assert math.isnan(ages[sop]) and sum(a == 53.0 for a in ages.values()) == 3  # the study's other images
    assert f"{path}: 1 implausible ages (> 120) set to NaN in column \"Patient's Age\", e.g. row {sop!r}" in caplog.text


@pytest.mark.parametrize("fraction", [float("nan"), float("inf"), -0.1, 1.5, "0.2", None, True])
def test_patient_split_requires_finite_fractions_in_unit_interval(fraction):
    df = pd.DataFrame({"sample_id": ["a", "b", "c"], "patient_id": ["p1", "p2", "p3"], "label:Edema": [1.0, 0.0, 1.0]})
    with pytest.raises(ValueError, match=rf"split fraction 'test' = {re.escape(repr(fraction))} must be a finite"):
        patient_split(df, {"test": fraction, "val": 0.1}, seed=0)


# --------------------------------------------------------------------------------------------------------------
# Images and DICOMs read directly
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_read_dicom_malformed_header_values_name_the_file(tmp_path):
    good = tmp_path / "good.dcm"
    write_dicom(good, (np.arange(20 * 20).reshape(20, 20) * 9).astype(np.uint16))
    for attr, value, stored, message in [("NumberOfFrames", "9876", b"abcd", "invalid NumberOfFrames"),
                                         ("RescaleSlope", "1.2345", b"x.yzwq", "invalid Modality/VOI LUT")]:
        ds = pydicom.dcmread(good)
        setattr(ds, attr, value)
        if attr == "RescaleSlope":
            ds.RescaleIntercept = "0"
        path = tmp_path / f"{attr}.dcm"
        ds.save_as(path)
        path.write_bytes(path.read_bytes().replace(value.encode(), stored))
        with pytest.raises(DataError, match=names(path, message)):
            read_dicom(path)
        with pytest.raises(DataError, match=names(path, message)):
            decode(path, 16)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_decode_truncated_image_names_the_file_once(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if suffix == ".jpg" else data[:100])
    with pytest.raises(DataError, match=names(path, "cannot decode image: OSError: image file is truncated")):
        decode(path, 16)
    table = pd.DataFrame({"sample_id": ["s0"], "patient_id": ["p0"], "path": [str(path)], "sex": [None],
                          "age": [np.nan], "label:Edema": [1.0]})
    for cache in (None, tmp_path / "cache"):
        with pytest.raises(DataError) as e:
            TableDataset(table, ["Edema"], 16, cache_dir=cache)[0]
        assert str(e.value).count(str(path)) == 1, str(e.value)  # not wrapped twice
        assert str(e.value).startswith(f"cannot read image {path} (sample 's0'): cannot decode image: OSError")



@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("zeroed", [1024, 12])
def test_decode_png_with_a_zero_filled_tail_names_the_file(tmp_path, bits, zeroed):
    # Before: Pillow skips the image data's checksums and stops quietly at the broken chunk after it, so the 8-bit
    # fixture with its last 1 KB zeroed decoded as a partly black image (and with IEND zeroed, as the whole image).
    path = tmp_path / "tail.png"
    write_gray(path, np.random.default_rng(0), positive=True, bits=bits)
    good = decode(path, None)
    data = path.read_bytes()
    assert len(data) > 2 * zeroed
    path.write_bytes(data[:-zeroed] + b"\0" * zeroed)
    with pytest.raises(DataError, match=names(path, "cannot decode image: ") + ".*" + re.escape("broken PNG file")):
        decode(path, 16)
    path.write_bytes(data[:-12])  # no IEND chunk: the copy stopped right after the image data
    with pytest.raises(DataError, match=names(path, "cannot decode image: OSError: damaged PNG: OSError: truncated")):
        decode(path, 16)
    path.write_bytes(data + b"\0" * 64)  # bytes after IEND are no damage: PNG readers ignore them
    np.testing.assert_array_equal(decode(path, None), good)


def test_a_dataset_root_one_level_off_names_the_right_one(tmp_path):
    """The commonest root mistake is one folder off (the folder above, or the images folder inside): the error
    lists the files it looked for and names the folder that has them."""
    from scaling.data import load_table

    root = write_fixture("nih_cxr14", tmp_path / "nih")
    (root / "images").mkdir(exist_ok=True)
    for wrong in (tmp_path, root / "images"):
        with pytest.raises(DataError, match=rf"{wrong}: none of the expected label files exist: .*; {root} has "
                                            r"them: is that the dataset root\?"):
            load_table("nih_cxr14", wrong, "all")

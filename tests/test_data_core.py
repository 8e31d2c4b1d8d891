"""Sample-table core: the CheXpert loader on a hand-written CSV, label policies, the registry, patient splits."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling.data import DataError, load_table
from scaling.data.datasets.chexpert import COLUMNS, _race
from scaling.data.labels import (
    CANONICAL_LABELS,
    HARMONISATION,
    PADCHEST_TERMS,
    apply_label_policy,
    harmonise,
    padchest_labels,
    select_labels,
)
from scaling.data.splits import (
    check_disjoint,
    fraction_subset,
    kshot_subset,
    patient_order,
    patient_split,
)

NAN = math.nan
HEADER = ",".join(COLUMNS)
# The first two rows are the real first rows of CheXpert-small train.csv (Stanford AIMI release); the others add
# the traps: a lateral with blank AP/PA, the full-size release prefix, Unknown sex and age 0.
ROWS = [
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
    "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Female,87,Lateral,,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
    "CheXpert-v1.0/train/patient00003/study1/view1_frontal.jpg,Unknown,0,Frontal,PA,,0.0,1.0,,,0.0,,,,,1.0,,,",
]
TASKS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def write_chexpert(tmp_path: Path, rows=ROWS, header=HEADER, name="train.csv") -> Path:
    ddir = tmp_path / "CheXpert-v1.0-small"
    ddir.mkdir(exist_ok=True)
    (ddir / name).write_text("\n".join([header, *rows]) + "\n")
    return ddir


def labels_of(df, row, names):
    return [df.loc[row, "label:" + n] for n in names]


def same(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# CheXpert loader
# ---------------------------------------------------------------------------------------------------------------


def test_chexpert_csv_option_relabels_the_training_images_only(tmp_path):
    write_chexpert(tmp_path, rows=ROWS[:2], name="train_cheXbert.csv")
    write_chexpert(tmp_path, rows=ROWS[2:], name="train.csv")
    valid = [r.replace("/train/", "/valid/").replace("patient0000", "patient6454") for r in ROWS[3:]]
    write_chexpert(tmp_path, rows=valid, name="valid.csv")
    options = {"csv": "train_cheXbert.csv"}  # what a study's data.options gives both of its splits
    assert list(load_table("chexpert", tmp_path, "train", **options)["patient_id"]) == ["patient00001",
                                                                                         "patient00002"]
    assert list(load_table("chexpert", tmp_path, "valid", **options)["sample_id"]) == [
        "valid/patient64543/study1/view1_frontal.jpg"]  # valid.csv, not the training re-labelling


def test_chexpert_rows_and_attributes(tmp_path):
    ddir = write_chexpert(tmp_path)
    df = load_table("chexpert", tmp_path, "train")  # the parent of the release directory works too
    assert list(df["sample_id"]) == [
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00002/study2/view1_frontal.jpg",
        "train/patient00002/study2/view2_lateral.jpg",
        "train/patient00003/study1/view1_frontal.jpg",  # 'CheXpert-v1.0/' prefix stripped too
    ]
    assert list(df["path"]) == [str(ddir.resolve() / s) for s in df["sample_id"]]
    assert list(df["patient_id"]) == ["patient00001", "patient00002", "patient00002", "patient00003"]
    assert list(df["study_id"]) == ["patient00001/study1", "patient00002/study2", "patient00002/study2", "patient00003/study1"]
    assert list(df["sex"]) == ["F", "F", "F", None]
    assert same(list(df["age"]), [68.0, 87.0, 87.0, NAN])
    assert list(df["view"]) == ["frontal", "frontal", "lateral", "frontal"]
    assert list(df["view_position"]) == ["AP", "AP", None, "PA"]
    assert "race" not in df.columns  # no demographics file here


@pytest.mark.parametrize(
    "uncertainty, expected",
    [
        ("ignore", [NAN, NAN, NAN, NAN, NAN]),
        ("zeros", [0.0, 0.0, 0.0, 0.0, 0.0]),
        ("ones", [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("best", [1.0, 0.0, 0.0, 1.0, 1.0]),  # U-Ones: Atelectasis, Edema, Effusion; U-Zeros: Cardiomegaly, Consolidation
        ({"Edema": "ones", "Atelectasis": "zeros"}, [0.0, NAN, NAN, 1.0, NAN]),
    ],
)
def test_uncertainty_policies(tmp_path, uncertainty, expected):
    write_chexpert(tmp_path)
    df = load_table("chexpert", tmp_path, "train", uncertainty=uncertainty)
    assert same(labels_of(df, 1, TASKS), expected)  # row 2: all five tasks are -1.0
    assert same(labels_of(df, 1, ["Lung Opacity", "Fracture", "No Finding", "Support Devices"]), [1.0, 1.0, 0.0, 0.0])


def test_blank_rules(tmp_path):
    write_chexpert(tmp_path)
    zero = load_table("chexpert", tmp_path, "train", blank="zero")
    nan = load_table("chexpert", tmp_path, "train", blank="nan")
    names = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Pneumothorax", "Edema", "Support Devices"]
    # Row 1: No Finding = 1.0 makes blank pathologies explicit negatives under both rules (Support Devices is 1.0).
    assert same(labels_of(zero, 0, names), [1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert same(labels_of(nan, 0, names), [1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    # Row 4: blanks are 0 under 'zero', NaN under 'nan'; written values are kept.
    assert same(labels_of(zero, 3, names), [0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert same(labels_of(nan, 3, names), [NAN, 0.0, 1.0, NAN, 0.0, NAN])


def test_no_finding_rule_spares_support_devices():
    out = apply_label_policy(
        {"No Finding": np.array([1.0, NAN]), "Edema": np.array([NAN, NAN]), "Support Devices": np.array([NAN, NAN])},
        blank="nan",
    )
    assert same(out["Edema"], [0.0, NAN]) and same(out["Support Devices"], [NAN, NAN])


def test_views_and_unique_patients_filters(tmp_path):
    write_chexpert(tmp_path)
    assert list(load_table("chexpert", tmp_path, "train", views=["frontal"])["view"]) == ["frontal"] * 3
    assert list(load_table("chexpert", tmp_path, "train", views=["PA"])["sample_id"]) == [
        "train/patient00003/study1/view1_frontal.jpg"
    ]
    assert load_table("chexpert", tmp_path, "train", unique_patients=True)["patient_id"].tolist() == [
        "patient00001", "patient00002", "patient00003"
    ]
    assert len(load_table("chexpert", tmp_path, "train", filters={"sex": "F"})) == 3


def test_demographics_join(tmp_path):
    ddir = write_chexpert(tmp_path)
    pd.DataFrame(
        {
            "PATIENT": ["patient00001", "patient00002", "patient00009"],
            "GENDER": ["Female", "Female", "Male"],
            "AGE_AT_CXR": [68, 87, 50],
            "PRIMARY_RACE": ["White, non-Hispanic", "Black or African American", "Asian"],
            "ETHNICITY": ["Non-Hispanic/Non-Latino", "Hispanic/Latino", "Unknown"],
        }
    ).to_excel(ddir.parent / "CHEXPERT DEMO.xlsx", index=False)
    df = load_table("chexpert", ddir, "train")
    assert list(df["race"]) == ["White", "Black", "Black", None]
    assert list(df["ethnicity"]) == ["Non-Hispanic", "Hispanic", "Hispanic", None]
    assert "race" not in load_table("chexpert", ddir, "train", demographics=False).columns


def test_race_substring_mapping():
    values = pd.Series(["White", "Black, White", "Asian - Historical Conv", "Other", "Unknown", "", "Native Hawaiian"])
    assert list(_race(values)) == ["White", "Black", "Asian", "Other", None, None, "Other"]


def test_official_split_file(tmp_path):
    ddir = write_chexpert(tmp_path)
    (ddir / "split.csv").write_text(",index,split\n0,0,train\n1,1,test\n2,2,test\n3,3,validate\n")
    df = load_table("chexpert", ddir, "test", split_file="split.csv")
    assert list(df["patient_id"]) == ["patient00002", "patient00002"]
    with pytest.raises(DataError, match=r"unknown split 'valid'.*'validate'"):
        load_table("chexpert", ddir, "valid", split_file="split.csv")


def test_missing_column_names_file_and_column(tmp_path):
    header = HEADER.replace(",Edema", "")
    ddir = write_chexpert(tmp_path, rows=[], header=header)
    with pytest.raises(DataError, match=r"train\.csv: missing required column\(s\) \['Edema'\]") as e:
        load_table("chexpert", tmp_path, "train")
    assert str(ddir / "train.csv") in str(e.value)


def test_unparseable_label_names_file_line_and_column(tmp_path):
    bad = ROWS[1].replace(",-1.0,1.0,", ",-1.0,2.0,", 1)
    write_chexpert(tmp_path, rows=[ROWS[0], bad])
    with pytest.raises(DataError, match=r"train\.csv: line 3, column 'Lung Opacity': unparseable label value '2\.0'"):
        load_table("chexpert", tmp_path, "train")


def test_unexpected_sex_names_line(tmp_path):
    write_chexpert(tmp_path, rows=[ROWS[0].replace("Female", "F")])
    with pytest.raises(DataError, match=r"line 2, column 'Sex': unexpected value 'F'"):
        load_table("chexpert", tmp_path, "train")


# ---------------------------------------------------------------------------------------------------------------
# Registry and label selection
# ---------------------------------------------------------------------------------------------------------------


def test_registry_errors(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'chexpret' \(did you mean 'chexpert'\?\).*'nih_cxr14'"):
        load_table("chexpret", tmp_path, "train")
    with pytest.raises(DataError, match=r"dataset root '.*nowhere' does not exist"):
        load_table("chexpert", tmp_path / "nowhere", "train")
    write_chexpert(tmp_path)
    with pytest.raises(DataError, match=r"unknown loader option\(s\) \['uncertainity'\].*'uncertainty'"):
        load_table("chexpert", tmp_path, "train", uncertainity="ones")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no CheXpert train\.csv/valid\.csv here"):
        load_table("chexpert", tmp_path / "empty", "train")


def test_every_registered_loader_follows_the_contract():
    import inspect

    from scaling.data.registry import DATASETS, available, get_loader

    assert available() == list(DATASETS)
    for name in DATASETS:
        module = get_loader(name)
        assert module.__doc__ and module.load.__doc__, name
        assert list(inspect.signature(module.load).parameters)[:2] == ["root", "split"], name
        assert isinstance(module.SPLITS, tuple) and module.SPLITS, name


def test_a_loader_of_your_own_is_named_by_its_import_path(tmp_path, monkeypatch):
    # a top-level module on the path (one file beside the config) is found as a package's module is
    (tmp_path / "site_loader.py").write_text(
        "import pandas as pd\nSPLITS = ('all',)\n\ndef load(root, split):\n    \"\"\"One image.\"\"\"\n"
        "    return pd.DataFrame({'sample_id': ['a'], 'patient_id': ['1'], 'path': ['/a.png'], 'sex': [None],\n"
        "                         'age': [float('nan')], 'label:Lesion': [1.0]})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_table("site_loader", tmp_path, "all")["label:Lesion"].tolist() == [1.0]
    with pytest.raises(DataError, match=r"module .*json.*is not a loader"):
        load_table("json", tmp_path, "all")
    with pytest.raises(DataError, match=r"unknown dataset 'site_loadr'"):
        load_table("site_loadr", tmp_path, "all")


def test_verify_files_reports_missing_by_name(tmp_path):
    ddir = write_chexpert(tmp_path)
    assert len(load_table("chexpert", tmp_path, "train")) == 4  # metadata alone needs no images
    for s in ROWS[:3]:
        p = ddir / s.split(",")[0].split("/", 1)[1]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    with pytest.raises(DataError, match=r"1 of 4 image files are missing: .*patient00003/study1/view1_frontal\.jpg "
                                        r"\(sample 'train/patient00003/study1/view1_frontal\.jpg'\)"):
        load_table("chexpert", tmp_path, "train", verify_files=True)


def test_select_labels_adds_nan_never_zero(tmp_path):
    write_chexpert(tmp_path)
    df = select_labels(load_table("chexpert", tmp_path, "train"), ["Edema", "Nodule"])
    assert [c for c in df.columns if c.startswith("label:")] == ["label:Edema", "label:Nodule"]
    assert df["label:Nodule"].isna().all()
    with pytest.raises(DataError, match=r"unknown label 'Effusion'.*'Pleural Effusion'"):
        select_labels(df, ["Effusion"])


def test_harmonisation_to_canonical_names():
    assert harmonise("nih_cxr14", "Effusion") == "Pleural Effusion"
    assert harmonise("nih_cxr14", "Pleural_Thickening") == "Pleural Thickening"
    assert padchest_labels(["abnormal mediastinum", "pulmonary edema"])["Edema"] == 1.0
    assert padchest_labels(["abnormal mediastinum"])["No Finding"] == 0.0 and padchest_labels(["normal"])["No Finding"]
    assert harmonise("mimic_cxr", "Lung Opacity") == "Lung Opacity"
    assert harmonise("isic2019", "AK") == "Actinic Keratosis"
    assert harmonise("nih_cxr14", "Support Devices") is None  # NIH does not label it: NaN after select_labels
    assert {v for table in HARMONISATION.values() for v in table.values()} <= set(CANONICAL_LABELS)
    assert set(PADCHEST_TERMS) <= set(CANONICAL_LABELS)
    with pytest.raises(DataError, match="no harmonisation table for dataset 'openi'"):
        harmonise("openi", "Effusion")


def test_bad_policy_values(tmp_path):
    write_chexpert(tmp_path)
    with pytest.raises(DataError, match=r"uncertainty policy 'U-Ones' is not allowed"):
        load_table("chexpert", tmp_path, "train", uncertainty="U-Ones")
    with pytest.raises(DataError, match=r"uncertainty policy for 'Edema' is 'one'"):
        load_table("chexpert", tmp_path, "train", uncertainty={"Edema": "one"})
    with pytest.raises(DataError, match=r"blank rule 'ignore' is not allowed; choose one of \['zero', 'nan'\]"):
        load_table("chexpert", tmp_path, "train", blank="ignore")


# ---------------------------------------------------------------------------------------------------------------
# Splits and fractions
# ---------------------------------------------------------------------------------------------------------------


def make_table(n_patients=200, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        common, rare = float(rng.random() < 0.4), float(rng.random() < 0.04)
        for k in range(int(rng.integers(1, 4))):
            rows.append((f"p{p:04d}_{k}", f"p{p:04d}", common, rare, NAN if rng.random() < 0.2 else 0.0))
    return pd.DataFrame(rows, columns=["sample_id", "patient_id", "label:Edema", "label:Hernia", "label:Fracture"])


def test_patient_split_disjoint_sizes_and_seeded():
    df = make_table()
    parts = patient_split(df, {"test": 0.2, "val": 0.1}, seed=0)
    assert {k: v["patient_id"].nunique() for k, v in parts.items()} == {"test": 40, "val": 20, "train": 140}
    assert sum(len(v) for v in parts.values()) == len(df)
    check_disjoint(parts)
    again = patient_split(df.sample(frac=1.0, random_state=3), {"test": 0.2, "val": 0.1}, seed=0)
    assert set(again["test"]["patient_id"]) == set(parts["test"]["patient_id"])  # row order does not matter
    other = patient_split(df, {"test": 0.2, "val": 0.1}, seed=1)
    assert set(other["test"]["patient_id"]) != set(parts["test"]["patient_id"])
    # Stratified: the rare label's positive patients are spread in proportion (8 of ~200 -> 1-2 in test).
    rare = df.groupby("patient_id")["label:Hernia"].max()
    n_rare = int(rare.sum())
    assert abs(int(rare[parts["test"]["patient_id"].unique()].sum()) - 0.2 * n_rare) <= 1
    with pytest.raises(DataError, match="sum to at most 1"):
        patient_split(df, {"test": 0.7, "val": 0.5})
    with pytest.raises(DataError, match=r"patient 'p0001' is in both split 'a' and split 'b'"):
        check_disjoint({"a": df[df.patient_id == "p0001"], "b": df[df.patient_id == "p0001"]})


def test_fractions_nested_patient_level_and_cover_labels():
    df = make_table()
    subsets = [fraction_subset(df, f, seed=7) for f in (0.01, 0.1, 0.5, 1.0)]
    pats = [set(s["patient_id"]) for s in subsets]
    assert pats[0] <= pats[1] <= pats[2] <= pats[3] == set(df["patient_id"])
    assert 20 <= len(pats[1]) <= 20 + 6 and 100 <= len(pats[2]) <= 106
    for s in subsets:  # whole patients: every image of a chosen patient is in the subset
        assert len(s) == int(df["patient_id"].isin(set(s["patient_id"])).sum())
        for col in ("label:Edema", "label:Hernia"):  # at least one positive and one negative per label
            assert (s[col] == 1.0).any() and (s[col] == 0.0).any()
    assert [set(fraction_subset(df, f, seed=7)["patient_id"]) for f in (0.01, 0.1)] == pats[:2]  # deterministic
    assert set(fraction_subset(df, 0.1, seed=8)["patient_id"]) != pats[1]
    shuffled = df.sample(frac=1.0, random_state=1)
    assert set(fraction_subset(shuffled, 0.1, seed=7)["patient_id"]) == pats[1]


def test_patient_order_interleaves_strata():
    df = make_table(400)
    order = patient_order(df, seed=0)
    rare = df.groupby("patient_id")["label:Hernia"].max()[order].to_numpy()
    half = len(order) // 2
    assert abs(rare[:half].sum() - rare[half:].sum()) <= 2


def test_kshot_nested():
    df = make_table()
    s1, s4 = kshot_subset(df, 1, seed=0), kshot_subset(df, 4, seed=0)
    assert set(s1["patient_id"]) <= set(s4["patient_id"])
    per = s4.groupby("patient_id")[["label:Edema", "label:Hernia"]].max()
    assert (per["label:Hernia"] == 1.0).sum() >= 4 and (per["label:Edema"] == 0.0).sum() >= 4
    assert s1["patient_id"].nunique() <= 6  # 3 labels x (1 positive + 1 negative), overlaps allowed

"""Synthetic CheXpert in the exact release format, read back by the real loader; fractal pretraining images."""

import hashlib
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scaling.data import load_table
from scaling.data.datasets.chexpert import COLUMNS
from scaling.data.labels import CHEXPERT_LABELS
from scaling.demo.synthetic import write_fractal_imagefolder, write_synthetic_chexpert

TASKS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
POLICY_VALUE = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}


@pytest.fixture(scope="module")
def site_a(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "a"
    write_synthetic_chexpert(root, n_patients=120, seed=3, image_size=32)
    return root


def read_text(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_release_layout_and_encodings(site_a):
    ddir = site_a / "CheXpert-v1.0-small"
    train, valid = read_text(ddir / "train.csv"), read_text(ddir / "valid.csv")
    assert (ddir / "train.csv").read_text().splitlines()[0] == ",".join(COLUMNS)  # the real 19-column header
    assert train["Path"].str.fullmatch(r"CheXpert-v1\.0-small/train/patient\d{5}/study\d/view\d_(frontal|lateral)\.jpg").all()
    assert valid["Path"].str.fullmatch(r"CheXpert-v1\.0-small/valid/patient\d{5}/study1/view1_frontal\.jpg").all()
    assert train["Path"].str.contains("lateral").any()
    for name in CHEXPERT_LABELS:
        assert set(train[name]) <= {"1.0", "0.0", "-1.0", ""}
        assert set(valid[name]) <= {"1.0", "0.0"}  # consensus labels
    assert set(train["No Finding"]) == {"1.0", ""}
    for name in TASKS:
        assert {"1.0", "0.0", "-1.0", ""} == set(train[name])
    lateral = train["Frontal/Lateral"] == "Lateral"
    assert (train.loc[lateral, "AP/PA"] == "").all() and train.loc[~lateral, "AP/PA"].isin(["AP", "PA"]).all()
    assert set(train["Sex"]) <= {"Female", "Male", "Unknown"}
    ages = train["Age"].astype(int)
    assert ages.between(0, 90).all() and ages[ages > 0].min() >= 18
    # No Finding is 1.0 only when no pathology is positive or uncertain (Support Devices aside).
    others = [n for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices")]
    nf = train["No Finding"] == "1.0"
    assert not train.loc[nf, others].isin(["1.0", "-1.0"]).any().any()
    demo = pd.read_excel(site_a / "CHEXPERT DEMO.xlsx", dtype=str)
    assert list(demo.columns) == ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]
    assert set(train["Path"].str.extract(r"(patient\d+)")[0]) <= set(demo["PATIENT"])


def test_images_are_grayscale_jpegs(site_a):
    ddir = site_a / "CheXpert-v1.0-small"
    paths = read_text(ddir / "train.csv")["Path"].str.removeprefix("CheXpert-v1.0-small/")
    for rel in paths[:20]:
        with Image.open(ddir / rel) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", (32, 36))


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_loader_round_trip_under_each_policy(site_a, policy):
    raw = read_text(site_a / "CheXpert-v1.0-small" / "train.csv")
    df = load_table("chexpert", site_a, "train", uncertainty=policy, verify_files=True)
    assert len(df) == len(raw)
    for name in CHEXPERT_LABELS:
        expected = raw[name].map({"1.0": 1.0, "0.0": 0.0, "": 0.0, "-1.0": POLICY_VALUE[policy]}).to_numpy(float)
        np.testing.assert_array_equal(df["label:" + name].to_numpy(), expected)
    assert list(df["sex"]) == [{"Female": "F", "Male": "M", "Unknown": None}[s] for s in raw["Sex"]]
    ages = raw["Age"].astype(float)
    np.testing.assert_array_equal(df["age"].to_numpy(), ages.where(ages > 0).to_numpy())
    assert df["race"].isin(["White", "Black", "Asian", "Other", None]).all() and df["race"].notna().mean() > 0.8
    valid = load_table("chexpert", site_a, "valid")
    assert set(valid["patient_id"]).isdisjoint(df["patient_id"])


def test_deterministic_and_seeded(tmp_path, site_a):
    again = write_synthetic_chexpert(tmp_path / "again", n_patients=120, seed=3, image_size=32)
    ref = site_a / "CheXpert-v1.0-small"
    assert (again / "train.csv").read_bytes() == (ref / "train.csv").read_bytes()
    rel = "train/patient00007/study1/view1_frontal.jpg"
    assert hashlib.sha1((again / rel).read_bytes()).digest() == hashlib.sha1((ref / rel).read_bytes()).digest()
    other = write_synthetic_chexpert(tmp_path / "other", n_patients=120, seed=4, image_size=32, demographics=False)
    assert (other / "train.csv").read_bytes() != (ref / "train.csv").read_bytes()
    assert not (tmp_path / "other" / "CHEXPERT DEMO.xlsx").exists()


def test_site_b_is_a_different_acquisition(tmp_path, site_a):
    b = write_synthetic_chexpert(tmp_path / "b", n_patients=40, seed=3, site="b", image_size=32)
    df_b = load_table("chexpert", tmp_path / "b", "train")
    assert df_b["patient_id"].str[7:].astype(int).min() == 80001  # ids never collide with site a
    df_a = load_table("chexpert", site_a, "train")

    def contrast(paths):  # mean per-image standard deviation of grey levels
        return np.mean([np.asarray(Image.open(p), float).std() for p in paths[:40]])

    assert contrast(list(df_b["path"])) < 0.85 * contrast(list(df_a["path"]))
    assert b.name == "CheXpert-v1.0-small"


def test_signal_is_learnable_by_a_linear_probe(site_a):
    """A logistic regression on 16 px pixels separates the 5 tasks well above chance: the signal is in the image."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from scaling.data.images import decode
    from scaling.data.splits import patient_split

    root = write_synthetic_chexpert(site_a.parent / "probe", n_patients=400, seed=11, image_size=32).parent
    parts = patient_split(load_table("chexpert", root, "train"), {"test": 0.3}, seed=0)

    def features(t):
        return np.stack([decode(p, 16)[0].ravel() / 255.0 for p in t["path"]])

    x_train, x_test = features(parts["train"]), features(parts["test"])
    aucs = []
    for name in TASKS:
        y, y_test = parts["train"]["label:" + name].to_numpy(), parts["test"]["label:" + name].to_numpy()
        fit, ev = ~np.isnan(y), ~np.isnan(y_test)  # uncertain (-1.0) labels are NaN under the default policy
        clf = LogisticRegression(C=0.05, max_iter=500).fit(x_train[fit], y[fit])
        aucs.append(roc_auc_score(y_test[ev], clf.decision_function(x_test[ev])))
    assert np.mean(aucs) >= 0.75, aucs


def test_fractal_imagefolder(tmp_path):
    root = write_fractal_imagefolder(tmp_path / "f", num_images=45, num_classes=3, image_size=32, seed=0)
    classes = sorted(p.name for p in root.iterdir())
    assert classes == ["class_000", "class_001", "class_002"]
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 45 and all(len(list((root / c).glob("*.png"))) == 15 for c in classes)
    with Image.open(files[0]) as im:
        assert (im.mode, im.size) == ("RGB", (32, 32))
    again = write_fractal_imagefolder(tmp_path / "g", num_images=45, num_classes=3, image_size=32, seed=0)
    assert all((again / f.relative_to(root)).read_bytes() == f.read_bytes() for f in files)
    arrays = [np.asarray(Image.open(f), float) for f in files]
    assert all(a.std() > 5 for a in arrays)  # not blank frames
    assert not np.array_equal(arrays[0], arrays[3])

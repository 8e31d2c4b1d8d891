"""What a study may evaluate on: an OOD set holding training or validation data is refused (or trimmed on
request), a shift on the test set's own patients is resampled together with the test set, and data.filters holds
rows out of training."""

import re

import numpy as np
import pandas as pd
import pytest
from dataset_fixtures import write_fixture
from sklearn.metrics import roc_auc_score

from scaling.config import EvalConfig, load_config
from scaling.data import load_table
from scaling.data.splits import patient_split
from scaling.data.table import DataError
from scaling.metrics import compute_run_metrics
from scaling.metrics.bootstrap import ClusterBootstrap, percentile_interval
from scaling.study.data import load_study_data
from scaling.study.runner import metric_settings, paired_with_test

NIH_LABELS = "data.labels=[Pleural Effusion,Atelectasis]"


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nih")
    root = write_fixture("nih_cxr14", tmp / "nih", n=120)
    return root, [f"output_dir={tmp / 's'}", "data.dataset=nih_cxr14", f"data.root={root}", NIH_LABELS,
                  "data.test_split=test"]


def test_an_ood_set_of_training_patients_is_refused_naming_the_fix(nih):
    root, base = nih
    with pytest.raises(DataError) as err:
        load_study_data(load_config(None, [*base, "data.ood=[{name: again, split: train}]"]))
    train = load_table("nih_cxr14", root, "train")  # every patient of the train split trains or validates
    msg = str(err.value)
    assert f"eval set 'again' holds {len(train)} images of {train['patient_id'].nunique()} patients" in msg
    assert "data.ood.0.patients: unseen" in msg and "data.ood.0.patients: test" in msg and "data.filters" in msg


def test_unseen_drops_the_patients_the_study_trains_on(nih, caplog):
    root, base = nih
    with caplog.at_level("INFO", logger="scaling.study.data"):
        data = load_study_data(load_config(None, [*base, "data.ood=[{name: rest, split: all, patients: unseen}]"]))
    every = load_table("nih_cxr14", root, "all")
    seen = set(data.train["patient_id"]) | set(data.val["patient_id"])
    expected = every[~every["patient_id"].isin(seen)]
    rest = data.ood["rest"]
    assert sorted(rest["sample_id"]) == sorted(expected["sample_id"]) and len(rest) < len(every)
    # here that is the official test list, whose patients are the test set's: resampled together with it
    assert set(rest["patient_id"]) == set(data.test["patient_id"])
    n = data.test["patient_id"].nunique()
    assert f"eval set 'rest' shares {n} of its {n} patients with the test set" in caplog.text
    assert f"dropped {len(every) - len(expected)} of its {len(every)} images" in caplog.text
    sizes = {"train": data.train, "val": data.val, "test": data.test, "rest": rest}
    assert "study data: " + ", ".join(f"{k} {len(t)} images of {t['patient_id'].nunique()} patients"
                                      for k, t in sizes.items()) in caplog.text
    with pytest.raises(DataError, match="only images of patients the study trains or validates on"):
        load_study_data(load_config(None, [*base, "data.ood=[{name: x, split: train, patients: unseen}]"]))


def test_patients_test_needs_the_training_dataset(nih, tmp_path):
    _, base = nih
    other = write_fixture("nih_cxr14", tmp_path / "other", n=20)
    with pytest.raises(DataError, match="data.ood.0.patients: 'test' keeps the test set's patients"):
        load_study_data(load_config(None, [*base, f"data.ood=[{{name: x, root: {other}, patients: test}}]"]))
    with pytest.raises(Exception, match="choose one of"):
        load_config(None, [*base, "data.ood=[{name: x, patients: some}]"])


def test_a_shift_on_the_test_patients_own_lateral_films(tmp_path):
    # Train on frontal films; evaluate on the lateral films of the held-out test patients (same people, other view).
    base = [f"output_dir={tmp_path / 's'}", "data.root=synthetic", "data.options={views: [frontal]}"]
    lateral = "{name: lateral, split: train, options: {views: [lateral]}"
    data = load_study_data(load_config(None, [*base, f"data.ood=[{lateral}, patients: test}}]"]))
    lat = data.ood["lateral"]
    assert len(lat) > 10 and set(lat["view"]) == {"lateral"} and set(data.test["view"]) == {"frontal"}
    assert set(lat["patient_id"]) <= set(data.test["patient_id"])
    every_lateral = load_table("chexpert", tmp_path / "s" / "data" / "site_a", "train", views=["lateral"])
    expected = every_lateral[every_lateral["patient_id"].isin(set(data.test["patient_id"]))]
    assert sorted(lat["sample_id"]) == sorted(expected["sample_id"])
    # the same set without `patients: test` holds the training patients' laterals: refused
    with pytest.raises(DataError, match="eval set 'lateral' holds .* images of .* patients that the study trains"):
        load_study_data(load_config(None, [*base, f"data.ood=[{lateral}}}]"]))


def test_data_filters_hold_a_site_out_of_training(tmp_path):
    root = write_fixture("ham10000", tmp_path / "ham", n=120)
    base = [f"output_dir={tmp_path / 's'}", "data.dataset=ham10000", f"data.root={root}", "data.train_split=all",
            "data.labels=[Malignant]", "data.ood=[{name: molemax, split: all, filters: {site: vidir_molemax}}]"]
    with pytest.raises(DataError, match="eval set 'molemax' holds"):  # molemax images are also training images
        load_study_data(load_config(None, base))
    data = load_study_data(load_config(None, [*base, "data.filters={site: [vidir_modern, rosendahl, vienna_dias]}"]))
    every = load_table("ham10000", root, "all")
    held = every[every["site"] != "vidir_molemax"]
    own = pd.concat([data.train, data.val, data.test])
    assert sorted(own["sample_id"]) == sorted(held["sample_id"])
    assert sorted(data.ood["molemax"]["sample_id"]) == sorted(every.loc[every["site"] == "vidir_molemax", "sample_id"])
    with pytest.raises(DataError, match=r"data.filters=\{'site': 'nowhere'\}\) has no rows"):
        load_study_data(load_config(None, [*base, "data.filters={site: nowhere}"]))


def test_the_same_image_under_another_dataset_is_refused(tmp_path):
    # ISIC 2019 contains the HAM10000 images under their ISIC ids: HAM10000 as an OOD set would score training images.
    isic = write_fixture("isic2019", tmp_path / "isic", n=80)
    ham = write_fixture("ham10000", tmp_path / "ham", n=40)
    base = [f"output_dir={tmp_path / 's'}", "data.dataset=isic2019", f"data.root={isic}", "data.train_split=all",
            "data.labels=[Malignant]", f"data.ood=[{{name: ham, dataset: ham10000, root: {ham}, split: all}}]"]
    with pytest.raises(DataError, match="images with the ids of training or validation images.*exclude_ham"):
        load_study_data(load_config(None, base))
    data = load_study_data(load_config(None, [*base, "data.options={exclude_ham: true}"]))
    assert not set(data.ood["ham"]["sample_id"]) & set(data.train["sample_id"])
    assert len(data.ood["ham"]) == len(load_table("ham10000", ham, "all"))


def test_which_sets_are_resampled_with_test(nih):
    root, base = nih
    cfg = load_config(None, [*base, f"data.ood=[{{name: again, split: test}}, {{name: elsewhere, dataset: "
                                    f"nih_cxr14, root: {root}/../other, split: test}}]"])
    test = pd.DataFrame({"patient_id": ["a", "b"]})
    preds = {"test": test, "again": pd.DataFrame({"patient_id": ["b", "c"]}),
             "elsewhere": pd.DataFrame({"patient_id": ["a"]})}  # another root: an "a" there is someone else
    assert paired_with_test(cfg, preds) == ["again"]
    assert paired_with_test(cfg, {**preds, "again": pd.DataFrame({"patient_id": ["c"]})}) == []
    assert metric_settings(cfg)["shift_bootstrap"] == "paired on shared patients"
    assert "shift_bootstrap" not in metric_settings(load_config(None, base))  # a store without such sets is kept


def _shift_predictions(seed=0):
    """Test and OOD sets sharing 40 of their 60 patients each (two images per patient and set): a strong patient
    effect makes the two AUROCs move together, which a joint resample sees and independent ones do not."""
    rng = np.random.default_rng(seed)
    y = (rng.random(80) < 0.4).astype(float)
    effect = rng.normal(size=80) * 1.5

    def frame(prefix, patients, noise):
        score = np.repeat(y[patients] + effect[patients], 2) + noise * rng.normal(size=2 * patients.size)
        return pd.DataFrame({"sample_id": [f"{prefix}{i}" for i in range(2 * patients.size)],
                             "patient_id": np.repeat([f"p{i}" for i in patients], 2),
                             "label:L": np.repeat(y[patients], 2), "logit:L": score,
                             "prob:L": 1 / (1 + np.exp(-score))})

    return {"val": frame("v", np.arange(60), 0.5), "test": frame("t", np.arange(60), 0.5),
            "ood": frame("o", np.arange(20, 80), 1.0)}


def _drop_row(rows):
    return rows[(rows["eval_set"] == "ood") & (rows["metric"] == "auroc_drop") & (rows["label"] == "L")].iloc[0]


def test_the_paired_drop_interval_is_a_joint_patient_resample():
    preds = _shift_predictions()
    cfg = EvalConfig(n_boot=300, bootstrap_seed=3)
    paired, info = compute_run_metrics(preds, ["L"], [], cfg, paired=["ood"])
    independent, _ = compute_run_metrics(preds, ["L"], [], cfg)
    assert info["paired_shift"] == ["ood"]
    # Oracle: the same patient multiplicities, each replicate's AUROCs from scikit-learn with those weights.
    test, ood = preds["test"], preds["ood"]
    ids = np.concatenate([test["patient_id"], ood["patient_id"]]).astype(object)
    boot = ClusterBootstrap(ids, n=ids.size, n_boot=300, seed=3)
    w = boot.counts[:, boot.codes]
    n = len(test)
    drops = np.array([roc_auc_score(test["label:L"], test["prob:L"], sample_weight=w[b, :n])
                      - roc_auc_score(ood["label:L"], ood["prob:L"], sample_weight=w[b, n:]) for b in range(300)])
    lo, hi = percentile_interval(drops, 0.05)
    row = _drop_row(paired)
    assert (row["lo"], row["hi"]) == pytest.approx((lo, hi), abs=1e-12)
    assert row["value"] == pytest.approx(roc_auc_score(test["label:L"], test["prob:L"])
                                         - roc_auc_score(ood["label:L"], ood["prob:L"]), abs=1e-12)
    # The same patients in both sets: the independent resample is much wider, and only the drop row changes.
    other = _drop_row(independent)
    assert other["value"] == row["value"] and (hi - lo) < 0.8 * (other["hi"] - other["lo"])
    keep = ~((paired["metric"] == "auroc_drop") & (paired["eval_set"] == "ood"))
    pd.testing.assert_frame_equal(paired[keep], independent[keep])
    with pytest.raises(ValueError, match="not OOD sets"):
        compute_run_metrics(preds, ["L"], [], cfg, paired=["test"])


def test_the_paired_drop_interval_covers_the_true_drop():
    # 200 simulated studies: 60 test patients, 60 OOD patients of which 40 are test patients (two images each, a
    # strong patient effect, the OOD images noisier and less separated). The population drop comes from 200,000
    # independent patients of the same model. The joint resample covers it about as often as its 95 % promise; the
    # independent one, blind to the shared patients, is wider and over-covers.
    rng = np.random.default_rng(0)

    def scores(y, effect, shift, noise, size):
        return y * (1 - shift) + effect + noise * rng.normal(size=size)

    y = (rng.random(200_000) < 0.4).astype(float)
    effect = rng.normal(size=y.size) * 1.5
    true_drop = (roc_auc_score(y, scores(y, effect, 0.0, 0.5, y.size))
                 - roc_auc_score(y, scores(y, effect, 0.3, 1.0, y.size)))

    def frame(prefix, y_pat, effect_pat, pats, shift, noise):
        s = scores(np.repeat(y_pat[pats], 2), np.repeat(effect_pat[pats], 2), shift, noise, 2 * pats.size)
        return pd.DataFrame({"sample_id": [f"{prefix}{i}" for i in range(s.size)],
                             "patient_id": np.repeat([f"p{i}" for i in pats], 2), "label:L": np.repeat(y_pat[pats], 2),
                             "logit:L": s, "prob:L": 1 / (1 + np.exp(-s))})

    covered, width = {"paired": 0, "independent": 0}, {"paired": [], "independent": []}
    for k in range(200):
        y_pat = (rng.random(80) < 0.4).astype(float)
        effect_pat = rng.normal(size=80) * 1.5
        test_pats, ood_pats = np.arange(60), np.arange(20, 80)
        preds = {"val": frame("v", y_pat, effect_pat, test_pats, 0.0, 0.5),
                 "test": frame("t", y_pat, effect_pat, test_pats, 0.0, 0.5),
                 "ood": frame("o", y_pat, effect_pat, ood_pats, 0.3, 1.0)}
        for name, paired in (("paired", ["ood"]), ("independent", [])):
            row = _drop_row(compute_run_metrics(preds, ["L"], [], EvalConfig(n_boot=300, bootstrap_seed=k),
                                                paired=paired)[0])
            covered[name] += row["lo"] <= true_drop <= row["hi"]
            width[name].append(row["hi"] - row["lo"])
    assert 0.89 <= covered["paired"] / 200 <= 0.99
    assert covered["independent"] / 200 >= 0.975
    assert np.mean(width["paired"]) < 0.8 * np.mean(width["independent"])


def test_an_official_split_sharing_training_patients_is_warned_about(nih, tmp_path, caplog):
    root, base = nih
    with caplog.at_level("WARNING", logger="scaling.study.data"):
        load_study_data(load_config(None, base))
    assert "shares" not in caplog.text  # NIH's test list and its train_val list are patient-disjoint
    caplog.clear()
    # Move patient 1's follow-up image to the test list: patient 1 is then in both splits, no image is.
    moved = write_fixture("nih_cxr14", tmp_path / "moved", n=120)
    train_list = (moved / "train_val_list.txt").read_text().split()
    train_list.remove("00000001_001.png")
    (moved / "train_val_list.txt").write_text("\n".join(train_list) + "\n")
    (moved / "test_list.txt").write_text((moved / "test_list.txt").read_text() + "00000001_001.png\n")
    with caplog.at_level("WARNING", logger="scaling.study.data"):
        data = load_study_data(load_config(None, [*base, f"data.root={moved}", f"output_dir={tmp_path / 's'}"]))
    n = data.test["patient_id"].nunique()
    assert "00000001_001.png" in set(data.test["sample_id"]) and "1" in set(data.train["patient_id"])
    assert (f"the test set (official split 'test') shares 1 of its {n} patients with the training set: its metrics "
            f"are optimistic for them (e.g. patient '1')") in caplog.text


@pytest.mark.parametrize("override, name", [("data.test_split=all", "test"), ("data.val_split=train", "val")])
def test_an_official_split_holding_training_images_is_refused(nih, override, name):
    # Before: only the shared patients were warned about, and the study scored training images as test images.
    root, base = nih
    cfg = load_config(None, [*base, override])
    train = patient_split(load_table("nih_cxr14", root, "train"), {"val": cfg.data.val_fraction}, seed=0)["train"]
    if name == "val":  # the whole train split: every training image, and the test set is untouched
        train, held = load_table("nih_cxr14", root, "train"), load_table("nih_cxr14", root, "train")
    else:
        held = load_table("nih_cxr14", root, "all")
    first = held.loc[held["sample_id"].isin(set(train["sample_id"])), "sample_id"].iloc[0]
    split = override.split("=")[1]
    with pytest.raises(DataError, match=re.escape(
            f"the {name} set (split {split!r} of nih_cxr14) holds {len(train)} of its {len(held)} images that the "
            f"training set (split 'train') also holds (e.g. sample {first!r}): its metrics would be measured on "
            f"training images. Name a split disjoint from data.train_split in data.{name}_split")):
        load_study_data(cfg)


def test_each_ood_set_resamples_from_a_stream_of_its_own():
    # One shared stream would give two sets of 60 different patients the same multiplicities by id rank: coupled
    # replicates of test and OOD AUROC. val and test keep eval.bootstrap_seed (their stored intervals are unchanged).
    from scaling.metrics.run_metrics import set_seed

    assert set_seed(7, "val") == set_seed(7, "test") == 7
    assert set_seed(7, "nih") == set_seed(7, "nih") != set_seed(7, "mimic")
    ids = np.array([f"p{i}" for i in range(60)], dtype=object)
    test = ClusterBootstrap(ids, n_boot=200, seed=set_seed(0, "test")).counts
    ood = ClusterBootstrap(np.array([f"q{i}" for i in range(60)], dtype=object), n_boot=200,
                           seed=set_seed(0, "ood")).counts
    shared = ClusterBootstrap(np.array([f"q{i}" for i in range(60)], dtype=object), n_boot=200, seed=0).counts
    assert np.array_equal(test, shared)  # what a shared stream did
    assert abs(np.corrcoef(test.ravel(), ood.ravel())[0, 1]) < 0.03


def test_val_and_test_sharing_images_is_warned_about(nih, caplog):
    _, base = nih
    with caplog.at_level("WARNING", logger="scaling.study.data"):
        load_study_data(load_config(None, base))
    assert "the val and test sets share" not in caplog.text  # val carved from the training patients
    with caplog.at_level("WARNING", logger="scaling.study.data"):
        data = load_study_data(load_config(None, [*base, "data.val_split=test"]))  # both NIH's test list
    n = len(data.test)
    assert f"the val and test sets share {n} of the test set's {n} images" in caplog.text
    assert "calibration and threshold metrics are optimistic" in caplog.text

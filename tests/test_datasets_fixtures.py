"""Every fixture loads through the registry, decodes through the image pipeline, and has both classes of the targets
the study recipes train and evaluate on (chexpert_bit → NIH/MIMIC, derm_isic → DDI/Fitzpatrick17k, mammo_vindr →
CBIS-DDSM/CMMD)."""

import pytest

from dataset_fixtures import DATASETS, LOADER_OPTIONS, write_fixture
from scaling.data.images import decode
from scaling.data.registry import DATASETS as REGISTERED
from scaling.data.registry import get_loader, load_table
from scaling.data.table import DataError

COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# (dataset, split, labels that must have both classes in that split)
TARGETS = [
    ("nih_cxr14", "test", COMPETITION),
    ("nih_cxr14", "train", COMPETITION),
    ("mimic_cxr", "test", COMPETITION),
    ("padchest", "all", ("Pleural Effusion", "Cardiomegaly", "Atelectasis")),
    ("ham10000", "all", ("Malignant", "Melanoma")),
    ("isic2019", "all", ("Malignant", "Melanoma")),
    ("isic2020", "all", ("Malignant", "Melanoma")),
    ("fitzpatrick17k", "all", ("Malignant", "Melanoma")),
    ("ddi", "all", ("Malignant", "Melanoma")),
    ("vindr_mammo", "train", ("Suspicious",)),
    ("vindr_mammo", "test", ("Suspicious",)),
    ("cbis_ddsm", "test", ("Malignant", "Suspicious")),
    ("cmmd", "all", ("Malignant",)),
    ("embed", "all", ("Malignant", "Suspicious")),
]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("fixtures")
    return {name: write_fixture(name, base / name) for name in DATASETS}


def test_every_registered_dataset_but_chexpert_has_a_fixture():
    assert set(DATASETS) == set(REGISTERED) - {"chexpert"}


@pytest.mark.parametrize("name, split, targets", TARGETS)
def test_targets_have_both_classes(roots, name, split, targets):
    df = load_table(name, roots[name], split, verify_files=True)
    for label in targets:
        assert set(df[f"label:{label}"].dropna()) == {0.0, 1.0}, (name, split, label)


@pytest.mark.parametrize("name", DATASETS)
def test_fixture_images_decode_and_splits_are_declared(roots, name):
    loader = get_loader(name)
    assert "all" in loader.SPLITS
    df = load_table(name, roots[name], "all", verify_files=True, **LOADER_OPTIONS.get(name, {}))
    for path in df["path"]:
        assert decode(path, 16, 3).shape == (3, 16, 16)


def test_unknown_fixture_name():
    with pytest.raises(ValueError, match="no fixture for dataset 'chexpert'"):
        write_fixture("chexpert", "/nonexistent")


def test_registry_rejects_unknown_options(roots):
    with pytest.raises(DataError, match=r"unknown loader option\(s\) \['view'\]"):
        load_table("nih_cxr14", roots["nih_cxr14"], "all", view=["PA"])

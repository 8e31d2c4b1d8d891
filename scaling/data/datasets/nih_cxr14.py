"""NIH ChestX-ray14: ``Data_Entry_2017*.csv`` + the official ``train_val_list.txt`` / ``test_list.txt``.

Layout (NIH ChestX-ray14 release; Wang et al. 2017)::

    <root>/Data_Entry_2017.csv            (or Data_Entry_2017_v2020.csv, .csv.gz as torchxrayvision ships it)
    <root>/train_val_list.txt, test_list.txt
    <root>/images/00000001_000.png                       (Box layout, flat)
    <root>/images_001/images/00000001_000.png ...        (Kaggle layout)

Traps handled: the header has commas inside brackets (``OriginalImage[Width,Height]``), so pandas splits it into
extra columns, and the original 2017 file ends every line with a comma (an empty ``Unnamed: 11`` column); the 2017
file also has implausible ages up to 414, which become NaN. Labels are ``|``-separated finding names; a name
outside the 14 findings and ``No Finding`` is an error, not a silent zero. There is no uncertainty: a finding not
listed is 0.0.

The release's two lists and its label file match exactly: every row is in one list and every list entry is a row.
So an image in both lists is an error naming both files; with a split asked for, a list entry that names no row is
an error naming the list, the count and examples (``split='all'``: a warning), and rows in neither list are left out
of every split with a warning giving their count and examples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from scaling.data import labels as L
from scaling.data.datasets.readers import (chest_view, drop_implausible_ages, filter_views, finish, index_images,
                                          locate, map_values, no_expected_file, read_csv, require_ids, select_split)
from scaling.data.table import LABEL_PREFIX, DataError

log = logging.getLogger(__name__)

ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv",
               "Data_Entry_2017.csv.gz")
"""Label files tried in order: the 2020 re-release (corrected ages) first."""
SPLITS = ("train", "test", "all")
"""``train`` is train_val_list.txt (carve validation from it by patient), ``test`` is test_list.txt."""
FINDINGS = tuple(L.HARMONISATION["nih_cxr14"])


def _age(values: pd.Series, ids: pd.Series, source: Path) -> pd.Series:
    """``Patient Age`` as years: integers, or DICOM age strings like ``058Y`` in early copies; > 120 → NaN."""
    text = values.astype(str).str.strip()
    match = text.str.fullmatch(r"(\d+)Y?")
    if not match.all():
        i = int(np.flatnonzero(~match.to_numpy())[0])
        raise DataError(f"{source}: row {ids.iloc[i]!r}, column 'Patient Age': unparseable age {text.iloc[i]!r}")
    return drop_implausible_ages(text.str.rstrip("Y").astype(float), ids, source, "Patient Age")


def _labels(findings: pd.Series, ids: pd.Series, source: Path) -> pd.DataFrame:
    """One 1.0/0.0 column per canonical finding from the ``|``-joined ``Finding Labels``."""
    tokens = findings.fillna("").astype(str).str.split("|")
    out = {LABEL_PREFIX + L.harmonise("nih_cxr14", f): np.zeros(len(tokens)) for f in FINDINGS}
    for i, names in enumerate(tokens):
        for name in names:
            name = name.strip()
            if name not in FINDINGS:
                raise DataError(f"{source}: row {ids.iloc[i]!r}, column 'Finding Labels': unknown finding {name!r} "
                                f"(expected '|'-joined names from {list(FINDINGS)})")
            out[LABEL_PREFIX + L.harmonise("nih_cxr14", name)][i] = 1.0
    return pd.DataFrame(out, index=findings.index)


def _split_list(root: Path, name: str, required: bool) -> dict[str, int]:
    """Image names in an official split list, each with its line; an absent list is an error only when a split was
    asked for."""
    path = root / name
    if not path.is_file():
        if not required:
            return {}
        raise DataError(f"{path}: official split list not found (needed for split != 'all')")
    names: dict[str, int] = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            names.setdefault(line.strip(), i)
    return names


def _examples(names, k: int = 5) -> str:
    names = sorted(names)
    return ", ".join(map(repr, names[:k])) + (", ..." if len(names) > k else "")


def _official_splits(root: Path, ids: pd.Series, entry: Path, split: str) -> np.ndarray:
    """``train`` / ``test`` / None per Data_Entry row from the two official lists, after checking them against
    each other and against Data_Entry.

    The release's lists and Data_Entry match exactly (every row in one list, every list entry a row), so anything
    else is a wrong or edited file: an image in both lists is an error; a list entry that names no row is an error
    when a split is loaded from the lists (the split would silently lose it) and a warning for ``split='all'``,
    where the lists only fill the ``split`` column; rows in neither list, which no split holds, are logged."""
    lists = {which: (root / name, _split_list(root, name, split != "all")) for which, name in
             (("train", "train_val_list.txt"), ("test", "test_list.txt"))}
    (train_path, train), (test_path, test) = lists["train"], lists["test"]
    both = set(train) & set(test)
    if both:
        first = min(both, key=train.get)
        raise DataError(f"{train_path} (line {train[first]}) and {test_path} (line {test[first]}) both list image "
                        f"{first!r} ({len(both)} image(s) in both lists: {_examples(both)}); an image belongs to "
                        f"one official split, or the study would test on an image it trains on")
    known = set(ids)
    for list_path, names in (lists["train"], lists["test"]):
        unknown = [n for n in names if n not in known]
        if not unknown:
            continue
        message = (f"{list_path}: {len(unknown)} of its {len(names)} entries name no row of {entry}, e.g. "
                   f"{_examples(unknown)} (line {names[unknown[0]]}); the release's lists and label file match "
                   f"exactly, so one of them is a wrong or edited file")
        if split != "all":
            raise DataError(message)
        log.warning("%s", message)
    listed = ids.isin(set(train) | set(test))
    if split != "all" and not listed.all():
        log.warning("%s: %d of its %d rows are in neither %s nor %s and are left out of every split, e.g. %s",
                    entry, int((~listed).sum()), len(ids), train_path.name, test_path.name,
                    _examples(ids[~listed]))
    return np.where(ids.isin(set(train)), "train", np.where(ids.isin(set(test)), "test", None))


def load(
    root: str | Path,
    split: str = "train",
    *,
    entry_file: str | None = None,
    views: list[str] | None = None,
    verify_files: bool = False,
) -> pd.DataFrame:
    """Load NIH ChestX-ray14 as a sample table (one row per PNG).

    ``split``: ``train`` (train_val_list.txt), ``test`` (test_list.txt) or ``all``.
    ``entry_file``: label file name under ``root`` (default: the first of :data:`ENTRY_FILES` that exists).
    ``views``: keep rows whose ``view`` or ``view_position`` is listed (``["PA"]``; filter, logged). Labels: the
    14 findings under canonical names (``Effusion`` → ``Pleural Effusion``, ``Pleural_Thickening`` →
    ``Pleural Thickening``) and ``No Finding``. Attributes: ``view`` (always ``frontal``), ``view_position``
    (``PA``/``AP``), ``follow_up``, ``split``.
    """
    root = Path(root)
    source = f"nih_cxr14({root})"
    names = [entry_file] if entry_file else list(ENTRY_FILES)
    path = next((root / n for n in names if (root / n).is_file()), None)
    if path is None:
        raise no_expected_file(root, names, "label files")
    required = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                "View Position"]
    raw = read_csv(path, required, dtype={"Image Index": str, "Patient ID": str, "Patient Age": str})
    empty = [c for c in raw.columns if c.startswith("Unnamed:") and raw[c].isna().all()]
    raw = raw.drop(columns=empty)  # the 2017 file's trailing comma
    for col in ("Image Index", "Patient ID"):
        require_ids(raw[col], path, col)
    ids = raw["Image Index"]
    if ids.duplicated().any():
        raise DataError(f"{path}: duplicate Image Index {ids[ids.duplicated()].iloc[0]!r}")

    df = pd.DataFrame({
        "sample_id": ids,
        "patient_id": raw["Patient ID"].str.strip().str.lstrip("0").replace("", "0"),
        "sex": map_values(raw["Patient Gender"], {"M": "M", "F": "F"}, ids, path, "Patient Gender"),
        "age": _age(raw["Patient Age"], ids, path),
        "view": chest_view(raw["View Position"], ("PA", "AP"), ()),
        "view_position": raw["View Position"],
        "follow_up": raw["Follow-up #"],
    })
    df = pd.concat([df, _labels(raw["Finding Labels"], ids, path)], axis=1)

    df["split"] = _official_splits(root, ids, path, split)
    df = select_split(df, split, SPLITS, source)

    found = index_images([root / "images", *sorted(root.glob("images_*/images"))], (".png",))
    df["path"] = locate(df["sample_id"], found, root / "images", path, "Image Index")
    df = filter_views(df, views, source)
    return finish(df, source, verify_files)

"""The data of a study: every sample table it needs (training dataset split by patient once, official splits where
configured, OOD sets), prepared with the study's labels and age groups, and the checks a launch or ``--dry-run``
makes on them before anything is written (subgroup names, image files).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from scaling.config import DataConfig, EvalSetConfig, StudyConfig
from scaling.data.table import DataError, OptionError, add_age_group, apply_filters, label_names
from scaling.engine.ranks import is_main_process
from scaling.io import atomic_write_text, read_parquet_columns
from scaling.study.coordination import once
from scaling.study.grid import SYNTHETIC
from scaling.study.store import RunStore

log = logging.getLogger(__name__)


@dataclass
class StudyData:
    """The sample tables of a study, split once and shared by every run."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    ood: dict[str, pd.DataFrame] = field(default_factory=dict)
    labels: tuple[str, ...] = ()

    def eval_sets(self) -> dict[str, pd.DataFrame]:
        """Every evaluation set by name: ``val`` (thresholds/temperature), ``test`` and the OOD sets."""
        return {"val": self.val, "test": self.test, **self.ood}

    def identifiers(self) -> list[str]:
        """Every sample and patient id of the study's tables: what W&B and the report must never show."""
        tables = [self.train, *self.eval_sets().values()]
        return pd.concat([t[["sample_id", "patient_id"]] for t in tables]).to_numpy().ravel().tolist()


def _synthetic_root(store: RunStore, root: str, seed: int) -> Path:
    """Resolve ``synthetic[:site]`` to a generated CheXpert-layout dataset under the store (generated once)."""
    from scaling.demo.synthetic import write_synthetic_chexpert

    site = root.split(":", 1)[1] if ":" in root else "a"
    out = store.root / "data" / f"site_{site}"

    def make():
        if is_main_process():
            n_patients = 700 if site == "a" else 300
            # site b draws other patients (another seed) with another acquisition: the OOD test set.
            write_synthetic_chexpert(out, n_patients=n_patients, seed=seed + (0 if site == "a" else 1000), site=site)
            atomic_write_text(out / "DONE", "")

    once(store, f"data-site_{site}", (out / "DONE").is_file, make)
    return out


def _check_root(root: str, where: str) -> None:
    """Refuse a root that cannot be a dataset, before anything is written."""
    if not root:
        raise OptionError(f"{where} is empty: give the dataset's directory, or '{SYNTHETIC}' for the offline demo "
                          f"data", "root")
    if root == SYNTHETIC or root.startswith(SYNTHETIC + ":"):
        return
    p = Path(root).expanduser()
    if not p.exists():
        raise OptionError(f"dataset root does not exist: {p} ({where})", "root")


def check_roots(data: DataConfig) -> None:
    """Every dataset root of the config exists (or names the demo data); DataError naming the field otherwise."""
    _check_root(data.root, "data.root")
    for i, e in enumerate(data.ood):
        if e.root:
            _check_root(e.root, f"data.ood.{i}.root ({e.name})")


def _resolve_root(cfg: StudyConfig, root: str) -> Path:
    _check_root(root, "data.root")
    if root == SYNTHETIC or root.startswith(SYNTHETIC + ":"):
        return _synthetic_root(RunStore(cfg.output_dir), root, seed=0)
    return Path(root).expanduser()


@contextmanager
def _fields(**fields: str):
    """Name the config field behind an :class:`~scaling.data.table.OptionError` raised inside: ``split=``,
    ``options=`` and ``labels=`` give the field for each kind of setting (e.g. ``split="data.test_split"``)."""
    try:
        yield
    except OptionError as e:
        name = fields.get(e.setting)
        if name is None or str(e).startswith(f"{name}: "):
            raise
        raise OptionError(f"{name}: {e}", e.setting) from None


def _prepare(df: pd.DataFrame, d: DataConfig, source: str, training_data: bool, warn_missing: bool = True
             ) -> pd.DataFrame:
    """Select the study's labels (NaN where a dataset lacks one, logged unless ``warn_missing`` is off: the val and
    test sets of the training dataset lack what its training set lacks) and derive the age groups. A one-of-K task
    also keeps its derived labels and completes every row with a class to a one-hot (two positive classes: a
    DataError naming ``source`` and the sample); on the training dataset, which defines the task, the derived labels
    must agree with their groups (``scaling.data.labels.check_derived_labels``)."""
    from scaling.data.labels import check_derived_labels, one_of_k_labels, select_labels

    out = select_labels(df, [*d.labels, *d.derived_labels], source=source if warn_missing else None,
                        known=[*d.labels, *d.derived_labels])  # checked against the training table
    if d.task == "multiclass":
        out = one_of_k_labels(out, d.labels, source)
        if training_data:
            check_derived_labels(out, d.labels, d.derived_labels, source)
    return add_age_group(out, d.age_bins).reset_index(drop=True)


def load_study_data(cfg: StudyConfig) -> StudyData:
    """Load and split every table the study needs (patient-level; official splits where configured)."""
    from scaling.data import load_table
    from scaling.data.registry import get_loader
    from scaling.data.splits import patient_split

    from scaling.data.labels import CANONICAL_LABELS, check_label_names

    d = cfg.data
    loader = get_loader(d.dataset)
    own = not loader.__name__.startswith("scaling.") or getattr(loader, "FREE_LABEL_NAMES", False)
    if not own:  # a shipped loader names canonical labels only: a typo is refused before any table is read
        with _fields(labels="data.labels"):
            check_label_names(d.labels)
        with _fields(labels="data.derived_labels"):
            check_label_names(d.derived_labels)
    root = _resolve_root(cfg, d.root)
    if not d.test_split and d.train_split != "all" and "test" in getattr(get_loader(d.dataset), "SPLITS", ()):
        log.warning("%s has an official 'test' split, but data.test_split is empty: the in-distribution test set is "
                    "carved from %.0f%% of the patients of the %r split instead (set data.test_split: test to use the "
                    "official one)", d.dataset, 100 * d.test_fraction, d.train_split)
    where = f"{d.dataset} (data.filters)"
    with _fields(split="data.train_split", options="data.options"):
        full = apply_filters(load_table(d.dataset, root, d.train_split, **d.options), d.filters, where)
    theirs = set(label_names(full))
    for field_name, names in (("data.labels", d.labels), ("data.derived_labels", d.derived_labels)):
        with _fields(labels=field_name):  # a loader of your own may name its labels freely
            check_label_names([n for n in names if n not in theirs and n not in CANONICAL_LABELS],
                              also=sorted(theirs))
    # Validation and in-distribution test come from official splits when named, else from train patients.
    # The split seed is fixed (not the run seed): every run of the study sees the same val/test patients.
    carve = {}
    if not d.test_split:
        carve["test"] = d.test_fraction
    if not d.val_split:
        carve["val"] = d.val_fraction
    parts = patient_split(full, carve, seed=0) if carve else {"train": full}
    train = parts["train"]
    with _fields(split="data.val_split", options="data.options"):
        val = (apply_filters(load_table(d.dataset, root, d.val_split, **d.options), d.filters, where) if d.val_split
               else parts["val"])
    with _fields(split="data.test_split", options="data.options"):
        test = (apply_filters(load_table(d.dataset, root, d.test_split, **d.options), d.filters, where)
                if d.test_split else parts["test"])
    for name, table, split in (("train", train, d.train_split), ("val", val, d.val_split or d.train_split),
                               ("test", test, d.test_split or d.train_split)):
        if table.empty:  # e.g. a loader option such as ``views`` that matches no row: named here, not in every run
            raise DataError(f"the {name} set of {d.dataset} (split {split!r}, data.options={dict(d.options)}, "
                            f"data.filters={dict(d.filters)}) has no rows; check data.options, data.filters and the "
                            f"{name} split")
    for name, table, split in (("val", val, d.val_split), ("test", test, d.test_split)):
        again = seen_images(table, train)
        if again.any():  # only official splits can: carved ones are patient-disjoint by construction
            raise DataError(f"the {name} set (split {split!r} of {d.dataset}) holds {int(again.sum())} of its "
                            f"{len(table)} images that the training set (split {d.train_split!r}) also holds (e.g. "
                            f"sample {table.loc[again, 'sample_id'].iloc[0]!r}): its metrics would be measured on "
                            f"training images. Name a split disjoint from data.train_split in data.{name}_split, or "
                            f"fix the dataset's split lists")
        shared = set(table["patient_id"]) & set(train["patient_id"]) if split else set()
        if shared:  # an official split is the benchmark's protocol: said loudly, not refused
            log.warning("the %s set (official split %r) shares %d of its %d patients with the training set: its "
                        "metrics are optimistic for them (e.g. patient %r)", name, split, len(shared),
                        table["patient_id"].nunique(), sorted(shared)[0])
    both = seen_images(test, val)
    if both.any():  # e.g. val_split and test_split both CheXpert's `valid`: allowed, but not silently
        log.warning("the val and test sets share %d of the test set's %d images (e.g. sample %r): the temperature and "
                    "thresholds fitted on val are scored on the same images, so the test set's calibration and "
                    "threshold metrics are optimistic; name disjoint splits in data.val_split and data.test_split",
                    int(both.sum()), len(test), test.loc[both, "sample_id"].iloc[0])
    ood = {}
    for i, e in enumerate(d.ood):
        eroot = _resolve_root(cfg, e.root) if e.root else root
        options = {**(d.options if not e.dataset else {}), **e.options}
        with _fields(split=f"data.ood.{i}.split", options=f"data.ood.{i}.options" if e.options else "data.options"):
            t = apply_filters(load_table(e.dataset or d.dataset, eroot, e.split, **options), e.filters,
                              f"eval set {e.name!r}")
        if t.empty:
            raise DataError(f"eval set {e.name!r} is empty after filters {e.filters} (loader options {options})")
        ood[e.name] = held_out(t, i, e, same_source(e, d), train, val, test,
                               same_patient_ids=(e.dataset or d.dataset) == d.dataset)
        shared = set(ood[e.name]["patient_id"]) & set(test["patient_id"]) if same_source(e, d) else set()
        if shared:  # e.g. AP films of the official test list, or the test patients' lateral films
            log.info("eval set %r shares %d of its %d patients with the test set: its AUROC drop compares images of "
                     "the same people, and its interval resamples the patients of both sets together",
                     e.name, len(shared), ood[e.name]["patient_id"].nunique())
    own = lambda t, name: _prepare(t, d, f"{d.dataset} ({name} set)", training_data=True,  # noqa: E731
                                   warn_missing=name == "train")
    data = StudyData(train=own(train, "train"), val=own(val, "val"), test=own(test, "test"),
                     ood={k: _prepare(v, d, f"eval set {k!r}", training_data=False) for k, v in ood.items()},
                     labels=d.labels)
    check_subgroups(d, set().union(*(t.columns for t in (data.train, data.val, data.test, *data.ood.values()))))
    log.info("study data: %s", ", ".join(f"{name} {len(t)} images of {t['patient_id'].nunique()} patients"
                                          for name, t in {"train": data.train, **data.eval_sets()}.items()))
    for label in d.labels:
        column = data.train.get(f"label:{label}")
        if column is not None and not (column == 1).any():
            log.warning("label %r has no positive image in the training set (%d images): the model cannot learn it "
                        "and its AUROC says nothing; check data.labels and the loader options", label,
                        len(data.train))
    return data


def same_source(eval_set: EvalSetConfig, d: DataConfig) -> bool:
    """Whether an OOD set reads the training dataset from the same root: its patient ids are then the training
    data's, and a patient it shares with the study's own sets is the same person."""
    def key(root: str) -> str:
        return root if root == SYNTHETIC or root.startswith(SYNTHETIC + ":") else str(Path(root).expanduser().resolve())

    return (eval_set.dataset or d.dataset) == d.dataset and key(eval_set.root or d.root) == key(d.root)


def seen_images(table: pd.DataFrame, *seen: pd.DataFrame) -> pd.Series:
    """Which rows of ``table`` are images of the ``seen`` tables (the same ``sample_id``): an evaluation set must hold
    none of the images the study trains on, or it measures memory. Ids are compared whatever dataset each table
    reads, since a release can contain another under the same ids (ISIC 2019 holds HAM10000)."""
    return table["sample_id"].isin(set().union(*(set(s["sample_id"]) for s in seen)))


def held_out(t: pd.DataFrame, i: int, e: EvalSetConfig, same: bool, train: pd.DataFrame, val: pd.DataFrame,
             test: pd.DataFrame, same_patient_ids: bool = False) -> pd.DataFrame:
    """The rows of OOD set ``e`` (``data.ood[i]``) that the study may score, by ``e.patients``
    (:class:`scaling.config.EvalSetConfig`): an OOD set must not hold an image, or (from the training dataset) a
    patient, that the study trains or validates on, or its AUROC measures memory rather than transfer.

    ``same``: the set reads the training dataset from its root (:func:`same_source`). ``same_patient_ids``: it reads
    the training dataset, from any root, so its patient ids are taken for the same people: a second hospital site
    exported like the first (``inhouse`` at another root) shares the hospital group's patient numbers."""
    field_name = f"data.ood.{i}.patients"
    images = seen_images(t, train, val)
    seen_patients = (t["patient_id"].isin(set(train["patient_id"]) | set(val["patient_id"])) if same or same_patient_ids
                     else pd.Series(False, index=t.index))
    if e.patients == "test":
        if not same:
            raise DataError(f"{field_name}: 'test' keeps the test set's patients, so eval set {e.name!r} must read "
                            f"the training dataset from its root (it reads {e.dataset or '-'} at {e.root or '-'})")
        # An official test split need not be patient-disjoint from training: such patients are never kept.
        keep = t["patient_id"].isin(set(test["patient_id"])) & ~images & ~seen_patients
        log.info("eval set %r: %d of its %d images belong to the test set's patients (%s: test)", e.name,
                 int(keep.sum()), len(t), field_name)
        if not keep.any():
            raise DataError(f"eval set {e.name!r} has no image of a test-set patient ({field_name}: test); its "
                            f"split {e.split!r} and filters {dict(e.filters)} select other patients")
        return t[keep].reset_index(drop=True)
    seen = images | seen_patients
    if not seen.any():
        return t
    n_patients = t.loc[seen, "patient_id"].nunique()
    example = t.loc[seen, "sample_id"].iloc[0]
    if e.patients == "unseen":
        log.info("eval set %r: dropped %d of its %d images (%d patients) that the study trains or validates on "
                 "(%s: unseen)", e.name, int(seen.sum()), len(t), n_patients, field_name)
        if seen.all():
            raise DataError(f"eval set {e.name!r} has only images of patients the study trains or validates on "
                            f"({field_name}: unseen dropped all {len(t)}); draw it from other patients")
        return t[~seen].reset_index(drop=True)
    what = (f"{int(seen_patients.sum())} images of {t.loc[seen_patients, 'patient_id'].nunique()} patients"
            if seen_patients.any() else f"{int(images.sum())} images with the ids of training or validation "
            f"images (a copy of them: ISIC 2019 contains HAM10000, see the isic2019 option exclude_ham)")
    elsewhere = ("" if same or not seen_patients.any() else f" (it reads the training dataset from another root, "
                 f"{e.root}: its patient ids are taken for the same people; if that site numbers its patients on its "
                 f"own, the matches are coincidences)")
    raise DataError(f"eval set {e.name!r} holds {what} that the study trains or validates on (e.g. sample "
                    f"{example!r}){elsewhere}: its AUROC would be measured on training data. Set {field_name}: unseen "
                    f"to drop them, {field_name}: test to keep only the test set's patients (a shift on the same "
                    f"patients), or hold these rows out of training with data.filters")


def check_subgroups(d: DataConfig, columns: set[str]) -> None:
    """Refuse, before anything is written, a ``data.subgroups`` attribute that is none of ``columns`` (those of every
    set of the study, or of its stored predictions): a misspelt name would otherwise only drop its fairness tables
    with a warning. An attribute that only some sets have, such as skin type on dermatology OOD sets, is fine. An
    identifier column (``patient_id``, ``exam_id``, ``path``, ...: ``scaling.tracking.is_identifier_key``) is
    refused too."""
    from scaling.tracking import is_identifier_key

    identifiers = [a for a in d.subgroups if is_identifier_key(a)]
    if identifiers:
        raise DataError(f"data.subgroups {identifiers} names an identifier column: its groups would be single "
                        f"patients, exams or images, and their names (the ids) would be written to the report and "
                        f"W&B; split by an attribute such as sex, age_group or race")
    missing = [a for a in d.subgroups if a not in columns]
    if missing:
        known = sorted(c for c in columns if not c.startswith(("label:", "logit:", "prob:", "path"))
                       and c != "sample_id")
        raise DataError(f"data.subgroups {missing} is not an attribute of any set of the study ({d.dataset}); "
                        f"its tables have {known}")


def stored_columns(store: RunStore, run_ids) -> set[str]:
    """Every column of the stored predictions of ``run_ids`` (Parquet schemas only: nothing is loaded). A damaged
    file is an :class:`~scaling.io.UnreadableFile` naming it, before anything is rescored."""
    return {c for rid in run_ids for f in sorted((store.run_dir(rid) / "predictions").glob("*.parquet"))
            for c in read_parquet_columns(f)}


def check_image_files(data: StudyData, dataset: str) -> None:
    """Every image file of every set exists (one ``stat`` per image: seconds for 10^5 local files, longer on a
    network file system); a DataError counts the missing ones and names the first. The plan and a launch (under
    ``data.on_bad_image: error``) check before anything is written: a missing file would otherwise fail each run
    that reads it, after the run store was written."""
    from scaling.data.registry import check_files

    t0 = time.perf_counter()
    for name, table in {"train": data.train, **data.eval_sets()}.items():
        check_files(table, f"{dataset} ({name} set)")
    log.info("every image file of the study exists (%d checked in %.1f s)",
             len(data.train) + sum(len(t) for t in data.eval_sets().values()), time.perf_counter() - t0)

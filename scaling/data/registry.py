"""Dataset name → loader module, imported lazily, and :func:`load_table`, the one entry point to every dataset.

Each loader module exposes ``load(root, split, **options) -> DataFrame`` (a sample table, see
:mod:`scaling.data.table`), a ``SPLITS`` tuple and a module docstring describing its on-disk layout. Lazy import
keeps ``import scaling.data`` cheap and lets a dataset's optional dependencies (pydicom, openpyxl) load only when
that dataset is used.

Your own dataset: write such a module and name it by its dotted import path wherever a dataset name goes
(``data.dataset: mylab.loaders.lesions``, ``load_table("mylab.loaders.lesions", root, "all")``): every process of a
launch imports it itself, so nothing has to be registered in each rank. :func:`register_dataset` gives it a short
name within one process (docs/data.md, "Your own dataset").
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from scaling.data.table import DataError, OptionError, apply_filters, validate_table

log = logging.getLogger(__name__)

DATASETS: dict[str, str] = {
    "chexpert": "scaling.data.datasets.chexpert",
    "mimic_cxr": "scaling.data.datasets.mimic_cxr",
    "nih_cxr14": "scaling.data.datasets.nih_cxr14",
    "padchest": "scaling.data.datasets.padchest",
    "ham10000": "scaling.data.datasets.ham10000",
    "isic2019": "scaling.data.datasets.isic2019",
    "isic2020": "scaling.data.datasets.isic2020",
    "fitzpatrick17k": "scaling.data.datasets.fitzpatrick17k",
    "ddi": "scaling.data.datasets.ddi",
    "cbis_ddsm": "scaling.data.datasets.cbis_ddsm",
    "vindr_mammo": "scaling.data.datasets.vindr_mammo",
    "cmmd": "scaling.data.datasets.cmmd",
    "embed": "scaling.data.datasets.embed",
    "inhouse": "scaling.data.datasets.inhouse",
}
"""Registered dataset names and the module that loads each."""

MISSING_LIST_SHOWN = 10


def available() -> list[str]:
    """Names of registered datasets whose loader module is installed."""
    return [n for n, m in DATASETS.items() if importlib.util.find_spec(m) is not None]


def register_dataset(name: str, module: str) -> None:
    """Register loader module ``module`` (a dotted import path) under ``name`` in this process. A study launched
    with ``accelerate launch`` runs in fresh processes: name the module itself in ``data.dataset`` there."""
    if not name or not module:
        raise ValueError("register_dataset needs a name and a module path")
    DATASETS[name] = module


def _own_loader(name: str) -> ModuleType:
    """The loader module at dotted path ``name``, checked for the loader contract."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise DataError(f"dataset {name!r}: no registered dataset has this name, and importing it as a loader module "
                        f"failed ({e}); is its package installed or on PYTHONPATH?") from None
    missing = [a for a in ("load", "SPLITS") if not hasattr(module, a)]
    if missing or not callable(getattr(module, "load", None)):
        raise DataError(f"dataset {name!r}: module {module.__file__} is not a loader: it needs load(root, split, "
                        f"**options) returning a sample table and a SPLITS tuple (missing: {missing or ['load()']}); "
                        f"see docs/data.md, 'Your own dataset'")
    return module


def get_loader(name: str) -> ModuleType:
    """Import and return the loader module of dataset ``name`` (a registered name, or the import path of a loader
    module of your own: ``mylab.loaders.lesions``, or ``lesions`` for a module on the path); unknown names list the
    valid ones."""
    if name not in DATASETS:
        if "." in name or importlib.util.find_spec(name) is not None:  # a package's module, or a top-level one
            return _own_loader(name)
        close = difflib.get_close_matches(name, DATASETS, n=3)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; valid names: {sorted(DATASETS)}, or the dotted import "
                        f"path of a loader module of your own (docs/data.md, 'Your own dataset')")
    module = DATASETS[name]
    if importlib.util.find_spec(module) is None:
        raise DataError(f"dataset {name!r}: loader module {module} is not available in this installation")
    return importlib.import_module(module)


def check_files(df: pd.DataFrame, source: str) -> None:
    """Raise DataError naming the missing image files (and their sample ids) of a sample table."""
    missing = [(sid, p) for sid, p in zip(df["sample_id"], df["path"]) if not Path(p).is_file()]
    if missing:
        shown = "; ".join(f"{p} (sample {sid!r})" for sid, p in missing[:MISSING_LIST_SHOWN])
        more = f" and {len(missing) - MISSING_LIST_SHOWN} more" if len(missing) > MISSING_LIST_SHOWN else ""
        raise DataError(f"{source}: {len(missing)} of {len(df)} image files are missing: {shown}{more}. A file the "
                        f"loader found nowhere is shown under the folder it expects by default; check that every "
                        f"archive of the release is extracted under the dataset root")


def load_table(
    name: str,
    root: str | Path,
    split: str,
    *,
    verify_files: bool = False,
    filters: Mapping[str, Any] | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Load split ``split`` of dataset ``name`` stored at ``root`` as a validated sample table.

    Args:
        name: a key of :data:`DATASETS`.
        root: the dataset's directory on disk (must exist).
        split: one of the loader's splits (see its ``SPLITS``).
        verify_files: check that every image file exists; missing ones are reported by name. Reading metadata
            never needs the images.
        filters: ``{column: value or [values]}`` attribute filters applied after loading (each logs its removals).
        **options: the loader's own keyword options; unknown ones are rejected with the valid names.
    """
    loader = get_loader(name)
    root_path = Path(root).expanduser()
    if not str(root) or not root_path.exists():
        raise DataError(f"{name}: dataset root {str(root)!r} does not exist")
    params = list(inspect.signature(loader.load).parameters.values())[2:]  # after (root, split)
    accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    unknown = [] if takes_any else [k for k in options if k not in accepted]
    if unknown:
        raise OptionError(f"{name}: unknown loader option(s) {unknown}; valid options: {accepted}", "options")
    source = f"{name}:{split} at {root_path}"
    t0 = time.perf_counter()
    df = validate_table(loader.load(root_path, split, **options), source)
    if filters:
        df = apply_filters(df, dict(filters), source)
    if verify_files:
        check_files(df, source)
    log.info(
        "%s: %d images, %d patients (%.2fs)", source, len(df), df["patient_id"].nunique(), time.perf_counter() - t0
    )
    return df

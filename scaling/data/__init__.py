"""Datasets as sample tables (one row per image), label harmonisation, patient-level splits and image pipelines.

Entry point: :func:`load_table` (``load_table("chexpert", root, "train", uncertainty="ones")``). Loaders are
imported lazily from :data:`scaling.data.registry.DATASETS`, so importing this package stays cheap.
"""

from scaling.data.registry import DATASETS, available, load_table, register_dataset
from scaling.data.table import LABEL_PREFIX, DataError, label_columns, label_names, validate_table

__all__ = [
    "DATASETS",
    "LABEL_PREFIX",
    "DataError",
    "available",
    "label_columns",
    "label_names",
    "load_table",
    "register_dataset",
    "validate_table",
]

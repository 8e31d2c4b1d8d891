"""One loader module per public dataset, each reading the dataset's real on-disk layout into a sample table.

Every module exposes ``load(root, split, **options) -> DataFrame`` (see :mod:`scaling.data.table`), a ``SPLITS``
tuple and a docstring describing its layout; :mod:`scaling.data.datasets.readers` holds the helpers they share
(CSV reading with file/row errors, image indexing, value maps). Use them through
:func:`scaling.data.load_table`, which imports a loader only when its dataset is asked for.
"""

"""Scaling studies: a grid of runs, trained and evaluated into a run store, read back as tables and a report.

Entry points (importable from here; each is loaded from its module on first use, so ``import scaling.study`` stays
cheap and the package imports none of its modules)::

    from scaling.config import load_config
    from scaling.study import run_study, plan, load_study, load_results, summarise, build_report, write_report

    cfg = load_config("my_study.yaml", ["grid.fractions=[0.1,1.0]"])
    print(plan(cfg))                        # the runs, what each lacks and costs, without training (--dry-run)
    table = run_study(cfg)                  # train / evaluate what is missing; results.csv, report.html
    results = load_results(cfg.output_dir)  # tidy: one row per run x eval set x label x group x metric

* :func:`~scaling.study.runner.run_study`, :func:`~scaling.study.runner.plan` (``scaling.study.runner``): run a
  study config, or plan it.
* :class:`~scaling.study.store.RunStore` (``scaling.study.store``): the on-disk store of runs (spec, predictions,
  metrics, weights), docs/run-store.md.
* :func:`~scaling.study.aggregate.load_study`, :func:`~scaling.study.aggregate.load_results`,
  :func:`~scaling.study.aggregate.summarise`, :func:`~scaling.study.aggregate.run_status`
  (``scaling.study.aggregate``): read a store back.
* :func:`~scaling.study.report.build_report`, :func:`~scaling.study.report.write_report` (``scaling.study.report``):
  the HTML report, docs/report.md.
* :func:`~scaling.study.grid.expand_grid`, :func:`~scaling.study.grid.run_id`,
  :class:`~scaling.study.grid.RunSpec`, :func:`~scaling.study.grid.source_label` (``scaling.study.grid``): the
  grid's cells, their ids and labels.

``python -m scaling.study`` is the command line (``summary``, ``fits``, ``compare``, ``report``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_study": "runner", "plan": "runner", "StudyFailed": "runner",
    "RunStore": "store", "StoreError": "store",
    "load_study": "aggregate", "load_results": "aggregate", "summarise": "aggregate", "run_status": "aggregate",
    "build_report": "report", "write_report": "report",
    "expand_grid": "grid", "run_id": "grid", "RunSpec": "grid", "source_label": "grid",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Load an entry point from its module on first use (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

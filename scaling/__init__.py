"""scaling: supervised transfer-learning scaling studies for medical imaging.

Entry points: ``scaling.config`` (typed configs), ``scaling.data`` (dataset tables and loaders),
``scaling.models`` (backbones and weight sources), ``scaling.engine`` (the Accelerate trainer and sharding),
``scaling.metrics`` (AUROC + CIs, calibration, fairness), ``scaling.study`` (grid, run store, report).

A study in three calls: ``scaling.config.load_config`` (YAML + dotted overrides), then
``scaling.study.run_study(cfg)`` (or ``scaling.study.plan(cfg)`` to see the runs without training), then
``scaling.study.load_study(cfg.output_dir)`` / ``load_results`` to read the tidy results back
(``scaling.study.RunStore`` is the store itself, ``scaling.study.build_report`` / ``write_report`` the HTML report).
"""

__version__ = "0.1.0"

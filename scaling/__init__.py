"""scaling: supervised transfer-learning scaling studies for medical imaging.

Entry points: ``scaling.config`` (typed configs), ``scaling.data`` (dataset tables and loaders),
``scaling.models`` (backbones and weight sources), ``scaling.engine`` (the Accelerate trainer and sharding),
``scaling.metrics`` (AUROC + CIs, calibration, fairness), ``scaling.study`` (grid, run store, report).
"""

__version__ = "0.1.0"

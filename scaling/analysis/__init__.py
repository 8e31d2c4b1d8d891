"""What the pretrained features contribute: representation similarity, linear probes, per-block features.

Each piece takes a model, a :class:`~scaling.engine.Trainer` or arrays and returns arrays or DataFrames, so the
study runner and report can call it in a few lines (docs/analysis.md):

* :mod:`scaling.analysis.cka`: minibatch linear CKA (Nguyen, Raghu & Kornblith 2021) between the blocks of two
  models, e.g. pretrained vs fine-tuned, or two backbone scales.
* :mod:`scaling.analysis.features`: spatially pooled per-block features of a (possibly sharded) model, gathered on
  the main process.
* :mod:`scaling.analysis.probe`: linear probe on frozen pre-logit features, returning logits shaped like
  ``Trainer.predict`` so the metrics apply unchanged.
* :mod:`scaling.analysis.interpolation`: loss and macro AUROC along the line between two fine-tuned models'
  weights and its performance barrier (Neyshabur, Sedghi & Zhang 2020, §3.3), through any ``Trainer.predict``.

Block re-initialisation (Raghu et al. 2019) lives with the models: :func:`scaling.models.reinit.reinit_units`.
"""

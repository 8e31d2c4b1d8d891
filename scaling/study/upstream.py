"""Upstream supervised pretraining: how BiT-S/M/L were made, here also at demo scale on generated images.

The study's pretraining-scale axis needs weights pretrained on datasets of different sizes. :func:`run_pretraining`
trains any backbone from scratch on a single-label dataset with the same Trainer (and sharding) as fine-tuning and
exports a safetensors file, which fine-tuning then loads through the ordinary local-file weight source.
``recipes/pretrain.py`` is its command line for real-scale data; :func:`pretrain` is the demo's ``upstream:<name>``
source, on formula-driven images (``scaling.demo.synthetic.write_fractal_imagefolder``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from scaling.config import ModelConfig, ShardingConfig, TrainConfig, UpstreamConfig
from scaling.data.table import DataError

log = logging.getLogger(__name__)


def run_pretraining(
    backbone: str,
    dataset: Dataset,
    out_path: str | Path,
    train_cfg: TrainConfig,
    sharding_cfg: ShardingConfig | None = None,
    *,
    loss: str = "multiclass",
    run_dir: str | Path | None = None,
    model_kwargs: dict | None = None,
    tracker=None,
) -> dict:
    """Pretrain ``backbone`` from scratch on ``dataset`` and export it to ``out_path``; returns the Trainer's summary.

    ``loss="multiclass"``: softmax cross-entropy over ``len(dataset.classes)`` classes (an ImageFolder, the demo's
    fractals, ImageNet-style data). ``loss="multilabel"``: masked BCE over ``dataset.labels`` (a medical table from
    any loader; unlabelled findings do not count). The same Trainer and sharding as fine-tuning; resumes from
    ``run_dir/checkpoints`` when interrupted. The exported file holds the whole model with its upstream head, which
    fine-tuning drops; once it is written the run directory (whose final checkpoint holds the same weights) is
    removed, so the weights are stored once.
    """
    import shutil

    from accelerate.utils import set_seed

    from scaling.engine import Trainer
    from scaling.engine.ranks import barrier, is_main_process
    from scaling.models import build_model, input_normalisation

    names = list(dataset.classes if loss == "multiclass" else dataset.labels)
    if loss == "multiclass" and len(names) < 2:
        raise DataError(f"pretraining needs at least 2 classes, the dataset has {len(names)}")
    model_cfg = ModelConfig(backbone=backbone, pretrained="scratch", zero_init_head=False, kwargs=model_kwargs or {})
    # The initial weights are drawn here, before the Trainer seeds its loop: seed them too, so that the same
    # upstream settings always give the same weights.
    set_seed(train_cfg.seed)
    model = build_model(model_cfg, num_outputs=len(names), image_size=getattr(dataset, "image_size", None))
    # Normalised as fine-tuning will feed this architecture, so that the exported weights see the same inputs there.
    dataset.mean, dataset.std = input_normalisation(model)
    out_path = Path(out_path)
    run_dir = Path(run_dir) if run_dir is not None else out_path.with_suffix(".run")
    trainer = Trainer(model, train_cfg, sharding_cfg or ShardingConfig(), loss=loss, output_dir=run_dir,
                      tracker=tracker)
    try:
        summary = trainer.fit(dataset)
        trainer.export(out_path)
    finally:
        trainer.close()
    barrier()
    if is_main_process():
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("pretrained %s on %d images, %d %s -> %s", backbone, len(dataset), len(names),
             "classes" if loss == "multiclass" else "labels (masked BCE)", out_path)
    return summary


def pretrain(up: UpstreamConfig, backbone: str, image_root: str | Path, out_path: str | Path,
             sharding_cfg: ShardingConfig | None = None) -> dict:
    """The demo's upstream run ``up`` for ``backbone``: SGD + cosine on the ImageFolder at ``image_root``."""
    from scaling.data.dataset import ImageFolderDataset

    dataset = ImageFolderDataset(image_root, up.image_size, train=True)
    train = TrainConfig(batch_size=up.batch_size, optimizer="sgd", lr=up.lr, momentum=0.9, weight_decay=1e-4,
                        schedule="cosine", warmup_steps=max(1, up.steps // 10), steps=up.steps,
                        log_every=max(1, up.steps // 4))
    return run_pretraining(backbone, dataset, out_path, train, sharding_cfg)

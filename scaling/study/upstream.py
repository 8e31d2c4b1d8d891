"""Upstream supervised pretraining: how BiT-S/M/L were made, here at demo scale on generated images.

The study's pretraining-scale axis needs weights pretrained on datasets of different sizes. Offline, the demo makes
them: each backbone is pretrained by the same Trainer (and the same sharding) on formula-driven images
(``scaling.data.synthetic.write_fractal_imagefolder``, classes = generating formulas) and exported as a local
safetensors file, which fine-tuning then loads through the ordinary local-file weight source.
"""

from __future__ import annotations

import logging
from pathlib import Path

from scaling.config import ModelConfig, ShardingConfig, TrainConfig, UpstreamConfig

log = logging.getLogger(__name__)


def pretrain(
    up: UpstreamConfig,
    backbone: str,
    image_root: str | Path,
    out_path: str | Path,
    sharding_cfg: ShardingConfig | None = None,
    *,
    tracker=None,
) -> dict:
    """Pretrain ``backbone`` from scratch on the ImageFolder at ``image_root``; export weights to ``out_path``.

    Returns the trainer's summary. The exported file holds the whole model (with its upstream head); fine-tuning
    drops that head and attaches a new one.
    """
    from scaling.data.dataset import ImageFolderDataset
    from scaling.engine import Trainer
    from scaling.models import build_model

    dataset = ImageFolderDataset(image_root, up.image_size, train=True)
    if len(dataset.classes) < 2:
        raise ValueError(f"upstream {up.name!r}: {image_root} has {len(dataset.classes)} class(es); need >= 2")
    model = build_model(ModelConfig(backbone=backbone, pretrained="scratch", zero_init_head=False),
                        num_outputs=len(dataset.classes))
    train = TrainConfig(batch_size=up.batch_size, optimizer="sgd", lr=up.lr, momentum=0.9, weight_decay=1e-4,
                        schedule="cosine", warmup_steps=max(1, up.steps // 10), steps=up.steps,
                        log_every=max(1, up.steps // 4))
    out_path = Path(out_path)
    trainer = Trainer(model, train, sharding_cfg or ShardingConfig(), loss="multiclass",
                      output_dir=out_path.parent / f"{Path(out_path).stem}.run", tracker=tracker)
    summary = trainer.fit(dataset)
    trainer.export(out_path)
    log.info("upstream %s: %s pretrained on %d images, %d classes -> %s", up.name, backbone, len(dataset),
             len(dataset.classes), out_path)
    return summary

"""Launched on 2 CPU ranks by tests/test_analysis_features.py (torchrun, gloo): per-block features of sharded models.

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/analysis_suite.py <out_dir> [<hf_model_dir>]

One launch covers fsdp (ViT and BiT-style ResNetV2), ddp, chunked streaming with padding duplicates, block CKA
between two sharded models, then zero3 (DeepSpeed, switched on for the last cells the way
``accelerate launch --use_deepspeed`` would); with a Hugging Face model directory also that backbone under fsdp
and zero3. Rank 0 writes
``<out_dir>/analysis.pt``; the pytest side compares every entry with one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toy import FAMILIES, ToyDataset  # noqa: E402

from scaling.analysis.cka import block_cka  # noqa: E402
from scaling.analysis.features import block_features, iter_block_features  # noqa: E402
from scaling.config import ModelConfig, ShardingConfig, TrainConfig  # noqa: E402
from scaling.engine import Trainer  # noqa: E402
from scaling.models import build_model  # noqa: E402

N_EVAL = 21  # odd: the second rank's slice wraps around, so padding duplicates must be dropped
BATCH = 4


def trainer_for(model, strategy: str) -> Trainer:
    """An inference-only Trainer (no fit): the features come from the sharded forward of ``Trainer.predict``."""
    return Trainer(model, TrainConfig(batch_size=8, steps=1), ShardingConfig(strategy=strategy))


def main():
    out_dir = Path(sys.argv[1])
    hf_dir = sys.argv[2] if len(sys.argv) > 2 else ""
    out: dict = {"world": int(os.environ["WORLD_SIZE"])}
    data = ToyDataset(N_EVAL, seed=1)
    for family in ("vit", "resnetv2"):
        trainer = trainer_for(FAMILIES[family](), "fsdp")
        out[f"fsdp_{family}"] = block_features(trainer, data, batch_size=BATCH)
        out[f"fsdp_{family}_units"] = trainer.shard.units
        if family == "vit":
            # Chunks of 8 over 2 ranks: every chunk pads; the stream must reassemble the same features.
            out["fsdp_vit_chunks"] = list(iter_block_features(trainer, data, chunk_size=8, batch_size=BATCH))
            other = trainer_for(FAMILIES["vit"](seed=1), "fsdp")
            out["fsdp_cka"] = block_cka(trainer, data, other, chunk_size=8, batch_size=BATCH, cka_batch_size=10)
            other.close()
        trainer.close()
    trainer = trainer_for(FAMILIES["vit"](), "ddp")
    out["ddp_vit"] = block_features(trainer, data, batch_size=BATCH)
    trainer.close()
    if hf_dir:
        torch.manual_seed(0)  # the new head's init, which the pytest side repeats
        model = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf", zero_init_head=False), 3)
        trainer = trainer_for(model, "fsdp")
        out["fsdp_hf"] = block_features(trainer, data, batch_size=BATCH)
        out["fsdp_hf_units"] = trainer.shard.units
        out["fsdp_hf_pred"] = trainer.predict(data, batch_size=BATCH)
        trainer.close()
    # DeepSpeed last: a launch is either DeepSpeed or not (check_launch), so its cells come after the others.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    trainer = trainer_for(FAMILIES["vit"](), "zero3")
    out["zero3_vit"] = block_features(trainer, data, batch_size=BATCH)
    out["zero3_partitioned"] = trainer.shard.share
    trainer.close()
    if hf_dir:
        # An hf: model built after a ZeRO-3 cell (as in a ZeRO-3 study grid) and partitioned by its own cell.
        model = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf", zero_init_head=False), 3)
        trainer = trainer_for(model, "zero3")
        out["zero3_hf"] = block_features(trainer, data, batch_size=BATCH)
        trainer.close()
    if torch.distributed.get_rank() == 0:
        torch.save(out, out_dir / "analysis.pt")


if __name__ == "__main__":
    main()

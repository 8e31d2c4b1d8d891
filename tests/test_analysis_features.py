"""Per-block features: hooks, pooling, and 2 real gloo ranks (fsdp, zero3, ddp) against one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import launcher  # noqa: E402
from toy import FAMILIES, ToyDataset  # noqa: E402

from scaling.analysis.cka import MinibatchCKA, block_cka  # noqa: E402
from scaling.analysis.features import PRE_LOGITS, block_features, layer_names, pool  # noqa: E402

SUITE = Path(__file__).resolve().parent / "dist_scripts" / "analysis_suite.py"
# fp32 features of the same weights in batches of different composition (rank slices, padding): BLAS kernels sum
# in a batch-size-dependent order, observed up to 3e-5 absolute on ResNetV2 activations of magnitude ~1.
TOL = dict(rtol=1e-4, atol=1e-4)


def _reference(model, n=21):
    """Features computed directly, without hooks: timm's forward_features / blocks, pooled by hand."""
    model.eval()
    x = torch.stack([ToyDataset(n, seed=1)[i]["image"] for i in range(n)])
    feats = {}
    with torch.no_grad():
        if hasattr(model, "blocks"):  # ViT
            h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
            for i, blk in enumerate(model.blocks):
                h = blk(h)
                feats[f"blocks.{i}"] = h.mean(1)
        else:  # ResNetV2
            h = model.stem(x)
            for s, stage in enumerate(model.stages):
                for j, blk in enumerate(stage.blocks):
                    h = blk(h)
                    feats[f"stages.{s}.blocks.{j}"] = h.mean((2, 3))
        feats[PRE_LOGITS] = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    return feats, logits


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from test_models_hf import tiny_hf_dir

    hf_dir = tiny_hf_dir(tmp_path_factory.mktemp("hf"), "dinov2")
    out = launcher.out_dir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SUITE),
           str(out), str(hf_dir)]
    proc = subprocess.run(cmd, env=launcher.env(), cwd=launcher.REPO, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        raise AssertionError(f"analysis suite failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out / "analysis.pt", weights_only=False), hf_dir


def test_pool_means_over_space_and_tokens():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    torch.testing.assert_close(pool(x), x.mean((2, 3)))
    torch.testing.assert_close(pool((x.flatten(2).transpose(1, 2), None)), x.mean((2, 3)))
    with pytest.raises(ValueError, match="cannot pool"):
        pool(torch.zeros(2))


@pytest.mark.parametrize("family", ["vit", "resnetv2"])
def test_hooked_features_equal_a_direct_forward(family):
    model = FAMILIES[family]()
    ref, logits = _reference(model)
    got = block_features(model, ToyDataset(21, seed=1), batch_size=4)
    assert list(got["features"]) == list(ref) == layer_names(model)
    for name, value in ref.items():
        torch.testing.assert_close(got["features"][name], value, **TOL)  # batch 4 vs 21
    np.testing.assert_allclose(got["logits"], logits.numpy(), **TOL)
    np.testing.assert_array_equal(got["index"], np.arange(21))
    with pytest.raises(ValueError, match="unknown layer"):
        block_features(model, ToyDataset(4), layers=["nope"])
    # a module in training (dropout, batch statistics) gets eval-mode features and is handed back in training mode
    model.train()
    again = block_features(model, ToyDataset(21, seed=1), batch_size=4)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(again["features"][PRE_LOGITS], got["features"][PRE_LOGITS])


def test_two_ranks_give_the_features_of_one_process(suite):
    out, _ = suite
    assert out["world"] == 2
    assert out["fsdp_vit_units"] == 3 and out["fsdp_resnetv2_units"] == 5  # blocks + root: really sharded
    assert out["zero3_partitioned"] == pytest.approx(0.5, abs=0.05)
    for key, family in [("fsdp_vit", "vit"), ("fsdp_resnetv2", "resnetv2"), ("ddp_vit", "vit"), ("zero3_vit", "vit")]:
        ref = block_features(FAMILIES[family](), ToyDataset(21, seed=1), batch_size=4)
        got = out[key]
        np.testing.assert_array_equal(got["index"], np.arange(21))  # padding duplicates dropped
        assert list(got["features"]) == list(ref["features"])
        for name in ref["features"]:
            torch.testing.assert_close(got["features"][name], ref["features"][name], **TOL)
        np.testing.assert_allclose(got["logits"], ref["logits"], **TOL)


def test_chunked_stream_and_block_cka_on_two_ranks(suite):
    out, _ = suite
    chunks = out["fsdp_vit_chunks"]
    assert [len(c["index"]) for c in chunks] == [8, 8, 5]
    ref = block_features(FAMILIES["vit"](), ToyDataset(21, seed=1), batch_size=4)
    joined = torch.cat([c["features"][PRE_LOGITS] for c in chunks])
    torch.testing.assert_close(joined, ref["features"][PRE_LOGITS], **TOL)
    local = block_cka(FAMILIES["vit"](), ToyDataset(21, seed=1), FAMILIES["vit"](seed=1), chunk_size=8,
                      batch_size=4, cka_batch_size=10)
    dist = out["fsdp_cka"]
    assert len(dist) == 9 and list(dist.columns) == list(local.columns)
    np.testing.assert_allclose(dist["cka"], local["cka"], atol=1e-6)
    # Chunks of 8 cut into batches of 10 → batches of 8, 8, 5: the same numbers as feeding them by hand.
    a = block_features(FAMILIES["vit"](), ToyDataset(21, seed=1))["features"]
    b = block_features(FAMILIES["vit"](seed=1), ToyDataset(21, seed=1))["features"]
    acc = MinibatchCKA(list(a), list(b))
    for lo, hi in ((0, 8), (8, 16), (16, 21)):
        acc.update({k: v[lo:hi] for k, v in a.items()}, {k: v[lo:hi] for k, v in b.items()})
    np.testing.assert_allclose(local["cka"], acc.table()["cka"], atol=1e-10)


def test_hugging_face_backbone_under_fsdp_on_two_ranks(suite):
    """A DINOv2 (RAD-DINO's architecture) sharded per encoder layer gives one process's features and logits."""
    from scaling.config import ModelConfig
    from scaling.models import build_model

    out, hf_dir = suite
    assert out["fsdp_hf_units"] == 3  # 2 Dinov2Layer units + the root
    torch.manual_seed(0)  # the same new head as the suite's
    model = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf", zero_init_head=False), 3)
    ref = block_features(model, ToyDataset(21, seed=1), batch_size=4)
    got = out["fsdp_hf"]
    assert list(got["features"]) == list(ref["features"]) and len(ref["features"]) == 3
    for name in ref["features"]:
        torch.testing.assert_close(got["features"][name], ref["features"][name], **TOL)
    np.testing.assert_allclose(out["fsdp_hf_pred"]["logits"], ref["logits"], **TOL)
    np.testing.assert_array_equal(out["fsdp_hf_pred"]["index"], np.arange(21) * 10 + 3)  # ToyDataset's own index
    for name in ref["features"]:  # ZeRO-3 partitioning of a model built after an earlier ZeRO-3 cell
        torch.testing.assert_close(out["zero3_hf"]["features"][name], ref["features"][name], **TOL)

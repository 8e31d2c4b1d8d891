"""Backbones, weight sources and the per-family table (tiny models; the hub is never reached)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from scaling.config import ModelConfig, TrainConfig
from scaling.models import (
    PRESETS,
    CheckpointMismatch,
    WeightsUnavailable,
    build_model,
    count_params,
    family_spec,
    input_channels,
    model_info,
)
from scaling.models import weights as W
from scaling.models.optim import build_optimizer, param_groups
from scaling.models.presets import resolve_backbone

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_weights(tmp_path, monkeypatch):
    """No test may see a real cache: an empty weights dir and an empty HF cache."""
    monkeypatch.setenv("SCALING_WEIGHTS_DIR", str(tmp_path / "weights"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def _images(n=2, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _features(model, x):
    """Pre-logit features of a TransferModel or timm model (unsharded test use only)."""
    inner = getattr(model, "backbone", model)
    with torch.no_grad():
        return inner.forward_head(inner.forward_features(x), pre_logits=True)


def _source(name="resnetv2_tiny", classes=20, seed=1):
    """An 'upstream' timm model with random non-trivial weights, including GroupNorm affine terms."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=classes).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _bit_npz(model, path):
    """Write a timm ResNetV2 in the official big_transfer npz layout (HWIO kernels, ``resnet/`` prefix)."""

    def tf(t):
        a = t.detach().numpy()
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a

    sd, out, p = model.state_dict(), {}, "resnet/"
    out[f"{p}root_block/standardized_conv2d/kernel"] = tf(sd["stem.conv.weight"])
    out[f"{p}group_norm/gamma"], out[f"{p}group_norm/beta"] = tf(sd["norm.weight"]), tf(sd["norm.bias"])
    out[f"{p}head/conv2d/kernel"], out[f"{p}head/conv2d/bias"] = tf(sd["head.fc.weight"]), tf(sd["head.fc.bias"])
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            u = f"{p}block{i + 1}/unit{j + 1:02d}/"
            for k, sub in enumerate("abc", start=1):
                out[f"{u}{sub}/standardized_conv2d/kernel"] = tf(getattr(block, f"conv{k}").weight)
                out[f"{u}{sub}/group_norm/gamma"] = tf(getattr(block, f"norm{k}").weight)
                out[f"{u}{sub}/group_norm/beta"] = tf(getattr(block, f"norm{k}").bias)
            if block.downsample is not None:
                out[f"{u}a/proj/standardized_conv2d/kernel"] = tf(block.downsample.conv.weight)
    np.savez(path, **out)


# --------------------------------------------------------------------------------------------------------------
# Tiny registered models
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, lo, hi",
    [
        ("resnetv2_tiny", 0.3e6, 0.55e6),
        ("resnetv2_small", 1.5e6, 3e6),
        ("vit_micro", 0.1e6, 0.5e6),
        ("vit_mini", 0.5e6, 2e6),
    ],
)
def test_tiny_models_are_registered_timm_models_of_the_planned_size(name, lo, hi):
    model = timm.create_model(name, num_classes=5)
    assert lo <= count_params(model) <= hi
    assert model(_images()).shape == (2, 5)
    assert timm.is_model(name) and name in PRESETS


def test_tiny_resnet_is_bit_style():
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import PreActBottleneck

    model = timm.create_model("resnetv2_small")
    kinds = {type(m) for m in model.modules()}
    assert {PreActBottleneck, StdConv2d, GroupNormAct} <= kinds
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


# --------------------------------------------------------------------------------------------------------------
# build_model and the weight formats
# --------------------------------------------------------------------------------------------------------------


def test_scratch_build_has_zero_head_and_right_width():
    model = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained="scratch"), num_outputs=5)
    logits = model(_images())
    assert logits.shape == (2, 5) and torch.count_nonzero(logits) == 0
    nonzero = build_model(ModelConfig(backbone="vit_micro", zero_init_head=False), num_outputs=3)(_images())
    assert nonzero.shape == (2, 3) and torch.count_nonzero(nonzero) > 0


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt_wrapped", "transfer_model", "npz"])
def test_every_file_format_reproduces_the_source_backbone(tmp_path, fmt):
    src = _source()
    path = tmp_path / f"ckpt.{ 'npz' if fmt == 'npz' else 'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(src.state_dict(), str(path))
    elif fmt == "pt":
        torch.save(src.state_dict(), path)
    elif fmt == "pt_wrapped":  # DDP-style prefix inside a training-checkpoint container
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "step": 3}, path)
    elif fmt == "transfer_model":  # what Trainer.export writes for a model from build_model
        wrapped = build_model(ModelConfig(backbone="resnetv2_tiny", zero_init_head=False), num_outputs=20)
        wrapped.backbone.load_state_dict(src.state_dict())
        torch.save(wrapped.state_dict(), path)
    else:
        _bit_npz(src, path)
    model = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(path)), num_outputs=5).eval()
    x = _images()
    torch.testing.assert_close(_features(model, x), _features(src, x), rtol=0, atol=0)
    assert torch.count_nonzero(model(x)) == 0  # the 20-class upstream head was replaced by a zero 5-class head


def test_bit_npz_reader_agrees_with_timms_own_npz_loader(tmp_path):
    src = _source("resnetv2_small")
    path = tmp_path / "BiT-S-Rsmall.npz"
    _bit_npz(src, path)
    reference = timm.create_model("resnetv2_small", num_classes=20).eval()
    reference.load_pretrained(str(path))  # timm.models.resnetv2._load_weights
    ours = build_model(ModelConfig(backbone="resnetv2_small", pretrained=str(path)), num_outputs=20).eval()
    x = _images()
    torch.testing.assert_close(_features(ours, x), _features(reference, x), rtol=0, atol=0)


def test_vit_checkpoint_loads_at_a_new_resolution(tmp_path):
    src = _source("vit_micro")
    path = tmp_path / "vit.safetensors"
    save_file(src.state_dict(), str(path))
    cfg = ModelConfig(backbone="vit_micro", pretrained=str(path), kwargs={"img_size": 96})
    model = build_model(cfg, num_outputs=4)
    assert model(_images(size=96)).shape == (2, 4)
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_rgb_checkpoint_adapts_to_grayscale_input(tmp_path):
    path = tmp_path / "rgb.safetensors"
    save_file(_source().state_dict(), str(path))
    model = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(path), kwargs={"in_chans": 1}), 2)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 2)


@pytest.mark.parametrize("backbone", ["resnetv2_tiny", "vit_micro"])
def test_input_channels_are_those_the_first_layer_was_built_with(backbone):
    """timm leaves ``pretrained_cfg["input_size"]`` at 3 channels for ``in_chans=1``; the first layer knows."""
    for kwargs, channels in (({}, 3), ({"in_chans": 1}, 1)):
        model = build_model(ModelConfig(backbone=backbone, pretrained="scratch", kwargs=kwargs), 2, image_size=32)
        assert input_channels(model) == input_channels(model.backbone) == channels
        with torch.device("meta"):
            on_meta = build_model(ModelConfig(backbone=backbone, pretrained="scratch", kwargs=kwargs), 2)
        assert input_channels(on_meta) == channels


def test_wrong_architecture_names_the_first_mismatching_tensor(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file(_source("resnetv2_small").state_dict(), str(path))
    with pytest.raises(CheckpointMismatch, match=r"first mismatching tensor 'stem\.conv\.weight'.*\(24, 3, 7, 7\)"):
        build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(path)), num_outputs=5)
    partial = {k: v for k, v in _source().state_dict().items() if k != "norm.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointMismatch, match="lacks backbone tensor 'norm.bias'"):
        build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(tmp_path / "partial.safetensors")), 5)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _source().state_dict(), "cfg": ModelConfig()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(path)), 5)


# --------------------------------------------------------------------------------------------------------------
# Source resolution, the hub offline, bad input
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, pretrained, kind, location",
    [
        ("bit_r50x1", "scratch", "scratch", ""),
        ("BiT-R50x1", "bit-m", "hub", "resnetv2_50x1_bit.goog_in21k"),
        ("bit_r101x3", "hub", "hub", "resnetv2_101x3_bit.goog_in21k"),
        ("bit_r152x4", "in21k", "hub", "resnetv2_152x4_bit.goog_in21k"),
        ("bit_r152x2", "bit-s", "url", "https://storage.googleapis.com/bit_models/BiT-S-R152x2.npz"),
        ("bit_r50x3", "in1k", "url", "https://storage.googleapis.com/bit_models/BiT-S-R50x3.npz"),
        ("bit_r50x1", "hub:goog_in21k_ft_in1k", "hub", "resnetv2_50x1_bit.goog_in21k_ft_in1k"),
        ("vit_s16", "in1k", "hub", "vit_small_patch16_224.augreg_in1k"),
        ("vit_b16", "in21k", "hub", "vit_base_patch16_224.augreg_in21k"),
        ("vit_l16", "in21k-orig", "hub", "vit_large_patch16_224.orig_in21k"),
        ("vit_h14", "hub", "hub", "vit_huge_patch14_224.orig_in21k"),
        ("resnetv2_50x1_bit", "hub:resnetv2_50x1_bit.goog_in21k", "hub", "resnetv2_50x1_bit.goog_in21k"),
    ],
)
def test_sources_resolve_to_timm_tags_and_official_files(backbone, pretrained, kind, location):
    spec = W.resolve_source(resolve_backbone(backbone), pretrained)
    assert (spec.kind, spec.location) == (kind, location)


def test_named_source_can_be_a_user_file_that_keeps_its_metadata(tmp_path):
    path = tmp_path / "jft_r50x1.npz"
    path.write_bytes(b"")
    spec = W.resolve_source(resolve_backbone("bit_r50x1"), f"bit-l:{path}")
    assert spec.kind == "file" and spec.source.n_images == 300_000_000
    with pytest.raises(ValueError, match="never released.*bit-l:/path"):
        W.resolve_source(resolve_backbone("bit_r50x1"), "bit-l")


def test_weights_dir_is_the_offline_override_for_downloads(tmp_path):
    target = W.weights_dir() / "BiT-S-R50x1.npz"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"npz")
    assert W.fetch(W.resolve_source(resolve_backbone("bit_r50x1"), "bit-s")) == target
    hub = W.weights_dir() / "resnetv2_50x1_bit.goog_in21k.safetensors"
    hub.write_bytes(b"st")
    assert W.fetch(W.resolve_source(resolve_backbone("bit_r50x1"), "bit-m")) == hub


@pytest.mark.parametrize("offline_flag", [True, False])
@pytest.mark.parametrize("pretrained", ["bit-m", "bit-s"])
def test_hub_and_download_fail_fast_offline_with_instructions(monkeypatch, offline_flag, pretrained):
    from huggingface_hub import constants

    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # no offline flag, host does not resolve: the probe must fail fast instead of 46 s of retries
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("SCALING_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
        monkeypatch.setattr(
            W, "resolve_source", lambda p, s, _r=W.resolve_source: _swap_host(_r(p, s), "https://weights.invalid")
        )
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="local file") as err:
        build_model(ModelConfig(backbone="bit_r50x1", pretrained=pretrained), num_outputs=5)
    assert time.monotonic() - t0 < 10
    assert "SCALING_WEIGHTS_DIR" in str(err.value)


def _swap_host(spec, host):
    if spec.kind != "url":
        return spec
    return W.WeightSpec(spec.kind, host + "/bit_models/" + spec.location.rsplit("/", 1)[1], spec.source)


@pytest.mark.parametrize(
    "backbone, pretrained, message",
    [
        ("resnet_9000", "scratch", r"unknown backbone 'resnet_9000'.*bit_r50x1"),
        ("bit_r50x1", "imagenet", r"no pretraining source 'imagenet'.*bit-m"),
        ("vit_l16", "in1k", r"no pretraining source 'in1k'.*in21k"),
        ("bit_r50x1", "hub:nonexistent_tag", r"no pretrained weights.*goog_in21k"),
        ("resnetv2_tiny", "hub", r"has no hub weights"),
        ("resnetv2_tiny", "upstream:demo", r"study runner"),
        ("resnetv2_tiny", "/no/such/file.safetensors", r"not found"),
    ],
)
def test_bad_backbone_or_source_lists_the_valid_ones(backbone, pretrained, message):
    with pytest.raises((ValueError, WeightsUnavailable), match=message):
        build_model(ModelConfig(backbone=backbone, pretrained=pretrained), num_outputs=5)


# --------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, n_params, family, source, n_images",
    [
        ("bit_r50x1", 23_500_352, "resnetv2", "bit-m", 14_197_122),  # 25.55M with a 1000-class head (timm)
        ("bit_r101x3", 387_934_080 - 6_145_000, "resnetv2", "bit-s", 1_281_167),
        ("vit_s16", 21_665_664, "vit", "in1k", 1_281_167),
        ("resnetv2_tiny", 504_464, "resnetv2", "scratch", 0),
    ],
)
def test_model_info(backbone, n_params, family, source, n_images):
    info = model_info(backbone)
    assert info["family"] == family
    assert info["n_params"] == pytest.approx(n_params, rel=1e-3)
    assert info["sources"][source]["n_images"] == n_images


# --------------------------------------------------------------------------------------------------------------
# Family table and optimizer groups
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone, block", [("resnetv2_tiny", "PreActBottleneck"), ("vit_micro", "Block")])
def test_family_spec_names_blocks_no_wd_and_checkpointing(backbone, block):
    model = build_model(ModelConfig(backbone=backbone, zero_init_head=False), num_outputs=3)
    spec = family_spec(model)
    assert block in {c.__name__ for c in spec.block_classes}
    assert any(isinstance(m, spec.block_classes) for m in model.modules())
    names = dict(model.named_parameters())
    no_wd = spec.no_weight_decay(model)
    assert no_wd and no_wd <= set(names)
    assert all(names[n].ndim <= 1 for n in no_wd if "pos_embed" not in n and "cls_token" not in n)
    x = _images()
    model.train()
    ref = model(x)
    ref.sum().backward()
    ref_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    spec.set_grad_checkpointing(model, True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(model.parameters(), ref_grad):
        torch.testing.assert_close(p.grad, g)
    assert spec.group_matcher(model)


def test_family_spec_rejects_unknown_classes():
    with pytest.raises(ValueError, match="supported families"):
        family_spec(torch.nn.Linear(2, 2))


def test_a_timm_model_outside_the_table_gets_the_generic_row(tmp_path):
    from timm.models.resnet import BasicBlock

    from scaling.analysis.features import layer_names

    model = build_model(ModelConfig(backbone="resnet18", zero_init_head=False), num_outputs=2)
    spec = family_spec(model)
    assert spec.name == "timm:ResNet" and spec.block_classes == (BasicBlock,) and spec.filter_fn is None
    # CKA's layers: every BasicBlock of the four stages in forward order, then the pooled classifier input.
    assert layer_names(model) == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)] + ["pre_logits"]
    # Own weights load through the same path (head dropped, every other tensor copied).
    save_file(model.state_dict(), tmp_path / "resnet18.safetensors")
    again = build_model(ModelConfig(backbone="resnet18", pretrained=str(tmp_path)), num_outputs=5)
    torch.testing.assert_close(again.backbone.layer3[1].conv2.weight, model.backbone.layer3[1].conv2.weight)
    assert again.backbone.fc.out_features == 5
    # A stage that is a norm layer with an activation inside is no block (DenseNet's norm0 / norm5).
    assert [c.__name__ for c in family_spec(timm.create_model("densenet121")).block_classes] == ["DenseBlock"]


@pytest.mark.parametrize("name, blocks", [
    ("regnety_002", ["s1", "s2", "s3", "s4"]),  # feature_info lists the stem, a ConvNormAct, beside the stages
    ("inception_v3", ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b",
                      "Mixed_7c"]),
])
def test_the_generic_rule_takes_no_block_class_that_also_lives_inside_another_block(name, blocks):
    """Every convolution inside a RegNet stage or an Inception module is a ``ConvNormAct``, the class of a stem
    entry of ``feature_info``: it must not make each of them a CKA layer and a re-initialisation unit."""
    from scaling.analysis.features import layer_names
    from scaling.models.reinit import NECK, STEM, units

    with torch.device("meta"):
        model = timm.create_model(name, num_classes=2)
    assert layer_names(model) == [*blocks, "pre_logits"]
    table = units(model)
    assert list(table) == [STEM, *blocks, NECK]
    assert all(table[b] for b in blocks)  # every unit holds tensors: after:k / first:k count real blocks
    head = {"head.fc.weight", "head.fc.bias", "fc.weight", "fc.bias"}
    assert sorted(k for u in table.values() for k in u) == sorted(set(model.state_dict()) - head)


def test_register_family_adds_a_row_that_wins_over_the_generic_rule_and_parents():
    from timm.models.resnet import Bottleneck, ResNet
    from timm.models.vision_transformer import VisionTransformer

    from scaling.models.families import FAMILIES, FamilySpec, register_family

    class MyViT(VisionTransformer):
        pass

    rows = dict(FAMILIES)
    try:
        register_family(FamilySpec("resnet", ResNet, (Bottleneck,), None))
        assert family_spec(timm.create_model("resnet18")).block_classes == (Bottleneck,)
        register_family(FamilySpec("myvit", MyViT, (torch.nn.Linear,), None))
        assert family_spec(MyViT(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)).name == "myvit"
        assert family_spec(timm.create_model("vit_micro")).name == "vit"  # the parent keeps its row
        with pytest.raises(ValueError, match="already registered"):
            register_family(FamilySpec("resnet", ResNet, (torch.nn.Conv2d,), None))
        register_family(FamilySpec("resnet", ResNet, (torch.nn.Conv2d,), None), replace=True)
        assert family_spec(timm.create_model("resnet18")).block_classes == (torch.nn.Conv2d,)
    finally:
        FAMILIES.clear()
        FAMILIES.update(rows)


def test_own_module_without_blocks_is_told_to_pass_block_classes():
    from scaling.config import ShardingConfig
    from scaling.engine import Trainer
    from scaling.engine.sharding import block_classes_for

    own = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"pass Trainer\(\.\.\., block_classes=\(YourBlock,\)\)"):
        block_classes_for(own)
    # What a Trainer that needs the blocks (here per-block compile) says, before anything is compiled.
    with pytest.raises(ValueError, match=r"Sequential is neither a timm model nor in the family table.*"
                                         r"block_classes=\(YourBlock,\)"):
        Trainer(own, TrainConfig(batch_size=4, steps=1, compile="blocks"), ShardingConfig(strategy="none"))
    assert block_classes_for(timm.create_model("resnet18"))[0].__name__ == "BasicBlock"


def test_param_groups_no_decay_on_norms_and_layer_decay_scales():
    model = build_model(ModelConfig(backbone="vit_micro"), num_outputs=3)
    groups = param_groups(model, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75))
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["backbone.pos_embed"])]["weight_decay"] == 0
    assert by_param[id(named["backbone.blocks.0.norm1.weight"])]["weight_decay"] == 0
    assert by_param[id(named["backbone.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    head, first = by_param[id(named["backbone.head.weight"])], by_param[id(named["backbone.patch_embed.proj.weight"])]
    assert head["lr_scale"] == 1.0 and first["lr_scale"] == pytest.approx(0.75 ** 5)
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(named)
    flat = param_groups(model, TrainConfig())
    assert {g["lr_scale"] for g in flat} == {1.0} and {g["weight_decay"] for g in flat} == {0.0}


def test_build_optimizer_kinds():
    model = build_model(ModelConfig(), num_outputs=3)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.003))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3)), torch.optim.AdamW)


@pytest.mark.parametrize(
    "backbone, pretrained, ok",
    [
        ("vit_l16", "in1k", False),
        ("vit_l16", "in21k", True),
        ("vit_s16", "in1k", True),
        ("bit_r50x1", "in1k", True),
        ("bit_r50x1", "bit-l", False),
        ("bit_r50x1", "bit-l:/data/jft.npz", True),
        ("resnetv2_tiny", "upstream:fractal_small", True),
        ("resnetv2_tiny", "hub", False),
        ("resnetv2_tiny", "scratch", True),
    ],
)
def test_has_source_marks_grid_cells_without_public_weights(backbone, pretrained, ok):
    from scaling.models import has_source

    assert has_source(backbone, pretrained) is ok


def test_vit_image_size_is_passed_and_tiny_vits_take_any_size():
    model = build_model(ModelConfig(backbone="vit_micro"), num_outputs=2, image_size=32)
    assert model.backbone.patch_embed.img_size == (32, 32)
    assert build_model(ModelConfig(backbone="vit_mini"), 2)(_images(size=48)).shape == (2, 2)
    assert build_model(ModelConfig(backbone="resnetv2_tiny"), 2, image_size=32)(_images(size=32)).shape == (2, 2)


def test_meta_device_build_reads_no_weights(tmp_path):
    unreadable = tmp_path / "not_really.safetensors"
    unreadable.write_bytes(b"garbage")
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone="resnetv2_small", pretrained=str(unreadable)), num_outputs=4)
    assert all(p.is_meta for p in model.parameters())
    assert model.backbone.get_classifier().weight.shape[0] == 4


def test_online_hub_path_reads_the_cache_first_then_downloads(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(W, "_reachable", lambda url, timeout=W.PROBE_TIMEOUT_S: True)
    calls = []

    def fake_download(repo, filename, local_files_only=False, **kw):
        calls.append((repo, filename, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = W.fetch(W.resolve_source(resolve_backbone("bit_r50x1"), "bit-m"))
    assert path == tmp_path / "model.safetensors"
    repo = "timm/resnetv2_50x1_bit.goog_in21k"
    assert calls == [(repo, "model.safetensors", True), (repo, "pytorch_model.bin", True), (repo, "model.safetensors", False)]


def test_online_url_download_is_atomic_into_the_weights_dir(monkeypatch):
    import io
    import urllib.request

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(W, "_reachable", lambda url, timeout=W.PROBE_TIMEOUT_S: True)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"npz-bytes"))
    path = W.fetch(W.resolve_source(resolve_backbone("bit_r101x3"), "bit-s"))
    assert path == W.weights_dir() / "BiT-S-R101x3.npz" and path.read_bytes() == b"npz-bytes"
    assert [p.name for p in path.parent.iterdir()] == ["BiT-S-R101x3.npz"]  # no partial file left behind


# --------------------------------------------------------------------------------------------------------------
# One source, one file per backbone (a weight directory)
# --------------------------------------------------------------------------------------------------------------


def test_source_directory_finds_the_official_bit_file_of_each_backbone(tmp_path):
    for name in ("BiT-L-R50x1.npz", "BiT-L-R101x3.npz", "BiT-M-R50x1.npz"):
        (tmp_path / name).write_bytes(b"")
    for backbone, expected in (("bit_r50x1", "BiT-L-R50x1.npz"), ("BiT-R101x3", "BiT-L-R101x3.npz")):
        spec = W.resolve_source(resolve_backbone(backbone), f"bit-l:{tmp_path}")
        assert spec.kind == "file" and Path(spec.location).name == expected
        assert spec.source.name == "bit-l" and spec.source.n_images == 300_000_000  # metadata kept
    assert Path(W.resolve_source(resolve_backbone("bit_r50x1"), f"in21k:{tmp_path}").location).name == "BiT-M-R50x1.npz"
    with pytest.raises(WeightsUnavailable, match=r"no file for backbone 'bit_r152x4'.*'BiT-L-R152x4\.npz', "
                                                  r"'bit_r152x4\.safetensors'.*present: \['BiT-L-R101x3\.npz'"):
        W.resolve_source(resolve_backbone("bit_r152x4"), f"bit-l:{tmp_path}")


def test_plain_directory_serves_every_backbone_of_a_grid(tmp_path):
    sources = {"resnetv2_tiny": _source("resnetv2_tiny"), "vit_micro": _source("vit_micro")}
    save_file(sources["resnetv2_tiny"].state_dict(), str(tmp_path / "resnetv2_tiny.safetensors"))
    torch.save(sources["vit_micro"].state_dict(), tmp_path / "vit_micro.pt")
    x = _images()
    for backbone, src in sources.items():
        model = build_model(ModelConfig(backbone=backbone, pretrained=str(tmp_path)), num_outputs=2).eval()
        torch.testing.assert_close(_features(model, x), _features(src, x), rtol=0, atol=0)
    with pytest.raises(WeightsUnavailable, match=r"looked for \['resnetv2_small\.safetensors'"):
        build_model(ModelConfig(backbone="resnetv2_small", pretrained=str(tmp_path)), num_outputs=2)


def test_a_label_of_ones_own_names_a_weight_directory_and_a_missing_one_is_named(tmp_path):
    """``<label>:<dir>`` loads the backbone's file from the directory (also ``bit-l:`` on a non-BiT backbone, which
    has no such source); a path that does not exist is named as such, not as the whole source string."""
    model = build_model(ModelConfig(backbone="resnetv2_tiny", zero_init_head=False), num_outputs=2)
    (tmp_path / "w").mkdir()
    save_file(model.state_dict(), tmp_path / "w" / "resnetv2_tiny.safetensors")
    for source in (f"mypre:{tmp_path / 'w'}", f"bit-l:{tmp_path / 'w'}"):
        spec = W.resolve_source(resolve_backbone("resnetv2_tiny"), source)
        assert (spec.kind, spec.location) == ("file", str(tmp_path / "w" / "resnetv2_tiny.safetensors"))
        again = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=source), num_outputs=3)
        torch.testing.assert_close(again.backbone.stem.conv.weight, model.backbone.stem.conv.weight)
    assert W.resolve_source(resolve_backbone("resnetv2_tiny"), f"mypre:{tmp_path / 'w'}").name == "mypre"
    with pytest.raises(W.WeightsUnavailable, match=rf"weight file or directory not found: {tmp_path}/nope "
                                                   rf"\(from 'mypre:{tmp_path}/nope'\)"):
        W.resolve_source(resolve_backbone("resnetv2_tiny"), f"mypre:{tmp_path}/nope")


@pytest.mark.parametrize("backbone, kwargs, mean, std", [
    ("bit_r50x1", {}, (0.5,) * 3, (0.5,) * 3),                         # big_transfer: (x - 0.5) / 0.5
    ("vit_b16", {}, (0.5,) * 3, (0.5,) * 3),                           # AugReg / original ViT weights
    ("resnet18", {}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),    # ImageNet-trained torchvision-style CNN
    ("resnet18", {"in_chans": 1}, (0.449,), (0.226,)),                 # one channel: the mean of the three
])
def test_input_normalisation_is_what_the_weights_were_trained_with(backbone, kwargs, mean, std):
    from scaling.models import input_normalisation

    model = build_model(ModelConfig(backbone=backbone, pretrained="scratch", kwargs=kwargs), num_outputs=2)
    got_mean, got_std = input_normalisation(model)
    assert np.allclose(got_mean, mean, atol=1e-3) and np.allclose(got_std, std, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# An official-layout BiT .npz against big_transfer's forward pass, written out in NumPy
# --------------------------------------------------------------------------------------------------------------


def _np_std_conv(x, w_hwio, stride=1, pad=0):
    """big_transfer ``StdConv2d`` on ``x`` [B, C, H, W]: the HWIO kernel standardised per output channel (biased
    variance, eps 1e-10), then a plain convolution."""
    w = w_hwio.transpose(3, 2, 0, 1)
    w = (w - w.mean(axis=(1, 2, 3), keepdims=True)) / np.sqrt(w.var(axis=(1, 2, 3), keepdims=True) + 1e-10)
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", win, w)


def _np_gn_relu(x, gamma, beta, groups):
    """GroupNorm (eps 1e-5) with its affine terms, then ReLU: every pre-activation norm of BiT's ResNetV2."""
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    return np.maximum(g.reshape(b, c, h, w) * gamma[None, :, None, None] + beta[None, :, None, None], 0)


def _np_bit_features(npz, x, groups):
    """Pooled pre-logit features of a BiT ResNetV2 read from an official ``.npz`` (big_transfer
    ``bit_pytorch/models.py``: root conv 7x7/2, zero pad 1, max pool 3/2; pre-activation bottleneck units whose
    projection takes the pre-activated input and whose 3x3 conv carries the stride; final GroupNorm + ReLU)."""
    p = "resnet/"
    x = _np_std_conv(x, npz[f"{p}root_block/standardized_conv2d/kernel"], stride=2, pad=3)
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    x = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-1, -2))
    for block in range(1, 5):
        for unit in range(1, 100):
            u = f"{p}block{block}/unit{unit:02d}/"
            if f"{u}a/standardized_conv2d/kernel" not in npz:
                break
            stride = 2 if block > 1 and unit == 1 else 1
            out = _np_gn_relu(x, npz[f"{u}a/group_norm/gamma"], npz[f"{u}a/group_norm/beta"], groups)
            proj = f"{u}a/proj/standardized_conv2d/kernel"
            residual = _np_std_conv(out, npz[proj], stride=stride) if proj in npz else x
            out = _np_std_conv(out, npz[f"{u}a/standardized_conv2d/kernel"])
            out = _np_gn_relu(out, npz[f"{u}b/group_norm/gamma"], npz[f"{u}b/group_norm/beta"], groups)
            out = _np_std_conv(out, npz[f"{u}b/standardized_conv2d/kernel"], stride=stride, pad=1)
            out = _np_gn_relu(out, npz[f"{u}c/group_norm/gamma"], npz[f"{u}c/group_norm/beta"], groups)
            x = _np_std_conv(out, npz[f"{u}c/standardized_conv2d/kernel"]) + residual
    x = _np_gn_relu(x, npz[f"{p}group_norm/gamma"], npz[f"{p}group_norm/beta"], groups)
    return x.mean(axis=(2, 3))


def test_an_official_bit_npz_loads_to_big_transfers_forward_pass(tmp_path):
    """A .npz written key by key in the official BiT layout (HWIO kernels, ``blockN/unitMM/{a,b,c}``, ``a/proj``,
    a 1000-class ``head/conv2d``), with random weights drawn without timm, is converted and loaded into the BiT-style
    ``resnetv2_tiny``; its pooled features equal a NumPy forward pass of big_transfer's model to 1e-5, and the
    upstream head is replaced by a zero head."""
    rng = np.random.default_rng(0)
    stem, widths, units, groups = 16, (64, 128, 256, 512), (1, 1, 1, 1), 8   # resnetv2_tiny's geometry

    def kernel(k, cin, cout):
        return rng.normal(0, 1, (k, k, cin, cout)).astype(np.float32)

    def norm(c):
        return rng.normal(1, 0.2, c).astype(np.float32), rng.normal(0, 0.2, c).astype(np.float32)

    p, npz, cin = "resnet/", {}, stem
    npz[f"{p}root_block/standardized_conv2d/kernel"] = kernel(7, 3, stem)
    for block, (cout, n) in enumerate(zip(widths, units), start=1):
        mid = cout // 4
        for unit in range(1, n + 1):
            u = f"{p}block{block}/unit{unit:02d}/"
            for sub, (k, ci, co) in zip("abc", [(1, cin, mid), (3, mid, mid), (1, mid, cout)]):
                npz[f"{u}{sub}/standardized_conv2d/kernel"] = kernel(k, ci, co)
                npz[f"{u}{sub}/group_norm/gamma"], npz[f"{u}{sub}/group_norm/beta"] = norm(ci)
            if unit == 1:
                npz[f"{u}a/proj/standardized_conv2d/kernel"] = kernel(1, cin, cout)
            cin = cout
    npz[f"{p}group_norm/gamma"], npz[f"{p}group_norm/beta"] = norm(cin)
    npz[f"{p}head/conv2d/kernel"] = kernel(1, cin, 1000)
    npz[f"{p}head/conv2d/bias"] = rng.normal(0, 1, 1000).astype(np.float32)
    path = tmp_path / "BiT-S-Rtiny.npz"
    np.savez(path, **npz)

    model = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(path)), num_outputs=5).eval()
    x = _images(size=32).double().numpy()
    expected = _np_bit_features({k: v.astype(np.float64) for k, v in npz.items()}, x, groups)
    # float64, so that what is compared is the conversion, not float32 rounding (1e-5 apart over 13 layers)
    got = _features(model.double(), torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (2, 512)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert torch.count_nonzero(model(torch.from_numpy(x))) == 0


@pytest.mark.parametrize("source, mean", [("in21k", 0.5), ("hub:mae", 0.485), ("hub:dino", 0.485)])
def test_a_hub_source_is_normalised_as_its_own_tag(source, mean):
    """ViT-B/16's AugReg weights expect [-1, 1] inputs, its MAE and DINO weights ImageNet's statistics (timm's
    pretrained_cfg of each tag). Built on the meta device: no weights are fetched."""
    from scaling.models import input_normalisation

    with torch.device("meta"):
        model = build_model(ModelConfig(backbone="vit_b16", pretrained=source), num_outputs=2)
    assert input_normalisation(model)[0][0] == pytest.approx(mean)

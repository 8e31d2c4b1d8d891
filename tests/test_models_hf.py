"""Hugging Face encoders as backbones (``hf:<dir>``), offline, on tiny models saved in the real format."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from toy import ToyDataset  # noqa: E402

from scaling.config import ModelConfig, ShardingConfig, TrainConfig  # noqa: E402
from scaling.models import WeightsUnavailable, build_model, family_spec, has_source, model_info  # noqa: E402
from scaling.models.optim import param_groups  # noqa: E402
from scaling.models.presets import missing_source_hint  # noqa: E402


def tiny_hf_dir(root: Path, kind: str = "vit", seed: int = 0) -> Path:
    """Save a tiny ViT or DINOv2 with ``save_pretrained`` (config.json + model.safetensors) and return the dir."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    if kind == "vit":
        model = ViTModel(ViTConfig(intermediate_size=64, **common), add_pooling_layer=False)
    else:
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, **common))
    with torch.no_grad():  # non-trivial norms, so a wrong load cannot pass for a fresh init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = root / f"tiny_{kind}"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["vit", "dinov2"])
def hf_dir(request, tmp_path_factory):
    return tiny_hf_dir(tmp_path_factory.mktemp("hf"), request.param)


def _images(n=4, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_saved_in_the_real_format(hf_dir):
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_hf_backbone_loads_the_checkpoint_and_heads_its_class_token(hf_dir):
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(hf_dir).eval()
    model = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf", zero_init_head=False), 3).eval()
    enc = model.backbone.encoder.state_dict()
    for k, v in ref.state_dict().items():
        if k in enc:
            assert torch.equal(enc[k], v), k
    x = _images()
    with torch.no_grad():
        cls = ref(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(model(x), model.backbone.head(cls))
        assert model(_images(size=48)).shape == (4, 3)  # other resolutions: position embeddings interpolated
    zero = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf"), 3)
    assert torch.count_nonzero(zero(x)) == 0  # BiT's zero head, as for timm backbones
    assert model.num_outputs == 3 and model.data_config["input_size"] == (3, 32, 32)


def test_scratch_is_the_same_architecture_without_the_weights(hf_dir):
    pre = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf"), 2)
    scratch = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="scratch"), 2)
    a, b = pre.backbone.encoder.state_dict(), scratch.backbone.encoder.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["embeddings.patch_embeddings.projection.weight"],
                           b["embeddings.patch_embeddings.projection.weight"])


def test_input_channels_follow_the_encoders_config(hf_dir):
    from scaling.models import input_channels

    gray = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="scratch", kwargs={"num_channels": 1}), 2)
    assert input_channels(build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf"), 2)) == 3
    assert input_channels(gray) == 1


@pytest.mark.parametrize("location", ["/nonexistent/rad-dino", "./no-such-model", "../no-such-model",
                                      "~/no-such-model-here"])
def test_a_local_path_that_is_not_a_directory_is_named_at_once(location, tmp_path):
    """Written as a path, an ``hf:`` location is a directory: a missing one is said to be missing, not passed to the
    hub as a malformed repo id (which took seconds and never mentioned the directory)."""
    for call in (lambda: build_model(ModelConfig(backbone=f"hf:{location}", pretrained="hf"), 2),
                 lambda: model_info(f"hf:{location}")):
        with pytest.raises(WeightsUnavailable, match=rf"^directory not found: {re.escape(location)} "):
            call()
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsUnavailable, match=rf"^not a directory: {re.escape(str(tmp_path / 'file'))} "):
        build_model(ModelConfig(backbone=f"hf:{tmp_path / 'file'}", pretrained="hf"), 2)


def test_skip_hints_for_hugging_face_pairs_never_offer_a_file():
    """A Hugging Face checkpoint is its own architecture, so no file fixes an hf x timm pair; a named timm source
    without public weights does take one."""
    assert missing_source_hint("resnetv2_tiny", "hf") == missing_source_hint("bit_r50x1", "hf:/w/rad-dino") == (
        "Hugging Face weights come with their own architecture: list 'hf:<repo or directory>' in grid.backbones, "
        "with pretrained 'hf'")
    assert missing_source_hint("hf:/w/rad-dino", "bit-m") == \
        "an 'hf:' backbone takes pretrained 'hf' (its own weights) or 'scratch'"
    assert missing_source_hint("vit_l16", "in1k") == "give a file as 'in1k:<path>'"


def test_family_row_optimizer_groups_and_checkpointing(hf_dir):
    from scaling.engine.sharding import blocks_of

    model = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf", zero_init_head=False), 3)
    spec = family_spec(model)
    kind = model.backbone.model_type
    assert spec.name == f"hf_{kind}" and spec.block_classes[0].__name__ == {"vit": "ViTLayer", "dinov2": "Dinov2Layer"}[kind]
    assert len(blocks_of(model, spec.block_classes)) == 2  # one FSDP unit per encoder layer
    no_wd = spec.no_weight_decay(model)
    assert "backbone.encoder.embeddings.cls_token" in no_wd and "backbone.encoder.embeddings.position_embeddings" in no_wd
    groups = param_groups(model, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["backbone.head.weight"])] == 1.0
    layers = model.backbone.layer_prefix()
    assert scale[id(named["backbone.encoder.embeddings.cls_token"])] == pytest.approx(0.5 ** 3)
    last_layer = [scale[id(p)] for n, p in named.items() if n.startswith(f"backbone.{layers}.1.")]
    assert len(last_layer) > 4 and last_layer == pytest.approx([0.5] * len(last_layer))
    assert scale[id(named["backbone.encoder.layernorm.weight"])] == pytest.approx(0.5)  # with the last layer
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    if kind == "dinov2":
        assert "backbone.encoder.embeddings.mask_token" not in trainable  # unused outside masked pretraining
    x = _images()
    model.train()
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())  # every trainable parameter is used (DDP needs it)
    model.zero_grad()
    spec.set_grad_checkpointing(model, True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n])


def test_trainer_fine_tunes_and_reinit_uses_transformers_init(hf_dir):
    from scaling.engine import Trainer
    from scaling.models.reinit import reinit_first, units

    model = build_model(ModelConfig(backbone=f"hf:{hf_dir}", pretrained="hf"), 3)
    layers = model.backbone.layer_prefix()  # encoder.layers (ViT) / encoder.encoder.layer (DINOv2), transformers 5
    table = units(model)
    assert list(table) == ["stem", f"{layers}.0", f"{layers}.1", "neck"]
    pretrained = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    reinit_first(model, 2, seed=3)
    fresh = model.backbone.fresh(3).state_dict()
    own = model.backbone.state_dict()
    assert "encoder.embeddings.cls_token" in table["stem"] and table["neck"] == ["encoder.layernorm.weight",
                                                                                "encoder.layernorm.bias"]
    for key in own:
        reinit = key in table["stem"] or key in table[f"{layers}.0"]
        if not key.startswith("head"):
            assert torch.equal(own[key], fresh[key] if reinit else pretrained[key]), key
    trainer = Trainer(model, TrainConfig(batch_size=8, steps=3, lr=0.01, warmup_steps=1, log_every=1),
                      ShardingConfig(strategy="none"))
    summary = trainer.fit(ToyDataset(24))
    out = trainer.predict(ToyDataset(10, seed=1), batch_size=4)
    trainer.close()
    assert summary["steps"] == 3 and out["logits"].shape == (10, 3)


def test_sources_metadata_and_errors(hf_dir, tmp_path):
    name = f"hf:{hf_dir}"
    assert has_source(name, "hf") and has_source(name, "scratch") and has_source(name, name)
    assert not has_source(name, "in21k") and not has_source("resnetv2_tiny", name)
    info = model_info(name)
    direct = build_model(ModelConfig(backbone=name, pretrained="hf"), 2).backbone.encoder
    assert info["family"] == "hf" and info["n_params"] == sum(p.numel() for p in direct.parameters())
    with pytest.raises(ValueError, match="brings its own architecture.*model.backbone"):
        build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=name), 2)
    with pytest.raises(ValueError, match="takes pretrained 'hf'"):
        build_model(ModelConfig(backbone=name, pretrained="in21k"), 2)
    (tmp_path / "empty").mkdir()  # transformers 4.x took "mpt" from its name for a model type
    with pytest.raises(WeightsUnavailable, match="no config.json in directory .*empty.*local directory holding"):
        build_model(ModelConfig(backbone=f"hf:{tmp_path / 'empty'}", pretrained="hf"), 2)
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    with pytest.raises(ValueError, match=r"model type 'bert' has no family row; supported: \['dinov2', 'vit'\]"):
        build_model(ModelConfig(backbone=f"hf:{tmp_path / 'bert'}", pretrained="scratch"), 2)


def test_an_encoder_is_normalised_with_its_own_preprocessor_statistics(tmp_path, monkeypatch, caplog):
    """A directory's ``preprocessor_config.json`` (RAD-DINO's values), a hub repo's from the Hugging Face cache, and
    ImageNet's with a warning when neither is on disk; ``input_normalisation`` is what the study feeds the model."""
    import json

    from huggingface_hub import constants

    from scaling.models import input_normalisation

    rad_dino = {"image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583]}
    local = tiny_hf_dir(tmp_path / "local")
    (local / "preprocessor_config.json").write_text(json.dumps(rad_dino))
    model = build_model(ModelConfig(backbone=f"hf:{local}", pretrained="scratch"), 2)
    assert input_normalisation(model) == (tuple(rad_dino["image_mean"]), tuple(rad_dino["image_std"]))

    # a hub repo: its files in the Hugging Face cache layout (refs/main -> snapshots/<commit>/)
    cache = tmp_path / "hf"
    repo = cache / "models--acme--cxr-encoder"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((tiny_hf_dir(tmp_path / "hub") / name).read_bytes())
    (snapshot / "preprocessor_config.json").write_text(json.dumps(rad_dino))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # transformers 4.x keeps its own copy of the cache path, read when it is imported
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(cache), raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = build_model(ModelConfig(backbone="hf:acme/cxr-encoder", pretrained="scratch"), 2)
    assert input_normalisation(hub)[1] == tuple(rad_dino["image_std"])

    bare = tiny_hf_dir(tmp_path / "bare")
    with caplog.at_level("WARNING", logger="scaling.models.hf"):
        plain = build_model(ModelConfig(backbone=f"hf:{bare}", pretrained="scratch"), 2)
    assert input_normalisation(plain) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert "no preprocessor_config.json" in caplog.text

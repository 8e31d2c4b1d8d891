"""Block re-initialisation (Raghu et al. 2019): re-initialised units equal a fresh init, the rest stay pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from scaling.config import ModelConfig
from scaling.models import build_model
from scaling.models.reinit import NECK, STEM, mean_var_init, reinit_after, reinit_first, units


def _upstream(name, path):
    """A pretrained-looking checkpoint: random weights with perturbed norms, saved as safetensors."""
    torch.manual_seed(123)
    src = timm.create_model(name, num_classes=7)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_file(src.state_dict(), str(path))
    return src.state_dict()


@pytest.mark.parametrize("name, first_block, n_units", [("resnetv2_tiny", "stages.0.blocks.0", 6),
                                                         ("vit_micro", "blocks.0", 6)])
@pytest.mark.parametrize("direction", ["first", "after"])
def test_reinitialised_units_equal_a_fresh_init_and_the_rest_stay_pretrained(tmp_path, name, first_block, n_units,
                                                                              direction):
    pretrained = _upstream(name, tmp_path / "up.safetensors")
    model = build_model(ModelConfig(backbone=name, pretrained=str(tmp_path / "up.safetensors")), num_outputs=3)
    table = units(model)
    assert list(table)[:2] == [STEM, first_block] and list(table)[-1] == NECK and len(table) == n_units
    head_before = {k: v.clone() for k, v in model.backbone.get_classifier().state_dict().items()}
    rng_before = torch.random.get_rng_state()
    done = reinit_first(model, 2, seed=5) if direction == "first" else reinit_after(model, 2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the run's own seeding is untouched
    # Independent reference: timm's own init under the same seed, built directly.
    torch.manual_seed(5)
    fresh = timm.create_model(name, num_classes=3).state_dict()
    own = model.backbone.state_dict()
    reinit_keys = {k for u in done for k in table[u]}
    assert done == (list(table)[:2] if direction == "first" else list(table)[2:])
    for key, value in own.items():
        if key.startswith("head"):
            continue
        expected = fresh[key] if key in reinit_keys else pretrained[key]
        assert torch.equal(value, expected), key
        assert not torch.equal(fresh[key], pretrained[key]), key  # the two references really differ
    for k, v in model.backbone.get_classifier().state_dict().items():
        assert torch.equal(v, head_before[k])  # the new zero head is left as built
    if direction == "first":
        assert "patch_embed.proj.weight" in reinit_keys or "stem.conv.weight" in reinit_keys


def test_reinit_all_units_is_a_scratch_model_and_bad_k_is_refused(tmp_path):
    _upstream("resnetv2_tiny", tmp_path / "up.safetensors")
    model = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(tmp_path / "up.safetensors")), 3)
    reinit_first(model, len(units(model)), seed=0)
    torch.manual_seed(0)
    scratch = build_model(ModelConfig(backbone="resnetv2_tiny"), 3)
    for (k, a), b in zip(model.state_dict().items(), scratch.state_dict().values()):
        assert torch.equal(a, b), k
    assert reinit_first(model, 0) == []
    with pytest.raises(ValueError, match="k=7 must be between 0 and the number of units, 6"):
        reinit_first(model, 7)
    with pytest.raises(TypeError, match="build_model"):
        reinit_first(timm.create_model("resnetv2_tiny"), 1)


# ----------------------------------------------------------------------------------------------------------------
# Mean Var init (Raghu et al. 2019, §5): each tensor drawn i.i.d. with the pretrained tensor's mean and variance
# ----------------------------------------------------------------------------------------------------------------


def _mean_var(path, name="resnetv2_tiny", seed=0):
    return build_model(ModelConfig(backbone=name, pretrained=f"meanvar:{path}"), num_outputs=3, seed=seed)


@pytest.mark.parametrize("name", ["resnetv2_tiny", "vit_micro"])
def test_mean_var_init_draws_each_tensor_with_its_pretrained_mean_and_variance(tmp_path, name):
    pretrained = _upstream(name, tmp_path / "up.safetensors")
    model = _mean_var(tmp_path / "up.safetensors", name, seed=3)
    own = model.backbone.state_dict()
    head = {k for k in own if k.startswith("head")}
    params = {n for n, _ in model.backbone.named_parameters()}
    assert model.mean_var_tensors == [n for n, _ in model.backbone.named_parameters() if n not in head]
    assert {"norm.weight", "norm.bias"} <= set(model.mean_var_tensors)  # norms are drawn too, not kept
    if name == "vit_micro":
        assert {"pos_embed", "cls_token", "patch_embed.proj.bias"} <= set(model.mean_var_tensors)
    for key in head:
        assert not own[key].any(), key  # the new head stays zero-initialised
    for key in params - head:
        ref, got = pretrained[key].double().flatten(), own[key].double().flatten()
        n = ref.numel()
        # NumPy's population statistics of the pretrained tensor, the draw's by torch: the sample mean is within
        # 5 standard errors (sd / sqrt(n)), the sample sd within 5 of its own (about sd / sqrt(2n)).
        mean, sd = float(np.mean(ref.numpy())), float(np.std(ref.numpy()))
        assert abs(float(got.mean()) - mean) < 5 * sd / n ** 0.5 + 1e-12, key
        if n > 1:
            assert abs(float(got.std(correction=0)) - sd) < 5 * sd / (2 * n) ** 0.5 + 1e-12, key
        else:
            assert torch.equal(got, ref), key  # one element: variance 0, the value itself
        if n >= 200:  # the features are gone: no correlation with the pretrained values beyond chance (4.5 / sqrt(n))
            corr = np.corrcoef(ref.numpy(), got.numpy())[0, 1]
            assert abs(corr) < 4.5 / n ** 0.5, (key, corr)


def test_mean_var_init_is_its_seeds_alone(tmp_path):
    _upstream("resnetv2_tiny", tmp_path / "up.safetensors")
    a, b, c = (_mean_var(tmp_path / "up.safetensors", seed=s).backbone.state_dict() for s in (0, 0, 1))
    drawn = [k for k in a if not k.startswith("head")]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in drawn if a[k].numel() > 1 and a[k].std() > 0)
    torch.manual_seed(99)  # another global RNG state changes nothing, and the draw leaves it as it was
    loaded = build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=str(tmp_path / "up.safetensors")), 3)
    rng_before = torch.random.get_rng_state()
    assert mean_var_init(loaded, seed=0) == [k for k in drawn if k in dict(loaded.backbone.named_parameters())]
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(torch.equal(a[k], v) for k, v in loaded.backbone.state_dict().items())
    # not the scratch init of the same seed, rescaled: the draw has its own stream
    torch.manual_seed(0)
    fresh = timm.create_model("resnetv2_tiny", num_classes=3).state_dict()
    stem = "stem.conv.weight"
    corr = np.corrcoef(fresh[stem].flatten().numpy(), a[stem].flatten().numpy())[0, 1]
    assert abs(corr) < 4.5 / a[stem].numel() ** 0.5


def test_mean_var_init_resets_batchnorm_statistics_and_refuses_what_has_none(tmp_path):
    src = timm.create_model("resnet18", num_classes=5)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(1, 2)
                m.running_var.uniform_(3, 4)
                m.num_batches_tracked.fill_(7)
    save_file(src.state_dict(), str(tmp_path / "r18.safetensors"))
    model = _mean_var(tmp_path / "r18.safetensors", "resnet18")
    bn = model.backbone.bn1
    assert torch.equal(bn.running_mean, torch.zeros(64)) and torch.equal(bn.running_var, torch.ones(64))
    assert int(bn.num_batches_tracked) == 0 and "bn1.weight" in model.mean_var_tensors
    for bad in ("meanvar:scratch", "meanvar:meanvar:bit-m", "meanvar:"):
        with pytest.raises(ValueError, match="statistics of pretrained weights"):
            build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=bad), num_outputs=3)
    with torch.device("meta"):  # the study's checks build on the meta device: nothing to draw, nothing read
        meta = build_model(ModelConfig(backbone="resnet18", pretrained=f"meanvar:{tmp_path}/r18.safetensors"), 3)
    assert meta.mean_var_tensors == []

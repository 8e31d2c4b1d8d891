"""Block re-initialisation (Raghu et al. 2019): re-initialised units equal a fresh init, the rest stay pretrained."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from scaling.config import ModelConfig
from scaling.models import build_model
from scaling.models.reinit import NECK, STEM, reinit_after, reinit_first, units


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

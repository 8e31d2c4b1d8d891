"""The shipped study configs load, and every grid cell names a backbone and weight source that resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaling.config import load_config
from scaling.engine.schedule import mixup_alpha, total_steps
from scaling.models import has_source, model_info, resolve_backbone, resolve_source

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
STUDIES = ["chexpert_bit", "chexpert_vit", "derm_isic", "mammo_vindr"]


@pytest.mark.parametrize("name", STUDIES)
def test_study_config_loads_and_its_grid_resolves(name):
    path = CONFIGS / f"{name}.yaml"
    header = path.read_text().split("\nname:")[0]
    for topic in ("Reproduces", "Hardware", "Expected time", "Data you need"):
        assert topic in header, f"{path.name} header lacks {topic!r}"
    cfg = load_config(path)
    assert cfg.name == name
    cells = [(b, p) for b in cfg.grid.backbones for p in cfg.grid.pretrained]
    runnable = [(b, p) for b, p in cells if has_source(b, p)]
    assert len(runnable) >= len(cells) - 1  # at most the one documented cell without public weights
    for b, p in runnable:
        spec = resolve_source(resolve_backbone(b), p)
        assert spec.kind in ("hub", "url") and spec.source.n_images >= 1_281_167
        assert model_info(b)["family"] in ("resnetv2", "vit")


@pytest.mark.parametrize(
    "name, n_train, steps, alpha",
    [("chexpert_bit", 2_000, 500, 0.0), ("chexpert_bit", 180_000, 10_000, 0.1), ("derm_isic", 19_000, 500, 0.0)],
)
def test_hyperrule_configs_scale_length_and_mixup_with_the_fraction(name, n_train, steps, alpha):
    train = load_config(CONFIGS / f"{name}.yaml").train
    assert (total_steps(train, n_train), mixup_alpha(train, n_train)) == (steps, alpha)
    assert train.batch_size % train.grad_accum == 0 and train.weight_decay == 0.0

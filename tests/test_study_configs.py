"""The real study configs on fixture data in the datasets' real formats: --dry-run plans every cell, and a
smoke variant (tiny backbone, a few steps, no sharding) trains and evaluates end to end through the same runner."""

from pathlib import Path

import pytest

from scaling.config import compose, load_config
from dataset_fixtures import write_fixture
from scaling.demo.synthetic import write_synthetic_chexpert
from scaling.study.runner import plan, run_study
from scaling.study.store import RunStore

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
STUDIES = ["chexpert_bit", "chexpert_vit", "derm_isic", "mammo_vindr"]


def _data(tmp: Path, dataset: str) -> Path:
    root = tmp / dataset
    if not root.exists():
        if dataset == "chexpert":
            write_synthetic_chexpert(root, n_patients=60, seed=0, image_size=48)
        else:
            write_fixture(dataset, root, seed=0, n=40)
    return root


def _point_at_fixtures(name: str, tmp: Path) -> list[str]:
    """Dotted overrides that point the config's training set and every OOD set at fixture data."""
    d = compose(CONFIGS / f"{name}.yaml")["data"]
    ov = [f"output_dir={tmp / 'store'}", f"data.root={_data(tmp, d['dataset'])}"]
    for i, e in enumerate(d.get("ood", [])):
        root = _data(tmp, e["dataset"])
        ov.append(f"data.ood.{i}.root={root}")
        for key in ("patients", "admissions"):  # MIMIC-IV demographics tables, written by the MIMIC fixture
            if key in e.get("options", {}):
                ov.append(f"data.ood.{i}.options.{key}={root / 'hosp' / f'{key}.csv.gz'}")
    return ov


@pytest.mark.parametrize("name", STUDIES)
def test_dry_run_plans_every_cell(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml", _point_at_fixtures(name, tmp_path))
    p = plan(cfg)
    g = cfg.grid
    n_cells = len(g.backbones) * len(g.pretrained) * len(g.fractions) * len(g.seeds)
    # cells without public weights (ViT-L x ImageNet-1k) are dropped, never more
    assert 0 < len(p) <= n_cells and (len(p) == n_cells or name == "chexpert_vit")
    assert set(p.status) == {"missing"} and (p.train_images > 0).all() and (p.steps > 0).all()
    # nested fractions: more patients at a larger fraction, for the same seed
    one = p[(p.backbone == p.backbone.iloc[0]) & (p.pretrained == p.pretrained.iloc[0]) & (p.seed == g.seeds[0])]
    assert list(one.sort_values("fraction").train_patients) == sorted(one.train_patients)
    assert not RunStore(cfg.output_dir).run_ids()  # a dry run trains nothing


SMOKE = ["grid.pretrained=[scratch]", "grid.fractions=[1.0]", "grid.seeds=[0]", "train.hyperrule=off",
         "train.steps=3", "train.batch_size=8", "train.grad_accum=1", "train.mixed_precision=no", "train.warmup_steps=1",
         "sharding.strategy=none", "sharding.activation_checkpointing=none", "sharding.param_dtype=fp32",
         "data.image_size=32", "data.num_workers=0", "eval.n_boot=20", "tracking.wandb=off"]


@pytest.mark.parametrize("name", STUDIES)
def test_smoke_variant_trains_end_to_end(name, tmp_path):
    backbone = "vit_micro" if "vit" in name else "resnetv2_tiny"
    cfg = load_config(CONFIGS / f"{name}.yaml", [*_point_at_fixtures(name, tmp_path), *SMOKE,
                                                  f"grid.backbones=[{backbone}]"])
    table = run_study(cfg, report=False)
    assert list(table.status) == ["complete"]
    store = RunStore(cfg.output_dir)
    rid = table.run_id.iloc[0]
    assert set(store.eval_sets(rid)) == {"val", "test", *[e.name for e in cfg.data.ood]}
    m = store.read_metrics(rid)
    assert {"auroc", "ece", "brier"} <= set(m.metric)
    assert store.read_meta(rid)["steps"] == 3

"""Grid expansion and content-derived run ids."""

from scaling.config import load_config
from scaling.study.grid import config_hash, expand_grid, run_config, run_id


def _cfg(*ov):
    return load_config(None, ["grid.backbones=[a,b]", "grid.pretrained=[scratch,hub]", "grid.fractions=[0.1,1]",
                              "grid.seeds=[0,1]", *ov])


def test_grid_is_the_cartesian_product():
    specs = expand_grid(_cfg())
    assert len(specs) == 16
    assert len(set(specs)) == 16
    assert specs[0].backbone == "a" and specs[-1].backbone == "b"


def test_ids_are_stable_and_content_derived():
    a, b = _cfg(), _cfg()
    ids_a = [run_id(a, s) for s in expand_grid(a)]
    assert ids_a == [run_id(b, s) for s in expand_grid(b)]
    assert len(set(ids_a)) == 16
    # a setting that changes results changes every id; where results go and how they are tracked does not
    assert run_id(_cfg("train.lr=0.1"), expand_grid(a)[0]) != ids_a[0]
    assert run_id(_cfg("output_dir=elsewhere", "tracking.wandb=offline", "name=x"), expand_grid(a)[0]) == ids_a[0]


def test_run_config_collapses_the_grid():
    cfg = _cfg()
    spec = expand_grid(cfg)[5]
    rc = run_config(cfg, spec)
    assert rc.model.backbone == spec.backbone and rc.model.pretrained == spec.pretrained
    assert rc.train.seed == spec.seed and rc.grid.fractions == (spec.fraction,)
    assert config_hash(rc) != config_hash(cfg)

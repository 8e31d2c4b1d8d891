"""Grid expansion and run ids: a run id hashes exactly the settings that change a run's results."""

import dataclasses

import pytest

from scaling.config import ConfigError, StudyConfig, load_config, to_dict
from scaling.study.grid import (
    NEUTRAL,
    RunSpec,
    config_hash,
    eval_set_identity,
    expand_grid,
    result_settings,
    run_config,
    run_id,
    settings_diff,
    study_settings,
)

BASE = ["data.root=/data/chexpert", "train.steps=100", "grid.backbones=[a,b]", "grid.pretrained=[scratch,hub]",
        "grid.fractions=[0.1,1]", "grid.seeds=[0,1]"]
SPEC = RunSpec("a", "scratch", 0.1, 0)
OOD = "data.ood=[{name: nih, dataset: nih_cxr14, root: /data/nih, split: test}]"


def _cfg(*ov):
    return load_config(None, [*BASE, *ov])


# override(s) -> does it change the run id of SPEC? Every setting of StudyConfig must appear here (see below).
TABLE = [
    # where results go and how they are watched
    ("name=other", False),
    ("output_dir=/elsewhere", False),
    ("tracking.wandb=offline", False),
    ("tracking.project=p", False),
    ("tracking.entity=e", False),
    ("tracking.log_identifiers=true", False),
    # data: identity and preparation count, speed and evaluation do not
    ("data.dataset=nih_cxr14", True),
    ("data.root=/mnt/other/chexpert", False),  # the same dataset on another mount
    ("data.root=synthetic", True),  # the demo data is another dataset
    ("data.labels=[Edema]", True),
    ("data.task=multiclass", True),  # a softmax head and cross-entropy: another model
    # scored from the logits, but stored with the predictions (prob:<name>): the predictions differ
    (["data.task=multiclass", "data.derived_labels={Malignant: [Edema, Atelectasis]}"], True),
    ("data.options={uncertainty: zeros}", True),
    ("data.filters={site: [a, b]}", True),  # another training population
    ("data.train_split=valid", True),
    ("data.val_split=valid", True),
    ("data.val_fraction=0.2", True),
    ("data.test_split=valid", True),
    ("data.test_fraction=0.3", True),
    ("data.image_size=96", True),
    ("data.num_workers=8", False),
    ("data.cache=false", False),
    ("data.on_bad_image=skip", False),
    ("data.flip=true", True),
    ("data.augment=bit", True),  # BiT's training views: another run (test_bit_augmentation_... below)
    (["data.augment=bit", "data.bit_resize=100"], True),  # the default's 75 px is another run again
    (OOD, False),
    ("data.subgroups=[sex]", False),
    ("data.age_bins=[0,50,200]", False),
    # model: the grid sets backbone and source; everything else shapes the model
    ("model.backbone=zzz", False),
    ("model.pretrained=hub", False),
    ("model.drop_path_rate=0.1", True),
    ("model.zero_init_head=false", True),
    ("model.kwargs={global_pool: max}", True),
    # training: everything but logging and checkpoint cadence
    ("train.batch_size=64", True),
    ("train.grad_accum=2", True),
    ("train.optimizer=adamw", True),
    ("train.lr=0.1", True),
    ("train.momentum=0.8", True),
    ("train.weight_decay=0.01", True),
    ("train.layer_decay=0.9", True),
    ("train.schedule=bit", True),
    ("train.warmup_steps=5", True),
    ("train.steps=200", True),
    (["train.steps=0", "train.epochs=2"], True),
    (["train.steps=0", "train.examples=3200"], True),
    ("train.mixup_alpha=0.1", True),
    ("train.clip_grad_norm=1.0", True),
    ("train.mixed_precision=bf16", True),
    ("train.seed=7", False),  # the grid's seed axis sets it
    ("train.log_every=1", False),
    ("train.eval_every=10", False),  # validation draws no random number (tests/test_augmentation.py)
    ("train.compile=blocks", False),
    ("train.deterministic=true", False),
    ("train.checkpoint_every=10", False),
    ("train.hyperrule=code", True),
    # the weights kept: the best validation point instead of the last step (see the test below for eval_every)
    (["train.select=val_auroc", "train.eval_every=10"], True),
    (["train.select=val_loss", "train.eval_every=10", "train.early_stopping_patience=3"], True),
    # sharding: how, not what (equivalence with one process is tested in tests/test_sharding.py) — but precision
    ("sharding.strategy=fsdp", False),
    ("sharding.param_dtype=bf16", True),
    ("sharding.reduce_dtype=bf16", True),
    ("sharding.offload_params=true", False),
    ("sharding.offload_optimizer=true", False),
    ("sharding.activation_checkpointing=timm", False),
    ("sharding.sync_each_micro_batch=false", False),
    (["sharding.strategy=fsdp", "sharding.blocks_per_unit=4"], False),
    # evaluation: statistics of stored predictions, recomputed when they change
    ("eval.n_boot=1000", False),
    ("eval.alpha=0.1", False),
    ("eval.min_group_size=50", False),
    ("eval.min_group_patients=3", False),
    ("eval.ece_bins=15", False),
    ("eval.threshold=sens90", False),
    ("eval.fixed_threshold=0.3", False),
    ("eval.bootstrap_seed=3", False),
    ("eval.batch_size=256", False),
    ("eval.aggregate=[exam]", False),
    # the grid: growing it keeps every existing cell's id; upstream entries count only for their own cells
    ("grid.backbones=[a,b,c]", False),
    ("grid.pretrained=[scratch]", False),
    ("grid.fractions=[0.1,0.5,1]", False),
    ("grid.seeds=[0,1,2,3]", False),
    ("upstream=[{name: up, num_images: 10}]", False),
    ("grid.shots=[1,5]", False),
    ("grid.protocols=[finetune,linear_probe]", False),
    ("grid.reinit=[none,after:2]", False),
    ("grid.shuffle=[none,8]", False),
    ("grid.also=[{pretrained: [hub], reinit: ['after:2']}]", False),
    # the linear probe: only a probe cell fits one (test_probe_settings_change_probe_cells_only)
    ("probe.cs=[0.1,1]", False),
    ("probe.select=log_loss", False),
    ("probe.standardize=false", False),
    ("probe.max_iter=50", False),
    ("probe.batch_size=8", False),
    # CKA: an analysis of the trained model, recomputed when it changes
    ("cka.enabled=false", False),
    ("cka.eval_set=val", False),
    ("cka.max_examples=64", False),
    ("cka.batch_size=32", False),
    ("cka.scales=false", False),
]


@pytest.mark.parametrize("overrides, changes", TABLE, ids=[str(o) for o, _ in TABLE])
def test_which_settings_change_a_run_id(overrides, changes):
    ov = [overrides] if isinstance(overrides, str) else overrides
    base, other = _cfg(), _cfg(*ov)
    assert (run_id(other, SPEC) != run_id(base, SPEC)) is changes
    # the study hash (what aggregation groups runs by) follows the same rule for every setting outside the cell
    if not any(o.startswith(("grid.", "upstream", "model.backbone", "model.pretrained", "train.seed")) for o in ov):
        assert (config_hash(other) != config_hash(base)) is changes


def test_selection_settings_keep_existing_ids_and_count_when_set():
    # At their defaults they are not hashed at all: every run id from before they existed is unchanged.
    plain = result_settings(run_config(_cfg(), SPEC))["train"]
    assert not {"select", "early_stopping_patience", "eval_every"} & set(plain)
    # Selecting on validation: the metric, the patience and the spacing of the validation points all count.
    base = _cfg("train.select=val_auroc", "train.eval_every=10")
    others = [_cfg("train.select=val_loss", "train.eval_every=10"),
              _cfg("train.select=val_auroc", "train.eval_every=20"),
              _cfg("train.select=val_auroc", "train.eval_every=10", "train.early_stopping_patience=2")]
    assert len({run_id(c, SPEC) for c in [_cfg(), base, *others]}) == 5
    assert len({config_hash(c) for c in [_cfg(), base, *others]}) == 5


@pytest.mark.parametrize("overrides, message", [
    (["train.select=val_auroc"], "train.select='val_auroc' chooses among validation points"),
    (["train.early_stopping_patience=2"], "train.early_stopping_patience=2 needs a metric"),
    (["train.select=best"], "train.select='best' is not allowed"),
    (["train.select=val_loss", "train.eval_every=5", "train.early_stopping_patience=-1"],
     "train.early_stopping_patience=-1 must be >= 0"),
])
def test_bad_selection_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_derived_labels_alone_change_the_run_id():
    one_of_k = _cfg("data.task=multiclass")
    derived = _cfg("data.task=multiclass", "data.derived_labels={Malignant: [Edema, Atelectasis]}")
    other = _cfg("data.task=multiclass", "data.derived_labels={Malignant: [Edema]}")
    assert len({run_id(c, SPEC) for c in (one_of_k, derived, other)}) == 3


@pytest.mark.parametrize("setting", ["probe.cs=[0.1,1]", "probe.select=log_loss", "probe.standardize=false",
                                     "probe.max_iter=50"])
def test_probe_settings_change_probe_cells_only(setting):
    axes = ["grid.protocols=[finetune,linear_probe]"]
    base, other = _cfg(*axes), _cfg(*axes, setting)
    probe = dataclasses.replace(SPEC, protocol="linear_probe")
    assert run_id(other, probe) != run_id(base, probe)
    assert run_id(other, SPEC) == run_id(base, SPEC)
    # one study: every cell records the same study hash, whatever its protocol
    assert config_hash(run_config(other, probe)) == config_hash(run_config(other, SPEC)) == config_hash(base)


def test_settings_added_later_keep_old_ids_at_their_old_behaviour():
    # data.task and data.derived_labels postdate run ids: at multilabel / none they are not hashed, so a store
    # written before them keeps its ids (the hash below is that of the plain cell before they existed)
    assert "task" not in result_settings(run_config(_cfg(), SPEC))["data"]
    assert "filters" not in result_settings(run_config(_cfg(), SPEC))["data"]
    assert run_id(_cfg("data.task=multiclass"), SPEC) != run_id(_cfg(), SPEC)
    demo = load_config(None, ["grid.backbones=[resnetv2_tiny]"])
    assert run_id(demo, RunSpec("resnetv2_tiny", "scratch", 1.0, 0)) == "resnetv2-tiny__scratch__f1__s0__85392d39"


def _leaves(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key


def test_the_table_decides_every_setting():
    # A setting added to the config later changes ids by default; this test makes its author decide, here.
    covered = {o.split("=", 1)[0] for ov, _ in TABLE for o in ([ov] if isinstance(ov, str) else ov)}
    undecided = [k for k in _leaves(to_dict(StudyConfig())) if k not in covered]
    assert not undecided, f"add these settings to TABLE: {undecided}"
    # and every neutral entry names a real setting
    leaves = set(_leaves(to_dict(StudyConfig())))
    assert all(any(leaf == n or leaf.startswith(n + ".") for leaf in leaves) for n in NEUTRAL)


def test_cell_axes_change_the_id_and_stay_readable():
    cfg = _cfg()
    ids = [run_id(cfg, s) for s in expand_grid(cfg)]
    assert len(set(ids)) == 16
    assert ids[0].startswith("a__scratch__f0.1__s0__") and len(ids[0].rsplit("__", 1)[1]) == 8
    file_src = run_id(cfg, RunSpec("a", "/w/bit_m.npz", 1.0, 2))
    assert file_src.startswith("a__file-bit-m.npz__f1__s2__")
    # the upstream entry is part of its own cells
    up = _cfg("upstream=[{name: up, num_images: 10}]", "grid.pretrained=[scratch,upstream:up]")
    up2 = _cfg("upstream=[{name: up, num_images: 20}]", "grid.pretrained=[scratch,upstream:up]")
    spec = RunSpec("a", "upstream:up", 0.1, 0)
    assert run_id(up, spec) != run_id(up2, spec)


def test_protocol_budget_and_reinit_axes_are_cells_with_readable_ids():
    cfg = _cfg("grid.backbones=[a]", "grid.fractions=[1]", "grid.seeds=[0]", "grid.shots=[5]",
               "grid.protocols=[finetune,linear_probe]", "grid.reinit=[none,'after:2']")
    cells = expand_grid(cfg)
    # 2 sources x 2 budgets x (finetune + probe), plus hub's 2 budgets re-initialised: re-initialised scratch and
    # probe cells are not cells
    assert len(cells) == 2 * 2 * 2 + 1 * 2
    assert not [c for c in cells if c.reinit != "none" and (c.pretrained == "scratch" or c.protocol != "finetune")]
    ids = {(c.pretrained, c.budget, c.protocol, c.reinit): run_id(cfg, c) for c in cells}
    assert len(set(ids.values())) == len(cells)
    assert ids[("hub", "k5", "linear_probe", "none")].startswith("a__hub__k5__s0__probe__")
    assert ids[("hub", "f1", "finetune", "after:2")].startswith("a__hub__f1__s0__reinit-after-2__")
    # the plain fine-tuning cell keeps the id it had before these axes existed
    plain = RunSpec("a", "hub", 1.0, 0)
    assert run_id(cfg, plain) == run_id(_cfg("grid.backbones=[a]"), plain)
    assert "protocol" not in result_settings(run_config(cfg, plain))["cell"]
    shot = next(c for c in cells if c.shots == 5 and c.protocol == "linear_probe")
    assert result_settings(run_config(cfg, shot))["cell"] == {"shots": [5], "protocol": ["linear_probe"]}
    assert config_hash(run_config(cfg, shot)) == config_hash(cfg)


def test_block_shuffled_cells_have_readable_ids_and_leave_every_other_id_alone():
    cfg = _cfg("grid.backbones=[a]", "grid.fractions=[1]", "grid.seeds=[0]", "grid.shots=[5]",
               "grid.protocols=[finetune,linear_probe]", "grid.reinit=[none,'after:2']", "grid.shuffle=[none, 16]")
    without = _cfg("grid.backbones=[a]", "grid.fractions=[1]", "grid.seeds=[0]", "grid.shots=[5]",
                   "grid.protocols=[finetune,linear_probe]", "grid.reinit=[none,'after:2']")
    cells = expand_grid(cfg)
    # the cells of the grid without the axis, each with its id, plus the fine-tuned, not re-initialised cells of
    # both sources (scratch too) at both budgets, shuffled
    assert [c for c in cells if c.shuffle == "none"] == expand_grid(without)
    assert {run_id(cfg, c) for c in cells if c.shuffle == "none"} == {run_id(without, c) for c in expand_grid(without)}
    shuffled = [c for c in cells if c.shuffle != "none"]
    assert {(c.pretrained, c.budget, c.protocol, c.reinit) for c in shuffled} == {
        (p, b, "finetune", "none") for p in ("scratch", "hub") for b in ("f1", "k5")}
    spec = next(c for c in shuffled if c.pretrained == "hub" and c.budget == "f1")
    assert run_id(cfg, spec).startswith("a__hub__f1__s0__shuffle-16__")
    assert result_settings(run_config(cfg, spec))["cell"] == {"fraction": [1.0], "shuffle": ["16"]}
    assert config_hash(run_config(cfg, spec)) == config_hash(cfg) == config_hash(without)
    # "016" and 16 are one cell
    assert RunSpec("a", "hub", 1.0, 0, shuffle="016") == spec and spec.block == 16


def test_also_adds_cells_without_multiplying_the_grid():
    cfg = _cfg("grid.also=[{pretrained: [hub], fractions: [1], reinit: ['after:1', 'first:2']}, "
               "{backbones: [a], fractions: [], shots: [1, 5], protocols: [linear_probe], seeds: [0]}]")
    cells = expand_grid(cfg)
    main = [c for c in cells if c.protocol == "finetune" and c.reinit == "none" and not c.shots]
    assert len(main) == 16
    reinit = [c for c in cells if c.reinit != "none"]
    assert {(c.backbone, c.reinit, c.seed) for c in reinit} == {(b, r, s) for b in "ab" for r in ("after:1", "first:2")
                                                                for s in (0, 1)}
    shots = [c for c in cells if c.shots]
    assert {(c.pretrained, c.shots) for c in shots} == {(p, k) for p in ("scratch", "hub") for k in (1, 5)}
    assert len(cells) == len(set(cells)) == 16 + 8 + 4
    # the upstream names of sub-grids are checked like the grid's
    with pytest.raises(ConfigError, match="grid.pretrained names 'upstream:nope'"):
        _cfg("grid.also=[{pretrained: ['upstream:nope']}]")


@pytest.mark.parametrize("override, message", [
    ("grid.protocols=[probe]", "grid.protocols='probe' is not allowed"),
    ("grid.reinit=['after']", "grid.reinit contains 'after'; use 'none', 'after:<k>' or 'first:<k>'"),
    ("grid.shots=[0]", "grid.shots contains 0"),
    ("grid.shots=[5,5]", "grid.shots=.5, 5. names a value twice"),
    ("grid.fractions=[]", "grid.fractions and grid.shots are both empty"),
    ("grid.also=[{reinit: ['first:x']}]", "grid.also.reinit contains 'first:x'"),
    ("probe.cs=[]", "probe.cs=.. must be a non-empty list"),
    ("cka.batch_size=2", "cka.batch_size=2 must be >= 4"),
])
def test_bad_analysis_axes_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(override)


def test_ids_are_stable_and_independent_of_the_grid_around_them():
    a, b = _cfg(), _cfg()
    assert [run_id(a, s) for s in expand_grid(a)] == [run_id(b, s) for s in expand_grid(b)]
    # the same cell in a one-cell grid, a grown grid, or as its own run config has one id
    one = _cfg("grid.backbones=[a]", "grid.pretrained=[scratch]", "grid.fractions=[0.1]", "grid.seeds=[0]")
    assert run_id(one, SPEC) == run_id(a, SPEC) == run_id(run_config(a, SPEC), SPEC)


def test_run_config_collapses_the_grid_and_shares_the_study_hash():
    cfg = _cfg()
    spec = expand_grid(cfg)[5]
    rc = run_config(cfg, spec)
    assert rc.model.backbone == spec.backbone and rc.model.pretrained == spec.pretrained
    assert rc.train.seed == spec.seed and rc.grid.fractions == (spec.fraction,)
    assert config_hash(rc) == config_hash(cfg)
    assert result_settings(rc)["cell"] == {"fraction": [spec.fraction]}
    assert rc.grid.protocols == ("finetune",) and rc.grid.reinit == ("none",) and rc.grid.shots == ()
    assert "grid" not in study_settings(cfg) and "cell" not in study_settings(cfg)


def test_eval_set_identity_ignores_the_mount_path():
    cfg = _cfg(OOD)
    moved = _cfg(OOD.replace("/data/nih", "/mnt/nih"))
    other = _cfg(OOD.replace("split: test", "split: train"))
    ident = lambda c: eval_set_identity(c.data.ood[0], c.data)  # noqa: E731
    assert ident(cfg) == ident(moved)
    assert settings_diff(ident(cfg), ident(other)) == ["split: 'test' != 'train'"]
    # an OOD set of the training dataset inherits its loader options
    same = _cfg("data.options={uncertainty: zeros}", "data.ood=[{name: b, split: valid}]")
    assert eval_set_identity(same.data.ood[0], same.data)["options"] == {"uncertainty": "zeros"}
    assert eval_set_identity(same.data.ood[0], same.data)["dataset"] == "chexpert"
    # which of its patients it keeps is part of what it is; "all" (the behaviour before the field) is not written
    plain = _cfg("data.ood=[{name: b, split: valid}]")
    test_patients = _cfg("data.ood=[{name: b, split: valid, patients: test}]")
    assert "patients" not in ident(plain) and ident(test_patients)["patients"] == "test"
    assert settings_diff(ident(plain), ident(test_patients)) == ["patients: '<absent>' != 'test'"]


def test_settings_diff_names_nested_keys():
    old = result_settings(run_config(_cfg(), SPEC))
    new = result_settings(run_config(_cfg("train.lr=0.5", "data.labels=[Edema]"), SPEC))
    assert settings_diff(old, new) == ["data.labels: ['Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', "
                                       "'Pleural Effusion'] != ['Edema']", "train.lr: 0.003 != 0.5"]


def test_the_docs_quote_real_demo_run_ids_and_every_later_default():
    """The run-id examples of the docs are ids the demo study really has (an example with a source the demo lacks
    sends a reader looking for a run that cannot exist), and run-store.md names every setting of LATER_DEFAULTS."""
    import re
    from pathlib import Path

    from scaling.study.grid import LATER_DEFAULTS

    docs = Path(__file__).resolve().parents[1] / "docs"
    demo = load_config(docs.parent / "recipes" / "configs" / "demo.yaml")
    ids = {run_id(demo, s) for s in expand_grid(demo)}
    quoted = {m for page in ("configs.md", "run-store.md")
              for m in re.findall(r"`([a-z0-9.-]+__[a-z0-9.-]+__[fk][0-9.]+__s\d+__[0-9a-f]{8})`",
                                  (docs / page).read_text())}
    assert len(quoted) >= 1 and quoted <= ids, quoted - ids
    text = " ".join((docs / "run-store.md").read_text().split())
    listed = re.search(r"Settings added after run ids were first written \(([^;]*);", text).group(1)
    assert sorted(re.findall(r"`([a-z_.]+)`", listed)) == sorted(LATER_DEFAULTS)


def test_weight_sources_are_labelled_without_their_directories():
    from scaling.study.grid import source_label

    cases = {"/home/alice/site7/weights": "file:weights", "./w/x.pt": "file:x.pt", "r50.safetensors":
             "file:r50.safetensors", "~/w/r50.npz": "file:r50.npz", "/w/dir/": "file:dir",
             "bit-l:/data/jft": "bit-l", "mimic:/home/alice/mimic": "mimic", "scratch": "scratch",
             "bit-m": "bit-m", "hub:goog_in21k": "hub:goog_in21k", "upstream:up": "upstream:up"}
    assert {s: source_label(s) for s in cases} == cases
    assert all(source_label(label) == label for label in cases.values())  # a label is its own label
    spec = RunSpec("a", "/home/alice/site7/weights", 1.0, 0)
    assert (spec.pretrained, spec.source) == ("file:weights", "/home/alice/site7/weights")
    assert run_config(_cfg(), spec).model.pretrained == "/home/alice/site7/weights"  # loaded from the source
    cfg = _cfg("grid.pretrained=[scratch, /home/alice/site7/weights, 'mimic:/home/alice/mimic']")
    assert list(dict.fromkeys(c.pretrained for c in expand_grid(cfg))) == ["scratch", "file:weights", "mimic"]


def test_labelling_sources_keeps_the_run_ids_stores_hold():
    # ids written before sources had labels (computed then, for these sources): a store keeps every run
    demo = load_config(None, ["grid.backbones=[bit_r50x1]"])
    before = {"/w/bit_m.npz": "bit-r50x1__file-bit-m.npz__f1__s0__2fbf3627",
              "./w/x.pt": "bit-r50x1__file-x.pt__f1__s0__0b24ae21",
              "w/x.safetensors": "bit-r50x1__w-x.safetensors__f1__s0__c5ddcd17",
              "bit-l:/w/jft": "bit-r50x1__bit-l-w-jft__f1__s0__36dc30e0",
              "hub:goog_in21k": "bit-r50x1__hub-goog-in21k__f1__s0__4d2030a7",
              "bit-m": "bit-r50x1__bit-m__f1__s0__570bb727"}
    assert {s: run_id(demo, RunSpec("bit_r50x1", s, 1.0, 0)) for s in before} == before
    # a label of one's own (refused before labels existed) names the run by the label, not by its directories
    assert run_id(demo, RunSpec("bit_r50x1", "mine:/home/alice/w", 1.0, 0)).startswith("bit-r50x1__mine__f1__s0__")


def test_mean_var_sources_are_cells_with_their_own_labels_ids_and_upstream_settings():
    cfg = _cfg("grid.backbones=[a]", "grid.fractions=[0.1,1]", "grid.seeds=[0,1]",
               "grid.pretrained=[scratch, 'meanvar:bit-m', bit-m, 'meanvar:bit-l:/home/alice/jft']",
               "grid.reinit=[none, 'after:2']")
    cells = expand_grid(cfg)
    # scratch and Mean Var cells are not re-initialised (nothing pretrained to keep): 4 sources x 2 budgets x 2 seeds,
    # plus bit-m's re-initialised cells
    assert len(cells) == 4 * 2 * 2 + 2 * 2
    assert {c.pretrained for c in cells if c.reinit != "none"} == {"bit-m"}
    assert list(dict.fromkeys(c.pretrained for c in cells)) == ["scratch", "meanvar:bit-m", "bit-m", "meanvar:bit-l"]
    ids = {(c.source, c.fraction, c.seed, c.reinit): run_id(cfg, c) for c in cells}
    assert len(set(ids.values())) == len(cells)
    assert ids[("meanvar:bit-m", 1.0, 1, "none")].startswith("a__meanvar-bit-m__f1__s1__")
    # named by the source's label, without its directories
    assert ids[("meanvar:bit-l:/home/alice/jft", 0.1, 0, "none")].startswith("a__meanvar-bit-l__f0.1__s0__")
    assert run_id(cfg, RunSpec("a", "meanvar:/home/alice/w.npz", 1, 0)).startswith("a__meanvar-file-w.npz__f1__s0__")
    assert run_config(cfg, cells[4]).model.pretrained == "meanvar:bit-m"
    # Mean Var of an upstream run carries that run's settings in its id, as the upstream source does
    spec = RunSpec("a", "meanvar:upstream:up", 1.0, 0)
    small = _cfg("upstream=[{name: up, num_images: 10}]", "grid.pretrained=['meanvar:upstream:up']")
    large = _cfg("upstream=[{name: up, num_images: 20}]", "grid.pretrained=['meanvar:upstream:up']")
    assert run_config(small, spec).upstream == small.upstream
    assert run_id(small, spec) != run_id(large, spec)
    with pytest.raises(ConfigError, match="grid.pretrained names 'meanvar:upstream:nope'"):
        _cfg("grid.pretrained=['meanvar:upstream:nope']")
    # labels: 'meanvar:' and the source's label, never its directories
    from scaling.study.grid import source_label

    cases = {"meanvar:bit-m": "meanvar:bit-m", "meanvar:/home/alice/w.npz": "meanvar:file:w.npz",
             "meanvar:mimic:/home/alice/mimic": "meanvar:mimic", "meanvar:upstream:up": "meanvar:upstream:up"}
    assert {s: source_label(s) for s in cases} == cases
    assert all(source_label(label) == label for label in cases.values())


def test_bit_augmentation_counts_and_the_default_light_keeps_every_id():
    # data.augment and data.bit_resize postdate run ids: at light they are not hashed, so every id is what it was
    # (the two ids below were computed by the code before the fields existed)
    light = result_settings(run_config(_cfg("data.augment=light"), SPEC))["data"]
    assert not {"augment", "bit_resize"} & set(light)
    assert run_id(_cfg(), SPEC) == run_id(_cfg("data.augment=light"), SPEC) == "a__scratch__f0.1__s0__c203026f"
    demo = load_config(None, ["grid.backbones=[resnetv2_tiny]"])
    assert run_id(demo, RunSpec("resnetv2_tiny", "scratch", 1.0, 0)) == "resnetv2-tiny__scratch__f1__s0__85392d39"
    # under bit the resize counts as the size it resolves to: 0 at 96 px is BiT's 112, the same run as 112 given
    bit = result_settings(run_config(_cfg("data.augment=bit", "data.image_size=96"), SPEC))["data"]
    assert (bit["augment"], bit["bit_resize"]) == ("bit", 112)
    ids = {r: run_id(_cfg("data.augment=bit", "data.image_size=96", f"data.bit_resize={r}"), SPEC)
           for r in (0, 112, 113, 96)}
    assert ids[0] == ids[112] and len({ids[0], ids[113], ids[96]}) == 3
    assert config_hash(_cfg("data.augment=bit", "data.image_size=96")) == \
        config_hash(_cfg("data.augment=bit", "data.image_size=96", "data.bit_resize=112"))
    assert config_hash(_cfg("data.augment=bit")) != config_hash(_cfg())

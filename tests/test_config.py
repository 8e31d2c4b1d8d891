"""Config loading: every recipe YAML loads; typos, wrong types and bad values are rejected with the field named."""

import re
from pathlib import Path

import pytest

from scaling.config import (ConfigError, EvalConfig, StudyConfig, TrainConfig, UpstreamConfig, from_dict, load_config,
                            read_yaml, save_config, to_dict)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, StudyConfig)
    assert cfg.grid.backbones and cfg.grid.pretrained


def test_recipes_exist():
    names = {p.name for p in CONFIGS}
    assert "demo.yaml" in names


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=0.01", "grid.seeds=[0,1,2]", "data.labels=[Edema]", "train.steps=5"])
    assert cfg.train.lr == 0.01
    assert cfg.grid.seeds == (0, 1, 2)
    assert cfg.data.labels == ("Edema",)
    assert cfg.train.steps == 5


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'sharding'"):
        from_dict(StudyConfig, {"shardng": {}})


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.lr=fast", r"train\.lr: expected a number"),
        ("train.batch_size=3.5", r"train\.batch_size: expected an integer"),
        ("data.cache=maybe", r"data\.cache: expected true/false"),
        ("grid.seeds=3", r"grid\.seeds: expected a list"),
        ("train.optimizer=lamb", r"train\.optimizer='lamb' is not allowed"),
        ("sharding.strategy=zero4", r"sharding\.strategy='zero4' is not allowed"),
        ("grid.fractions=[0.0]", r"grid\.fractions contains 0.0"),
        ("grid.pretrained=[upstream:nope]", r"no upstream entry has that name"),
        ("data.ood=[{name: a}, {name: b, patients: some}]", r"data\.ood\[1\]\.patients='some' is not allowed"),
        ("data.ood=[{name: a, filters: {view: [[x]]}}]", r"data\.ood\[0\]\.filters\.view=\[\['x'\]\] must be a value"),
        ("data.filters={site: {a: 1}}", r"data\.filters\.site=\{'a': 1\} must be a value or a non-empty list"),
        ("data.filters={site: []}", r"data\.filters\.site=\[\] must be a value or a non-empty list"),
        ("train.batch_size=10", None),
    ],
)
def test_bad_values_name_the_field(override, match):
    if match is None:
        assert load_config(None, [override]).train.batch_size == 10
        return
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_exclusive_duration_and_activation_checkpointing():
    with pytest.raises(ConfigError, match="only one of train.steps"):
        load_config(None, ["train.steps=10", "train.epochs=1"])
    with pytest.raises(ConfigError, match="activation_checkpointing='fsdp' needs an FSDP strategy"):
        load_config(None, ["sharding.activation_checkpointing=fsdp", "sharding.strategy=ddp"])


MC = "data.task=multiclass"
DERM = "data.labels=[Melanoma, Melanocytic Nevus, Basal Cell Carcinoma]"


@pytest.mark.parametrize("overrides, match", [
    (["data.task=softmax"], r"data\.task='softmax' is not allowed"),
    ([MC, "data.labels=[Melanoma]"], r"data\.task='multiclass' needs at least two classes"),
    (["data.labels=[Edema, Edema]"], r"data\.labels names \['Edema'\] more than once"),
    ([DERM, "data.derived_labels={Malignant: [Melanoma]}"], r"data\.derived_labels needs data\.task='multiclass'"),
    ([MC, DERM, "data.derived_labels={Melanoma: [Melanoma]}"], r"data\.derived_labels\.Melanoma: .* its own name"),
    ([MC, DERM, "data.derived_labels={Malignant: [Melanoma, Dermatofibroma]}"],
     r"data\.derived_labels\.Malignant names \['Dermatofibroma'\], which are not classes"),
    ([MC, DERM, "data.derived_labels={Malignant: []}"], r"data\.derived_labels\.Malignant must name at least one"),
    ([MC, DERM, "data.derived_labels={Malignant: [Melanoma, Melanoma]}"], r"names a class twice"),
    ([MC, DERM, "data.derived_labels={Malignant: [Melanoma, Melanocytic Nevus, Basal Cell Carcinoma]}"],
     r"groups every class"),
    ([MC, DERM, "grid.also=[{protocols: [linear_probe]}]"], r"linear_probe .* data\.task='multiclass' is fine-tuned"),
    ([MC, DERM, "data.derived_labels={Malignant: Melanoma}"], r"data\.derived_labels\.Malignant: expected a list"),
])
def test_task_and_derived_labels_are_checked(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_derived_labels_round_trip(tmp_path):
    cfg = load_config(None, [MC, DERM, "data.derived_labels={Malignant: [Melanoma, Basal Cell Carcinoma]}"])
    assert cfg.data.derived_labels == {"Malignant": ("Melanoma", "Basal Cell Carcinoma")}
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz.*did you mean 'train\.epochs'.*typo\.yaml"):
        load_config(typo)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["grid.fractions=[0.1,1.0]", "data.ood=[{name: b, root: 'synthetic:b', split: train}]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert to_dict(again)["data"]["ood"][0]["root"] == "synthetic:b"


def test_override_list_items_by_index(tmp_path):
    base = tmp_path / "s.yaml"
    base.write_text("data:\n  ood:\n    - {name: a, root: /x}\n    - {name: b, root: /y, options: {k: 1}}\n")
    cfg = load_config(base, ["data.ood.1.root=/z", "data.ood.1.options.k=2"])
    assert [e.root for e in cfg.data.ood] == ["/x", "/z"] and cfg.data.ood[1].options == {"k": 2}
    with pytest.raises(ConfigError, match="not an index of a list of 2"):
        load_config(base, ["data.ood.5.root=/z"])
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        load_config(None, ["train.lr.x=1"])


def test_yaml_1_1_booleans_stay_strings(tmp_path):
    """``off``/``no`` are words here, not booleans (YAML 1.1 would turn ``wandb: off`` into False)."""
    f = tmp_path / "c.yaml"
    f.write_text("tracking: {wandb: off}\ntrain: {mixed_precision: no, hyperrule: off}\ndata: {cache: false}\n")
    cfg = load_config(f, ["sharding.activation_checkpointing=none", "data.on_bad_image=skip"])
    assert cfg.tracking.wandb == "off" and cfg.train.mixed_precision == "no" and cfg.train.hyperrule == "off"
    assert cfg.data.cache is False


def test_exponent_floats_are_numbers_as_in_yaml_1_2(tmp_path):
    """``lr: 1e-4`` is a float (YAML 1.1 reads it, and ``1.5e3``, as a string: "expected a number, got str"), in a
    file and in an override; integers, dates and words that merely start with a digit or an e are unchanged."""
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 1e-4, weight_decay: 1.5e3, warmup_steps: 12}\nname: 1e\n")
    cfg = load_config(f, ["train.clip_grad_norm=5E-1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.clip_grad_norm) == (1e-4, 1500.0, 0.5)
    assert cfg.train.warmup_steps == 12 and isinstance(cfg.train.warmup_steps, int) and cfg.name == "1e"
    assert read_yaml("a: .5e-2\nb: -2E+2\nc: 0x10\nd: e5\n") == {"a": 0.005, "b": -200.0, "c": 16, "d": "e5"}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_compose_fragments_under_the_file(tmp_path):
    _write(tmp_path / "parts" / "data.yaml", "data:\n  dataset: nih_cxr14\n  image_size: 96\n  labels: [Edema]\n")
    _write(tmp_path / "parts" / "train.yaml", "defaults: [data.yaml]\ntrain: {lr: 0.01, steps: 5}\n")
    cfg = load_config(_write(tmp_path / "s.yaml", "defaults: [parts/train.yaml]\ndata: {image_size: 128}\n"))
    # fragments nest, mappings merge key by key, the including file wins
    assert (cfg.data.dataset, cfg.data.image_size, cfg.data.labels) == ("nih_cxr14", 128, ("Edema",))
    assert (cfg.train.lr, cfg.train.steps) == (0.01, 5)


def test_defaults_errors_name_the_file_that_set_the_key(tmp_path):
    frag = _write(tmp_path / "parts" / "data.yaml", "data:\n  image_sise: 96\n")
    top = _write(tmp_path / "s.yaml", "defaults: [parts/data.yaml]\ntrain: {lr: 0.01}\n")
    with pytest.raises(ConfigError, match=r"data\.image_sise.*did you mean 'data\.image_size'.* in .*parts/data\.yaml"):
        load_config(top)
    frag.write_text("data:\n  image_size: -3\n")
    with pytest.raises(ConfigError, match=r"data\.image_size=-3 must be > 0 in .*parts/data\.yaml"):
        load_config(top)
    frag.write_text("data:\n  image_size: 96\n")
    with pytest.raises(ConfigError, match=r"train\.lr=-1\.0 must be > 0 in override `train\.lr=-1`"):
        load_config(top, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"defaults entry 'nope\.yaml' not found"):
        load_config(_write(tmp_path / "t.yaml", "defaults: [nope.yaml]\n"))
    _write(tmp_path / "loop.yaml", "defaults: [loop2.yaml]\n")
    _write(tmp_path / "loop2.yaml", "defaults: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


def test_shipped_chexpert_studies_share_one_data_block():
    root = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    bit, vit = load_config(root / "chexpert_bit.yaml"), load_config(root / "chexpert_vit.yaml")
    assert bit.data == vit.data and len(bit.data.ood) == 2
    assert "\ndata:" not in (root / "chexpert_bit.yaml").read_text()  # the block lives in one fragment


def test_duplicate_yaml_keys_are_refused_naming_file_key_and_line(tmp_path):
    top = _write(tmp_path / "s.yaml", "train: {lr: 0.1, batch_size: 8}\ngrid: {seeds: [0]}\ntrain: {steps: 5}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: duplicate key 'train' at line 3 \(first set at line 1\)"):
        load_config(top)
    nested = _write(tmp_path / "parts" / "d.yaml", "data:\n  options:\n    views: [frontal]\n    views: [lateral]\n")
    with pytest.raises(ConfigError, match=r"parts/d\.yaml: duplicate key 'views' at line 4 \(first set at line 3\)"):
        load_config(_write(tmp_path / "t.yaml", "defaults: [parts/d.yaml]\n"))
    flow = _write(tmp_path / "f.yaml", "data: {ood: [{name: a, root: /x, root: /y}]}\n")
    with pytest.raises(ConfigError, match=r"f\.yaml: duplicate key 'root' at line 1"):
        load_config(flow)
    with pytest.raises(ConfigError, match=r"override 'data\.options=\{a: 1, a: 2\}': duplicate key 'a'"):
        load_config(None, ["data.options={a: 1, a: 2}"])
    # YAML merge keys are not duplicates: a key of the mapping overrides the merged one
    nested.write_text("x-base: &b {a: 1, b: 2}\ndata:\n  options: {<<: *b, a: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'x-base'"):  # the anchor's home is not a config key
        load_config(tmp_path / "t.yaml")
    nested.write_text("model:\n  kwargs: &k {a: 1, b: 2}\ndata:\n  options: {<<: *k, a: 3}\n")
    assert load_config(tmp_path / "t.yaml").data.options == {"a": 3, "b": 2}


def test_a_binary_config_file_is_a_config_error_naming_it(tmp_path):
    f = tmp_path / "weights.yaml"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"config file .*weights\.yaml is not UTF-8 text"):
        load_config(f)


@pytest.mark.parametrize("override, match", [
    # accepted before, failing only after training (or silently meaning something else)
    ("eval.batch_size=0", r"eval\.batch_size=0 must be >= 1"),
    ("eval.ece_bins=0", r"eval\.ece_bins=0 must be >= 1"),
    ("eval.n_boot=-1", r"eval\.n_boot=-1 must be >= 0"),
    ("eval.min_group_size=-1", r"eval\.min_group_size=-1 must be >= 0"),
    ("eval.min_group_patients=-1", r"eval\.min_group_patients=-1 must be >= 0"),
    ("eval.fixed_threshold=1.5", r"eval\.fixed_threshold=1\.5 must be a probability in \[0, 1\]"),
    ("train.log_every=0", r"train\.log_every=0 must be >= 1"),
    ("model.drop_path_rate=2", r"model\.drop_path_rate=2\.0 must be in \[0, 1\)"),
    ("model.drop_path_rate=1", r"model\.drop_path_rate=1\.0 must be in \[0, 1\)"),
    ("train.momentum=-5", r"train\.momentum=-5\.0 must be in \[0, 1\)"),
    ("train.momentum=1", r"train\.momentum=1\.0 must be in \[0, 1\)"),
    ("train.lr=.nan", r"train\.lr=nan must be a finite number > 0"),
    ("train.lr=.inf", r"train\.lr=inf must be a finite number > 0"),
    ("train.lr=0", r"train\.lr=0\.0 must be > 0"),
    ("train.steps=-5", r"train\.steps=-5 must be >= 0"),
    ("train.epochs=-1", r"train\.epochs=-1\.0 must be >= 0"),
    ("train.epochs=.nan", r"train\.epochs=nan must be a finite number >= 0"),
    ("train.examples=-10", r"train\.examples=-10 must be >= 0"),
    ("train.warmup_steps=-1", r"train\.warmup_steps=-1 must be >= 0"),
    ("train.mixup_alpha=-0.2", r"train\.mixup_alpha=-0\.2 must be >= 0"),
    ("train.weight_decay=-0.0001", r"train\.weight_decay=-0\.0001 must be >= 0"),
    ("train.clip_grad_norm=-1", r"train\.clip_grad_norm=-1\.0 must be >= 0"),
    ("train.checkpoint_every=-1", r"train\.checkpoint_every=-1 must be >= 0"),
    ("train.layer_decay=0", r"train\.layer_decay=0\.0 must be in \(0, 1\]"),
    ("data.num_workers=-2", r"data\.num_workers=-2 must be >= 0"),
    ("output_dir=", r"output_dir='' is empty"),
    ("output_dir=' '", r"output_dir=' ' is empty"),
    # age groups: pd.cut needs at least two strictly increasing edges, and the edges name the groups
    ("data.age_bins=[]", r"data\.age_bins=\[\] needs at least two edges"),
    ("data.age_bins=[40]", r"data\.age_bins=\[40\.0\] needs at least two edges"),
    ("data.age_bins=[0,40,40,200]", r"data\.age_bins=\[0\.0, 40\.0, 40\.0, 200\.0\] must be strictly increasing"),
    ("data.age_bins=[0,60,40]", r"data\.age_bins=.* must be strictly increasing"),
    ("data.age_bins=[0,.inf]", r"data\.age_bins=\[0\.0, inf\] must be finite whole numbers"),
    ("data.age_bins=[0,40.5,200]", r"data\.age_bins=.* must be finite whole numbers"),
    # upstream runs: sizes the generator and the trainer need
    ("upstream=[{name: up, num_images: 0}]", r"upstream\[0\]\.num_images=0 must be >= 1"),
    ("upstream=[{name: a}, {name: b, steps: 0}]", r"upstream\[1\]\.steps=0 must be >= 1"),
    ("upstream=[{name: up, num_classes: 1}]", r"upstream\[0\]\.num_classes=1 must be >= 2"),
    ("upstream=[{name: up, lr: -1}]", r"upstream\[0\]\.lr=-1\.0 must be > 0"),
    ("upstream=[{name: ''}]", r"upstream\[0\]\.name='' must be a non-empty name"),
])
def test_values_that_fail_later_are_refused_at_load(override, match):
    with pytest.raises(ConfigError, match=match + f".* in override `{re.escape(override)}`$"):
        load_config(None, [override])


def test_refused_values_name_the_file_that_set_them(tmp_path):
    frag = _write(tmp_path / "parts" / "eval.yaml", "eval:\n  ece_bins: 0\n")
    top = _write(tmp_path / "s.yaml", "defaults: [parts/eval.yaml]\ndata: {age_bins: [0, 40, 200]}\n")
    with pytest.raises(ConfigError, match=r"eval\.ece_bins=0 must be >= 1 in .*parts/eval\.yaml$"):
        load_config(top)
    frag.write_text("upstream:\n  - {name: up}\n  - {name: big, num_images: 0}\n")
    with pytest.raises(ConfigError, match=r"upstream\[1\]\.num_images=0 must be >= 1 in .*parts/eval\.yaml$"):
        load_config(top)
    frag.write_text("eval: {n_boot: 0}\n")
    top.write_text("defaults: [parts/eval.yaml]\ndata: {age_bins: [0, 40, 40, 200]}\n")
    with pytest.raises(ConfigError, match=r"data\.age_bins=.* must be strictly increasing in .*s\.yaml$"):
        load_config(top)


def test_documented_zero_settings_still_load():
    """0 is "off" / "unset" where the field says so; these keep loading."""
    cfg = load_config(None, ["eval.n_boot=0", "eval.min_group_size=0", "train.warmup_steps=0", "train.mixup_alpha=0",
                             "train.clip_grad_norm=0", "train.checkpoint_every=0", "train.momentum=0",
                             "model.drop_path_rate=0", "data.num_workers=0", "eval.fixed_threshold=0"])
    assert cfg.eval.n_boot == 0 and cfg.train.warmup_steps == 0
    # no length set: the BiT-HyperRule length (scaling.engine.schedule.total_steps); steps=0 means unset
    none = load_config(None, ["train.steps=0", "train.epochs=0", "train.examples=0"]).train
    assert (none.steps, none.epochs, none.examples) == (0, 0.0, 0)
    assert load_config(None, ["train.steps=0", "train.examples=3200"]).train.examples == 3200


def test_standalone_sections_check_their_values():
    with pytest.raises(ConfigError, match=r"upstream\[\]\.num_images=0 must be >= 1"):
        UpstreamConfig(name="up", num_images=0)
    with pytest.raises(ConfigError, match=r"eval\.batch_size=0 must be >= 1"):
        EvalConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"train\.log_every=0 must be >= 1"):
        TrainConfig(log_every=0)


@pytest.mark.parametrize("override, match", [
    ("data.ood=[{name: test, root: /x}]", r"data\.ood\[0\]\.name='test' is reserved"),
    ("data.ood=[{name: a, root: /x}, {name: val, root: /y}]", r"data\.ood\[1\]\.name='val' is reserved"),
    ("data.ood=[{name: train}]", r"data\.ood\[0\]\.name='train' is reserved"),
    ("data.ood=[{name: nih, root: /x}, {name: nih, root: /y}]", r"data\.ood\[1\]\.name='nih' repeats data\.ood\[0\]"),
    ("data.ood=[{name: 'a/b'}]", r"data\.ood\[0\]\.name='a/b' must be a non-empty name without '/'"),
    ("data.ood=[{name: ''}]", r"data\.ood\[0\]\.name='' must be a non-empty name"),
    ("upstream=[{name: up}, {name: up, num_images: 50}]", r"upstream\[1\]\.name='up' repeats upstream\[0\]\.name"),
    ("upstream=[{name: ..}]", r"upstream\[0\]\.name='\.\.' must be a non-empty name"),
])
def test_name_collisions_are_refused(override, match):
    with pytest.raises(ConfigError, match=match + ".* in override"):
        load_config(None, [override])


def test_name_collisions_in_a_file_name_the_file(tmp_path):
    f = _write(tmp_path / "s.yaml", "data:\n  ood:\n    - {name: nih, root: /x}\n    - {name: nih, root: /y}\n")
    with pytest.raises(ConfigError, match=r"data\.ood\[1\]\.name='nih' repeats data\.ood\[0\]\.name.* in .*s\.yaml$"):
        load_config(f)
    assert [e.name for e in load_config(f, ["data.ood.1.name=mimic"]).data.ood] == ["nih", "mimic"]


def test_errors_on_a_whole_section_name_where_it_was_set(tmp_path):
    """A single-word key (``train=3``) is blamed on the override or file that set it, not on the top file."""
    top = _write(tmp_path / "s.yaml", "train: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"train: expected a mapping for TrainConfig, got int in override `train=3`$"):
        load_config(top, ["train=3"])
    _write(tmp_path / "parts" / "t.yaml", "train: 3\n")
    top.write_text("defaults: [parts/t.yaml]\ngrid: {seeds: [0]}\n")
    with pytest.raises(ConfigError, match=r"train: expected a mapping .* in .*parts/t\.yaml$"):
        load_config(top)
    _write(tmp_path / "parts" / "t.yaml", "shardng: {strategy: ddp}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'shardng'.* in .*parts/t\.yaml$"):
        load_config(top)


@pytest.mark.parametrize("override, field", [("grid.seeds=[0,-1]", "grid.seeds"),
                                             ("grid.seeds=[4294967296]", "grid.seeds"),
                                             ("train.seed=-3", "train.seed"),
                                             ("grid.also=[{seeds: [-2]}]", "grid.also.seeds")])
def test_seeds_outside_what_the_generators_take_are_refused_at_load(override, field):
    """numpy's and Accelerate's generators take seeds in [0, 2**32): another value is refused when the config is
    read, naming the field and the override, instead of failing every run that seeds itself with it."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: seed -?\d+ is out of range; seeds must be integers "
                                          rf"in \[0, 2\*\*32\) in override `{re.escape(override)}`"):
        load_config(None, ["data.root=synthetic", override])
    assert load_config(None, ["data.root=synthetic", "grid.seeds=[0,4294967295]"]).grid.seeds == (0, 4294967295)


@pytest.mark.parametrize("overrides, message", [
    (["data.augment=autoaugment"], r"^data\.augment='autoaugment' is not allowed; choose one of \['light', 'bit'\]"),
    (["data.augment=bit", "data.image_size=384", "data.bit_resize=320"],
     r"^data\.bit_resize=320 is smaller than data\.image_size=384: .* at least data\.image_size"),
    (["data.bit_resize=448"], r"^data\.bit_resize=448 applies only to data\.augment='bit'"),
    (["data.augment=bit", "data.bit_resize=-1"], r"^data\.bit_resize=-1 must be >= 0"),
])
def test_bad_augmentation_settings_name_the_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.root=synthetic", *overrides])


def test_the_training_resize_is_bits_rule_unless_given():
    def resize(*ov):
        return load_config(None, ["data.root=synthetic", *ov]).data.train_resize

    assert resize("data.image_size=384") == 384  # light: images are cached at the crop size, as always
    assert resize("data.augment=bit", "data.image_size=384") == 448  # the paper's 448 / 384
    assert resize("data.augment=bit", "data.image_size=480", "data.bit_resize=512") == 512  # the released code's
    assert resize("data.augment=bit", "data.image_size=384", "data.bit_resize=384") == 384  # flips only
    assert load_config(None, ["data.root=synthetic"]).data.augment == "light"

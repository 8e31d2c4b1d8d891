"""Config loading: every recipe YAML loads; typos, wrong types and bad values are rejected with the field named."""

from pathlib import Path

import pytest

from scaling.config import ConfigError, StudyConfig, from_dict, load_config, save_config, to_dict

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

"""Block shuffling (Neyshabur, Sedghi & Zhang 2020, §3) as a grid axis: the transform on hand-built images, the
config and run ids, and a real (tiny) study whose stored predictions are its stored models on images shuffled here,
independently, and whose report's shuffle table is recomputed from the stored predictions."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from scaling.analysis.features import block_features
from scaling.config import ConfigError, load_config
from scaling.data.dataset import TableDataset
from scaling.data.images import ImageTransform, block_permutation, block_shuffle
from scaling.models import build_model
from scaling.study.grid import RunSpec, expand_grid, run_config, run_id
from scaling.study.data import load_study_data
from scaling.study.report import build_report, render_html
from scaling.study.runner import plan, run_study
from scaling.study.store import RunStore
from study_launch import count

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
UP = "upstream:up"
SIZE, BLOCK = 32, 8


def _shuffle_by_hand(image: np.ndarray, block: int, perm) -> np.ndarray:
    """The paper's definition written out with loops: the image cut into block x block tiles in row-major order,
    tile ``perm[j]`` put at position ``j`` (independent of einops and of the library)."""
    c, h, w = image.shape
    per_row = w // block
    tiles = [image[:, r * block:(r + 1) * block, q * block:(q + 1) * block]
             for r in range(h // block) for q in range(per_row)]
    out = np.empty_like(image)
    for j, src in enumerate(perm):
        r, q = divmod(j, per_row)
        out[:, r * block:(r + 1) * block, q * block:(q + 1) * block] = tiles[int(src)]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------------------------


def test_a_shuffled_image_is_exactly_a_permutation_of_its_blocks():
    # 2 channels, 4 x 4 blocks of 4 px, every block a distinct constant per channel
    image = torch.zeros(2, 16, 16, dtype=torch.uint8)
    for j in range(16):
        r, q = divmod(j, 4)
        image[0, 4 * r:4 * r + 4, 4 * q:4 * q + 4] = j
        image[1, 4 * r:4 * r + 4, 4 * q:4 * q + 4] = 100 + j
    out = ImageTransform(16, train=False, shuffle=4, shuffle_seed=3)(image)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == image.shape
    for j in range(16):
        r, q = divmod(j, 4)
        tile = out[:, 4 * r:4 * r + 4, 4 * q:4 * q + 4]
        assert (tile[0] == perm[j]).all() and (tile[1] == 100 + perm[j]).all()  # channels move together
    assert sorted(int(out[0, 4 * r, 4 * q]) for r in range(4) for q in range(4)) == list(range(16))
    assert not torch.equal(out, image)
    np.testing.assert_array_equal(out.numpy(), _shuffle_by_hand(image.numpy(), 4, perm.tolist()))


def test_one_pixel_blocks_keep_the_pixel_multiset_and_a_whole_image_block_is_the_identity():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 65535, (1, 8, 8), generator=g, dtype=torch.int32).to(torch.uint16)
    out = ImageTransform(8, train=False, shuffle=1, shuffle_seed=0)(image)
    assert out.dtype == torch.uint16
    assert sorted(out.flatten().tolist()) == sorted(image.flatten().tolist()) and not torch.equal(out, image)
    assert torch.equal(ImageTransform(8, train=False, shuffle=8, shuffle_seed=5)(image), image)


def test_the_permutation_is_the_seed_s_and_the_same_for_every_image_train_and_eval():
    assert torch.equal(block_permutation(16, 7), block_permutation(16, 7))
    assert not torch.equal(block_permutation(64, 0), block_permutation(64, 1))
    image = torch.arange(3 * 32 * 32).reshape(3, 32, 32).to(torch.uint8)
    train = ImageTransform(32, train=True, shuffle=BLOCK, shuffle_seed=4)
    plain = ImageTransform(32, train=True)
    perm = block_permutation(16, 4)
    for view in (11, 12):  # a training view is the unshuffled cell's view of that seed, then shuffled
        np.testing.assert_array_equal(train(image, view).numpy(),
                                      _shuffle_by_hand(plain(image, view).numpy(), BLOCK, perm.tolist()))
    evaluation = ImageTransform(32, train=False, shuffle=BLOCK, shuffle_seed=4)
    np.testing.assert_array_equal(evaluation(image).numpy(), _shuffle_by_hand(image.numpy(), BLOCK, perm.tolist()))
    with pytest.raises(ValueError, match="divides"):
        ImageTransform(32, train=False, shuffle=5)
    with pytest.raises(ValueError, match="tile"):
        block_shuffle(image, 5, block_permutation(36, 0))


def test_cache_on_and_off_serve_identical_shuffled_images(tmp_path):
    from scaling.demo.synthetic import write_synthetic_chexpert
    from scaling.data import load_table

    root = tmp_path / "data"
    write_synthetic_chexpert(root, n_patients=6, seed=0)
    table = load_table("chexpert", root, "train", uncertainty="ignore").head(8)
    kw = dict(shuffle=BLOCK, shuffle_seed=2)
    cached = TableDataset(table, LABELS, SIZE, train=True, cache_dir=tmp_path / "cache", **kw)
    fresh = TableDataset(table, LABELS, SIZE, train=True, **kw)
    unshuffled = TableDataset(table, LABELS, SIZE, train=False)
    perm = block_permutation((SIZE // BLOCK) ** 2, 2).tolist()
    for i in range(len(table)):
        for key in (i, (i, 100 + i)):
            assert torch.equal(cached[key]["image"], fresh[key]["image"])
        np.testing.assert_array_equal(cached[i]["image"].numpy(),
                                      _shuffle_by_hand(unshuffled[i]["image"].numpy(), BLOCK, perm))


# ----------------------------------------------------------------------------------------------------------------
# Config and grid
# ----------------------------------------------------------------------------------------------------------------


def test_shuffled_cells_their_ids_and_the_combinations_that_are_no_cells():
    base = ["grid.pretrained=[scratch, 'meanvar:bit-m', bit-m]", "grid.backbones=[bit_r50x1]",
            "grid.protocols=[finetune, linear_probe]"]
    plain = load_config(None, base)
    cfg = load_config(None, [*base, "grid.shuffle=[none, 8, 32]"])
    cells = expand_grid(cfg)
    assert [c for c in cells if c.shuffle == "none"] == expand_grid(plain)
    assert {run_id(cfg, c) for c in cells if c.shuffle == "none"} == {run_id(plain, c) for c in expand_grid(plain)}
    shuffled = [c for c in cells if c.shuffle != "none"]
    # fine-tuned scratch and pretrained cells, never a probe or a Mean Var init
    assert sorted((c.pretrained, c.shuffle) for c in shuffled) == [
        ("bit-m", "32"), ("bit-m", "8"), ("scratch", "32"), ("scratch", "8")]
    assert {c.protocol for c in shuffled} == {"finetune"}
    rid = run_id(cfg, RunSpec("bit_r50x1", "bit-m", 1.0, 0, shuffle=8))
    assert rid.startswith("bit-r50x1__bit-m__f1__s0__shuffle-8__")
    # the block size is part of what the run is: another size, another hash
    assert rid.rsplit("__", 1)[1] != run_id(cfg, RunSpec("bit_r50x1", "bit-m", 1.0, 0, shuffle=32)).rsplit("__", 1)[1]
    # a re-initialised cell is not shuffled, in the grid or in grid.also
    both = load_config(None, [*base, "grid.shuffle=[8]", "grid.reinit=[none, 'after:2']",
                              "grid.also=[{pretrained: [bit-m], reinit: [none, 'after:2'], shuffle: [none, 16]}]"])
    assert {(c.reinit, c.shuffle) for c in expand_grid(both)} >= {("after:2", "none"), ("none", "8"), ("none", "16")}
    assert not [c for c in expand_grid(both) if c.reinit != "none" and c.shuffle != "none"]


@pytest.mark.parametrize("override, message", [
    ("grid.shuffle=[7]", "grid.shuffle contains '7', which does not divide data.image_size=64"),
    ("grid.shuffle=[0]", "grid.shuffle contains '0'; use 'none' or a block size"),
    ("grid.shuffle=[big]", "grid.shuffle contains 'big'"),
    ("grid.shuffle=[]", "grid.shuffle must not be empty"),
    ("grid.shuffle=[8, 8]", "grid.shuffle=[8, 8] names a value twice"),
    ("grid.also=[{shuffle: [12]}]", "grid.also.shuffle contains '12', which does not divide data.image_size=64"),
])
def test_a_bad_block_size_is_refused_naming_the_field_and_the_value(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


# ----------------------------------------------------------------------------------------------------------------
# A real study
# ----------------------------------------------------------------------------------------------------------------


def overrides(store, *extra):
    return [
        f"output_dir={store}", "name=shuffle", "data.root=synthetic", f"data.image_size={SIZE}",
        f"data.labels=[{','.join(LABELS)}]", "data.options={uncertainty: ignore}", "train.batch_size=16",
        "train.lr=0.05", "train.steps=4", "train.warmup_steps=1", "train.log_every=4", "sharding.strategy=none",
        "eval.n_boot=20", "cka.max_examples=32", "cka.batch_size=32",
        f"upstream=[{{name: up, num_images: 120, num_classes: 4, image_size: {SIZE}, steps: 3, batch_size: 32}}]",
        "grid.backbones=[resnetv2_tiny]", f"grid.pretrained=[scratch, '{UP}']", "grid.fractions=[1.0]",
        f"grid.shuffle=[none, {BLOCK}]", *extra]


OOD = "data.ood=[{name: ood_site_b, root: 'synthetic:b', split: train}]"


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """The study without an OOD set, then grown by one: the new set is predicted from stored weights."""
    store = tmp_path_factory.mktemp("shuffle") / "store"
    table = run_study(load_config(None, overrides(store)), report=False)
    trained = count(store, "train")
    cfg = load_config(None, overrides(store, OOD))
    run_study(cfg, report=False)
    return cfg, RunStore(store), table, trained


class _ShuffledHere(TableDataset):
    """Evaluation images shuffled by :func:`_shuffle_by_hand`, not by the library's transform."""

    def __init__(self, table, perm):
        super().__init__(table, LABELS, SIZE, train=False)
        self.perm = perm

    def __getitem__(self, key):
        item = super().__getitem__(key)
        return {**item, "image": torch.from_numpy(_shuffle_by_hand(item["image"].numpy(), BLOCK, self.perm))}


def test_the_shuffled_cells_ran_with_their_ids_and_the_grown_study_trained_nothing(grown):
    cfg, store, table, trained = grown
    assert len(table) == 4 and set(table["status"]) == {"complete"}
    assert sorted(table["shuffle"]) == ["8", "8", "none", "none"]
    assert count(store.root, "train") == trained and len(trained) == 4
    assert set(count(store.root, "evaluate")) == set(store.run_ids())
    spec = store.read_spec(run_id(cfg, RunSpec("resnetv2_tiny", UP, 1.0, 0, shuffle=BLOCK)))
    assert (spec["shuffle"], spec["shuffle_block"], spec["shuffle_n_blocks"], spec["shuffle_seed"]) == ("8", 8, 16, 0)
    assert store.read_spec(run_id(cfg, RunSpec("resnetv2_tiny", UP, 1.0, 0)))["shuffle"] == "none"
    # --dry-run lists the axis and has nothing left to do
    p = plan(cfg)
    assert sorted(p["shuffle"]) == ["8", "8", "none", "none"] and set(p["todo"]) == {""}


def test_stored_predictions_are_the_stored_model_on_images_shuffled_here(grown):
    cfg, store, *_ = grown
    data = load_study_data(cfg)
    perm = torch.randperm((SIZE // BLOCK) ** 2, generator=torch.Generator().manual_seed(0)).tolist()
    for src in ("scratch", UP):
        spec = RunSpec("resnetv2_tiny", src, 1.0, 0, shuffle=BLOCK)
        rid = run_id(cfg, spec)
        model = build_model(dataclasses.replace(run_config(cfg, spec).model, pretrained="scratch"),
                            num_outputs=len(LABELS), image_size=SIZE)
        model.load_state_dict(load_file(store.model_path(rid)))
        model.eval()
        for name in ("test", "ood_site_b"):  # ood_site_b was added later, from the stored weights
            ds = _ShuffledHere(data.eval_sets()[name], perm)
            logits = np.asarray(block_features(model, ds, layers=["pre_logits"])["logits"])
            pred = store.read_predictions(rid, name)
            assert list(pred["sample_id"]) == list(ds.table["sample_id"])
            np.testing.assert_allclose(pred[[f"logit:{lab}" for lab in LABELS]].to_numpy(), logits, atol=1e-4)
            # and the unshuffled images give other predictions: the stored ones are of the shuffled images
            plain = block_features(model, TableDataset(ds.table, LABELS, SIZE), layers=["pre_logits"])["logits"]
            assert np.abs(np.asarray(plain) - logits).max() > 1e-3
        # CKA is computed on the cell's own shuffled images: its Gram matrices are never compared with another's
        from scaling.study.protocols import read_grams

        assert read_grams(store, rid)[2].endswith(f"/shuffle-{BLOCK}-s0")
        assert not read_grams(store, run_id(cfg, RunSpec("resnetv2_tiny", src, 1.0, 0)))[2].endswith("-s0")


def _macro(pred: pd.DataFrame) -> float:
    scores = [roc_auc_score(pred.loc[pred[f"label:{lab}"].notna(), f"label:{lab}"],
                            pred.loc[pred[f"label:{lab}"].notna(), f"logit:{lab}"]) for lab in LABELS
              if pred[f"label:{lab}"].dropna().nunique() == 2]
    return float(np.mean(scores))


def test_the_report_s_shuffle_table_is_recomputed_from_the_stored_predictions(grown):
    cfg, store, *_ = grown
    rep = build_report(store.root, n_boot_fit=10)
    assert 'id="tbl-shuffle"' in render_html(rep) and 'id="fig-shuffle"><img' in render_html(rep)
    t = rep.tables["shuffle"].set_index(["pretrained", "shuffle"])
    assert t.loc[(UP, "8"), "block"] == 8 and t.loc[(UP, "none"), "block"] == SIZE
    auroc = {}
    for src in ("scratch", UP):
        for sh in ("none", "8"):
            pred = store.read_predictions(run_id(cfg, RunSpec("resnetv2_tiny", src, 1.0, 0, shuffle=sh)), "test")
            auroc[src, sh] = _macro(pred)
            assert t.loc[(src, sh), "mean"] == pytest.approx(auroc[src, sh], abs=1e-9)
            assert t.loc[(src, sh), "lo"] <= t.loc[(src, sh), "mean"] <= t.loc[(src, sh), "hi"]
    for sh in ("none", "8"):
        r = t.loc[(UP, sh)]
        assert r["gap"] == pytest.approx(auroc[UP, sh] - auroc["scratch", sh], abs=1e-9)
        assert r["scratch"] == pytest.approx(auroc["scratch", sh], abs=1e-9)
        assert r["gap_lo"] <= r["gap"] <= r["gap_hi"] and r["gap_ci"] == "bootstrap"
    assert t.loc[("scratch", "8"), ["gap", "gap_lo", "gap_hi"]].isna().all()  # scratch has no gap over itself
    # the scaling views read the plain cells only: the shuffled ones are not more seeds of them
    assert set(rep.tables["headline"]["shuffle"]) == {"none", "8"}  # shown as an axis of the headline table
    comparisons = rep.tables["comparisons"]
    assert (comparisons["n"] > 0).all() and len(comparisons)
    blocks = rep.tables["cka_blocks"]
    assert set(blocks["shuffle"]) == {"none", "8"} and (blocks["n_seeds"] == 1).all()


def test_the_other_analysis_tables_never_take_a_shuffled_cell_for_a_plain_one(monkeypatch, tmp_path):
    """A shuffled fine-tuned cell is fine-tuned, not re-initialised and (maybe) k-shot: the probe gap, few-shot and
    re-initialisation tables must not read it as another seed or another reference of the unshuffled cell."""
    from scaling.study import analysis_tables as at

    def row(protocol, seed, value, shuffle="none", reinit="none", shots=0):
        return {"eval_set": "test", "label": "macro", "attribute": "all", "group": "all", "metric": "auroc",
                "pretrained": "bit-m", "backbone": "bit_r50x1", "n_params": 23.5e6, "fraction": 1.0, "shots": shots,
                "protocol": protocol, "reinit": reinit, "shuffle": shuffle, "seed": seed, "n_seeds": 1,
                "n_train_images": 10,
                "run_id": f"{protocol}-{shuffle}-{reinit}-{shots}-{seed}", "value": value, "mean": value,
                "lo": value - 0.05, "hi": value + 0.05}

    rows = pd.DataFrame([row("finetune", 0, 0.80), row("linear_probe", 0, 0.70), row("finetune", 0, 0.55, "8"),
                         row("finetune", 0, 0.75, reinit="after:2"), row("finetune", 0, 0.60, shots=5),
                         row("finetune", 0, 0.52, "8", shots=5)])
    monkeypatch.setattr(at.RunStore, "read_predictions", lambda self, rid, eval_set: rid)
    monkeypatch.setattr(at, "paired_macro_gap", lambda a, b, n_boot, alpha: {
        ("finetune-none-none-0-0", "linear_probe-none-none-0-0"): (0.10, 0.05, 0.15)}[a, b])
    gap = at.probe_gap(rows, tmp_path)
    assert len(gap) == 1 and gap["finetune"].iloc[0] == pytest.approx(0.80) and gap["gap"].iloc[0] == 0.10
    assert list(at.fewshot_table(rows)["mean"]) == [0.60]
    reinit = at.reinit_table(rows, pd.DataFrame([{"backbone": "bit_r50x1", "n_units": 6}])).set_index("reinit")
    assert sorted(reinit.index) == ["after:2", "none"]
    assert reinit.loc["after:2", "auroc_lost"] == pytest.approx(0.05)


def test_the_shuffle_gap_over_seeds_is_the_probe_gap_s_interval(monkeypatch, tmp_path):
    """Two seeds: the gap source − scratch at a block size is the mean of the per-seed paired differences, with the
    interval the probe gap gets from the same per-seed numbers (cell_interval: seeds and patients)."""
    from scaling.study import analysis_tables as at

    pairs = {("up8-0", "sc8-0"): (0.06, 0.01, 0.11), ("up8-1", "sc8-1"): (0.02, -0.03, 0.07),
             ("ft0", "lp0"): (0.06, 0.01, 0.11), ("ft1", "lp1"): (0.02, -0.03, 0.07)}
    monkeypatch.setattr(at.RunStore, "read_predictions", lambda self, rid, eval_set: rid)
    monkeypatch.setattr(at, "paired_macro_gap", lambda a, b, n_boot, alpha: pairs[a, b])

    def row(src, protocol, shuffle, seed, value, rid):
        return {"eval_set": "test", "label": "macro", "attribute": "all", "group": "all", "metric": "auroc",
                "pretrained": src, "backbone": "bit_r50x1", "n_params": 23.5e6, "fraction": 1.0, "shots": 0,
                "protocol": protocol, "reinit": "none", "shuffle": shuffle, "seed": seed, "run_id": rid,
                "value": value, "lo": value - 0.04, "hi": value + 0.04}

    shuffled = pd.DataFrame([row("bit-m", "finetune", "8", 0, 0.66, "up8-0"), row("bit-m", "finetune", "8", 1, 0.62,
                                                                                   "up8-1"),
                             row("scratch", "finetune", "8", 0, 0.60, "sc8-0"),
                             row("scratch", "finetune", "8", 1, 0.60, "sc8-1")])
    t = at.shuffle_table(shuffled, tmp_path, image_size=224).set_index(["pretrained", "shuffle"])
    # the same per-seed numbers through probe_gap (fine-tuned = the source, probe = scratch)
    probe = shuffled.assign(shuffle="none", pretrained="bit-m",
                            protocol=["finetune", "finetune", "linear_probe", "linear_probe"],
                            run_id=["ft0", "ft1", "lp0", "lp1"])
    ref = at.probe_gap(probe, tmp_path).iloc[0]
    r = t.loc[("bit-m", "8")]
    assert r["gap"] == pytest.approx(0.04) and r["gap_ci"] == "seeds+patients" == ref["gap_ci"]
    assert (r["gap_lo"], r["gap_hi"]) == (pytest.approx(ref["gap_lo"]), pytest.approx(ref["gap_hi"]))
    assert (r["mean"], r["lo"], r["hi"]) == (pytest.approx(0.64), pytest.approx(ref["finetune_lo"]),
                                             pytest.approx(ref["finetune_hi"]))
    assert r["block"] == 8 and r["scratch"] == pytest.approx(0.60) and r["n_seeds"] == 2

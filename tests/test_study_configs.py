"""The real study configs on fixture data in the datasets' real formats: --dry-run plans every cell, and a
smoke variant (two tiny backbones, a few steps, no sharding) trains, evaluates and reports end to end through the
same runner, with offline W&B."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from study_store import html_table

from scaling.config import compose, load_config
from dataset_fixtures import write_fixture
from scaling.demo.synthetic import write_synthetic_chexpert
from scaling.study.aggregate import load_results, summarise
from scaling.study.grid import expand_grid
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


def _plan_offline(cfg, weights: Path, monkeypatch) -> tuple[pd.DataFrame, list[str]]:
    """Plan ``cfg`` offline (as the tests run) with an empty weights directory, copying in each file the dry run
    names as missing, as its message tells a user to: (the plan, the files it asked for)."""
    from huggingface_hub import constants

    from scaling.models.weights import WeightsUnavailable

    monkeypatch.setenv("SCALING_WEIGHTS_DIR", str(weights))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(weights.parent / "hf"))
    asked = []
    while True:
        try:
            return plan(cfg), asked
        except WeightsUnavailable as e:
            path = Path(re.search(r"copy it to (\S+) \(directory set by", str(e)).group(1))
            assert path.parent == weights and path.name not in asked, str(e)
            asked.append(path.name)
            weights.mkdir(exist_ok=True)
            path.write_bytes(b"")


@pytest.mark.parametrize("name", STUDIES)
def test_dry_run_plans_every_cell(name, tmp_path, monkeypatch):
    cfg = load_config(CONFIGS / f"{name}.yaml", _point_at_fixtures(name, tmp_path))
    p, asked = _plan_offline(cfg, tmp_path / "weights", monkeypatch)
    # offline, every public checkpoint the grid starts from is asked for by name before anything is written:
    # BiT-M from the hub, BiT-S from its URL, one per backbone; ViT in21k and in1k (ViT-L has no in1k weights)
    bit = ["50x1", "50x3", "101x1", "101x3", "152x2"] + (["152x4"] if name == "chexpert_bit" else [])
    vit = [f"vit_{s}_patch16_224.augreg_{t}.safetensors" for s in ("small", "base") for t in ("in1k", "in21k")]
    expected = ({*vit, "vit_large_patch16_224.augreg_in21k.safetensors"} if name == "chexpert_vit" else
                {f"resnetv2_{a}_bit.goog_in21k.safetensors" for a in bit} | {f"BiT-S-R{a}.npz" for a in bit})
    assert sorted(asked) == sorted(expected)
    g = cfg.grid
    n_cells = len(expand_grid(cfg))
    # cells without public weights (ViT-L x ImageNet-1k) are dropped, never more
    assert 0 < len(p) <= n_cells and (len(p) == n_cells or name == "chexpert_vit")
    # every shipped study has the no-transfer control; the multi-label ones also linear probes and k-shot probes
    assert "scratch" in set(p.pretrained)
    if cfg.data.task == "multilabel":
        assert {"finetune", "linear_probe"} == set(p.protocol) and (p.shots > 0).any()
    tuned = p[p.protocol == "finetune"] if "protocol" in p else p
    assert set(p.status) == {"missing"} and (p.train_images > 0).all() and (tuned.steps > 0).all()
    assert (p[~p.index.isin(tuned.index)].steps == 0).all()  # a probe cell trains no step
    # nested fractions: more patients at a larger fraction, for the same seed
    plain = tuned[tuned.shots == 0] if "shots" in tuned else tuned
    one = plain[(plain.backbone == p.backbone.iloc[0]) & (plain.pretrained == p.pretrained.iloc[0])
                & (plain.seed == g.seeds[0])]
    assert list(one.sort_values("fraction").train_patients) == sorted(one.train_patients)
    assert not RunStore(cfg.output_dir).run_ids()  # a dry run trains nothing


SMOKE = ["grid.pretrained=[scratch]", "grid.also=[]", "grid.fractions=[1.0]", "grid.seeds=[0]", "train.hyperrule=off",
         "train.steps=3", "train.batch_size=8", "train.grad_accum=1", "train.mixed_precision=no", "train.warmup_steps=1",
         "sharding.strategy=none", "sharding.activation_checkpointing=none", "sharding.param_dtype=fp32",
         "data.image_size=32", "data.num_workers=0", "eval.n_boot=20", "tracking.wandb=offline"]
BACKBONES = {"chexpert_vit": ("vit_micro", "vit_mini")}
_CXR = {"val": {"sex", "age_group", "race"}, "test": {"sex", "age_group", "race"}, "nih_cxr14": {"sex", "age_group"},
        "mimic_cxr": {"sex", "age_group", "race"}}
EXPECTED_ATTRIBUTES = {
    "chexpert_bit": _CXR, "chexpert_vit": _CXR,
    "derm_isic": {"val": {"sex", "age_group"}, "test": {"sex", "age_group"}, "ddi": {"skin_group"},
                  "fitzpatrick17k": {"skin_group"}},
    # the fixture's validation patient (2 images) has no age in metadata.csv; CBIS-DDSM has no age, CMMD no density
    "mammo_vindr": {"val": {"density"}, "test": {"density", "age_group"}, "cbis_ddsm": {"density"},
                    "cmmd": {"age_group"}},
}
"""The subgroup attributes each evaluation set of a shipped config has on the fixture data."""
"""Two backbones per smoke study (the report's model-size views need two); BiT-style unless named here."""


def _ci(row) -> str:
    """A summary row formatted as the report prints it."""
    return f"{row['mean']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}]" if pd.notna(row["mean"]) else "n/a"


ONE_OF_K_SETS = {"derm_isic": {"val", "test"}}
"""The evaluation sets of a one-of-K study whose labelled samples all have a class (the OOD sets of derm_isic know
only melanoma or not: no accuracy there)."""


def _check_one_of_k(cfg, store, table, text, summary) -> None:
    """A one-of-K study stores a softmax and, per derived label, the summed probability of its group and its log-odds;
    its accuracy and balanced accuracy equal scikit-learn's on the stored predictions; results.csv and the report
    show them."""
    from scipy.special import expit
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

    classes = list(cfg.data.labels)
    for rid in table.run_id:
        rows = store.read_metrics(rid)
        k = rows[(rows.label == "all") & (rows.attribute == "all")].set_index(["eval_set", "metric"])["value"]
        scored = set()
        for e in store.eval_sets(rid):
            pred = store.read_predictions(rid, e)
            y = pred[[f"label:{c}" for c in classes]].to_numpy(float)
            p = pred[[f"prob:{c}" for c in classes]].to_numpy(float)
            np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
            for name, group in cfg.data.derived_labels.items():
                np.testing.assert_allclose(pred[f"prob:{name}"], pred[[f"prob:{c}" for c in group]].sum(axis=1),
                                           rtol=1e-12)
                np.testing.assert_allclose(expit(pred[f"logit:{name}"]), pred[f"prob:{name}"], rtol=1e-9)
                assert pred[f"label:{name}"].notna().any()  # from the data, on every set
            has_class = (y == 1.0).sum(axis=1) == 1
            if (~np.isnan(y).all(axis=1) & ~has_class).any():
                assert (e, "accuracy") not in k.index
                continue
            scored.add(e)
            t, guess = y[has_class].argmax(axis=1), p[has_class].argmax(axis=1)
            assert k[(e, "accuracy")] == pytest.approx(accuracy_score(t, guess), abs=1e-12)
            assert k[(e, "balanced_accuracy")] == pytest.approx(balanced_accuracy_score(t, guess), abs=1e-12)
            assert k[(e, "top3_accuracy")] == pytest.approx(
                top_k_accuracy_score(t, p[has_class], k=3, labels=range(len(classes))), abs=1e-12)
        assert scored == ONE_OF_K_SETS[cfg.name]
        assert table.set_index("run_id").loc[rid, "accuracy_test"] == k[("test", "accuracy")]
        assert table.set_index("run_id").loc[rid, "top3_accuracy_test"] == k[("test", "top3_accuracy")]
    for e in ["val", "test", *(e.name for e in cfg.data.ood)]:
        if e not in ONE_OF_K_SETS[cfg.name]:
            assert f"tbl-multiclass-{e}" not in text
            continue
        shown = html_table(text, f"tbl-multiclass-{e}").set_index("backbone")
        for bb in shown.index:
            cell = summary[(summary.backbone == bb) & (summary.eval_set == e) & (summary.label == "all")]
            assert shown.loc[bb, "accuracy"] == _ci(cell[cell.metric == "accuracy"].iloc[0])
            assert shown.loc[bb, "balanced_accuracy"] == _ci(cell[cell.metric == "balanced_accuracy"].iloc[0])


@pytest.mark.parametrize("name", STUDIES)
def test_smoke_study_trains_and_reports(name, tmp_path, monkeypatch):
    # The shipped config, shrunk (two tiny backbones, 3 steps, 32 px), trains, evaluates every set, writes the
    # HTML report and the offline W&B study view; the report shows every OOD set with the store's numbers.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)  # anything W&B writes relative to the cwd stays in tmp
    backbones = BACKBONES.get(name, ("resnetv2_tiny", "resnetv2_small"))
    cfg = load_config(CONFIGS / f"{name}.yaml", [*_point_at_fixtures(name, tmp_path), *SMOKE,
                                                  f"grid.backbones=[{','.join(backbones)}]"])
    ood = [e.name for e in cfg.data.ood]
    assert len(ood) >= 2
    table = run_study(cfg)
    assert list(table.status) == ["complete", "complete"]
    store = RunStore(cfg.output_dir)
    for rid in table.run_id:
        assert set(store.eval_sets(rid)) == {"val", "test", *ood}
        assert {"auroc", "ece", "brier"} <= set(store.read_metrics(rid).metric)
        assert store.read_meta(rid)["steps"] == 3

    text = (store.root / "report.html").read_text()
    tidy = load_results(store.root)
    everything = summarise(tidy)
    summary = everything[(everything.attribute == "all") & (everything.group == "all")]
    if cfg.data.task == "multiclass":
        _check_one_of_k(cfg, store, table, text, summary)
    for e in ood:
        assert f"<h3 id='ood-{e}'>" in text, e
        shared = list(pd.unique(tidy[(tidy.eval_set == e) & (tidy.metric == "auroc_drop") & (tidy.label != "macro")]
                                .label))
        assert shared, f"{e} shares no scorable label with test"
        assert f"Compared on {len(shared)} label(s): <b>{', '.join(shared)}</b>" in text
        shown = html_table(text, f"tbl-ood-{e}").set_index("backbone")
        assert sorted(shown.index) == sorted(backbones)
        for bb in backbones:
            cell = summary[(summary.backbone == bb) & (summary.eval_set == e)].set_index(["label", "metric"])
            assert shown.loc[bb, "test AUROC"] == _ci(cell.loc[("macro", "auroc_id")])
            assert shown.loc[bb, f"{e} AUROC"] == _ci(cell.loc[("macro", "auroc_ood")])
            assert shown.loc[bb, "drop"] == _ci(cell.loc[("macro", "auroc_drop")])
            for lab in shared:
                assert shown.loc[bb, f"drop: {lab}"] == _ci(cell.loc[(lab, "auroc_drop")])

    # Fairness and calibration on every set; val's threshold/temperature-dependent columns are marked in-sample;
    # an attribute only an OOD set has (Fitzpatrick skin type on DDI, Fitzpatrick17k) is reported there.
    macro = everything[(everything.label == "macro") & (everything.group == "all")]
    for e in ["val", "test", *ood]:
        cal = html_table(text, f"tbl-calibration-{e}").set_index("backbone")
        temp = "ece_temp (in-sample)" if e == "val" else "ece_temp"
        for bb in backbones:
            cell = macro[(macro.backbone == bb) & (macro.eval_set == e) & (macro.attribute == "all")]
            assert cal.loc[bb, "ece"] == _ci(cell[cell.metric == "ece"].iloc[0])
            assert cal.loc[bb, temp] == _ci(cell[cell.metric == "ece_temp"].iloc[0])
        attrs = sorted(set(macro[(macro.eval_set == e) & (macro.attribute != "all")].attribute))
        assert attrs == sorted(a for a in cfg.data.subgroups if a in EXPECTED_ATTRIBUTES[name][e]), (e, attrs)
        if not attrs:
            continue
        fair = html_table(text, f"tbl-fairness-{e}").set_index(["backbone", "attribute"])
        eod = "eod (in-sample)" if e == "val" else "eod"
        for bb in backbones:
            for a in attrs:
                cell = macro[(macro.backbone == bb) & (macro.eval_set == e) & (macro.attribute == a)]
                assert fair.loc[(bb, a), "worst_group_auroc"] == _ci(cell[cell.metric == "worst_group_auroc"].iloc[0])
                assert fair.loc[(bb, a), eod] == _ci(cell[cell.metric == "eod"].iloc[0])

    # Reliability diagrams for test and every OOD set, per backbone.
    rel = html_table(text, "tbl-reliability")
    assert set(zip(rel.eval_set, rel.backbone)) == {(e, bb) for e in ["test", *ood] for bb in backbones}
    assert re.search(r'<figure id="fig-reliability"><img', text)

    # Mammography: breast- and exam-level AUROC beside the image level, for every set.
    if cfg.eval.aggregate:
        for e in ["val", "test", *ood]:
            exam = html_table(text, f"tbl-exam-{e}").set_index("backbone")
            for bb in backbones:
                cell = summary[(summary.backbone == bb) & (summary.eval_set == e) & (summary.label == "macro")]
                cell = cell.set_index("metric")
                for col, metric in (("image", "auroc"), ("breast (max)", "auroc@breast_max"),
                                    ("breast (mean)", "auroc@breast_mean"), ("exam (max)", "auroc@exam_max"),
                                    ("exam (mean)", "auroc@exam_mean")):
                    assert exam.loc[bb, col] == _ci(cell.loc[metric]), (e, bb, col)
        units = html_table(text, "tbl-exam-units").set_index("evaluation set")
        test_preds = store.read_predictions(table.run_id.iloc[0], "test")
        assert int(units.loc["test", "exams"]) == test_preds.patient_id.nunique()  # VinDr: one exam per patient

    # The W&B study view: a study-level offline run holding the report's figures and tables.
    study_runs = list((store.root / "wandb-study").rglob("*.wandb"))
    assert len(study_runs) == 1
    blob = study_runs[0].read_bytes()
    for key in ["report/auroc_vs_params", "report/id_vs_ood", "report/headline", *[f"report/ood/{e}" for e in ood]]:
        assert key.encode() in blob, key

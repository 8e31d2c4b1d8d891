"""A study with the Mean Var init (Raghu et al. 2019) as a pretraining source: scratch vs ``meanvar:<source>`` vs the
source itself, trained end to end on the demo data; each run's starting weights, records and the report's paired
comparisons are checked against an independent computation."""

import math

import numpy as np
import pytest
import torch

from scaling.config import ModelConfig, load_config
from scaling.engine.checkpoint import read_final_weights
from scaling.models import build_model
from scaling.models.weights import read_state_dict
from scaling.study.grid import RunSpec, run_id
from scaling.study.report import build_report, render_html
from scaling.study.runner import plan, run_study
from scaling.study.store import RunStore

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
UP, MV = "upstream:up", "meanvar:upstream:up"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    store = tmp_path_factory.mktemp("meanvar") / "store"
    cfg = load_config(None, [
        f"output_dir={store}", "name=meanvar", "data.root=synthetic", "data.image_size=32",
        f"data.labels=[{','.join(LABELS)}]", "data.options={uncertainty: ignore}", "train.batch_size=16",
        "train.lr=0.01", "train.steps=4", "train.warmup_steps=1", "train.log_every=4", "sharding.strategy=none",
        "eval.n_boot=20", "cka.enabled=false",
        "upstream=[{name: up, num_images: 200, num_classes: 4, image_size: 32, steps: 5, batch_size: 32}]",
        "grid.backbones=[resnetv2_tiny]", f"grid.pretrained=[scratch, '{MV}', '{UP}']", "grid.fractions=[1.0]",
        "grid.seeds=[0,1]", "grid.reinit=[none, 'after:2']"])
    planned = plan(cfg)  # the dry run, before anything exists: the upstream weights are made by the study
    table = run_study(cfg)
    return cfg, RunStore(store), planned, table


def test_every_source_is_a_cell_with_its_own_run_and_record(study):
    cfg, store, planned, table = study
    # scratch and Mean Var have nothing pretrained to re-initialise: 3 sources x 2 seeds + the upstream's after:2
    assert len(planned) == len(table) == 3 * 2 + 2 and set(table["status"]) == {"complete"}
    assert sorted(planned["pretrained"].unique()) == sorted(table["pretrained"].unique()) == sorted(
        ["scratch", MV, UP])
    assert set(table[table["pretrained"] == MV]["reinit"]) == {"none"}
    n_drawn = sum(1 for n, _ in build_model(cfg.model, 5).backbone.named_parameters() if not n.startswith("head"))
    for seed in (0, 1):
        rid = run_id(cfg, RunSpec("resnetv2_tiny", MV, 1.0, seed))
        assert rid.startswith(f"resnetv2-tiny__meanvar-upstream-up__f1__s{seed}__")
        spec = store.read_spec(rid)
        assert (spec["pretrained"], spec["mean_var_of"], spec["mean_var_seed"], spec["mean_var_tensors"]) == (
            MV, UP, seed, n_drawn)
        assert math.isnan(spec["pretrain_images"])  # no point of a curve over pretraining images
        assert store.read_meta(rid)["input_normalisation"] == store.read_meta(
            run_id(cfg, RunSpec("resnetv2_tiny", UP, 1.0, seed)))["input_normalisation"]
    assert "mean_var_of" not in store.read_spec(run_id(cfg, RunSpec("resnetv2_tiny", UP, 1.0, 0)))


def test_a_mean_var_run_started_from_its_seeds_draw_not_from_the_pretrained_features(study):
    """After 4 small steps the fine-tuned weights are still their starting point's: they correlate with the Mean
    Var draw of the run's seed (rebuilt here from the upstream file) and not with the pretrained weights it was
    drawn from, nor with another seed's draw."""
    cfg, store, *_ = study
    upstream = store.upstream_dir("up") / "resnetv2_tiny.safetensors"
    pretrained = read_state_dict(upstream)
    draws = [build_model(ModelConfig(backbone="resnetv2_tiny", pretrained=f"meanvar:{upstream}"), 5,
                         seed=s).backbone.state_dict() for s in (0, 1)]
    key = "stages.3.blocks.0.conv2.weight"  # 128 x 128 x 3 x 3: correlations of chance are ~0.003
    for seed in (0, 1):
        tuned = read_final_weights(store.model_path(run_id(cfg, RunSpec("resnetv2_tiny", MV, 1.0, seed))).parent)
        got = tuned[f"backbone.{key}"].flatten().double().numpy()

        def corr(ref):
            return np.corrcoef(got, ref[key].flatten().double().numpy())[0, 1]

        assert corr(draws[seed]) > 0.9 and abs(corr(draws[1 - seed])) < 0.05 and abs(corr(pretrained)) < 0.05


def test_the_report_compares_mean_var_with_scratch_and_the_source_with_mean_var(study):
    cfg, store, *_ = study
    rep = build_report(store.root, n_boot_fit=10)
    assert MV in render_html(rep)
    macro = {}
    for rid in store.run_ids():
        spec, m = store.read_spec(rid), store.read_metrics(rid)
        if spec["reinit"] == "none":
            row = m[(m.eval_set == "test") & (m.label == "macro") & (m.attribute == "all") & (m.metric == "auroc")]
            macro.setdefault(spec["pretrained"], []).append(row.value.iloc[0])
    c = rep.tables["comparisons"]
    c = c[(c["axis"] == "pretrained") & (c["label"] == "macro") & (c["eval_set"] == "test")]
    pairs = {(r.pretrained, r.vs): r for r in c.itertuples()}
    # the ladder of pretraining images (the upstream against scratch), then the Mean Var init against the reference
    # (what the scale of the weights alone gives) and the source against it (what its features add)
    assert set(pairs) == {(UP, "scratch"), (MV, "scratch"), (UP, MV)}
    for (a, b), r in pairs.items():
        assert r.n_seeds == 2
        assert (r.auroc, r.auroc_vs) == (pytest.approx(np.mean(macro[a])), pytest.approx(np.mean(macro[b])))
        assert r.diff == pytest.approx(r.auroc - r.auroc_vs)


def test_a_mean_var_probe_caches_its_features_per_seed(tmp_path):
    """A loaded backbone's features are shared by every seed's probe cells; a Mean Var backbone is its seed's draw."""
    from scaling.study.protocols import feature_cache

    store = RunStore(tmp_path / "store")
    cfg = load_config(None, [f"output_dir={store.root}", "grid.pretrained=[bit-m, 'meanvar:bit-m']",
                             "grid.seeds=[0,1]", "grid.protocols=[linear_probe]"])

    def cache(source, seed, fraction=1.0):
        return feature_cache(cfg, store, RunSpec("bit_r50x1", source, fraction, seed, protocol="linear_probe"))

    assert cache("bit-m", 1) == cache("bit-m", 0, 0.5)
    assert cache("meanvar:bit-m", 1) == cache("meanvar:bit-m", 1, 0.5) != cache("meanvar:bit-m", 0)

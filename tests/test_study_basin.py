"""The loss-basin analysis (Neyshabur, Sedghi & Zhang 2020, §3.3): the interpolation on a tiny model against hand
computations, the barrier on hand numbers, the loss and AUROC against scikit-learn, and the command end to end on a
real (tiny) study whose alpha 0 and 1 rows are its runs' own stored predictions, scored here with scikit-learn."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy.special import log_softmax
from sklearn.metrics import log_loss, roc_auc_score

from scaling.analysis.features import block_features
from scaling.analysis.interpolation import barrier, interpolate_state_dicts, interpolation_curve, loss_and_auroc
from scaling.config import load_config
from scaling.data.dataset import TableDataset
from scaling.models import build_model
from scaling.study.__main__ import main
from scaling.study.analysis_tables import BASIN_FILE, read_basin
from scaling.study.basin import basin_sample
from scaling.study.data import load_study_data
from scaling.study.grid import RunSpec, run_config, run_id
from scaling.study.report import build_report, render_html
from scaling.study.runner import run_study
from scaling.study.store import RunStore

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
UP = "upstream:up"
SIZE = 32


def _tiny(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _trained_bn(seed):
    """A tiny model whose BatchNorm buffers moved (running statistics and the batch counter)."""
    m = _tiny(seed).train()
    with torch.no_grad():
        for _ in range(seed + 1):
            m(torch.randn(8, 3, generator=torch.Generator().manual_seed(seed)))
    return m.eval()


# ----------------------------------------------------------------------------------------------------------------
# The interpolation, the barrier, the loss and AUROC
# ----------------------------------------------------------------------------------------------------------------


def test_alpha_0_and_1_are_the_end_points_exactly_and_the_midpoint_is_the_average():
    a, b = _trained_bn(0).state_dict(), _trained_bn(3).state_dict()
    assert int(a["1.num_batches_tracked"]) == 1 and int(b["1.num_batches_tracked"]) == 4
    for k in a:
        assert torch.equal(interpolate_state_dicts(a, b, 0.0)[k], a[k])
        assert torch.equal(interpolate_state_dicts(a, b, 1.0)[k], b[k])
    mid = interpolate_state_dicts(a, b, 0.5)
    for k in ("0.weight", "2.bias", "1.running_mean", "1.running_var"):  # parameters and BN statistics alike
        np.testing.assert_allclose(mid[k].numpy(), (a[k].numpy() + b[k].numpy()) / 2, rtol=1e-6)
    q = interpolate_state_dicts(a, b, 0.25)["0.weight"].numpy()
    np.testing.assert_allclose(q, 0.75 * a["0.weight"].numpy() + 0.25 * b["0.weight"].numpy(), rtol=1e-6)
    # the integer counter is not averaged: the nearer end point's
    assert int(interpolate_state_dicts(a, b, 0.4)["1.num_batches_tracked"]) == 1
    assert int(interpolate_state_dicts(a, b, 0.6)["1.num_batches_tracked"]) == 4
    with pytest.raises(ValueError, match="not one architecture"):
        interpolate_state_dicts(a, {k: v for k, v in b.items() if k != "2.bias"}, 0.5)
    with pytest.raises(ValueError, match=r"'2.bias' has shape \(2,\)"):
        interpolate_state_dicts(a, {**b, "2.bias": torch.zeros(3)}, 0.5)


def test_the_barrier_on_hand_numbers():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    # chord of the losses: 1, 0.875, 0.75, 0.625, 0.5; excesses 0, 0.625, 1.25, 0.575, 0
    assert barrier(alphas, [1.0, 1.5, 2.0, 1.2, 0.5]) == pytest.approx(1.25)
    # the error 1 - AUROC: 0.2, 0.3, 0.4, 0.25, 0.1; chord 0.2, 0.175, 0.15, 0.125, 0.1; largest excess 0.25
    assert barrier(alphas, 1 - np.array([0.8, 0.7, 0.6, 0.75, 0.9])) == pytest.approx(0.25)
    assert barrier(alphas, [1.0, 0.6, 0.5, 0.6, 1.0]) == pytest.approx(0.0)  # below the chord: no barrier
    assert barrier([1.0, 0.0, 0.5], [3.0, 1.0, 2.5]) == pytest.approx(0.5)  # any order of the points
    with pytest.raises(ValueError, match="alpha 0 and 1"):
        barrier([0.0, 0.5], [1.0, 2.0])


def test_the_loss_and_auroc_are_the_training_loss_and_the_macro_auroc_of_sklearn():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 3))
    y = (rng.random((40, 3)) < 0.4).astype(float)
    y[rng.random((40, 3)) < 0.2] = np.nan  # unlabelled entries count in neither
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 1.0)  # one class only: out of the macro
    loss, auc = loss_and_auroc(z, y, "multilabel")
    known = ~np.isnan(y)
    bce = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
    assert loss == pytest.approx(bce[known].mean(), rel=1e-6)
    assert auc == pytest.approx(np.mean([roc_auc_score(y[known[:, j], j], z[known[:, j], j]) for j in (0, 1)]))

    c = rng.integers(-1, 3, size=40)  # -1: unlabelled
    loss, auc = loss_and_auroc(z, c, "multiclass")
    lab = c >= 0
    assert loss == pytest.approx(log_loss(c[lab], np.exp(log_softmax(z[lab], axis=1)), labels=[0, 1, 2]), rel=1e-6)
    p = np.exp(log_softmax(z, axis=1))
    assert auc == pytest.approx(np.mean([roc_auc_score(c[lab] == j, p[lab, j]) for j in range(3)]))


def test_the_curve_of_a_tiny_model_against_its_end_points_and_the_averaged_model():
    m1, m2 = _trained_bn(1), _trained_bn(2)
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(5))
    y = (torch.rand(30, 2, generator=torch.Generator().manual_seed(6)) < 0.5).float().numpy()

    def predict(m):
        with torch.no_grad():
            return {"logits": m.eval()(x).numpy(), "target": y}

    curve = interpolation_curve(m1.state_dict(), m2.state_dict(), lambda: _tiny(9), [0.0, 0.5, 1.0], predict)
    assert list(curve["alpha"]) == [0.0, 0.5, 1.0]
    for row, m in ((0, m1), (2, m2)):
        assert curve["loss"][row] == loss_and_auroc(predict(m)["logits"], y)[0]  # bit for bit: the stored model
    mid = _tiny(7)  # the averaged weights loaded by hand
    mid.load_state_dict({k: (v + m2.state_dict()[k]) / 2 if v.is_floating_point() else m2.state_dict()[k]
                         for k, v in m1.state_dict().items()})
    assert curve["loss"][1] == pytest.approx(loss_and_auroc(predict(mid)["logits"], y)[0], rel=1e-6)
    chord = (curve["loss"][0] + curve["loss"][2]) / 2
    assert curve["loss_barrier"].iloc[0] == pytest.approx(max(0.0, curve["loss"][1] - chord))
    assert curve["error_barrier"].nunique() == 1


# ----------------------------------------------------------------------------------------------------------------
# The command on a real study
# ----------------------------------------------------------------------------------------------------------------


def overrides(store, *extra):
    return [
        f"output_dir={store}", "name=basin", "data.root=synthetic", f"data.image_size={SIZE}",
        f"data.labels=[{','.join(LABELS)}]", "data.options={uncertainty: ignore}", "train.batch_size=16",
        "train.lr=0.05", "train.steps=4", "train.warmup_steps=1", "train.log_every=4", "eval.n_boot=10",
        "cka.enabled=false",
        f"upstream=[{{name: up, num_images: 120, num_classes: 4, image_size: {SIZE}, steps: 3, batch_size: 32}}]",
        "grid.backbones=[resnetv2_tiny]", f"grid.pretrained=[scratch, '{UP}']", "grid.fractions=[1.0]",
        "grid.seeds=[0, 1]", *extra]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    store = tmp_path_factory.mktemp("basin") / "store"
    cfg = load_config(None, overrides(store))
    run_study(cfg, report=False)
    before = render_html(build_report(store, n_boot_fit=10))
    assert main(["basin", str(store), "--max-examples", "0", "--alphas", "3"]) == 0
    return cfg, RunStore(store), before


def _bce(pred: pd.DataFrame) -> float:
    y = pred[[f"label:{lab}" for lab in LABELS]].to_numpy(dtype=float)
    z = pred[[f"logit:{lab}" for lab in LABELS]].to_numpy(dtype=float)
    known = ~np.isnan(y)
    return float((np.logaddexp(0, z) - y * z)[known].mean())  # -log sigmoid(z) for 1, -log(1 - sigmoid(z)) for 0


def _macro(pred: pd.DataFrame) -> float:
    return float(np.mean([roc_auc_score(pred.loc[pred[f"label:{lab}"].notna(), f"label:{lab}"],
                                        pred.loc[pred[f"label:{lab}"].notna(), f"logit:{lab}"]) for lab in LABELS
                          if pred[f"label:{lab}"].dropna().nunique() == 2]))


def test_the_end_points_are_the_runs_stored_predictions_scored_with_sklearn(study):
    cfg, store, _ = study
    t = read_basin(store.root)
    assert sorted(t["pretrained"].unique()) == sorted(["scratch", UP])
    assert len(t) == 2 * 3 and set(t["seeds"]) == {"0,1"} and set(t["alpha"]) == {0.0, 0.5, 1.0}
    assert set(t["norm_stats"]) == {"interpolated"} and set(t["eval_set"]) == {"test"}
    for src in ("scratch", UP):
        rows = t[t["pretrained"] == src].set_index("alpha")
        for alpha, seed in ((0.0, 0), (1.0, 1)):
            rid = run_id(cfg, RunSpec("resnetv2_tiny", src, 1.0, seed))
            assert rows.loc[alpha, "run_1" if seed == 0 else "run_2"] == rid
            pred = store.read_predictions(rid, "test")
            assert rows.loc[alpha, "n_examples"] == len(pred)
            assert rows.loc[alpha, "loss"] == pytest.approx(_bce(pred), rel=1e-5)
            assert rows.loc[alpha, "auroc"] == pytest.approx(_macro(pred), abs=1e-9)
        chord = (rows.loc[0.0, "loss"] + rows.loc[1.0, "loss"]) / 2
        assert rows["loss_barrier"].iloc[0] == pytest.approx(max(0.0, rows.loc[0.5, "loss"] - chord))
        err_chord = 1 - (rows.loc[0.0, "auroc"] + rows.loc[1.0, "auroc"]) / 2
        assert rows["error_barrier"].iloc[0] == pytest.approx(max(0.0, 1 - rows.loc[0.5, "auroc"] - err_chord))


def test_the_midpoint_is_the_model_with_the_averaged_stored_weights(study):
    cfg, store, _ = study
    data = load_study_data(cfg)
    spec = RunSpec("resnetv2_tiny", UP, 1.0, 0)
    w0 = load_file(store.model_path(run_id(cfg, spec)))
    w1 = load_file(store.model_path(run_id(cfg, dataclasses.replace(spec, seed=1, source=""))))
    model = build_model(dataclasses.replace(run_config(cfg, spec).model, pretrained="scratch"),
                        num_outputs=len(LABELS), image_size=SIZE)
    model.load_state_dict({k: (v + w1[k]) / 2 if v.is_floating_point() else w1[k] for k, v in w0.items()})
    ds = TableDataset(data.test, LABELS, SIZE, train=False)
    logits = np.asarray(block_features(model.eval(), ds, layers=["pre_logits"])["logits"])
    pred = ds.table.assign(**{f"logit:{lab}": logits[:, j] for j, lab in enumerate(LABELS)})
    row = read_basin(store.root).set_index(["pretrained", "alpha"]).loc[(UP, 0.5)]
    assert row["loss"] == pytest.approx(_bce(pred), rel=1e-4)
    assert row["auroc"] == pytest.approx(_macro(pred), abs=1e-6)


def test_a_second_command_skips_the_pairs_and_new_settings_replace_them(study):
    cfg, store, _ = study
    path = store.root / BASIN_FILE
    stamp = os.stat(path).st_mtime_ns
    assert main(["basin", str(store.root), "--max-examples", "0", "--alphas", "3"]) == 0
    assert os.stat(path).st_mtime_ns == stamp  # nothing recomputed, nothing written
    assert main(["basin", str(store.root), "--max-examples", "16", "--alphas", "2"]) == 0
    t = read_basin(store.root)
    assert len(t) == 2 * 2 and set(t["n_examples"]) == {16} and set(t["alpha"]) == {0.0, 1.0}
    # the 16 images are the seeded sample (the CKA sample's draw): the end points are the stored predictions on them
    sample = set(basin_sample(load_study_data(cfg).test, 16)["sample_id"])
    for src in ("scratch", UP):
        rid = run_id(cfg, RunSpec("resnetv2_tiny", src, 1.0, 0))
        pred = store.read_predictions(rid, "test")
        pred = pred[pred["sample_id"].isin(sample)]
        assert len(pred) == 16
        row = t[(t["pretrained"] == src) & (t["alpha"] == 0.0)].iloc[0]
        assert row["loss"] == pytest.approx(_bce(pred), rel=1e-5)
        assert (row["loss_barrier"], row["error_barrier"]) == (0.0, 0.0)  # two points: the chord itself
    # put back the study's table for the report test
    assert main(["basin", str(store.root), "--max-examples", "0", "--alphas", "3"]) == 0


def test_the_report_shows_the_basin_table_only_when_the_store_holds_it(study):
    cfg, store, before = study
    assert 'id="tbl-basin"' not in before and "id='basin'" not in before
    rep = build_report(store.root, n_boot_fit=10)
    html = render_html(rep)
    assert 'id="tbl-basin"' in html and 'id="fig-basin"><img' in html
    side = rep.tables["basin"].iloc[0]
    t = read_basin(store.root)
    for src in ("scratch", UP):
        rows = t[t["pretrained"] == src]
        assert side[f"loss_barrier: {src}"] == pytest.approx(rows["loss_barrier"].iloc[0])
        assert side[f"error_barrier: {src}"] == pytest.approx(rows["error_barrier"].iloc[0])
        assert side[f"loss_barrier: {src}"] == pytest.approx(barrier(rows["alpha"], rows["loss"]))
    assert list(rep.tables["basin"].columns[:3]) == ["backbone", "fraction", "eval_set"]
    assert rep.tables["basin"].columns[3] == "seeds: scratch"  # scratch first, the sources beside it


def test_two_ranks_under_accelerate_launch_give_the_one_process_table(study):
    """The command under ``accelerate launch`` with 2 real CPU ranks (gloo, the runs' DDP): every point predicted
    by both ranks, the same numbers as one process."""
    cfg, store, _ = study
    alone = read_basin(store.root)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    proc = subprocess.run([accelerate, "launch", "--config_file", str(repo / "launch" / "cpu_2proc.yaml"),
                           "--main_process_port", "0", "-m", "scaling.study", "basin", str(store.root),
                           "--max-examples", "0", "--alphas", "3", "--force"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("3 alphas, 2 process(es)") == 2  # really two ranks, one line per pair
    two = read_basin(store.root)
    assert list(two["run_1"]) == list(alone["run_1"]) and list(two["alpha"]) == list(alone["alpha"])
    np.testing.assert_allclose(two["loss"], alone["loss"], rtol=1e-5)
    np.testing.assert_allclose(two["auroc"], alone["auroc"], atol=1e-9)

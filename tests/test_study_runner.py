"""The study runner end to end on synthetic CheXpert data: an interrupted study completed, one run id one result,
a study grown in place, conflicts refused."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from scaling.config import ConfigError, EvalSetConfig, load_config
from scaling.data.table import DataError
from scaling.study.aggregate import load_results, summarise
from scaling.study.grid import expand_grid, run_id
from scaling.study.data import load_study_data
from scaling.study.runner import plan, run_study
from scaling.study.store import RunStore, StoreError
from study_launch import assert_same_results, count, launch, results, study_config

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def study_yaml(tmp: Path, **extra) -> Path:
    cfg = {
        "name": "t",
        "output_dir": str(tmp / "store"),
        "data": {"root": "synthetic", "image_size": 48, "labels": LABELS, "options": {"uncertainty": "ignore"},
                 "ood": [{"name": "ood_site_b", "root": "synthetic:b", "split": "train"}],
                 "subgroups": ["sex", "age_group"]},
        "train": {"batch_size": 32, "lr": 0.05, "steps": 100, "warmup_steps": 10, "log_every": 50},
        "eval": {"n_boot": 50},
        "upstream": [{"name": "up", "num_images": 200, "num_classes": 4, "image_size": 48, "steps": 10,
                      "batch_size": 32}],
        "grid": {"backbones": ["resnetv2_tiny"], "pretrained": ["scratch", "upstream:up"], "fractions": [0.3, 1.0],
                 "seeds": [0]},
    }
    for k, v in extra.items():
        cfg[k] = v
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def interrupted_then_completed(tmp_path_factory):
    """Start the study in a subprocess, kill it (SIGKILL) once the first run is done, then finish it in-process."""
    tmp = tmp_path_factory.mktemp("study")
    path = study_yaml(tmp)
    cfg = load_config(path)
    store = RunStore(cfg.output_dir)
    first = run_id(cfg, expand_grid(cfg)[0])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "recipes" / "scale_study.py"), "--config", str(path),
                             "--no-report"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not store.is_complete(first):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "first run did not finish in 10 minutes"
        time.sleep(0.5)
    time.sleep(1.0)  # the next run has started: kill it mid-way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_status = {rid: store.status(rid) for rid in store.run_ids()}
    done_files = sorted((store.run_dir(first)).rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in done_files if p.is_file()}
    table = run_study(cfg)
    return cfg, store, first, killed_status, mtimes, table


def test_interrupted_study_is_completed_without_redoing_finished_runs(interrupted_then_completed):
    cfg, store, first, killed_status, mtimes, table = interrupted_then_completed
    assert killed_status[first] == "complete"
    assert sum(s == "complete" for s in killed_status.values()) < len(expand_grid(cfg))
    assert all(store.is_complete(run_id(cfg, s)) for s in expand_grid(cfg))
    # the finished run was not touched by the second invocation
    for p, t in mtimes.items():
        assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    assert list(table["status"]) == ["complete"] * 4
    assert (store.root / "results.csv").is_file() and (store.root / "report.html").is_file()
    # the report's paired tests as a table: the pretrained source against scratch, at both fractions, on both sets
    comp = pd.read_csv(store.root / "comparisons.csv")
    macro = comp[comp["label"] == "macro"]
    assert len(macro) == 2 * 2 and set(macro["axis"]) == {"pretrained"} and set(macro["vs"]) == {"scratch"}
    assert set(macro["fraction"]) == {0.3, 1.0} and set(macro["eval_set"]) == {"test", "ood_site_b"}


def test_stored_predictions_and_metrics_agree_with_sklearn(interrupted_then_completed):
    cfg, store, first, *_ = interrupted_then_completed
    full_scratch = next(s for s in expand_grid(cfg) if s.fraction == 1.0 and s.pretrained == "scratch")
    rid = run_id(cfg, full_scratch)
    assert store.eval_sets(rid) == ["ood_site_b", "test", "val"]
    preds = store.read_predictions(rid, "test")
    assert not preds["sample_id"].duplicated().any()
    assert "path" not in preds.columns
    # every test sample is predicted exactly once (distributed padding deduplicated)
    m = store.read_metrics(rid)
    aucs = []
    for label in LABELS:
        ok = preds[f"label:{label}"].notna()
        ref = roc_auc_score(preds.loc[ok, f"label:{label}"], preds.loc[ok, f"prob:{label}"])
        row = m[(m.eval_set == "test") & (m.label == label) & (m.attribute == "all") & (m.metric == "auroc")]
        assert row.value.iloc[0] == pytest.approx(ref, abs=1e-9)
        aucs.append(ref)
    macro = m[(m.eval_set == "test") & (m.label == "macro") & (m.attribute == "all") & (m.metric == "auroc")]
    assert macro.value.iloc[0] == pytest.approx(np.mean(aucs), abs=1e-9)
    # a short fit on the synthetic data learns the signal: clearly above chance
    assert macro.value.iloc[0] > 0.65
    spec = store.read_spec(rid)
    assert spec["n_train_patients"] > store.read_spec(run_id(cfg, expand_grid(cfg)[0]))["n_train_patients"]


def test_nested_fractions_in_the_store(interrupted_then_completed):
    cfg, store, *_ = interrupted_then_completed
    res = pd.read_csv(store.root / "results.csv")
    assert set(res.fraction) == {0.3, 1.0}
    assert res["auroc_test"].between(0.0, 1.0).all() and res["auroc_ood_site_b"].notna().all()
    # the parameter count is n_params, as in spec.json and the summary, so the two merge on their common columns;
    # the old name stays as the last column for scripts written against it
    assert list(res.columns)[-1] == "params" and (res["n_params"] == res["params"]).all()
    assert (res["n_params"] == [store.read_spec(r)["n_params"] for r in res["run_id"]]).all()
    summary = summarise(load_results(store.root))
    merged = res.merge(summary[(summary["metric"] == "auroc") & (summary["eval_set"] == "test")
                               & (summary["label"] == "macro") & (summary["attribute"] == "all")])
    assert len(merged) == len(res) // len(cfg.grid.seeds)


def test_rerun_skips_everything_and_dry_run_reports_done(interrupted_then_completed):
    cfg, store, first, *_ = interrupted_then_completed
    before = (store.run_dir(first) / "DONE").stat().st_mtime_ns
    run_study(cfg, report=False)
    assert (store.run_dir(first) / "DONE").stat().st_mtime_ns == before
    p = plan(cfg)
    assert list(p["status"]) == ["complete"] * 4 and list(p["images_todo"]) == [0] * 4
    # a new evaluation set: each finished run reads that set's images only, no training image
    again = EvalSetConfig(name="site_b_again", root="synthetic:b", split="train")
    more = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, ood=(*cfg.data.ood, again)))
    p = plan(more)
    n_again = len(load_study_data(more).ood["site_b_again"])
    assert list(p["todo"]) == ["evaluate site_b_again"] * 4 and list(p["images_todo"]) == [n_again] * 4
    assert (p["images_processed"] > n_again).all()  # the run's whole cost, training included


def test_conflicts_and_bad_inputs_name_the_problem_and_keep_the_store(interrupted_then_completed, tmp_path):
    cfg, store, first, *_ = interrupted_then_completed
    base = study_yaml(tmp_path)
    # a run id recorded with other settings (a hash collision, or an older rule) names the key
    settings = store.run_dir(first) / "settings.json"
    saved = settings.read_text()
    settings.write_text(saved.replace('"lr": 0.05', '"lr": 0.07'))
    try:
        with pytest.raises(StoreError, match=f"run {first} .*recorded with other settings .train.lr: 0.07 != 0.05"):
            run_study(cfg)
    finally:
        settings.write_text(saved)
    before = {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
    # another learning rate is another set of runs beside these, not a conflict
    assert {run_id(load_config(base, ["train.lr=0.5"]), s) for s in expand_grid(cfg)}.isdisjoint(store.run_ids())
    # an upstream name already pretrained with other settings
    with pytest.raises(StoreError, match="upstream 'up' .* other settings .num_images: 200 != 400.*another name"):
        run_study(load_config(base, [f"output_dir={cfg.output_dir}", "upstream.0.num_images=400"]))
    # an evaluation set name that the store holds for another set
    with pytest.raises(StoreError, match=r"evaluation set 'ood_site_b' of run .*\.split: 'train' != 'test'"):
        run_study(load_config(base, [f"output_dir={cfg.output_dir}", "data.ood.0.split=test"]))
    # multi-label findings trained as one-of-K: the first image with two positive findings is named
    with pytest.raises(DataError, match=r"chexpert \(train set\): sample '.+' is positive for \['\w+', '\w+'.*"
                                        r"one-of-K task"):
        run_study(load_config(base, [f"output_dir={cfg.output_dir}", "data.task=multiclass"]))
    # a loader option that matches no row (a misspelt view) is named before any run, not an IndexError in each
    with pytest.raises(DataError, match=r"the train set of chexpert .*data.options=.*'views': \['frontall'\].* no rows"):
        run_study(load_config(base, [f"output_dir={cfg.output_dir}", "data.options={views: [frontall]}"]))
    # a subgroup attribute that no set has (misspelt) is named with the attributes the tables do have
    with pytest.raises(DataError, match=r"data.subgroups \['sexx'\] is not an attribute .*'sex'"):
        run_study(load_config(base, [f"output_dir={cfg.output_dir}", "data.subgroups=[sex,sexx]"]))
    # an identifier column (CheXpert's study_id) as a subgroup attribute: one group per exam, named by its id
    with pytest.raises(DataError, match=r"data.subgroups \['study_id'\] names an identifier column"):
        run_study(load_config(base, [f"output_dir={cfg.output_dir}", "data.subgroups=[sex,study_id]"]))
    # an empty dataset root is an error, not the current directory
    with pytest.raises(DataError, match="data.root is empty.*'synthetic'"):
        run_study(load_config(base, [f"output_dir={cfg.output_dir}", "data.root="]))
    # a dataset root that does not exist
    missing = load_config(None, [f"output_dir={tmp_path / 's'}", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match="does not exist"):
        run_study(missing)
    # an unknown backbone fails before anything is written, listing the valid names
    path = study_yaml(tmp_path, grid={"backbones": ["resnetv2_tinyy"], "pretrained": ["scratch"], "fractions": [1.0],
                                      "seeds": [0]}, output_dir=str(tmp_path / "s2"))
    with pytest.raises(ValueError, match="resnetv2_tinyy.*resnetv2_tiny"):
        run_study(load_config(path), report=False)
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s").exists()
    assert {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------------------------------
# One run id, one result; a study that grows in place
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launched_twice(tmp_path_factory):
    """One cell (augmentation on) launched in two fresh processes; the first launch's runs are moved aside."""
    tmp = tmp_path_factory.mktemp("twice")
    store = tmp / "store"
    config = study_config(tmp, store)
    for i in range(2):
        proc = launch(config)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if i == 0:
            (tmp / "first").mkdir()
            (store / "runs").rename(tmp / "first" / "runs")
    return tmp, store


def test_one_cell_launched_twice_gives_bit_identical_results(launched_twice):
    tmp, store = launched_twice
    (rid,) = RunStore(store).run_ids()
    assert RunStore(tmp / "first").run_ids() == [rid]
    got = results(store, rid)
    # the block-by-block CKA against the initialisation is part of the result, and as reproducible
    assert sorted(got) == ["cka.parquet", "metrics.parquet", "predictions/ood_site_b.parquet",
                           "predictions/test.parquet", "predictions/val.parquet"]
    assert_same_results(tmp / "first", store, [rid])
    assert got["predictions/test.parquet"]["logit:Edema"].std() > 0  # trained, not a constant zero head


def test_a_study_grows_in_place(launched_twice, tmp_path):
    ref_tmp, ref = launched_twice
    store = tmp_path / "store"
    rs = RunStore(store)

    def step(**kw):
        proc = launch(study_config(tmp_path, store, **kw))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    # 1. a finished one-cell study, without the OOD set
    step(ood=False)
    (first,) = rs.run_ids()
    weights = rs.model_path(first).stat().st_mtime_ns
    assert rs.eval_sets(first) == ["test", "val"]
    written = _mtimes(rs.run_dir(first) / "predictions")
    # 2. another seed and the OOD set: the new seed is trained, the finished run only predicted from its weights
    step(seeds=[0, 1])
    assert count(store, "train") == {first: 1, run_id(_cfg(store, seeds=[0, 1]), _spec(seed=1)): 1}
    assert count(store, "evaluate") == {first: 1}
    assert rs.model_path(first).stat().st_mtime_ns == weights
    assert {k: v for k, v in _mtimes(rs.run_dir(first) / "predictions").items() if k in written} == written
    # ... and its OOD predictions are those of a run trained with the OOD set from the start
    assert_same_results(ref, store, [first])
    # 3. another backbone and another fraction: only the three new cells train
    step(backbones=["resnetv2_tiny", "vit_micro"], fractions=[0.5, 1.0])
    trained = count(store, "train")
    assert len(trained) == 5 and set(trained.values()) == {1}
    assert {rs.read_spec(r)["backbone"] for r in trained} == {"resnetv2_tiny", "vit_micro"}
    # 4. only the statistics change: metrics are recomputed from the stored predictions, nothing is predicted
    grid = dict(backbones=["resnetv2_tiny", "vit_micro"], fractions=[0.5, 1.0])
    cells = [run_id(_cfg(store, **grid), s) for s in expand_grid(_cfg(store, **grid))]
    preds = {r: results(store, r) for r in cells}
    written = {r: _mtimes(rs.run_dir(r) / "predictions") for r in cells}
    proc = launch(study_config(tmp_path, store, **grid), "eval.n_boot=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert count(store, "train") == trained and count(store, "evaluate") == {first: 1}
    assert count(store, "metrics") == {r: 1 for r in cells}
    assert {r: _mtimes(rs.run_dir(r) / "predictions") for r in cells} == written
    for r, before in preds.items():
        after = results(store, r)
        for name in before:
            if name.startswith("predictions/"):
                pd.testing.assert_frame_equal(before[name], after[name], check_exact=True)
        ci = lambda m: m[(m.metric == "auroc") & (m.label == "macro") & (m.eval_set == "test")  # noqa: E731
                         & (m.attribute == "all")][["lo", "hi"]].to_numpy()
        assert not np.array_equal(ci(before["metrics.parquet"]), ci(after["metrics.parquet"]))
    assert rs.read_evaluation(first)["metrics"]["eval"]["n_boot"] == 30
    # 5. the OOD set leaves the config: every run is scored again on the configured sets only; its predictions of
    # the set stay on disk (nothing written is lost), and nothing is trained or predicted
    ood = {r: (rs.run_dir(r) / "predictions" / "ood_site_b.parquet").stat().st_mtime_ns for r in cells}
    proc = launch(study_config(tmp_path, store, ood=False, **grid), "eval.n_boot=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert count(store, "train") == trained and count(store, "evaluate") == {first: 1}
    assert count(store, "metrics") == {r: 2 for r in cells}
    for r in cells:
        assert set(pd.read_parquet(rs.run_dir(r) / "metrics.parquet")["eval_set"]) == {"test", "val"}
        assert (rs.run_dir(r) / "predictions" / "ood_site_b.parquet").stat().st_mtime_ns == ood[r]
        assert rs.read_evaluation(r)["scored"] == ["test", "val"]
    # ... and coming back, it is scored from those predictions again, still without predicting
    proc = launch(study_config(tmp_path, store, **grid), "eval.n_boot=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert count(store, "evaluate") == {first: 1} and count(store, "metrics") == {r: 3 for r in cells}
    assert {r: _mtimes(rs.run_dir(r) / "predictions") for r in cells} == written


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def _cfg(store: Path, **grid):
    return load_config(study_config(store.parent, store, **grid))


def _spec(backbone="resnetv2_tiny", fraction=1.0, seed=0):
    from scaling.study.grid import RunSpec

    return RunSpec(backbone, "scratch", fraction, seed)


def test_a_missing_weight_file_is_named_before_training_but_not_needed_by_finished_runs(tmp_path):
    """A local ``grid.pretrained`` file that does not exist is refused for the runs still to train (naming the
    source and the backbone); once those runs are finished their own weights are all they need, so the same config
    is accepted (a study grows on a machine without the pretrained files)."""
    from scaling.models.weights import WeightsUnavailable
    from scaling.study.runner import check_weights

    store = tmp_path / "store"
    cfg = _cfg(store, pretrained=[str(tmp_path / "w.safetensors"), "scratch"])
    cells = expand_grid(cfg)
    with pytest.raises(WeightsUnavailable, match=rf"grid.pretrained '{tmp_path}/w.safetensors' \(backbone "
                                                 rf"resnetv2_tiny\): weight file or directory not found: {tmp_path}/w.safetensors"):
        check_weights(cfg, RunStore(store), cells)
    for spec in cells:
        if spec.pretrained != "scratch":
            RunStore(store).mark_complete(run_id(cfg, spec))
    check_weights(cfg, RunStore(store), cells)


def test_path_sources_are_labelled_by_name_in_the_store_tables_and_wandb(tmp_path, monkeypatch):
    """A weight directory given as a plain path, and another under a label of one's own (``mine:<dir>``), train from
    their files; the store, the results table, the run status and the W&B run (its job_type is the ``pretrained``
    axis) name them ``file:<dir name>`` and ``mine``, never by the directories above, which carry user and site
    names. Two sources with the same label are refused."""
    import torch
    from safetensors.torch import save_file

    import scaling.tracking
    from scaling.config import ModelConfig
    from scaling.models import build_model
    from scaling.study.aggregate import load_study

    private = tmp_path / "alice-site7"
    for name in ("weights", "other"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone="resnetv2_tiny"), num_outputs=2)
        (private / name).mkdir(parents=True)
        save_file(model.state_dict(), private / name / "resnetv2_tiny.safetensors")
    axes = []
    real = scaling.tracking.Tracker.create
    monkeypatch.setattr(scaling.tracking.Tracker, "create",
                        staticmethod(lambda *a, **k: axes.append(dict(k["axes"] if "axes" in k else a[3]))
                                     or real(*a, **k)))
    store = tmp_path / "store"
    cfg = load_config(study_config(tmp_path, store, ood=False, pretrained=[str(private / "weights"),
                                                                          f"mine:{private / 'other'}"]),
                      ["grid.also=[]", "cka.enabled=false", "train.steps=2", "eval.n_boot=10"])
    table = run_study(cfg, report=False)
    assert sorted(table["pretrained"]) == ["file:weights", "mine"] and set(table["status"]) == {"complete"}
    assert sorted(a["pretrained"] for a in axes) == ["file:weights", "mine"]
    runs = load_study(store).runs
    assert len(runs) == 2 and set(runs["status"]) == {"complete"}
    assert sorted(runs["pretrained"]) == ["file:weights", "mine"]
    stored = "".join(p.read_text() for p in store.rglob("spec.json")) + (store / "results.csv").read_text()
    assert "alice-site7" not in stored
    with pytest.raises(ConfigError, match=r"would both be labelled 'file:weights'.*'<label>:<path>'"):
        plan(load_config(study_config(tmp_path, store, ood=False,
                                      pretrained=[str(private / "weights"), str(tmp_path / "weights")])))


def test_offline_a_hub_or_url_source_missing_from_the_weights_dir_and_cache_is_named_before_training(
        tmp_path, monkeypatch):
    """Offline (what the SLURM scripts set) a ``bit-m`` (hub) or ``bit-s`` (URL) source must already be on disk: the
    dry run names the one that is not, with the file to provide, instead of every run failing later; copying the
    file into the weights directory is enough. Online nothing is checked and no host is probed."""
    from huggingface_hub import constants

    from scaling.models import weights
    from scaling.models.weights import WeightsUnavailable
    from scaling.study.runner import check_weights

    wdir = tmp_path / "weights"
    monkeypatch.setenv("SCALING_WEIGHTS_DIR", str(wdir))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    store = tmp_path / "store"
    cfg = _cfg(store, backbones=["bit_r50x1"], pretrained=["bit-m", "bit-s"])
    cells = expand_grid(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match=r"grid.pretrained 'bit-m' \(backbone bit_r50x1\): cannot load hub "
                                                 r"weights timm/resnetv2_50x1_bit.goog_in21k: offline mode.*"
                                                 + re.escape(str(wdir / "resnetv2_50x1_bit.goog_in21k.safetensors"))):
        check_weights(cfg, RunStore(store), cells)
    wdir.mkdir()
    (wdir / "resnetv2_50x1_bit.goog_in21k.safetensors").write_bytes(b"")
    with pytest.raises(WeightsUnavailable,
                       match=r"grid.pretrained 'bit-s' .*" + re.escape(str(wdir / "BiT-S-R50x1.npz"))):
        check_weights(cfg, RunStore(store), cells)
    (wdir / "BiT-S-R50x1.npz").write_bytes(b"")
    check_weights(cfg, RunStore(store), cells)

    (wdir / "BiT-S-R50x1.npz").unlink()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("SCALING_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "_reachable", lambda *a, **k: pytest.fail("online, the check must not probe a host"))
    check_weights(cfg, RunStore(store), cells)


def test_offline_a_hugging_face_encoder_needs_its_weights_on_disk(tmp_path, monkeypatch):
    """``check_cached``: a directory needs a weight file beside its config; a hub repo needs one in the HF cache
    (found by huggingface_hub's own cache lookup, a sharded checkpoint by its index)."""
    from huggingface_hub import constants

    from scaling.models.hf import check_cached
    from scaling.models.weights import WeightsUnavailable

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    local = tmp_path / "rad-dino"
    local.mkdir()
    (local / "config.json").write_text("{}")
    with pytest.raises(WeightsUnavailable, match=rf"directory {local} holds none of \['model.safetensors'"):
        check_cached(str(local))
    (local / "model.safetensors").write_bytes(b"")
    check_cached(str(local))
    with pytest.raises(WeightsUnavailable, match=r"directory not found: /nonexistent/rad-dino"):
        check_cached("/nonexistent/rad-dino")
    with pytest.raises(WeightsUnavailable, match=r"'org/enc'.*not in the Hugging Face cache"):
        check_cached("org/enc")
    snapshot = tmp_path / "hf" / "models--org--enc" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hf" / "models--org--enc" / "refs").mkdir()
    (tmp_path / "hf" / "models--org--enc" / "refs" / "main").write_text("abc123")
    (snapshot / "model.safetensors.index.json").write_text("{}")
    check_cached("org/enc")


def test_model_kwargs_a_backbone_does_not_take_are_refused_by_the_dry_run(tmp_path):
    """``model.kwargs`` reach every backbone's constructor only when a run builds it: the dry run builds each on the
    meta device, so a misspelled keyword fails there, naming the field and the backbone, before anything is
    written; keywords the backbone takes pass."""
    store = tmp_path / "store"
    path = study_config(tmp_path, store)
    with pytest.raises(ConfigError, match=r"model.kwargs \{'drop_rat': 0.1\} do not build backbone resnetv2_tiny: "
                                          r".*unexpected keyword argument 'drop_rat'"):
        plan(load_config(path, ["model.kwargs={drop_rat: 0.1}"]))
    assert not store.exists()
    assert len(plan(load_config(path, ["model.kwargs={drop_path_rate: 0.1}"]))) > 0
    # A timm model the library cannot fine-tune (two classifier heads) is named as well, without any kwargs.
    with pytest.raises(ConfigError, match=r"grid.backbones: cannot build backbone deit_tiny_distilled_patch16_224: "
                                          r".*2 classifier heads.*use its plain variant \(e.g. "
                                          r"'deit_tiny_patch16_224'\)"):
        plan(load_config(path, ["grid.backbones=[resnetv2_tiny, deit_tiny_distilled_patch16_224]"]))


def test_an_official_test_split_left_unused_is_warned_about(tmp_path, caplog):
    """NIH ChestX-ray14 ships a test list: a config that carves its test set from the training patients instead is
    legitimate but usually an oversight, so the loader says so (and says nothing once data.test_split names it)."""
    from dataset_fixtures import write_fixture

    from scaling.study.data import load_study_data

    root = write_fixture("nih_cxr14", tmp_path / "nih", n=60)
    base = [f"output_dir={tmp_path / 's'}", "data.dataset=nih_cxr14", f"data.root={root}",
            "data.labels=[Pleural Effusion,Atelectasis]", "data.test_fraction=0.3"]
    with caplog.at_level("WARNING", logger="scaling.study.data"):
        load_study_data(load_config(None, base))
    assert "nih_cxr14 has an official 'test' split, but data.test_split is empty" in caplog.text
    assert "has no positive image in the training set" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scaling.study.data"):
        load_study_data(load_config(None, [*base, "data.test_split=test"]))
    assert "official 'test' split" not in caplog.text


def test_undefined_metrics_are_one_log_line_per_run_not_a_warning_each(interrupted_then_completed, tmp_path, caplog):
    """Small subgroups without both classes make some metrics undefined (NaN rows): scoring a run logs one line
    counting them (each message at debug level) and lets no MetricWarning reach the console; the stored metrics are
    the same as before."""
    import shutil
    import warnings

    from scaling.study.runner import score_run

    from scaling.study import runner

    cfg, store, first, *_ = interrupted_then_completed
    # scored without a patient minimum, so that the groups of a few patients (one class only) are computed
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, min_group_patients=0))
    copy = RunStore(shutil.copytree(store.root, tmp_path / "store"))
    score_run(cfg, copy, first)
    before = copy.read_metrics(first)
    runner._UNDEFINED_SEEN.clear()
    levels = []
    for _ in range(2):  # the same gaps in the next run are info, not another warning
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level("DEBUG", logger="scaling.study.runner"):
            warnings.simplefilter("always")
            score_run(cfg, copy, first)
        assert not [w for w in caught if "undefined" in str(w.message)]
        lines = [r for r in caplog.records if "metric warnings (an undefined value is stored as NaN" in r.message]
        assert len(lines) == 1 and f"run {first}: " in lines[0].message
        assert any(r.levelname == "DEBUG" and "is undefined" in r.message for r in caplog.records)
        levels.append(lines[0].levelname)
    assert levels == ["WARNING", "INFO"] and before["value"].isna().any()
    pd.testing.assert_frame_equal(copy.read_metrics(first), before)


def test_a_label_without_a_positive_training_image_is_warned_about(tmp_path, caplog):
    """A label no training image has (a subset, a filter, a misread policy) cannot be learnt: the launch says so."""
    from dataset_fixtures import write_fixture

    from scaling.study.data import load_study_data

    root = write_fixture("nih_cxr14", tmp_path / "nih", n=60)
    cfg = load_config(None, [f"output_dir={tmp_path / 's'}", "data.dataset=nih_cxr14", f"data.root={root}",
                             "data.labels=[Pleural Effusion,Hernia]", "data.test_split=test"])
    with caplog.at_level("WARNING", logger="scaling.study.data"):
        data = load_study_data(cfg)
    assert (data.train["label:Pleural Effusion"] == 1).any() and not (data.train["label:Hernia"] == 1).any()
    assert "label 'Hernia' has no positive image in the training set" in caplog.text
    assert "label 'Pleural Effusion' has no positive" not in caplog.text


def test_a_study_with_in_chans_1_feeds_the_model_one_channel(tmp_path, monkeypatch):
    """docs/models.md: ``model.kwargs: {in_chans: 1}`` adapts a backbone to grayscale input. Every batch of the
    study (training and prediction) reaches the model with 1 channel, and the run completes with predictions for
    every test sample."""
    import scaling.engine.trainer as trainer_module

    shapes = []
    real = trainer_module.to_device

    def recording(*args, **kwargs):
        x = real(*args, **kwargs)
        shapes.append(tuple(x.shape))
        return x

    monkeypatch.setattr(trainer_module, "to_device", recording)
    store = tmp_path / "store"
    cfg = load_config(study_config(tmp_path, store, ood=False), ["model.kwargs={in_chans: 1}", "grid.also=[]",
                                                                 "cka.enabled=false"])
    run_study(cfg, report=False)
    rid = run_id(cfg, expand_grid(cfg)[0])
    assert RunStore(store).is_complete(rid)
    assert len(shapes) > 4 and {s[1] for s in shapes} == {1}
    test = pd.read_parquet(store / "runs" / rid / "predictions" / "test.parquet")
    assert len(test) > 0 and test.filter(like="prob:").notna().all().all()


def test_skipped_hugging_face_pairs_say_what_fixes_them(tmp_path, caplog):
    """models.md's grid of a timm and an hf: backbone crossed with scratch, bit-m and hf: the two pairs without
    weights are skipped with the fix that works; 'give a file as hf:<path>' would be refused by build_model."""
    from scaling.study.runner import study_cells

    from scaling.config import ConfigError

    store = tmp_path / "store"
    grid = ["grid.backbones=[bit_r50x1, 'hf:/weights/rad-dino']", "grid.pretrained=[scratch, bit-m, hf]",
            "grid.also=[]"]
    with caplog.at_level("WARNING", logger="scaling.study.runner"):
        cells = study_cells(load_config(study_config(tmp_path, store), grid))
    assert {(c.backbone, c.pretrained) for c in cells} == {
        ("bit_r50x1", "scratch"), ("bit_r50x1", "bit-m"), ("hf:/weights/rad-dino", "scratch"),
        ("hf:/weights/rad-dino", "hf")}
    skipped = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping"))
    assert skipped == [
        "skipping bit_r50x1 x hf: no public weights for that pair (Hugging Face weights come with their own "
        "architecture: list 'hf:<repo or directory>' in grid.backbones, with pretrained 'hf')",
        "skipping hf:/weights/rad-dino x bit-m: no public weights for that pair (an 'hf:' backbone takes pretrained "
        "'hf' (its own weights) or 'scratch')"]
    with pytest.raises(ConfigError, match=r"no public weights for resnetv2_tiny x hf; change grid.backbones or "
                                          r"grid.pretrained; Hugging Face weights come with their own architecture"):
        study_cells(load_config(study_config(tmp_path, store), ["grid.pretrained=[hf]", "grid.also=[]"]))


def test_a_failed_runs_reason_in_the_report_names_no_sample(tmp_path):
    """report.html is sent as it is (docs/report.md): a run failed by an unreadable image is listed there with its
    error, but the sample id the error names (NIH ChestX-ray14's 'Image Index', no path) is redacted; FAILED.json,
    which stays on the machine, keeps the whole error."""
    from dataset_fixtures import write_fixture

    from scaling.study.runner import StudyFailed

    root = write_fixture("nih_cxr14", tmp_path / "nih", n=60)
    cfg = load_config(None, [f"output_dir={tmp_path / 's'}", "data.dataset=nih_cxr14", f"data.root={root}",
                             "data.labels=[Pleural Effusion,Atelectasis]", "data.test_split=test",
                             "data.image_size=32", "train.steps=2", "train.batch_size=8", "eval.n_boot=10"])
    sample = load_study_data(cfg).train.iloc[0]
    Path(sample["path"]).write_bytes(b"not an image")
    with pytest.raises(StudyFailed):
        run_study(cfg)
    store = RunStore(cfg.output_dir)
    html = (store.root / "report.html").read_text()
    assert "DataError: cannot read image" in html and sample["sample_id"] not in html
    failure = store.read_failure(run_id(cfg, expand_grid(cfg)[0]))
    assert f"(sample {sample['sample_id']!r})" in failure["error"]
    assert failure["reason"].startswith("DataError: cannot read image <redacted> (sample '<redacted>')")


@pytest.mark.parametrize("backbone, mean, std", [("resnetv2_tiny", (0.5,) * 3, (0.5,) * 3),
                                                  ("resnet10t", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_every_batch_is_normalised_as_the_backbones_weights_expect(tmp_path, monkeypatch, backbone, mean, std):
    """docs/models.md, "Input normalisation": BiT-style backbones get BiT's [-1, 1] inputs, an ImageNet-trained timm
    CNN ImageNet's mean and std (its ``pretrained_cfg``), in training, prediction and every evaluation set."""
    import scaling.engine.trainer as trainer_module

    seen = []
    real = trainer_module.to_device

    def recording(images, device, norm, **kwargs):
        seen.append((norm.mean, norm.std))
        return real(images, device, norm, **kwargs)

    monkeypatch.setattr(trainer_module, "to_device", recording)
    cfg = load_config(study_config(tmp_path, tmp_path / "store", ood=False, backbones=[backbone]),
                      ["grid.also=[]", "cka.enabled=false"])
    run_study(cfg, report=False)
    assert len(seen) > 4 and set(seen) == {(mean, std)}


def test_a_run_trained_on_bit_inputs_before_its_backbone_got_its_own_is_refused_at_relaunch(tmp_path):
    """Every run records the input normalisation it was trained on. A finished run without that record was trained
    when every backbone got BiT's 0.5 / 0.5: kept for a BiT-style backbone, but for an ImageNet-trained CNN its
    results are of other inputs than a run trained now, so the relaunch and the dry run refuse it (naming the run)
    instead of pooling it with new seeds; nothing is written."""
    path = study_config(tmp_path, tmp_path / "store", ood=False, backbones=["resnet10t", "resnetv2_tiny"])
    cfg = load_config(path, ["grid.also=[]", "cka.enabled=false"])
    run_study(cfg, report=False)
    store = RunStore(cfg.output_dir)
    ids = {spec.backbone: run_id(cfg, spec) for spec in expand_grid(cfg)}
    assert store.read_meta(ids["resnet10t"])["input_normalisation"] == {"mean": [0.485, 0.456, 0.406],
                                                                       "std": [0.229, 0.224, 0.225]}
    assert store.read_meta(ids["resnetv2_tiny"])["input_normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    for rid in ids.values():  # as a store written before the record existed
        meta = store.read_meta(rid)
        del meta["input_normalisation"]
        store.write_meta(rid, meta)
    before = {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
    for relaunch in (lambda: run_study(cfg, report=False), lambda: plan(cfg)):
        with pytest.raises(ConfigError, match=r"1 finished run\(s\) were trained on BiT's \[-1, 1\] inputs") as err:
            relaunch()
        assert str(store.run_dir(ids["resnet10t"])) in str(err.value)
        assert str(store.run_dir(ids["resnetv2_tiny"])) not in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()} == before


def test_probe_features_are_keyed_by_the_inputs_they_were_extracted_from():
    """A linear probe's feature cache is shared by a backbone x source: features of the same images normalised
    otherwise are other features, so ImageNet-normalised sets get their own key; BiT's keep the key of caches
    written before inputs were normalised per backbone."""
    from scaling.study.protocols import feature_keys

    cfg = load_config(None, ["data.root=synthetic", "data.ood=[{name: site_b, root: 'synthetic:b'}]"])
    bit = feature_keys(cfg, ["train", "site_b"], ((0.5,) * 3, (0.5,) * 3))
    imagenet = feature_keys(cfg, ["train", "site_b"], ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert bit["train"] == "run" and len(bit["site_b"]) == 16  # the keys caches were written under before
    assert all(imagenet[n] != bit[n] and imagenet[n].startswith(bit[n]) for n in bit)


def test_a_run_predicted_again_from_its_stored_weights_keeps_its_sources_normalisation(tmp_path):
    """A new evaluation set is predicted from the run's stored weights, rebuilt as ``scratch``: its inputs must still
    be normalised as the run's source was (ViT-B/16 MAE weights: ImageNet's mean, not AugReg's 0.5), and an upstream
    source (a local file) as its architecture, without training or resolving anything."""
    from scaling.models import input_normalisation
    from scaling.study.grid import RunSpec
    from scaling.study.runner import _starting_model_on_meta, run_config

    cfg = load_config(study_config(tmp_path, tmp_path / "store", ood=False),
                      ["upstream=[{name: up, num_images: 20, num_classes: 2, image_size: 32, steps: 1, "
                       "batch_size: 4}]"])
    for backbone, source, mean in (("vit_b16", "hub:mae", 0.485), ("vit_b16", "in21k", 0.5),
                                   ("resnetv2_tiny", "upstream:up", 0.5)):
        spec = RunSpec(backbone, source, 1.0, 0)
        model = _starting_model_on_meta(run_config(cfg, spec), spec)
        assert input_normalisation(model)[0][0] == pytest.approx(mean)


def test_a_study_with_bits_augmentation_trains_on_crops_of_images_cached_at_the_resize(tmp_path, monkeypatch, capsys):
    """docs/data.md, "BiT's augmentation (`data.augment: bit`)": ``data.augment: bit`` trains on random
    ``image_size`` crops of images resized (and cached) at ``data.bit_resize`` (here BiT's ratio: 32 → 37 px),
    evaluates on images resized to ``image_size`` from a store of their own, and records the views in meta.json and
    on ``--dry-run``."""
    import importlib.util
    import json

    from scaling.data.images import ImageTransform

    calls = []
    real = ImageTransform.__call__

    def recording(self, image, seed=None):
        out = real(self, image, seed)
        calls.append((self.augment, seed is not None and self.train, tuple(image.shape[-2:]), tuple(out.shape[-2:])))
        return out

    monkeypatch.setattr(ImageTransform, "__call__", recording)
    store = tmp_path / "store"
    config = study_config(tmp_path, store, ood=False)  # 32 px, flips on
    overrides = ["data.augment=bit", "grid.also=[]", "cka.enabled=false"]
    cfg = load_config(config, overrides)
    run_study(cfg, report=False)
    rid = run_id(cfg, expand_grid(cfg)[0])
    assert RunStore(store).is_complete(rid) and rid != run_id(load_config(config, overrides[1:]), expand_grid(cfg)[0])
    views = {c for c in calls if c[1]}
    evals = {c for c in calls if not c[1]}
    assert views == {("bit", True, (37, 37), (32, 32))}  # every training view: a 32 px crop of a 37 px image
    assert {c[1:] for c in evals} == {(False, (32, 32), (32, 32))}  # every evaluation image: read at 32 px
    assert len([c for c in calls if c[1]]) >= 4 * 16  # 4 steps of 16 images (and the Trainer's check of the keys)
    assert sorted(p.name for p in (store / "cache").glob("*px")) == ["32px", "37px"]
    meta = json.loads((store / "runs" / rid / "meta.json").read_text())
    assert meta["augmentation"] == {"augment": "bit", "crop": 32, "resize": 37, "flip": True}
    test = pd.read_parquet(store / "runs" / rid / "predictions" / "test.parquet")
    assert len(test) > 0 and test.filter(like="prob:").notna().all().all()

    spec = importlib.util.spec_from_file_location("scale_study", REPO / "recipes" / "scale_study.py")
    scale_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale_study)
    assert scale_study.main(["--config", str(config), "--dry-run", *overrides]) == 0
    assert "training views: bit: resized to 37x37, a random 32x32 crop, horizontal flips; evaluation: resized to " \
           "32x32" in capsys.readouterr().out

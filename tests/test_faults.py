"""Faults on a run store: concurrent launches, a full disk, bad images and rows mid-study, a read-only store, an empty
grid. Each case asserts that nothing already written is lost and, once the fault is repaired, that the results are
those of one uninterrupted launch (bit for bit: every launch runs in a fresh process with one thread).

Killing launches at random steps belongs to the resume tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from scaling.config import ModelConfig, load_config
from scaling.io import WriteError
from scaling.models import build_model
from scaling.study.grid import expand_grid, run_id
from scaling.study.store import RunStore
from study_launch import (
    REPO,
    assert_same_results,
    command,
    count,
    env,
    events,
    launch,
    snapshot,
    study_config,
)

GRID = {"fractions": [0.5, 1.0], "seeds": [0, 1, 2]}


def _ids(config: Path) -> list[str]:
    cfg = load_config(config)
    return [run_id(cfg, s) for s in expand_grid(cfg)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The six-cell grid, run by one launch from start to end."""
    tmp = tmp_path_factory.mktemp("reference")
    store = tmp / "store"
    config = study_config(tmp, store, **GRID)
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, _ids(config)


def _with_data(reference_store: Path, store: Path) -> None:
    """Give ``store`` the reference's generated demo data (deterministic, so the same as generating it again)."""
    shutil.copytree(reference_store / "data", store / "data")


# ----------------------------------------------------------------------------------------------------------------
# Many launches on one store
# ----------------------------------------------------------------------------------------------------------------


def test_three_launches_on_one_store_train_every_cell_once(reference, tmp_path):
    ref, ids = reference
    store = tmp_path / "store"
    config = study_config(tmp_path, store, **GRID)
    # Started together on an empty store: they also race for the demo data and the image cache.
    procs = [subprocess.Popen(command(config), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-2000:] for e in errs)
    assert count(store, "train") == {r: 1 for r in ids}
    assert count(store, "done") == {r: 1 for r in ids}
    launches = {e["launch"] for e in events(store) if e["event"] == "train"}
    assert len(launches) >= 2, "the launches did not split the grid"
    assert not list((store / "locks").glob("*.owner.json"))  # every claim was released
    assert_same_results(ref, store, ids)


def test_a_two_rank_launch_claims_on_rank_0_and_skips_a_claimed_run(reference, tmp_path):
    from scaling.study.claims import try_claim

    ref, _ = reference
    store = tmp_path / "store"
    _with_data(ref, store)
    config = study_config(tmp_path, store, seeds=[0, 1])
    busy, free = _ids(config)
    claim = try_claim(RunStore(store).lock_path(busy))  # another launch (this test) works on the first run
    try:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        proc = subprocess.run([accelerate, "launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
                               "--main_process_port", "0", str(REPO / "recipes" / "scale_study.py"), "--config",
                               str(config), "--no-report", "sharding.strategy=ddp"], env=env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)
    finally:
        claim.release()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert count(store, "train") == {free: 1}
    assert RunStore(store).read_meta(free)["world_size"] == 2
    assert not RunStore(store).run_dir(busy).exists()


# ----------------------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------------------


def _file_size_limit(nbytes: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_a_full_disk_fails_runs_with_the_file_and_bytes_and_loses_nothing(reference, tmp_path):
    ref, _ = reference
    store = tmp_path / "store"
    _with_data(ref, store)
    config = study_config(tmp_path, store, seeds=[0, 1])
    ids = _ids(config)
    data_before = snapshot(store / "data")

    # 1. 1 MB per file: the image cache (1,673 images x 32 x 32 bytes) cannot be written
    proc = launch(config, preexec_fn=_file_size_limit(1_000_000))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: 2 run(s) failed" in proc.stderr
    for rid in ids:
        err = RunStore(store).read_failure(rid)["error"]
        assert "cannot write image cache" in err and "/cache/32px/gray-uint8/data-" in err, err
        assert "bytes needed" in err and "File too large" in err, err
    # the half-written memmap was removed; the store built before it (train + val images, under 1 MB) still serves
    kept = json.loads((store / "cache" / "32px" / "gray-uint8" / "meta.json").read_text())
    assert [p.name for p in (store / "cache").rglob("data-*.bin")] == [kept["data_file"]]

    # 2. 1.9 MB per file: the cache fits, the fine-tuned weights (2 MB) do not; every run is tried and recorded
    proc = launch(config, preexec_fn=_file_size_limit(1_900_000))
    assert proc.returncode == 1, proc.stderr[-3000:]
    model = build_model(ModelConfig(backbone="resnetv2_tiny"), num_outputs=5, image_size=32)
    need = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    for rid in ids:
        err = RunStore(store).read_failure(rid)["error"]
        weights = RunStore(store).model_path(rid)
        # the Trainer keeps them as its final checkpoint: the error names it and the bytes it needs
        assert f"cannot write checkpoint {weights.parent}" in err and f"{need:,}" in err, err
        assert "File too large" in err, err
        assert not RunStore(store).is_complete(rid) and not weights.exists()
    assert count(store, "failed") == {rid: 2 for rid in ids}

    # 3. space again: the runs finish, exactly as an uninterrupted launch; the demo data was never touched
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_results(ref, store, ids)
    assert snapshot(store / "data") == data_before


def test_the_image_cache_checks_free_space_before_its_memmap(tmp_path, monkeypatch):
    # On a full tmpfs a memmap writer dies by SIGBUS at its first page: no error, no FAILED.json. Checked up front.
    import numpy as np
    from PIL import Image

    from scaling.data.images import ImageCache

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 40), 60 * i, dtype=np.uint8)).save(paths[-1])
    table = pd.DataFrame({"sample_id": [p.name for p in paths], "path": [str(p) for p in paths]})
    cache = ImageCache(tmp_path / "cache", 32)
    cache.build(table.iloc[:2])
    before = snapshot(tmp_path / "cache")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=3000))
    with pytest.raises(WriteError, match=r"image cache .*/cache/32px/gray-uint8/data-\w+\.bin needs 4,096 bytes, "
                                         r"but its file system has only 3,000 free"):
        cache.build(table)
    after = snapshot(tmp_path / "cache")
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == \
        {k: v for k, v in before.items() if not k.endswith(".lock")}
    # the built store is intact and still serves its images
    assert ImageCache(tmp_path / "cache", 32).read(str(paths[1])).mean() == 60


def test_a_base_exception_from_a_saver_is_recorded_and_the_study_goes_on(reference, tmp_path, monkeypatch):
    # torch.distributed.checkpoint reports a failed save as CheckpointException, a BaseException.
    from torch.distributed.checkpoint.api import CheckpointException

    from scaling.study import runner

    ref, _ = reference
    store = tmp_path / "store"
    _with_data(ref, store)
    cfg = load_config(study_config(tmp_path, store, seeds=[0, 1]))
    first, second = _ids(study_config(tmp_path, store, seeds=[0, 1]))
    real = runner.run_one

    def run_one(cfg, spec, data, store):
        if run_id(cfg, spec) == first:
            raise CheckpointException("save", {0: (OSError(28, "No space left on device"), None)})
        return real(cfg, spec, data, store)

    monkeypatch.setattr(runner, "run_one", run_one)
    with pytest.raises(runner.StudyFailed, match=f"1 run\\(s\\) failed.*{first}: CheckpointException"):
        runner.run_study(cfg, report=False)
    err = RunStore(store).read_failure(first)["error"]
    assert f"writing under {RunStore(store).run_dir(first)} (" in err and "bytes free" in err, err
    assert "No space left on device" in err, err
    assert RunStore(store).is_complete(second)


# ----------------------------------------------------------------------------------------------------------------
# Bad images and rows mid-study
# ----------------------------------------------------------------------------------------------------------------


def test_a_bad_image_mid_study_fails_only_the_runs_that_read_it(reference, tmp_path):
    ref, _ = reference
    store = tmp_path / "store"
    _with_data(ref, store)
    config = study_config(tmp_path, store, seeds=[0, 1, 2])
    first, *rest = _ids(config)
    proc = launch(study_config(tmp_path, store, seeds=[0]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = snapshot(RunStore(store).run_dir(first))

    # an image of the test set goes bad between two launches (a truncated copy, a flaky mount)
    sample = pd.read_parquet(RunStore(store).run_dir(first) / "predictions" / "test.parquet")["sample_id"].iloc[3]
    image = next((store / "data" / "site_a").glob(f"*/{sample}"))
    good = image.read_bytes()
    image.write_bytes(good[:40])
    proc = launch(config)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for rid in rest:
        err = RunStore(store).read_failure(rid)["error"]
        assert f"cannot read image {image}" in err and sample in err, err
    assert snapshot(RunStore(store).run_dir(first)) == done  # the finished run was not touched

    # a bad row in the label file stops the launch before anything is written, naming the file and line
    csv = next((store / "data" / "site_a").glob("*/train.csv"))
    rows = csv.read_text()
    csv.write_text(rows + "CheXpert-v1.0-small/train/no_patient_here/view1_frontal.jpg,Female,60,Frontal,AP"
                   + ",," * 7 + "\n")
    before = snapshot(store)
    proc = launch(config)
    assert proc.returncode == 2 and f"{csv}: line {rows.count(chr(10)) + 1}" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(store) == before

    # repaired: the failed runs are redone and every result is that of an uninterrupted launch
    csv.write_text(rows)
    image.write_bytes(good)
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_results(ref, store, [first, *rest])


# ----------------------------------------------------------------------------------------------------------------
# Damaged files of finished runs
# ----------------------------------------------------------------------------------------------------------------


def test_a_lost_or_damaged_metrics_file_is_rescored_from_the_stored_predictions(reference, tmp_path):
    ref, ids = reference
    store = tmp_path / "store"
    shutil.copytree(ref, store, ignore=shutil.ignore_patterns("cache", "locks", "events.jsonl"))
    lost, garbled, foreign, *_ = ids
    (store / "runs" / lost / "metrics.parquet").unlink()
    (store / "runs" / garbled / "metrics.parquet").write_bytes(b"this is not parquet\n" * 10)
    pd.DataFrame({"x": [1.0]}).to_parquet(store / "runs" / foreign / "metrics.parquet")
    predictions = {rid: snapshot(store / "runs" / rid / "predictions") for rid in ids}
    # The study grows by a seed at the same time: the launch trains two runs, rescores three and writes its results.
    config = study_config(tmp_path, store, fractions=GRID["fractions"], seeds=[0, 1, 2, 3])
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{lost}: metrics (metrics.parquet is missing)" in proc.stderr
    assert f"{garbled}: metrics (metrics.parquet cannot be read (ArrowInvalid" in proc.stderr
    assert f"{foreign}: metrics (metrics.parquet not a metrics table" in proc.stderr
    assert count(store, "metrics") == {lost: 1, garbled: 1, foreign: 1}
    assert set(count(store, "train")) == set(_ids(config)) - set(ids)  # nothing finished was trained again
    assert_same_results(ref, store, ids)  # the metrics are back, bit for bit; the predictions were not rewritten
    assert {rid: snapshot(store / "runs" / rid / "predictions") for rid in ids} == predictions
    table = pd.read_csv(store / "results.csv")
    assert len(table) == 8 and set(table["status"]) == {"complete"} and table["auroc_test"].notna().all()
    before = snapshot(store / "runs")
    assert launch(config).returncode == 0 and snapshot(store / "runs") == before  # repaired: nothing left to do


def test_runs_scored_under_older_metric_definitions_are_rescored_not_mixed(reference, tmp_path):
    # A store scored before a stored row changed its definition (SCORING_VERSION: the macro worst-group AUROC and
    # AUROC gap) records metric settings without that version, or with an older one: every finished run is
    # rescored from its predictions (nothing trained), so no results table mixes rows of two definitions.
    from scaling.metrics.run_metrics import SCORING_VERSION
    from scaling.study.runner import metric_settings, pending_work

    ref, ids = reference
    store = tmp_path / "store"
    shutil.copytree(ref, store, ignore=shutil.ignore_patterns("cache", "locks", "events.jsonl"))
    cfg = load_config(study_config(tmp_path, store, **GRID))
    runs, specs = RunStore(store), expand_grid(cfg)
    assert metric_settings(cfg)["scoring"] == SCORING_VERSION
    assert all(pending_work(cfg, runs, spec) is None for spec in specs)  # as scored: nothing to do
    older = [{k: v for k, v in metric_settings(cfg).items() if k != "scoring"},
             {**metric_settings(cfg), "scoring": SCORING_VERSION - 1}]
    for spec, settings in zip(specs, older * len(specs)):
        rid = run_id(cfg, spec)
        runs.write_evaluation(rid, {**runs.read_evaluation(rid), "metrics": settings})
        work = pending_work(cfg, runs, spec)
        assert work is not None and work.kind == "metrics", (rid, work)
    # Read before a launch rescores them, the store says its rows are of an older definition (report: a note).
    from scaling.study.aggregate import load_study
    from scaling.study.report import build_report

    assert sorted(load_study(store).stale_scoring) == sorted(run_id(cfg, s) for s in specs)
    assert "scored under an older definition" in build_report(store, n_boot_fit=5, n_boot_curve=5).notes["scoring"]


def test_a_damaged_predictions_file_is_named_when_a_launch_rescores(reference, tmp_path):
    ref, ids = reference
    store = tmp_path / "store"
    shutil.copytree(ref, store, ignore=shutil.ignore_patterns("cache", "locks", "events.jsonl"))
    config = study_config(tmp_path, store, **GRID)
    truncated = RunStore(store).predictions_path(ids[0], "test")
    good = truncated.read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    before = snapshot(store / "runs")
    # New metric settings: the launch only rescores, with the attributes of the stored predictions.
    proc = launch(config, "eval.n_boot=5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {truncated}: cannot be read (ArrowInvalid: "), \
        proc.stderr[-3000:]
    assert snapshot(store / "runs") == before  # refused before anything was rescored

    # A file that reads but lacks a column fails its own run, naming the file; the others are rescored.
    truncated.write_bytes(good)
    lacking = RunStore(store).predictions_path(ids[1], "val")
    pd.read_parquet(lacking).drop(columns="prob:Edema").to_parquet(lacking)
    proc = launch(config, "eval.n_boot=5")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = RunStore(store).read_failure(ids[1])["error"]
    assert err == f"ValueError: predictions['val'] ({lacking}) lacks column(s) ['prob:Edema']", err
    assert count(store, "metrics") == {rid: 1 for rid in ids if rid != ids[1]}


def test_damaged_weights_fail_a_new_evaluation_naming_the_file_and_the_run_is_not_reported_complete(
        reference, tmp_path, capsys):
    from scaling.study.__main__ import main as study_cli

    ref, ids = reference
    store = tmp_path / "store"
    shutil.copytree(ref, store, ignore=shutil.ignore_patterns("cache", "locks", "events.jsonl"))
    config = study_config(tmp_path, store, **GRID)
    weights = RunStore(store).model_path(ids[0])
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    # A second name for the OOD set: a new evaluation set, predicted from each run's stored weights.
    grown = "data.ood=[{name: ood_site_b, root: 'synthetic:b', split: train}, {name: b_again, root: 'synthetic:b', " \
            "split: train}]"
    proc = launch(config, grown)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = RunStore(store).read_failure(ids[0])["error"]
    assert err.startswith(f"CheckpointError: {weights}: cannot load the final weights (SafetensorError: "), err
    assert f"{ids[0]}: {err}" in proc.stderr
    assert count(store, "evaluate") == {rid: 1 for rid in ids[1:]}
    # It finished once (nothing is trained again), but it does not hold what the config asks: failed, not complete.
    assert RunStore(store).is_complete(ids[0]) and RunStore(store).status(ids[0]) == "failed"
    # ... also in a copy that did not keep the files' times (cp -r): FAILED.json older than DONE there.
    failed = RunStore(store).run_dir(ids[0]) / "FAILED.json"
    os.utime(failed, ns=(0, 0))
    assert RunStore(store).status(ids[0]) == "failed"
    assert [RunStore(store).status(rid) for rid in ids[1:]] == ["complete"] * 5
    table = pd.read_csv(store / "results.csv").set_index("run_id")
    assert table.loc[ids[0], "status"] == "failed" and pd.isna(table.loc[ids[0], "auroc_test"])
    capsys.readouterr()
    assert study_cli(["summary", str(store)]) == 0
    out = capsys.readouterr().out
    assert "5/6 runs complete (5 complete, 1 failed)" in out and f"failed   {ids[0]}: CheckpointError: " in out

    # The set is dropped again: what the run stores answers the config; rescoring it confirms that (the others are
    # rescored on the configured sets).
    proc = launch(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{ids[0]}: metrics (its last evaluation failed)" in proc.stderr
    assert count(store, "metrics") == {rid: 1 for rid in ids} and count(store, "train") == {}
    assert RunStore(store).status(ids[0]) == "complete" and not failed.exists()
    assert_same_results(ref, store, [ids[0]])

    # The weights repaired, the set back: the run is predicted on it, as the others were.
    weights.write_bytes(good)
    proc = launch(config, grown)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert count(store, "evaluate") == {rid: 1 for rid in ids} and count(store, "train") == {}
    assert [RunStore(store).status(rid) for rid in ids] == ["complete"] * 6
    pd.testing.assert_frame_equal(RunStore(store).read_predictions(ids[0], "b_again"),
                                  RunStore(store).read_predictions(ids[0], "ood_site_b"), check_exact=True)


# ----------------------------------------------------------------------------------------------------------------
# A read-only store, an empty grid
# ----------------------------------------------------------------------------------------------------------------


def _read_only(root: Path, on: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) if on else mode | stat.S_IWUSR)


def test_a_read_only_store_is_summarised_reported_and_planned_without_a_write(reference, tmp_path, capsys):
    from scaling.study.__main__ import main as study_cli
    from scaling.study.runner import run_study

    ref, ids = reference
    store = tmp_path / "store"
    shutil.copytree(ref, store)
    config = study_config(tmp_path, store, **GRID)
    scale_study = _recipe()
    _read_only(store, True)
    try:
        # (as root, permissions do not stop writes: the snapshot does)
        before = snapshot(store)
        assert study_cli(["summary", str(store)]) == 0
        assert "6/6 runs complete" in capsys.readouterr().out
        assert study_cli(["report", str(store), "-o", str(tmp_path / "report.html")]) == 0
        assert (tmp_path / "report.html").stat().st_size > 1000
        assert scale_study.main(["--config", str(config), "--dry-run"]) == 0
        assert "6 runs, 6 complete, 0 with work to do" in capsys.readouterr().out
        table = run_study(load_config(config), report=False)  # a finished study: nothing to do, nothing written
        assert list(table.status) == ["complete"] * 6
        assert snapshot(store) == before
    finally:
        _read_only(store, False)


def _recipe():
    spec = importlib.util.spec_from_file_location("scale_study", REPO / "recipes" / "scale_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_grid_with_every_cell_dropped_exits_2_with_the_reason(dry_run, tmp_path, capsys):
    args = ["--dry-run"] if dry_run else []
    code = _recipe().main([*args, f"output_dir={tmp_path / 'store'}", "grid.backbones=[resnetv2_tiny]",
                           "grid.pretrained=[bit-m]", "grid.also=[]"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: every cell of the grid was dropped: no public weights for resnetv2_tiny x bit-m; change "
                   "grid.backbones or grid.pretrained, or give a file as '<source>:<path>'"]
    assert not (tmp_path / "store").exists()

"""recipes/scale_study.py: bad input gives one clear line and exit code 2; --dry-run plans without training."""

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from scaling.study.store import StoreError

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scale_study", REPO / "recipes" / "scale_study.py")
scale_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale_study)


@pytest.mark.parametrize("args, message", [
    (["train.lrr=1"], "did you mean 'train.lr'"),
    (["grid.backbones=[resnet_nope]"], "grid.backbones: unknown backbone 'resnet_nope'"),
    (["data.root=/nonexistent/chexpert"], "dataset root does not exist: /nonexistent/chexpert"),
    (["sharding.strategy=zero3"], "needs a DeepSpeed launch"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["grid.pretrained=[/nonexistent/w.safetensors]"], "grid.pretrained '/nonexistent/w.safetensors' (backbone "),
    (["--dry-run", "grid.pretrained=[bit-l:/nonexistent/]"], "(backbone resnetv2_small): weight file or directory not found: /nonexistent"),
    # settings found wrong only once the data is read name their field and the override that set it
    (["data.root=/nonexistent/chexpert"], "[data.root is set in override `data.root=/nonexistent/chexpert`]"),
    (["data.labels=[Foo]"], "data.labels: unknown label 'Foo'; canonical names: ['No Finding', "),
    (["data.labels=[Edma]"], "data.labels: unknown label 'Edma'; closest names: ['Edema'] [data.labels is "
                             "set in override `data.labels=[Edma]`]"),
    (["--dry-run", "data.test_split=tst"], "data.test_split: chexpert: unknown split 'tst'; choose one of ['train', "
                                           "'valid'] [data.test_split is set in override `data.test_split=tst`]"),
    (["--dry-run", "data.options={bogus: 1}"], "data.options: chexpert: unknown loader option(s) ['bogus']"),
    (["--dry-run", "data.options.uncertainty=maybe"], "data.options: uncertainty policy 'maybe' is not allowed"),
    ([".train.lr=0.1"], "override '.train.lr=0.1': the key '.train.lr' has an empty part"),
])
def test_bad_input_is_one_clear_error(args, message, tmp_path, capsys):
    assert scale_study.main([*args, f"output_dir={tmp_path / 'store'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "store" / "runs").exists()


def test_a_setting_of_a_config_file_found_wrong_at_launch_names_the_file(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(f"defaults: [{REPO / 'recipes' / 'configs' / 'demo.yaml'}]\ndata:\n  labels: [Edema, Foo]\n")
    assert scale_study.main(["--config", str(study), f"output_dir={tmp_path / 'store'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.labels: unknown label 'Foo'") and err.endswith(f"[data.labels is set in {study}]")


def test_a_label_the_dataset_lacks_is_logged_once_per_source(tmp_path, caplog):
    caplog.set_level("WARNING", logger="scaling.data.labels")
    assert scale_study.main(["--dry-run", "data.labels=[Edema,Mass]", f"output_dir={tmp_path / 'store'}"]) == 0
    said = [r.getMessage() for r in caplog.records if "are not in" in r.getMessage()]
    assert said == ["labels ['Mass'] are not in chexpert (train set); they are NaN (excluded from loss and metrics)",
                    "labels ['Mass'] are not in eval set 'ood_site_b'; they are NaN (excluded from loss and metrics)"]


def test_dry_run_plans_the_demo(tmp_path, capsys):
    assert scale_study.main(["--dry-run", f"output_dir={tmp_path / 'store'}"]) == 0
    out = capsys.readouterr().out
    assert "44 runs, 0 complete" in out and "resnetv2_small" in out and "upstream:fractal_10k" in out
    assert not (tmp_path / "store" / "runs").exists()
    # a missing image is found by the plan (a launch would fail every run that reads it)
    train_csv = next((tmp_path / "store" / "data" / "site_a").rglob("train.csv"))  # the training dataset
    first = pd.read_csv(train_csv)["Path"].iloc[0]
    image = next(p for p in (train_csv.parent, *train_csv.parents) if (p / first).is_file()) / first
    image.unlink()
    assert scale_study.main(["--dry-run", f"output_dir={tmp_path / 'store'}"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: chexpert \((train|val|test) set\): 1 of \d+ image files are missing: {image} \(sample ",
                     err), err


def test_the_launch_prints_the_comparisons_that_hold_after_holm(tmp_path, capsys):
    rows = [  # two macro rows, one holding (p_holm 0.01), one not; a per-label row is never printed
        {"axis": "backbone", "eval_set": "test", "fraction": 1.0, "pretrained": "bit-m", "backbone": "bit_r101x3",
         "vs": "bit_r50x1", "label": "macro", "diff": 0.031, "diff_lo": 0.012, "diff_hi": 0.05, "p_holm": 0.01},
        {"axis": "pretrained", "eval_set": "ood", "fraction": 0.1, "pretrained": "bit-m", "backbone": "bit_r50x1",
         "vs": "bit-s", "label": "macro", "diff": 0.01, "diff_lo": -0.01, "diff_hi": 0.03, "p_holm": 0.4},
        {"axis": "backbone", "eval_set": "test", "fraction": 1.0, "pretrained": "bit-m", "backbone": "bit_r101x3",
         "vs": "bit_r50x1", "label": "Edema", "diff": 0.05, "diff_lo": 0.02, "diff_hi": 0.08, "p_holm": 0.001},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "comparisons.csv", index=False)
    scale_study.print_supported_comparisons(tmp_path / "comparisons.csv")
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "1 of 2 paired comparisons (macro AUROC) hold after Holm's adjustment at 0.05:"
    assert "bit_r101x3 vs bit_r50x1 (bit-m): +0.031 [+0.012, +0.050]  p_holm 0.01" in out[1]
    assert "Edema" not in "\n".join(out) and out[-1].endswith(str(tmp_path))
    scale_study.print_supported_comparisons(tmp_path / "missing.csv")  # --no-report or no comparison: silent
    (tmp_path / "empty.csv").write_text("")
    scale_study.print_supported_comparisons(tmp_path / "empty.csv")
    pd.DataFrame(columns=list(rows[0])).to_csv(tmp_path / "none.csv", index=False)
    scale_study.print_supported_comparisons(tmp_path / "none.csv")
    assert capsys.readouterr().out == ""
    # with 2-4 seeds a comparison that does not hold says little: the launch says so
    pd.DataFrame([{**r, "n_seeds": 2} for r in rows]).to_csv(tmp_path / "two_seeds.csv", index=False)
    scale_study.print_supported_comparisons(tmp_path / "two_seeds.csv")
    assert "2-4 seeds: each test has r - 1 degrees of freedom and little power" in capsys.readouterr().out


@pytest.fixture(scope="module")
def relaunched(tmp_path_factory):
    """A tiny study launched twice on one store, the second time with another learning rate (a setting that
    counts): two run ids, two study configs in one store."""
    from study_launch import study_config

    tmp = tmp_path_factory.mktemp("relaunch")
    store = tmp / "store"
    config = study_config(tmp, store, ood=False)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "cka": {"enabled": False}}))
    first = scale_study.main(["--config", str(config)])
    outputs = {f: (store / f).read_text() for f in ("results.csv", "report.html")}
    second = scale_study.main(["--config", str(config), "train.lr=0.01"])
    return store, config, (first, second), outputs


def _hashes(store: Path) -> dict[str, str]:
    """Run id -> config hash of every run of a store."""
    return {d.name: json.loads((d / "spec.json").read_text())["config_hash"] for d in (store / "runs").iterdir()}


def test_a_relaunch_with_a_changed_setting_reports_the_runs_of_its_own_config(relaunched, capsys):
    store, _, codes, first = relaunched
    assert codes == (0, 0)
    hashes = _hashes(store)
    latest = yaml.safe_load((store / "study.yaml").read_text())["_meta"]["config_hash"]
    (new,) = [r for r, h in hashes.items() if h == latest]
    (old,) = [r for r, h in hashes.items() if h != latest]
    results = pd.read_csv(store / "results.csv")
    assert list(results["run_id"]) == [new] and list(results["status"]) == ["complete"]
    report = (store / "report.html").read_text()
    assert report != first["report.html"] and "1 of 1 runs complete" in report
    assert f"The runs of study config {latest}. The store also holds runs of other configs, left out here: " \
           f"{hashes[old]} (tiny: 1 run, 1 complete)." in report
    assert (store / "comparisons.csv").is_file()

    from scaling.study.__main__ import main as study_cli

    capsys.readouterr()
    assert study_cli(["summary", str(store)]) == 2  # which of the two? the message lists them and both ways out
    err = capsys.readouterr().err
    assert f"{latest} (tiny: 1 run, 1 complete, the config in study.yaml)" in err and hashes[old] in err
    assert "--config-hash HASH" in err and "--allow-mixed" in err
    assert study_cli(["summary", str(store), "--config-hash", hashes[old]]) == 0
    assert "1/1 runs complete (1 complete)" in capsys.readouterr().out

    # `report` rebuilds what the launch wrote, with the same function: report, comparisons and results.csv
    csvs = ("comparisons.csv", "comparisons_subgroups.csv", "comparisons_brier.csv")
    launched = {f: (store / f).read_text() for f in ("results.csv", *csvs)}
    for f in launched:
        (store / f).unlink()
    assert study_cli(["report", str(store), "--config-hash", latest, "--n-boot", "5"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(store / f) for f in ("report.html", *csvs, "results.csv")]
    assert {f: (store / f).read_text() for f in launched} == launched
    # the old config's report says that study.yaml is not its config instead of showing it
    assert study_cli(["report", str(store), "--config-hash", hashes[old], "--n-boot", "5"]) == 0
    report = (store / "report.html").read_text()
    assert f"The runs of study config {hashes[old]}." in report
    assert f"study.yaml records config {latest}, not {hashes[old]}" in report


def test_no_report_prints_no_report_path(relaunched, capsys):
    store, config, _, _ = relaunched
    before = (store / "report.html").stat().st_mtime_ns
    assert scale_study.main(["--config", str(config), "train.lr=0.01", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert f"results: {store / 'results.csv'}" in out and "report:" not in out
    assert (store / "report.html").stat().st_mtime_ns == before


def test_overrides_on_both_sides_of_an_option(relaunched, capsys):
    store, config, _, _ = relaunched
    assert scale_study.main(["train.lr=0.01", "--dry-run", "--config", str(config), "grid.seeds=[0, 1]"]) == 0
    assert "2 runs, 1 complete, 1 with work to do" in capsys.readouterr().out  # lr 0.01, seed 0 is the stored run


def test_a_report_that_cannot_be_built_after_training_is_exit_1_not_bad_input(relaunched, tmp_path, monkeypatch,
                                                                               capsys):
    import shutil

    import scaling.study.report

    def broken(*args, **kwargs):
        raise StoreError("the report broke")

    store, config, _, _ = relaunched
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / "report.html").unlink()  # a launch with nothing to train still rebuilds a missing report
    monkeypatch.setattr(scaling.study.report, "build_report", broken)
    assert scale_study.main(["--config", str(config), "train.lr=0.01", f"output_dir={copy}"]) == 1
    err = capsys.readouterr().err
    assert "the runs are stored, but the study's outputs (results.csv, report.html, comparisons.csv) could not all " \
           "be written (StoreError: the report broke)" in err
    assert f"python -m scaling.study report {copy} --config-hash " in err
    assert (copy / "results.csv").read_text() == (store / "results.csv").read_text()


def test_a_run_that_fails_before_training_keeps_its_spec_and_is_counted_once(tmp_path, monkeypatch, capsys):
    import scaling.study.runner
    from scaling.models import WeightsUnavailable
    from scaling.study.__main__ import main as study_cli
    from study_launch import study_config

    def unavailable(*args, **kwargs):
        raise WeightsUnavailable("cannot load hub weights: offline mode")

    monkeypatch.setattr(scaling.study.runner, "_build", unavailable)
    store = tmp_path / "store"
    assert scale_study.main(["--config", str(study_config(tmp_path, store, ood=False)), "--no-report"]) == 1
    (run,) = (store / "runs").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["FAILED.json", "config.yaml", "settings.json", "spec.json"]
    spec = json.loads((run / "spec.json").read_text())
    assert (spec["run_id"], spec["backbone"], spec["pretrained"], spec["fraction"], spec["seed"]) == (
        run.name, "resnetv2_tiny", "scratch", 1.0, 0)
    capsys.readouterr()
    assert study_cli(["summary", str(store)]) == 0
    assert capsys.readouterr().out.startswith("0/1 runs complete (1 failed)\n  failed   ")


def test_a_dry_run_under_several_processes_prints_the_plan_once(relaunched, monkeypatch, capsys):
    _, config, _, _ = relaunched
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert scale_study.main(["--config", str(config), "--dry-run"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert scale_study.main(["--config", str(config), "--dry-run"]) == 0
    assert "1 runs, 1 complete" in capsys.readouterr().out


OWN_LOADER = '''"""A lab's own lesion photos: <root>/labels.csv (image, patient, lesion, sex, age) and <root>/images/*.png."""
from pathlib import Path

import pandas as pd

SPLITS = ("all",)


def load(root, split, *, site="a"):
    root = Path(root)
    df = pd.read_csv(root / "labels.csv")
    return pd.DataFrame({"sample_id": df["image"], "patient_id": df["patient"].astype(str),
                         "path": [str(root / "images" / i) for i in df["image"]], "sex": df["sex"],
                         "age": df["age"].astype(float), "label:Lesion": df["lesion"].astype(float), "site": site})
'''


def test_a_dataset_of_your_own_by_module_path_with_its_own_label_names(tmp_path):
    """The loader is named by its import path in the config, so the launch (a fresh process) imports it itself;
    its label ``Lesion`` is no canonical name, and a typo of it is still refused."""
    from PIL import Image

    from study_launch import command, env, study_config

    (tmp_path / "lablib").mkdir()
    (tmp_path / "lablib" / "__init__.py").write_text("")
    (tmp_path / "lablib" / "lesions.py").write_text(OWN_LOADER)
    data = tmp_path / "photos"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        lesion = i % 2
        pixels = rng.integers(0, 120, (32, 32, 3)) + 100 * lesion  # learnable: lesions are brighter
        Image.fromarray(pixels.astype(np.uint8)).save(data / "images" / f"p{i:03d}.png")
        rows.append({"image": f"p{i:03d}.png", "patient": i // 2, "lesion": lesion, "sex": "FM"[i % 3 % 2],
                     "age": 30 + i % 40})
    pd.DataFrame(rows).to_csv(data / "labels.csv", index=False)
    config = study_config(tmp_path, tmp_path / "store", ood=False)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"] = {**cfg["data"], "dataset": "lablib.lesions", "root": str(data), "labels": ["Lesion"],
                   "options": {"site": "lab"}, "subgroups": ["sex"]}
    cfg["cka"] = {"enabled": False}
    config.write_text(yaml.safe_dump(cfg))
    path = f"{tmp_path}{os.pathsep}{env()['PYTHONPATH']}"
    done = subprocess.run(command(config), env=env(PYTHONPATH=path), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = pd.read_csv(tmp_path / "store" / "results.csv")
    assert list(results["status"]) == ["complete"] and 0 <= results["auroc_test"].iloc[0] <= 1
    (run,) = (tmp_path / "store" / "runs").iterdir()
    test = pd.read_parquet(run / "predictions" / "test.parquet")
    assert "label:Lesion" in test.columns and set(test["label:Lesion"]) == {0.0, 1.0}
    typo = subprocess.run(command(config, "data.labels=[Lesoin]", "--dry-run"), env=env(PYTHONPATH=path),
                          capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2 and "data.labels: unknown label 'Lesoin'; closest names: ['Lesion']" in typo.stderr
    missing = subprocess.run(command(config, "data.dataset=lablib.nope", "--dry-run"), env=env(PYTHONPATH=path),
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "dataset 'lablib.nope': no registered dataset has this name" in missing.stderr

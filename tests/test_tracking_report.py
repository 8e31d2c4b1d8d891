"""The study's W&B view: the Report object is built offline with a panel per view; publishing offline logs the
report's figures and tables to a study-level run, creates no Report and leaks no identifier; an online study that
could not build its Report is refused before training."""

import importlib.util
import json
import socket
import sys

import pytest
from study_store import PATIENTS, SAMPLES, make_store, run_dir_of

from scaling.config import ConfigError, TrackingConfig, load_config
from scaling.study.grid import config_hash
from scaling.study.__main__ import main
from scaling.study.report import build_report
from scaling.study.runner import run_study
from scaling.study.store import RunStore
from scaling.study.wandb_report import (build_wandb_report, check_available, publish_study, report_panels,
                                        study_report_args)

needs_workspaces = pytest.mark.skipif(importlib.util.find_spec("wandb_workspaces") is None,
                                      reason="the W&B Report needs the wandb-report extra")


@pytest.fixture
def no_network(monkeypatch):
    """Any IP connection fails (W&B's own local service socket is a Unix socket and stays allowed)."""
    connect = socket.socket.connect

    def refuse(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access attempted in an offline test: {address}")
        return connect(sock, address, *args)

    monkeypatch.setattr(socket.socket, "connect", refuse)


@needs_workspaces
def test_report_object_built_offline(no_network):
    attributes = {"test": ["sex", "age_group"], "ood_site_b": ["sex", "skin_group"]}
    report = build_wandb_report("demo", project="scaling", entity="team", sources=["scratch", "upstream:big"],
                                ood_sets=["ood_site_b"], attributes=attributes)
    grid = report.blocks[-1]
    titles = [p.title for p in grid.panels]
    expected = [t for t, *_ in report_panels(["ood_site_b"], attributes)]
    assert titles[: len(expected)] == expected
    for view in ("AUROC vs model size (test)", "AUROC vs labelled fraction (test)",
                 "In-distribution vs OOD AUROC (ood_site_b)", "OOD drop vs model size (ood_site_b)",
                 "Worst-group AUROC vs model size (test, sex)", "AUROC gap vs model size (test, age_group)",
                 "Worst-group AUROC vs model size (ood_site_b, skin_group)",
                 "ECE vs model size (test)", "ECE after temperature scaling vs model size (ood_site_b)",
                 "Selective prediction: AURC vs model size (test)", "Training loss"):
        assert view in titles, view
    assert "Worst-group AUROC vs model size (test, skin_group)" not in titles  # the attribute is not on test
    assert [r.name for r in grid.runsets] == ["scratch", "upstream:big"]
    assert {r.entity for r in grid.runsets} == {"team"} and report.project == "scaling"
    # The payload report.save() would send (without an entity, so no project-id lookup on the server).
    spec = build_wandb_report("demo", project="scaling", sources=["scratch", "upstream:big"],
                              ood_sets=["ood_site_b"])._to_model().model_dump()
    filters = str(spec)
    assert "'value': 'demo'" in filters and "'value': 'upstream:big'" in filters
    assert "test/ood_site_b" not in filters and "ood_site_b/auroc_drop" in filters


@needs_workspaces
def test_report_of_a_study_with_analysis_cells_separates_them(no_network):
    report = build_wandb_report("demo", project="scaling", sources=["scratch", "upstream:big"], analysis=True)
    main, probe, shots = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    # the scaling views draw plain fine-tuning cells only; the analysis grids pair each source's protocols
    assert all("protocol" in str(r.filters) for r in main.runsets)
    assert [r.name for r in probe.runsets] == ["scratch: fine-tuned", "upstream:big: fine-tuned",
                                               "scratch: linear probe", "upstream:big: linear probe"]
    assert [p.title for p in shots.panels] == ["Few-shot: AUROC vs k (test)"]
    spec = str(report._to_model().model_dump())
    assert "'value': 'linear_probe'" in spec and "'name': 'protocol'" in spec and "'name': 'shots'" in spec
    plain = build_wandb_report("demo", project="scaling", sources=["scratch"])
    assert "protocol" not in str(plain._to_model().model_dump())  # a plain study's Report is what it was


@needs_workspaces
def test_report_selects_the_runs_of_one_study_config(tmp_path, no_network):
    """Two configs of one study name (another learning rate, same output_dir or W&B project) share the W&B group and
    job types; the Report, like the HTML report and the CSVs, draws the runs of one config hash: every run set
    filters on the config hash the cells carry in their W&B config."""
    cfg = make_store(tmp_path / "s", only={(b, "scratch", 1.0, 0) for b in ("bb_tiny", "bb_small")})
    rid, d = run_dir_of(tmp_path / "s", cfg, "bb_tiny", "scratch", 1.0, 0)
    spec = json.loads((d / "spec.json").read_text())
    other = "bb-tiny__scratch__f1__s0__otherconf"
    store = RunStore(tmp_path / "s")
    store.write_spec(other, {**spec, "run_id": other, "config_hash": "0123456789ab"}, "{}\n")
    store.write_metrics(other, store.read_metrics(rid))
    store.mark_complete(other)
    assert study_report_args(tmp_path / "s", config_hash="0123456789ab")["config_hash"] == "0123456789ab"
    assert study_report_args(tmp_path / "s", allow_mixed=True)["config_hash"] is None  # every config, on request

    args = study_report_args(tmp_path / "s", config_hash=config_hash(cfg))
    report = build_wandb_report(project="scaling", **{**args, "analysis": True})
    grids = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    runsets = [r for g in grids for r in g.runsets]
    assert len(runsets) == 3 * (1 + 2 + 2)  # per source: the scaling views, fine-tuned vs probe, k-shot per protocol
    for r in runsets:
        assert f"Config('config_hash') == '{config_hash(cfg)}'" in r.filters, r.filters
    # the filter the server gets: a config key equal to the hash, in every run set
    for r in runsets:
        spec = str(r._to_model().model_dump())
        assert "'name': 'config_hash'" in spec and f"'value': '{config_hash(cfg)}'" in spec
    no_sources = build_wandb_report("demo", project="scaling", config_hash="0123456789ab")
    assert "Config('config_hash') == '0123456789ab'" in no_sources.blocks[-1].runsets[0].filters
    mixed = build_wandb_report("demo", project="scaling", sources=["scratch"])
    assert "config_hash" not in mixed.blocks[-1].runsets[0].filters
    # block-shuffled cells are left out of the plain run sets by value, so runs logged before the axis stay in
    shuffled = build_wandb_report("demo", project="scaling", sources=["scratch"], analysis=True, shuffles=["8", "32"])
    plain = [r for b in shuffled.blocks if type(b).__name__ == "PanelGrid" for r in b.runsets
             if "linear_probe" not in r.filters and "shots') >= 1" not in r.filters]
    assert len(plain) == 2
    for r in plain:
        assert r.filters.endswith("Config('shuffle') != '8' and Config('shuffle') != '32'"), r.filters


def test_publish_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    keep = {(b, "scratch", 1.0, 0) for b in ("bb_tiny", "bb_small")}
    cfg = make_store(tmp_path / "s", only=keep)
    args = study_report_args(tmp_path / "s")
    # Sources come from the whole grid (study.yaml), including those not started yet.
    assert args == {"study": "handmade", "sources": ["scratch", "upstream:big", "upstream:small"],
                    "ood_sets": ["ood_site_b"], "attributes": {"test": ["sex"], "ood_site_b": ["sex"]},
                    "analysis": False, "config_hash": config_hash(cfg), "shuffles": []}
    assert publish_study(tmp_path / "s", TrackingConfig(wandb="offline"), build_report(tmp_path / "s", n_boot_fit=20)) is None  # no Report offline
    files = [p for p in (tmp_path / "s" / "wandb-study").rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in files)
    wandb_file = next(p for p in files if p.suffix == ".wandb").read_bytes()
    for key in (b"report/auroc_vs_params", b"report/headline", b"report/fits", b"report/comparisons",
                b"report/fairness/ood_site_b", b"report/calibration/val", b"report/ood/ood_site_b"):
        assert key in wandb_file, key
    for ident in PATIENTS + SAMPLES:
        assert ident.encode() not in blob
    assert publish_study(tmp_path / "s", TrackingConfig(wandb="off"), None) is None


def _without_wandb_workspaces(monkeypatch):
    """Make ``import wandb_workspaces`` fail as on an install without the wandb-report extra."""
    for name in [m for m in sys.modules if m == "wandb_workspaces" or m.startswith("wandb_workspaces.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)


def test_online_study_without_wandb_credentials_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """Without a W&B login every cell of an online study would fail when its tracker starts (a FAILED.json each):
    refused at start, before the store, naming the fix; a key in the environment is enough (read, not verified:
    no network)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    with pytest.raises(ConfigError, match=r"tracking.wandb=online needs W&B credentials .* `wandb login`"):
        check_available(TrackingConfig(wandb="online"))
    cfg = load_config(None, [f"output_dir={tmp_path / 'store'}", "data.root=synthetic", "tracking.wandb=online",
                             "grid.backbones=[resnetv2_tiny]", "grid.pretrained=[scratch]", "train.steps=2"])
    with pytest.raises(ConfigError, match="W&B credentials"):
        run_study(cfg)
    assert not (tmp_path / "store").exists()
    assert main(["wandb-report", str(tmp_path / "store")]) == 2
    assert "export WANDB_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    check_available(TrackingConfig(wandb="online"))


def test_online_study_without_wandb_workspaces_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the test session disables W&B; here the config decides
    _without_wandb_workspaces(monkeypatch)
    with pytest.raises(ConfigError, match=r"tracking.wandb=online .* wandb-workspaces"):
        check_available(TrackingConfig(wandb="online"))
    for mode in ("offline", "off"):  # no Report is built: nothing to refuse
        check_available(TrackingConfig(wandb=mode))
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment downgrades an online config
    check_available(TrackingConfig(wandb="online"))
    monkeypatch.delenv("WANDB_MODE")

    cfg = load_config(None, [f"output_dir={tmp_path / 'store'}", "data.root=synthetic", "tracking.wandb=online",
                             "grid.backbones=[resnetv2_tiny]", "grid.pretrained=[scratch]", "train.steps=2"])
    with pytest.raises(ConfigError, match="wandb-workspaces"):
        run_study(cfg)
    assert not (tmp_path / "store").exists()  # refused before the store, the data or any training
    assert main(["wandb-report", str(tmp_path / "store")]) == 2
    assert "pip install 'scaling[wandb-report]'" in capsys.readouterr().err

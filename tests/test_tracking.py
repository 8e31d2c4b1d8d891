"""W&B tracking: off means no import and no files; offline runs carry the metrics and never an identifier."""

import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from scaling.config import TrackingConfig
from scaling.tracking import REDACTED, Scrubber, Tracker, is_identifier_key, redact_paths

REPO = Path(__file__).resolve().parents[1]

PATIENTS = ["pzq81734", "pzq81735"]
SAMPLES = ["smx5521093", "smx5521094", "smx5521095"]
IMAGE_PATH = "/data/chexpert/patient77731/study1/view1_frontal.jpg"


def _rows() -> pd.DataFrame:
    rows = [
        ("test", "macro", "all", "all", "auroc", 0.81),
        ("test", "macro", "all", "all", "ece", 0.04),
        ("test", "macro", "sex", "all", "auroc_gap", 0.05),
        ("test", "macro", "sex", "F", "auroc", 0.79),
        ("ood_site_b", "macro", "all", "all", "auroc", 0.72),
    ]
    df = pd.DataFrame(rows, columns=["eval_set", "label", "attribute", "group", "metric", "value"])
    df["lo"], df["hi"], df["n"] = df.value - 0.02, df.value + 0.02, 100
    # Identifying columns a careless caller might pass along; they must never reach W&B.
    df["sample_id"] = SAMPLES[0]
    df["patient_id"] = PATIENTS[0]
    df["note"] = IMAGE_PATH
    return df


def test_identifier_keys_and_paths():
    for k in ("patient_id", "sample_id", "PatientID", "path", "image_path", "filename", "data.root_dir", "studyId",
              "exam_id", "lesion_id"):
        assert is_identifier_key(k), k
    for k in ("pretrain_images", "n_params", "test/auroc", "run_id", "fraction", "backbone", "test/sex/auroc_gap",
              "n_train_patients", "patient_count", "test/auroc@exam_max"):
        assert not is_identifier_key(k), k
    assert redact_paths(f"could not read {IMAGE_PATH}") == f"could not read {REDACTED}"
    assert redact_paths("patient1/study2/view1.png bad") == f"{REDACTED} bad"
    assert redact_paths("upstream:big and timm:resnetv2_50x1_bit.goog_in21k") == (
        "upstream:big and timm:resnetv2_50x1_bit.goog_in21k")
    s = Scrubber(protected=SAMPLES)
    assert s.value({"x": f"id {SAMPLES[1]}", "ok": "fine", "patient": "p"}) == {"x": REDACTED, "ok": "fine"}
    assert Scrubber(allow_identifiers=True).mapping({"patient_id": "p1"}) == {"patient_id": "p1"}


def test_protected_ids_are_found_as_whole_tokens():
    # MIMIC-CXR subject ids stand inside folder names (p10000032); NIH's patient ids are small numbers, which inside
    # another number or a group name such as '40-60' identify nobody and must not blank the string.
    s = Scrubber(protected=["10000032", "00000001_000.png", "40", "a1b2-c3", "123456"])
    for text in ("p10000032", "files/p10/p10000032 missing", "sample '00000001_000.png'", "x a1b2-c3", "40", " 40 ",
                 "mrn 123456"):
        assert s.text(text) == REDACTED, text
    for text in ("1400 images", "a1b2-c34", "test/auroc", "2040-2060"):
        assert s.text(text) == text, text
    # an error message keeps what went wrong and loses only the ids and paths
    assert s.message(f"cannot read image {IMAGE_PATH} (sample '00000001_000.png'): truncated") == (
        f"cannot read image {REDACTED} (sample '{REDACTED}'): truncated")
    assert s.message("subject p10000032: 3 images") == f"subject p{REDACTED}: 3 images"
    assert s.message("patient 40 is in train and test") == f"patient {REDACTED} is in train and test"


def test_short_numeric_patient_ids_leave_run_names_and_groups_alone():
    """NIH ChestX-ray14 numbers its patients 1 … 30805: every run id, backbone, age group and metric name with a
    number in it used to be blanked whole in W&B. Such ids are still redacted where they are the whole string, and
    inside an error message."""
    s = Scrubber(protected=[str(i) for i in range(1, 30806)] + ["00000001_000.png"])
    for text in ("bit_r50x1", "bitm-r101x3-f0.1-s2", "40-60", "80+", "ece_15", "test/auroc@exam_max", "fraction 0.01"):
        assert s.text(text) == text, text
    for text in ("402", "30805", "00000001_000.png", "sample 00000001_000.png"):
        assert s.text(text) == REDACTED, text
    assert s.message("patient 402 has no image") == f"patient {REDACTED} has no image"
    assert s.value({"group": "40-60", "patient": "402", "cell": "402"}) == {"group": "40-60", "cell": REDACTED}
    table = s.frame(pd.DataFrame({"group": ["40-60", "402"], "value": [0.8, 0.7]}))
    assert table["group"].tolist() == ["40-60", REDACTED]
    assert Scrubber(allow_identifiers=True, protected=["40"]).message("group 40") == "group 40"


def test_off_imports_nothing_and_writes_nothing(tmp_path):
    # A fresh interpreter: the test session itself may already have imported wandb.
    code = textwrap.dedent(f"""
        import sys
        from scaling.config import TrackingConfig
        from scaling.tracking import Tracker
        t = Tracker.create(TrackingConfig(wandb="off"), "s", "r", {{"seed": 0}}, {str(tmp_path / 'run')!r})
        t.log({{"a": 1.0}}, step=1); t.log_metrics_table([{{"eval_set": "test"}}]); t.finish()
        assert not t.active and t.run_id is None
        assert "wandb" not in sys.modules, "tracking off imported wandb"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    assert not any(tmp_path.rglob("*"))


def test_non_main_process_is_noop(tmp_path):
    t = Tracker.create(TrackingConfig(wandb="offline"), "s", "r", {"seed": 0}, tmp_path / "run", is_main_process=False)
    t.log({"a": 1.0}, step=1)
    t.finish()
    assert not t.active and not any(tmp_path.rglob("*"))


def test_offline_run_records_no_host_name(tmp_path, monkeypatch):
    """W&B puts the machine's name in every run it syncs (the run's 'host', shown in its overview) unless told
    otherwise; a hospital workstation's name is not W&B's business."""
    import socket

    host = "ward7-radiology-ws042"
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    t = Tracker.create(TrackingConfig(wandb="offline", project="scaling-test"), "demo", "cell", {"seed": 0},
                       tmp_path / "run")
    t.log({"train/loss": 0.5}, step=1)
    t.finish()
    records = b"".join(p.read_bytes() for p in tmp_path.rglob("*.wandb"))
    assert b"train/loss" in records and host.encode() not in records


def test_offline_run_has_metrics_and_no_identifiers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)  # anything W&B writes relative to the cwd stays in tmp
    run_dir = tmp_path / "runs" / "cell"
    axes = {"backbone": "resnetv2_tiny", "pretrained": "upstream:big", "fraction": 0.5, "seed": 1,
            "n_params": 12345, "pretrain_images": 2000, "data_root": "/data/chexpert", "sample_id": SAMPLES[2]}
    cfg = TrackingConfig(wandb="offline", project="scaling-test")
    t = Tracker.create(cfg, "demo", "cell", axes, run_dir)
    t.protect(PATIENTS + SAMPLES)
    t.log({"train/loss": 0.5, "train/images_per_s": 100.0, "patient_id": PATIENTS[1],
           "train/worst": f"sample {SAMPLES[1]}"}, step=1)
    t.log_metrics_table(_rows(), step=2)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    t.log_images({"plots/curve": fig}, step=2, captions={"plots/curve": IMAGE_PATH})
    plt.close(fig)
    with pytest.warns(UserWarning, match="patient images"):
        t.log_images({"samples": fig}, step=2, patient_data=True)
    wandb_id = t.run_id
    t.finish()

    assert (run_dir / "wandb.json").is_file() and wandb_id in (run_dir / "wandb.json").read_text()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    binary = [p for p in files if p.suffix == ".wandb"]
    assert binary, files
    blob = b"".join(p.read_bytes() for p in files)
    for ident in PATIENTS + SAMPLES + ["patient77731", "view1_frontal", "/data/chexpert"]:
        assert ident.encode() not in blob, f"{ident} leaked into W&B files"
    data = binary[0].read_bytes()
    for key in (b"train/loss", b"test/auroc", b"ood_site_b/auroc", b"test/sex/auroc_gap", b"resnetv2_tiny",
                b"upstream:big", b"pretrain_images"):
        assert key in data, key

    # A resumed cell continues the same W&B run.
    t2 = Tracker.create(cfg, "demo", "cell", axes, run_dir)
    assert t2.run_id == wandb_id
    t2.log({"train/loss": 0.4}, step=3)
    t2.finish()

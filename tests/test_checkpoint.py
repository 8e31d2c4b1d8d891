"""Resumable checkpoints: exact resume (1 process and 2 fresh launches for fsdp and zero3), SIGTERM, bad files."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import launcher  # noqa: E402
from toy import SigtermAt, ToyDataset, plant, vit  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.engine.checkpoint import CheckpointError, latest_checkpoint, read_state, resume_run_id  # noqa: E402
from scaling.engine.trainer import Preempted, Trainer  # noqa: E402

NONE = ShardingConfig(strategy="none")
CFG = TrainConfig(batch_size=8, steps=6, lr=0.05, warmup_steps=2, log_every=1, checkpoint_every=3)


class Tracker:
    run_id = "wandb-run-42"

    def log(self, data, step):
        pass


def _losses(trainer):
    return [h["loss"] for h in trainer.history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    trainer = Trainer(vit(), CFG, NONE, output_dir=run, tracker=Tracker())
    trainer.fit(ToyDataset(64))
    return run, _losses(trainer), trainer.full_state_dict()


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_resume_in_fresh_trainer_is_exact(uninterrupted, tmp_path):
    run, losses, params = uninterrupted
    run = _copy(run, tmp_path)
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_00000003" and read_state(ckpt)["step"] == 3
    assert resume_run_id(run) == "wandb-run-42"  # the tracker continues its W&B run
    trainer = Trainer(vit(seed=5), CFG, NONE, output_dir=run)  # different init: everything comes from the file
    summary = trainer.fit(ToyDataset(64))
    assert summary["resumed_from"] == 3
    assert _losses(trainer) == pytest.approx(losses, abs=1e-6)
    final = trainer.full_state_dict()
    assert max((final[k] - params[k]).abs().max().item() for k in params) <= 1e-6
    assert not list((run / "checkpoints").glob(".tmp-*"))  # nothing half-written left behind


def test_corrupt_state_file_names_the_file(uninterrupted, tmp_path):
    run = _copy(uninterrupted[0], tmp_path)
    state = latest_checkpoint(run) / "trainer_state.json"
    state.write_text(state.read_text()[:25])
    with pytest.raises(CheckpointError, match=str(state)):
        Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))


@pytest.mark.parametrize("field,value", [("world_size", 4), ("strategy", "zero3")])
def test_incompatible_checkpoint_names_file_and_mismatch(uninterrupted, tmp_path, field, value):
    run = _copy(uninterrupted[0], tmp_path)
    f = latest_checkpoint(run) / "trainer_state.json"
    state = json.loads(f.read_text())
    state[field] = value
    f.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"{field}: checkpoint has {value!r}"):
        Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))


def test_other_model_is_rejected(uninterrupted, tmp_path):
    run = _copy(uninterrupted[0], tmp_path)
    with pytest.raises(CheckpointError, match="trainer_state.json does not fit this run: model_signature"):
        Trainer(vit(depth=3), CFG, NONE, output_dir=run).fit(ToyDataset(64))


def test_corrupt_shard_names_the_checkpoint(uninterrupted, tmp_path):
    run = _copy(uninterrupted[0], tmp_path)
    ckpt = latest_checkpoint(run)
    for f in (ckpt / "model").glob("*.distcp"):
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(ckpt)):
        Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))


def test_sigterm_saves_then_fresh_launch_resumes_exactly_fsdp():
    """2 ranks: SIGTERM mid-run -> checkpoint + exit; a fresh `accelerate launch` resumes it (and the step-3
    checkpoint of an uninterrupted run) and reproduces the uninterrupted losses and parameters."""
    reference = launcher.run_suite("torch")["resume_fsdp"]
    code = launcher.run_and_sigterm("sigterm", marker="alive")
    assert code != 0
    ckpt = latest_checkpoint(launcher.out_dir() / "sigterm")
    assert ckpt is not None and 1 <= read_state(ckpt)["step"] < 6
    assert sorted(p.name for p in ckpt.iterdir()) == ["model", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json"]
    assert not list(ckpt.parent.glob(".tmp-*"))
    out = launcher.run_suite("resume", config="cpu_2proc.yaml", RESUME_STRATEGY="fsdp",
                             RESUME_DIRS="resume_fsdp,sigterm")
    for name in ("resume_fsdp", "sigterm"):
        cell = out[name]
        assert cell["world"] == 2 and cell["summary"]["resumed_from"] >= 1
        assert cell["losses"] == pytest.approx(reference["losses"], abs=1e-6)
        assert max((cell["params"][k] - reference["params"][k]).abs().max().item() for k in cell["params"]) <= 1e-6


def test_zero3_fresh_launch_resumes_exactly():
    reference = launcher.run_suite("zero", deepspeed=True)["resume_zero3"]
    out = launcher.run_suite("resume", config="cpu_2proc_zero3.yaml", RESUME_STRATEGY="zero3",
                             RESUME_DIRS="resume_zero3")
    cell = out["resume_zero3"]
    assert cell["world"] == 2 and cell["summary"]["resumed_from"] == 3
    assert cell["losses"] == pytest.approx(reference["losses"], abs=1e-6)
    assert max((cell["params"][k] - reference["params"][k]).abs().max().item() for k in cell["params"]) <= 1e-6


def test_no_file_of_a_checkpoint_runs_code_when_resumed(tmp_path):
    """Each file a resume reads, replaced by a pickle that would create a marker file when unpickled: the resume
    fails with a CheckpointError naming that file, and the marker never appears."""
    marker = tmp_path / "PWNED"
    plant(tmp_path / "probe.pkl", marker)
    pickle.loads((tmp_path / "probe.pkl").read_bytes())
    assert marker.exists()  # the payload is live: plain unpickling runs it
    marker.unlink()
    pristine = tmp_path / "pristine"
    with pytest.raises(Preempted):
        Trainer(vit(), CFG, NONE, output_dir=pristine, tracker=SigtermAt(2)).fit(ToyDataset(64))
    ckpt = latest_checkpoint(pristine)
    files = sorted(p.relative_to(pristine) for p in (pristine / "checkpoints").rglob("*") if p.is_file())
    assert {f.name for f in files} == {"latest", "trainer_state.json", ".metadata", "__0_0.distcp"}
    for f in files:
        run = tmp_path / f"run_{f.name}"
        shutil.copytree(pristine, run)
        plant(run / f, marker)
        with pytest.raises(CheckpointError, match=re.escape(str(run / f))):
            Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))
        assert not marker.exists(), f"unpickling {f} ran code"
    assert latest_checkpoint(pristine) == ckpt

"""Checkpoints in one process: exact resume after a real SIGTERM, what may change on resume (world size under DCP,
not under ZeRO), bad and malicious files. Real kills and fresh multi-rank launches: tests/test_resume.py."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from toy import SigtermAt, ToyDataset, plant, vit  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.engine.checkpoint import (  # noqa: E402
    CheckpointError,
    check_compatible,
    latest_checkpoint,
    read_state,
    resume_run_id,
)
from scaling.engine.trainer import Preempted, Trainer  # noqa: E402

NONE = ShardingConfig(strategy="none")
CFG = TrainConfig(batch_size=8, steps=6, lr=0.05, warmup_steps=2, log_every=1, checkpoint_every=2)


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run's losses and final parameters."""
    trainer = Trainer(vit(), CFG, NONE)
    trainer.fit(ToyDataset(64))
    return [h["loss"] for h in trainer.history], trainer.full_state_dict()


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """A run directory whose run got SIGTERM at step 3 (after the periodic checkpoint of step 2)."""
    run = tmp_path_factory.mktemp("run")
    with pytest.raises(Preempted) as stop:
        Trainer(vit(), CFG, NONE, output_dir=run, tracker=SigtermAt(3)).fit(ToyDataset(64))
    assert stop.value.code == 128 + 15 and stop.value.checkpoint.name == "step_00000003"
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_resume_in_fresh_trainer_is_exact(preempted, reference, tmp_path):
    losses, params = reference
    run = _copy(preempted, tmp_path)
    ckpt = latest_checkpoint(run)
    assert read_state(ckpt)["step"] == 3
    assert sorted(p.name for p in ckpt.iterdir()) == ["model", "trainer_state.json"]  # no RNG state to restore
    assert [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()] == ["step_00000003"]  # keep=1
    assert resume_run_id(run) == "run-1"  # the tracker continues its W&B run
    trainer = Trainer(vit(seed=5), CFG, NONE, output_dir=run)  # different init: everything comes from the file
    summary = trainer.fit(ToyDataset(64))
    assert summary["resumed_from"] == 3
    assert [h["loss"] for h in trainer.history] == losses
    final = trainer.full_state_dict()
    assert all(torch.equal(final[k], params[k]) for k in params)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # nothing half-written left behind


class SignalStepAt:
    """Tracker double that signals this process *and its DataLoader workers* while step ``at - 1`` is logged, as
    SLURM signals every process of a job step (``scancel --signal``, preemption, a signal srun forwards)."""

    run_id = "run-1"

    def __init__(self, at: int, signum: int):
        self.at, self.signum, self.workers = at, signum, 0

    def log(self, data, step):
        if step == self.at - 1:
            import subprocess

            import psutil

            children = psutil.Process().children()
            self.workers = len(children)
            # From another process, as slurmstepd sends it (torch's worker takes a SIGTERM from its parent as the
            # loader's own request to exit).
            pids = [str(p.pid) for p in [*children, psutil.Process()]]
            subprocess.run(["kill", f"-{self.signum}", *pids], check=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_every_process_of_the_step_checkpoints_despite_dataloader_workers(tmp_path, signum):
    """DataLoader workers ignore the job's signals and leave them to their rank: the rank saves the step and exits
    with 128 + the signal (a worker that died of it made the rank raise "DataLoader worker ... is killed by
    signal" with no checkpoint written)."""
    tracker = SignalStepAt(3, signum)
    with pytest.raises(Preempted) as stop:
        Trainer(vit(), CFG, NONE, output_dir=tmp_path, tracker=tracker, num_workers=2).fit(ToyDataset(64))
    assert tracker.workers >= 2  # this run's workers (a previous test's may still be exiting)
    assert stop.value.code == 128 + signum and stop.value.checkpoint.name == "step_00000003"
    assert read_state(latest_checkpoint(tmp_path))["step"] == 3


EXIT_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from toy import SigtermAt, ToyDataset, vit
from scaling.config import ShardingConfig, TrainConfig
from scaling.engine.trainer import Preempted, Trainer

cfg = TrainConfig(batch_size=8, steps=6, lr=0.05, warmup_steps=2, log_every=1)
trainer = Trainer(vit(), cfg, ShardingConfig(strategy="none"), output_dir=sys.argv[1], tracker=SigtermAt(2),
                  num_workers=2)
print("evaluated", round(trainer.evaluate(ToyDataset(16))["loss"], 4), flush=True)  # persistent workers
try:
    trainer.fit(ToyDataset(64))
except Preempted:
    held = sys.exc_info()  # the traceback keeps fit's frame, and the training iterator in it, alive
print("preempted", flush=True)  # and exit, with no trainer.close()
"""


def test_a_script_that_keeps_its_trainer_and_a_preemption_exits(tmp_path):
    """Workers ignore SIGTERM, and ``multiprocessing`` ends the workers still alive at interpreter exit with SIGTERM
    and joins them: a script that kept its Trainer (persistent prediction workers) or a preemption's traceback (the
    training iterator) used to wait there forever. The training loop's workers now end with the loop, and the
    prediction workers at exit."""
    import subprocess

    scripts = str(Path(__file__).parent / "dist_scripts")
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path), scripts], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and "evaluated" in proc.stdout and "preempted" in proc.stdout, proc.stderr[-3000:]


def test_a_checkpoint_half_written_by_a_killed_launch_is_ignored_then_removed(preempted, reference, tmp_path):
    """A launch killed mid-save (SIGKILL, a lost node) leaves ``.tmp-step_<N>``: the relaunch resumes from
    ``latest`` and the next checkpoint it writes removes the leftover (it stayed after the run had finished)."""
    run = _copy(preempted, tmp_path)
    half = run / "checkpoints" / ".tmp-step_00000005" / "model"
    half.mkdir(parents=True)
    (half / "__0_0.distcp").write_bytes(b"\0" * 4096)  # a shard cut off mid-write, no index, no state
    trainer = Trainer(vit(seed=5), CFG, NONE, output_dir=run)
    assert trainer.fit(ToyDataset(64))["resumed_from"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final", "latest"]
    assert all(torch.equal(trainer.full_state_dict()[k], v) for k, v in reference[1].items())


def test_corrupt_state_file_names_the_file(preempted, tmp_path):
    run = _copy(preempted, tmp_path)
    state = latest_checkpoint(run) / "trainer_state.json"
    state.write_text(state.read_text()[:25])
    with pytest.raises(CheckpointError, match=str(state)):
        Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))


def test_pointer_outside_the_store_is_refused(preempted, tmp_path):
    run = _copy(preempted, tmp_path)
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    with pytest.raises(CheckpointError, match=r"latest holds '\.\./\.\./elsewhere', not the name of a checkpoint"):
        latest_checkpoint(run)


def _edit_state(run: Path, **fields) -> Path:
    f = latest_checkpoint(run) / "trainer_state.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **fields}))
    return f


@pytest.mark.parametrize("field,value", [("strategy", "zero3"), ("total_steps", 7), ("batch_size", 16)])
def test_incompatible_checkpoint_names_file_and_mismatch(preempted, tmp_path, field, value):
    run = _copy(preempted, tmp_path)
    _edit_state(run, **{field: value})
    with pytest.raises(CheckpointError, match=rf"trainer_state.json does not fit this run: {field}: checkpoint "
                                              rf"has {value!r}"):
        Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))


def test_dcp_checkpoint_of_another_world_size_and_strategy_resumes(preempted, reference, tmp_path):
    """What 4 fsdp ranks with accumulation wrote resumes in 1 process: DCP reshards by global name and offset
    (real 2 <-> 1 rank resumes: tests/test_resume.py)."""
    run = _copy(preempted, tmp_path)
    _edit_state(run, world_size=4, strategy="fsdp", grad_accum=2)
    trainer = Trainer(vit(), CFG, NONE, output_dir=run)
    assert trainer.fit(ToyDataset(64))["resumed_from"] == 3
    assert all(torch.equal(v, reference[1][k]) for k, v in trainer.full_state_dict().items())


def test_zero_checkpoint_fits_another_world_size_but_not_another_stage(tmp_path):
    """A ZeRO checkpoint is joined and re-partitioned when its world size differs (real 2 <-> 1 rank resumes:
    tests/test_zero_reshard.py); another ZeRO stage or accumulation is still a mismatch naming the field."""
    state = {"strategy": "zero3", "world_size": 4, "grad_accum": 1, "model_signature": "abc"}
    check_compatible(tmp_path, state, {**state, "world_size": 2})
    for field, value in (("strategy", "zero2"), ("grad_accum", 2)):
        with pytest.raises(CheckpointError, match=rf"{field}: checkpoint has {state[field]!r}, this run has "
                                                  rf"{value!r}"):
            check_compatible(tmp_path, state, {**state, "world_size": 2, field: value})


def test_other_model_is_rejected(preempted, tmp_path):
    run = _copy(preempted, tmp_path)
    with pytest.raises(CheckpointError, match="trainer_state.json does not fit this run: model_signature"):
        Trainer(vit(depth=3), CFG, NONE, output_dir=run).fit(ToyDataset(64))


def test_corrupt_shard_names_the_file(preempted, tmp_path):
    run = _copy(preempted, tmp_path)
    shards = list((latest_checkpoint(run) / "model").glob("*.distcp"))
    for f in shards:
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=re.escape(str(shards[0]))):
        Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))


def test_no_file_of_a_checkpoint_runs_code_when_resumed(preempted, tmp_path):
    """Each file a resume reads, replaced by a pickle that would create a marker file when unpickled: the resume
    fails with a CheckpointError naming that file, and the marker never appears."""
    marker = tmp_path / "PWNED"
    plant(tmp_path / "probe.pkl", marker)
    pickle.loads((tmp_path / "probe.pkl").read_bytes())
    assert marker.exists()  # the payload is live: plain unpickling runs it
    marker.unlink()
    files = sorted(p.relative_to(preempted) for p in (preempted / "checkpoints").rglob("*") if p.is_file())
    assert {f.name for f in files} == {"latest", "trainer_state.json", ".metadata", "__0_0.distcp"}
    for f in files:
        run = tmp_path / f"run_{f.name}"
        shutil.copytree(preempted, run)
        plant(run / f, marker)
        with pytest.raises(CheckpointError, match=re.escape(str(run / f))):
            Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))
        assert not marker.exists(), f"unpickling {f} ran code"


class Recorder:
    run_id = "run-2"

    def __init__(self):
        self.logged = []

    def log(self, data, step):
        self.logged.append((step, dict(data)))


def test_finished_training_is_kept_and_a_second_fit_only_evaluates(preempted, reference, tmp_path):
    """The run finishes (after a resume): only the final checkpoint stays (fp32 weights + summary, no optimizer
    state); a second fit in a fresh Trainer trains nothing, returns the same summary and predicts the same."""
    from safetensors.torch import load_file

    run = _copy(preempted, tmp_path)
    first = Trainer(vit(), CFG, NONE, output_dir=run)
    summary = first.fit(ToyDataset(64), val_dataset=ToyDataset(16, seed=4))
    assert summary["resumed_from"] == 3 and summary["from_final_checkpoint"] is False
    final = latest_checkpoint(run)
    assert final.name == "final" and (run / "checkpoints" / "latest").read_text() == "final"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final", "latest"]  # step_* removed
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "trainer_state.json"]
    weights = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in reference[1].items())
    test = ToyDataset(20, seed=3)
    want = first.predict(test)["logits"]

    tracker = Recorder()
    again = Trainer(vit(seed=8), CFG, NONE, output_dir=run, tracker=tracker)
    second = again.fit(ToyDataset(64), val_dataset=ToyDataset(16, seed=4))
    assert second["from_final_checkpoint"] is True
    assert {k: v for k, v in second.items() if k != "from_final_checkpoint"} == \
        {k: v for k, v in summary.items() if k != "from_final_checkpoint"}  # val_loss recomputed: equal
    assert [s for s, d in tracker.logged if "train/loss" in d] == []  # nothing trained
    assert (again.predict(test)["logits"] == want).all()
    assert [h["loss"] for h in again.history] == reference[0]
    assert resume_run_id(run) is None  # the finishing launch had no tracker


class AtStep:
    """Tracker double that calls ``fn`` when step ``at`` is logged."""

    run_id = "run-3"

    def __init__(self, at: int, fn):
        self.at, self.fn = at, fn

    def log(self, data, step):
        if step == self.at:
            self.fn()


def test_a_checkpoint_that_does_not_fit_on_disk_is_a_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    import scaling.engine.checkpoint as ckpt

    def full_disk():
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))

    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:
        Trainer(vit(), CFG, NONE, output_dir=run, tracker=AtStep(3, full_disk)).fit(ToyDataset(64))
    assert isinstance(err.value, Exception)  # caught by a study's `except Exception` (DCP's own is a BaseException)
    msg = str(err.value)
    needed = int(re.search(r"needs about ([\d,]+) bytes", msg).group(1).replace(",", ""))
    assert 2 * 4 * sum(p.numel() for p in vit().parameters()) <= needed  # fp32 weights + momentum
    assert str(run / "checkpoints" / "step_00000004") in msg and "1,000 bytes are available" in msg
    assert "previous checkpoint" in msg and "step_00000002) is intact" in msg
    assert latest_checkpoint(run).name == "step_00000002" and not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    assert Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))["resumed_from"] == 2


FSIZE_SCRIPT = """
import json, resource, signal, sys
sys.path.insert(0, sys.argv[2])
from toy import ToyDataset, vit
from scaling.config import ShardingConfig, TrainConfig
from scaling.engine.trainer import Trainer

class Limit:  # at step 3, files may grow to 50 kB only (the checkpoint of step 4 is larger)
    run_id = "x"
    def log(self, data, step):
        if step == 3:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
            resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
cfg = TrainConfig(batch_size=8, steps=6, lr=0.05, warmup_steps=2, log_every=1, checkpoint_every=2)
try:
    Trainer(vit(), cfg, ShardingConfig(strategy="none"), output_dir=sys.argv[1], tracker=Limit()).fit(ToyDataset(64))
    print(json.dumps({"error": None}))
except BaseException as e:
    print(json.dumps({"type": type(e).__name__, "exception": isinstance(e, Exception), "error": str(e)}))
"""


def test_a_write_beyond_the_file_size_limit_is_a_clear_error_and_keeps_the_previous(tmp_path):
    """A real failing write (RLIMIT_FSIZE in a subprocess: EFBIG half-way through the shard file)."""
    import subprocess

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(run), str(Path(__file__).parent / "dist_scripts")],
                          capture_output=True, text=True, timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] == "CheckpointError" and out["exception"] is True, proc.stderr[-3000:]
    msg = out["error"]
    assert str(run / "checkpoints" / "step_00000004") in msg and "a short write" in msg
    assert "limited to 50,000 bytes (RLIMIT_FSIZE" in msg and re.search(r"needs about [\d,]+ bytes", msg)
    assert latest_checkpoint(run).name == "step_00000002" and not list((run / "checkpoints").glob(".tmp-*"))
    assert Trainer(vit(), CFG, NONE, output_dir=run).fit(ToyDataset(64))["resumed_from"] == 2

"""Exact resume after real kills, with augmentation and MixUp on: none (1 process), fsdp and zero3 (2 ranks).

Each strategy's cell (tests/dist_scripts/resume_suite.py) is launched three times: killed with SIGKILL (the whole
process group, as when a node is lost) after step 5, relaunched from its last periodic checkpoint and stopped with
SIGTERM (as SLURM preempts) after step 7, and relaunched to the end. Its parameters and test predictions must be
bit-identical to an uninterrupted run's. The same launches check world-size changes (a 2-rank fsdp checkpoint
resumed by 1 process and a 1-process checkpoint by 2 fsdp ranks) and that two fresh processes fitting the same
cell agree bit for bit.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import launcher  # noqa: E402
from toy import IMAGE_LABELS, IMG, write_image_table  # noqa: E402

from scaling.data.dataset import TableDataset  # noqa: E402
from scaling.engine.checkpoint import latest_checkpoint, read_state  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "resume_suite.py"
STRATEGIES = {"none": {"nproc": 0, "deepspeed": False}, "fsdp": {"nproc": 2, "deepspeed": False},
              "zero3": {"nproc": 2, "deepspeed": True}}
N2M_FROM = {"none": "fsdp", "fsdp": "none", "zero3": ""}


def _launch(out: Path, strategy: str, phase: str, label: str, **env) -> subprocess.Popen:
    how = STRATEGIES[strategy]
    log = open(out / f"{label}.log", "w")
    return subprocess.Popen(launcher.command(phase, script=SCRIPT, out=out, nproc=how["nproc"]),
                            env=launcher.env(how["deepspeed"], STRATEGY=strategy, LABEL=label, **env),
                            cwd=launcher.REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _tail(out: Path, label: str) -> str:
    return (out / f"{label}.log").read_text()[-6000:]


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (torchrun starts each rank in a session of its own, so killing the
    launcher's process group would leave the ranks running)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs[1:], timeout=30)  # the launcher itself is reaped by its Popen (keeps its exit code)


def _kill_after(out: Path, strategy: str, label: str, step: int, sig: int, timeout: int = 400, **env) -> dict:
    """Launch the victim, wait until rank 0 logged ``step``, send ``sig``; return the exit code and checkpoint."""
    proc = _launch(out, strategy, "victim", label, **env)
    marker = out / f"{label}_step{step}"
    deadline = time.time() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{label} ended before step {step}:\n{_tail(out, label)}")
            if time.time() > deadline:
                raise AssertionError(f"{label}: step {step} not reached in {timeout} s:\n{_tail(out, label)}")
            time.sleep(0.05)
        if sig == signal.SIGKILL:
            _kill_tree(proc.pid)  # every process at once, as when a node is lost: nothing gets to save
        else:
            proc.send_signal(sig)  # the launcher only; torchrun forwards it to its ranks
        code = proc.wait(timeout=180)
    finally:
        _kill_tree(proc.pid)  # no straggler survives the test
    ckpt = latest_checkpoint(out / strategy / "victim")
    logged = sorted(int(p.name.rsplit("step", 1)[1]) for p in out.glob(f"{label}_step*"))
    return {"code": code, "step": read_state(ckpt)["step"] if ckpt else None, "first_logged": logged[0],
            "log": _tail(out, label)}


def _final(out: Path, strategy: str) -> dict:
    proc = _launch(out, strategy, "final", f"{strategy}_final", N2M_FROM=N2M_FROM[strategy])
    code = proc.wait(timeout=600)
    assert code == 0, f"{strategy} final launch failed ({code}):\n{_tail(out, f'{strategy}_final')}"
    return torch.load(out / f"{strategy}_final.pt", weights_only=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    write_image_table(out / "src", 64).to_csv(out / "table.csv", index=False)
    write_image_table(out / "test_src", 24, seed=1).to_csv(out / "test.csv", index=False)
    for name in ("table", "test"):  # build the image cache once; the launches only read it
        import pandas as pd

        TableDataset(pd.read_csv(out / f"{name}.csv"), IMAGE_LABELS, IMG, cache_dir=out / "cache")
    kills = {}
    for s in STRATEGIES:
        kills[s, "SIGKILL"] = _kill_after(out, s, f"{s}_1", 5, signal.SIGKILL, FIRST="1")
    for s in STRATEGIES:
        kills[s, "SIGTERM"] = _kill_after(out, s, f"{s}_2", 7, signal.SIGTERM)
    first = {s: torch.load(out / f"{s}_{s}_1.pt", weights_only=True) for s in STRATEGIES}
    final = {s: _final(out, s) for s in ("fsdp", "zero3", "none")}  # none last: it loads the others' final weights
    return kills, first, final


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_killed_twice_then_resumed_equals_the_uninterrupted_run_bit_for_bit(chain, strategy):
    kills, _, final = chain
    killed, stopped = kills[strategy, "SIGKILL"], kills[strategy, "SIGTERM"]
    # SIGKILL: nothing saved at the kill; the last periodic checkpoint (every 2 steps) is intact.
    assert killed["code"] == -signal.SIGKILL
    assert killed["step"] in (4, 6), killed["log"]
    # SIGTERM: the relaunch resumed, then saved the step it was in and exited with 128 + 15.
    assert stopped["first_logged"] == killed["step"] + 1 and stopped["step"] >= 7, stopped["log"]
    if strategy == "none":
        assert stopped["code"] == 143
    else:
        assert stopped["code"] != 0
    victim, reference = final[strategy]["victim"], final[strategy]["reference"]
    assert victim["world"] == reference["world"] == (1 if strategy == "none" else 2)
    assert victim["summary"]["resumed_from"] == stopped["step"]
    assert _same(victim["params"], reference["params"])
    assert torch.equal(victim["logits"], reference["logits"])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_finished_run_is_evaluated_again_without_training(chain, strategy):
    _, _, final = chain
    done, again = final[strategy]["victim"], final[strategy]["victim_again"]
    assert again["summary"]["from_final_checkpoint"] is True and done["summary"]["from_final_checkpoint"] is False
    assert again["summary"]["steps"] == done["summary"]["steps"] and \
        again["summary"]["resumed_from"] == done["summary"]["resumed_from"]
    assert _same(again["params"], done["params"]) and torch.equal(again["logits"], done["logits"])
    if strategy == "zero3":  # ZeRO-2's whole parameters and fp32 master fragments are restored too
        z2, z2_again = final[strategy]["zero2"], final[strategy]["zero2_again"]
        assert z2_again["summary"]["from_final_checkpoint"] is True
        assert _same(z2_again["params"], z2["params"]) and torch.equal(z2_again["logits"], z2["logits"])


def test_final_weights_of_2_ranks_evaluate_in_1_process(chain):
    """The kept weights are consolidated: what fsdp and zero3 trained on 2 ranks predicts the same in 1 process."""
    _, _, final = chain
    for other in ("fsdp", "zero3"):
        one = final["none"][f"{other}_finished"]
        assert one["world"] == 1 and one["summary"]["from_final_checkpoint"] is True
        assert _same(one["params"], final[other]["victim"]["params"])
        assert (one["logits"] - final[other]["victim"]["logits"]).abs().max().item() < 1e-5


def test_no_zero_checkpoint_file_runs_code_when_resumed(chain):
    """DeepSpeed loads ZeRO files with torch.load(weights_only=False); scaling makes it weights_only=True: a planted
    pickle in every rank's model-state (or optimizer-state) file is refused, naming the file, and never runs."""
    _, _, final = chain
    for kind in ("model_states", "optim_states"):
        got = final["zero3"][f"poisoned_{kind}"]
        assert got["marker"] is False
        assert len(got["planted"]) == 2
        for rank, error in enumerate(got["errors"]):
            assert error is not None and "refused or unreadable ZeRO checkpoint file" in error, error
            assert any(f in error for f in got["planted"]), error


def test_two_fresh_processes_fit_the_same_cell_bit_for_bit(chain):
    _, first, final = chain
    a, b = first["none"]["reference_a"], final["none"]["reference"]
    assert _same(a["params"], b["params"]) and torch.equal(a["logits"], b["logits"])


def test_a_checkpoint_of_n_ranks_resumes_on_m(chain):
    """fsdp on 2 ranks -> 1 process, and 1 process -> fsdp on 2 ranks, each resumed at step 4 and run to the end,
    match an uninterrupted run on the new world size up to float summation order; so do 1 process and 2 ranks
    (the same global batches and augmentation draws on any world size)."""
    _, first, final = chain
    for strategy, world, source_world in (("none", 1, 2), ("fsdp", 2, 1)):
        source = first[N2M_FROM[strategy]]["n2m"]
        assert source["world"] == source_world
        resumed, reference = final[strategy]["n2m_resumed"], final[strategy]["n2m_reference"]
        assert resumed["world"] == world and resumed["summary"]["resumed_from"] == 4
        assert _max_diff(resumed["params"], reference["params"]) < 1e-5
        assert (resumed["logits"] - reference["logits"]).abs().max().item() < 1e-4
    one, two = final["none"]["n2m_reference"], final["fsdp"]["n2m_reference"]
    assert _max_diff(one["params"], two["params"]) < 1e-5


def test_an_fsdp_checkpoint_resumes_with_other_blocks_per_unit(chain):
    """Checkpoints are per parameter: a 2-rank fsdp checkpoint written with one block per FSDP unit (preempted at
    step 4) resumes with ``sharding.blocks_per_unit: 2`` and ends where the uninterrupted per-block run does."""
    _, _, final = chain
    regrouped, reference = final["fsdp"]["regrouped"], final["fsdp"]["n2m_reference"]
    assert regrouped["world"] == 2 and regrouped["summary"]["resumed_from"] == 4
    assert regrouped["summary"]["fsdp_units"] == 2 and reference["summary"]["fsdp_units"] == 3
    assert _max_diff(regrouped["params"], reference["params"]) < 1e-5
    assert (regrouped["logits"] - reference["logits"]).abs().max().item() < 1e-4

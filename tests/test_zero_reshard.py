"""A DeepSpeed ZeRO checkpoint resumes on another number of processes, with its optimizer state.

Real gloo ranks (tests/dist_scripts/zero_reshard_suite.py): zero1, zero2 and zero3 cells (SGD with momentum) are
preempted at step 3 on 1 and on 2 ranks; each checkpoint is resumed on the other world size to the end. Its final
parameters and momentum must match an uninterrupted run on the new world size, and a resume on the same world size,
up to the order of floating-point sums (1 and 2 uninterrupted ranks differ by 1.2e-7). The joined state of AdamW
checkpoints is compared with DeepSpeed's own converter to its universal format, which handles Adam states. A
checkpoint that cannot be joined (a rank's file missing, or holding a pickle that would run code) is an error
naming the file, and nothing is written.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import launcher  # noqa: E402
from toy import plant  # noqa: E402

from scaling.engine.checkpoint import (  # noqa: E402
    ZERO_CONSOLIDATED,
    CheckpointError,
    _zero_globals,
    _zero_whole_state,
    consolidate_zero,
    latest_checkpoint,
)

SUITE = Path(__file__).resolve().parent / "dist_scripts" / "zero_reshard_suite.py"
STRATEGIES = ("zero1", "zero2", "zero3")
TOL = 1e-5


def _launch(out: Path, phase: str, nproc: int) -> dict:
    proc = subprocess.run(launcher.command(phase, script=SUITE, out=out, nproc=nproc), env=launcher.env(True),
                          cwd=launcher.REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{phase} on {nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out / f"{phase}_w{nproc}.pt", weights_only=True)


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_reshard")
    source = {n: _launch(out, "source", n) for n in (1, 2)}
    for strategy in STRATEGIES:  # resumed from copies: the sources stay as written
        shutil.copytree(out / f"{strategy}_w2", out / f"{strategy}_w2_on1")
        shutil.copytree(out / f"{strategy}_w1", out / f"{strategy}_w1_on2")
        shutil.copytree(out / f"{strategy}_w2", out / f"{strategy}_w2_on2")
    broken = out / "unconvertible"
    shutil.copytree(out / "zero3_w2", broken)
    (latest_checkpoint(broken) / "model" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    before = _files(broken)
    resumed = {n: _launch(out, "resume", n) for n in (1, 2)}
    return {"out": out, "source": source, "resumed": resumed, "unconvertible": (before, _files(broken))}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("source_world,world", [(2, 1), (1, 2)])
def test_a_zero_checkpoint_resumes_on_another_world_size_with_its_momentum(suite, strategy, source_world, world):
    resumed = suite["resumed"][world][f"{strategy}/resharded"]
    assert "errors" not in resumed, resumed.get("errors")
    assert resumed["world"] == world and resumed["summary"]["resumed_from"] == 3
    assert resumed["summary"]["steps"] == 6 and resumed["engine_steps"] == 6  # DeepSpeed's counter carried over
    reference = suite["source"][world][f"{strategy}/reference"]
    assert reference["world"] == world
    assert _max_diff(resumed["params"], reference["params"]) < TOL
    assert _max_diff(resumed["momentum"], reference["momentum"]) < TOL
    # The momentum is carried over, not restarted: it is far from zero, and the tolerance far below it.
    assert max(v.abs().max().item() for v in reference["momentum"].values()) > 0.1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resharded_and_same_world_size_resumes_agree(suite, strategy):
    """On 2 ranks: the 1-rank checkpoint resumed ends where the 2-rank checkpoint resumed by DeepSpeed's own loader
    does, and that one is bit-identical to the uninterrupted 2-rank run."""
    same, resharded = suite["resumed"][2][f"{strategy}/same"], suite["resumed"][2][f"{strategy}/resharded"]
    reference = suite["source"][2][f"{strategy}/reference"]
    assert same["summary"]["resumed_from"] == 3
    assert _max_diff(same["params"], reference["params"]) == 0 and _max_diff(same["momentum"],
                                                                            reference["momentum"]) == 0
    assert _max_diff(resharded["params"], same["params"]) < TOL
    assert _max_diff(resharded["momentum"], same["momentum"]) < TOL


def test_a_checkpoint_that_cannot_be_joined_is_a_clear_error_and_writes_nothing(suite):
    got = suite["resumed"][1]["unconvertible"]
    assert got["world"] == 1 and len(got["errors"]) == 1
    error = got["errors"][0]
    assert "holds the optimizer-state files of ranks [0], but 2 ranks wrote this checkpoint" in error, error
    assert "unconvertible/checkpoints/step_00000003/model/state" in error
    assert "Nothing was written; without joining, it loads only on the 2 processes that wrote it" in error
    before, after = suite["unconvertible"]
    assert after == before and not any(ZERO_CONSOLIDATED in f for f in after)


def _load(path: Path):
    with torch.serialization.safe_globals(_zero_globals()):
        return torch.load(path, weights_only=True)


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_joined_adamw_state_equals_deepspeeds_universal_conversion(suite, strategy, tmp_path):
    """DeepSpeed's ``ds_to_universal`` joins Adam's states (not SGD's momentum): for AdamW checkpoints of 2 ranks,
    scaling's joined fp32 weights, moments and step equal its output exactly."""
    ckpt = latest_checkpoint(suite["out"] / f"{strategy}_adamw_w2")
    universal = tmp_path / "universal" / "state"
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                           "--input_folder", str(ckpt / "model" / "state"), "--output_folder", str(universal),
                           "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors, global_state = _zero_whole_state(ckpt, 2)
    names = {k.split("/", 1)[1] for k in tensors if k.startswith("fp32/")}
    assert len(names) == 32
    for name in names:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            theirs = _load(universal / "zero" / name / f"{key}.pt")
            theirs = theirs["param"] if isinstance(theirs, dict) else theirs  # ZeRO-1/2 wrap it, ZeRO-3 does not
            assert torch.equal(tensors[f"{key}/{name}"], theirs.view(tensors[f"{key}/{name}"].shape)), (name, key)
    if strategy == "zero3":
        step = _load(universal / "zero" / "optimizer_state.pt")["optimizer_state_dict"]["state"][0]["step"]
    else:
        step = _load(universal / "zero" / "head.bias" / "step.pt")
    assert global_state["optimizer_step"] == float(step) == 3.0
    assert global_state["engine"]["global_steps"] == 3 and global_state["world_size"] == 2


def test_joining_runs_no_code_from_the_rank_files(suite, tmp_path):
    """The rank files are loaded with torch.load(weights_only=True) when joined, too: a planted pickle in one rank's
    optimizer file is refused, naming it, never runs, and nothing is written."""
    run = tmp_path / "poisoned"
    shutil.copytree(suite["out"] / "zero2_w2", run)
    ckpt = latest_checkpoint(run)
    planted = ckpt / "model" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "PWNED"
    plant(planted, marker)
    with pytest.raises(CheckpointError, match="refused or unreadable ZeRO checkpoint file") as err:
        consolidate_zero(ckpt, 2, rank=0)
    assert str(planted) in str(err.value) and "loads only on the 2 processes that wrote it" in str(err.value)
    assert not marker.exists() and not any(p.name.startswith(f".{ZERO_CONSOLIDATED}") or p.name == ZERO_CONSOLIDATED
                                           for p in ckpt.iterdir())

"""launch/slurm.sbatch and launch/slurm_array.sbatch without a cluster: `srun` and `scontrol` are stand-ins, `srun`
with SLURM's own signal handling. The dry run records the command every node runs; the real runs start a tiny study
on 2 CPU ranks (or one process) through the real `accelerate launch`, preempt it with SIGUSR1 as SLURM's
`--signal=B:USR1@120` does, and check that every rank checkpointed, the job requeued itself and the next start
resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from launcher import reserved_port  # noqa: E402
from study_launch import study_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# srun's signal handling (slurm src/srun/libsrun/srun_job.c, _srun_signal_mgr): SIGTERM or SIGHUP make it SIGKILL
# every task ("forcing job termination"); SIGUSR1 is forwarded to the step, and slurmstepd signals every process of
# the step (its cgroup: here the task's process tree, whatever sessions its processes start). When the task exits,
# what is left of the step is killed. The task runs with SLURM_NODEID=1 (the second node) unless told otherwise.
SRUN = f'''#!{sys.executable}
import os, signal, subprocess, sys
import psutil

args = sys.argv[1:]
while args and args[0].startswith("--"):
    args = args[1:]
task = subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": os.environ.get("FAKE_NODEID", "1")}})


def step(sig):
    root = psutil.Process(task.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def handle(signum, frame):
    if signum in (signal.SIGTERM, signal.SIGHUP):
        print("srun: forcing job termination", flush=True)
        step(signal.SIGKILL)
    else:
        step(signum)


for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(s, handle)
# Recorded once the handlers are in place: a test that waits for this file may signal srun.
with open(os.path.join(os.environ["FAKE_OUT"], "srun"), "w") as f:
    f.write(" ".join(sys.argv[1:]))
code = task.wait()
for p in psutil.Process().children(recursive=True):
    p.kill()
sys.exit(code if code >= 0 else 128 - code)
'''

FAKES = {
    "srun": SRUN,
    # The node list expands to gpu-node-a and 4,000 more hosts (a long list: reading only its first line must not
    # kill scontrol with SIGPIPE under pipefail); `requeue` is recorded.
    "scontrol": '#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo "${FAKE_FIRST_HOST:-gpu-node-a}"; '
                'seq -f "gpu-node-%g" 4000; else echo "$@" >> "$FAKE_OUT/scontrol"; fi\n',
}
# accelerate records its arguments and the signal settings it got, then runs until SIGUSR1 (recorded) ends it.
FAKE_ACCELERATE = ('#!/bin/bash\ntrap \'echo USR1 > "$FAKE_OUT/accelerate_signal"; exit 138\' USR1\n'
                   'printf "%s\\n" "$@" > "$FAKE_OUT/accelerate"\n'
                   'echo "$PET_SIGNALS_TO_HANDLE $TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > "$FAKE_OUT/accelerate_env"\n'
                   'while true; do sleep 0.05; done\n')


def _bin(tmp_path: Path, fake_accelerate: bool) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {**FAKES, **({"accelerate": FAKE_ACCELERATE} if fake_accelerate else {})}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict:
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "FAKE_OUT": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
            "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", **extra}


def _wait_until(ready, proc: subprocess.Popen, what: str, log: Path | None = None, timeout: float = 30) -> None:
    """Poll ``ready()`` until it holds; fail (with the output so far) if ``proc`` ends or ``timeout`` passes."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else log.read_text()[-5000:]
        assert time.time() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30, text: str = "") -> None:
    _wait_until(lambda: path.exists() and text in path.read_text(), proc, f"{path.name} with {text!r}", path, timeout)


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has installed a handler for ``signum`` (the SigCgt mask of /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def test_slurm_sbatch_builds_the_per_node_launch_and_requeues_on_sigusr1(tmp_path):
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch", "launch/hsdp.yaml", "my_study.yaml", "train.steps=5"],
                            cwd=REPO, env=_env(tmp_path, _bin(tmp_path, fake_accelerate=True)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Signal only once every process on the way has its handler: the fake accelerate has written its last
        # file (its trap comes first), srun has recorded itself (after its handlers) and the batch shell traps USR1.
        _wait_for(tmp_path / "accelerate_env", proc, text="\n")
        _wait_for(tmp_path / "srun", proc, text="bash -c")
        _wait_until(lambda: _catches(proc.pid, signal.SIGUSR1), proc, "the batch shell's USR1 trap")
        args = (tmp_path / "accelerate").read_text().split("\n")[:-1]
        assert args == ["launch", "--config_file", "launch/hsdp.yaml",
                        "--num_machines", "2", "--num_processes", "8",  # SLURM_NNODES x SLURM_GPUS_ON_NODE
                        "--machine_rank", "1",  # this task's SLURM_NODEID
                        "--main_process_ip", "gpu-node-a",  # the first host of the node list
                        "--main_process_port", "29500", "--rdzv_backend", "static", "--same_network",
                        # a DeepSpeed launch on several machines would otherwise go through pdsh
                        "--deepspeed_multinode_launcher", "standard",
                        "recipes/scale_study.py", "--config", "my_study.yaml", "train.steps=5"]
        assert (tmp_path / "srun").read_text().startswith("--kill-on-bad-exit=1 bash -c")
        # torch.distributed's agent handles SIGUSR1 (else it dies of it) and waits up to 110 s for its ranks
        signals, timeout = (tmp_path / "accelerate_env").read_text().split()
        assert "SIGUSR1" in signals.split(",") and "SIGTERM" in signals.split(",") and int(timeout) == 110
        # SLURM's --signal=B:USR1@120 reaches the batch shell: srun forwards SIGUSR1 to the step, then requeue.
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "accelerate_signal").read_text().strip() == "USR1"
    assert (tmp_path / "scontrol").read_text().strip() == "requeue 4242"


def _tiny_study(tmp_path: Path, strategy: str) -> tuple[Path, Path]:
    """A study of one run long enough to be preempted (60 steps, no periodic checkpoint, 2 DataLoader workers)."""
    store = tmp_path / "store"
    path = study_config(tmp_path, store, ood=False)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].update(steps=60, log_every=1, checkpoint_every=0)
    cfg["sharding"]["strategy"] = strategy
    cfg["data"]["num_workers"] = 2
    path.write_text(yaml.safe_dump(cfg))
    return path, store


def _launch_all(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _preempt_then_resume(tmp_path: Path, script: str, launch_cfg: str, strategy: str, **env: str) -> dict:
    """Run ``script`` for real, SIGUSR1 its batch shell once step 3 is logged, then run it again to the end."""
    study, store = _tiny_study(tmp_path, strategy)
    environ = _env(tmp_path, _bin(tmp_path, fake_accelerate=False), FAKE_FIRST_HOST="127.0.0.1", FAKE_NODEID="0",
                   SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2", SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID="3",
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", WANDB_MODE="disabled", **env)
    command = ["bash", script, launch_cfg, str(study), "--no-report"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(log, proc, timeout=300, text="step 3/60")
        everything = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGUSR1)
        first_code = proc.wait(timeout=300)
        left = _launch_all(everything)  # what a requeue would kill: nothing may still be writing
    finally:
        for p in [psutil.Process(proc.pid)] if proc.poll() is None else []:
            p.kill()
        for p in _launch_all(everything if "everything" in locals() else []):
            p.kill()
    first = log.read_text()
    (run,) = (store / "runs").iterdir()
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    again = subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-5000:]
    final = json.loads((run / "checkpoints" / "final" / "trainer_state.json").read_text())
    return {"first_code": first_code, "first": first, "left": left, "saved": saved, "final": final,
            "requeue": (tmp_path / "scontrol").read_text().split("\n")}


def test_slurm_sbatch_preempted_on_two_ranks_checkpoints_every_rank_and_resumes(tmp_path):
    """Real ranks: SIGUSR1 from SLURM reaches both ranks (through srun and the agent; their DataLoader workers get
    it too and ignore it), both save the same step, the job requeues, and the next start resumes from that step."""
    with reserved_port() as port:  # both launches of the job use it
        got = _preempt_then_resume(tmp_path, "launch/slurm.sbatch", "launch/cpu_2proc.yaml", "fsdp",
                                   MAIN_PORT=str(port))
    saved = [line for line in got["first"].splitlines() if "signal 10: saved" in line]
    assert len(saved) == 2, got["first"][-5000:]  # every rank
    (step,) = {line.rsplit("at step ", 1)[1].split(";")[0] for line in saved}
    assert got["first_code"] == 0 and got["requeue"][0] == "requeue 4242" and not got["left"]
    assert got["saved"] == ["latest", f"step_{int(step):08d}"]  # only the preemption wrote a checkpoint
    assert "forcing job termination" not in got["first"]
    assert got["final"]["world_size"] == 2 and got["final"]["summary"]["resumed_from"] == int(step) >= 3


def test_slurm_array_preempted_one_process_run_checkpoints_and_resumes(tmp_path):
    """Accelerate's one-process launcher forwards no signal: the array script signals its rank directly, so the run
    checkpoints and nothing of the launch is left running when the task requeues."""
    got = _preempt_then_resume(tmp_path, "launch/slurm_array.sbatch", "launch/single_gpu.yaml", "none")
    saved = [line for line in got["first"].splitlines() if "signal 10: saved" in line]
    assert len(saved) == 1, got["first"][-5000:]
    step = int(saved[0].rsplit("at step ", 1)[1].split(";")[0])
    assert got["first_code"] == 0 and got["requeue"][0] == "requeue 4242_3" and not got["left"]
    assert got["saved"] == ["latest", f"step_{step:08d}"]
    assert got["final"]["world_size"] == 1 and got["final"]["summary"]["resumed_from"] == step >= 3



# Autobinds elsewhere until one is handed ``port`` (the kernel picks each at random among ~14,000 free ports).
_AUTOBIND_UNTIL = """
import socket, sys
port = int(sys.argv[1])
for i in range(1, 40001):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        if s.getsockname()[1] == port:
            sys.exit(f"handed out after {i} binds")
"""


def test_a_reserved_rendezvous_port_is_handed_to_no_other_process_and_the_launch_binds_it():
    """The port of a 2-node rehearsal or of the preempted SLURM job is chosen in this process and bound seconds later
    by the launch; meanwhile the other pytest worker's ranks bind ports of their own. A port picked free and closed
    went to another process's bind(0) after ~7,000 binds on average; a reserved one never does, and the launch's
    TCPStore binds it as accelerate's port check finds it free."""
    from datetime import timedelta

    from accelerate.utils import is_port_in_use
    from torch.distributed import TCPStore

    with reserved_port() as port:
        other = subprocess.run([sys.executable, "-c", _AUTOBIND_UNTIL, str(port)], capture_output=True, text=True,
                               timeout=120)
        assert other.returncode == 0, other.stderr
        assert not is_port_in_use(port)
        store = TCPStore("127.0.0.1", port, 1, True, timeout=timedelta(seconds=30))
        store.set("rendezvous", "up")
        assert store.get("rendezvous") == b"up" and is_port_in_use(port)

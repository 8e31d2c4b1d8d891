"""launch/slurm.sbatch, dry-run: the command every node runs, built from fake SLURM_* variables, and the
preemption path (SIGUSR1 -> SIGTERM to every rank -> requeue). `srun`, `scontrol` and `accelerate` are stand-ins
that record what they were asked to do; nothing is scheduled."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKES = {
    # The node list expands to gpu-node-a and 4,000 more hosts (a long list: reading only its first line must not
    # kill scontrol with SIGPIPE under pipefail); `requeue` is recorded.
    "scontrol": '#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo gpu-node-a; seq -f "gpu-node-%g" 4000; '
                'else echo "$@" >> "$FAKE_OUT/scontrol"; fi\n',
    # srun starts the task of one node (the second: SLURM_NODEID=1) after its own options.
    "srun": '#!/bin/bash\necho "$@" > "$FAKE_OUT/srun"\nwhile [[ "$1" == --* ]]; do shift; done\n'
            'SLURM_NODEID=1 exec "$@"\n',
    # accelerate records its arguments, then runs until a SIGTERM (which it records) ends it.
    "accelerate": '#!/bin/bash\ntrap \'echo TERM > "$FAKE_OUT/accelerate_signal"; exit 143\' TERM\n'
                  'printf "%s\\n" "$@" > "$FAKE_OUT/accelerate"\nwhile true; do sleep 0.05; done\n',
}


def _start(tmp_path: Path) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(tmp_path), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="gpu-node-[a-b]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4")
    return subprocess.Popen(["bash", "launch/slurm.sbatch", "launch/hsdp.yaml", "my_study.yaml", "train.steps=5"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path.name} never written"
        time.sleep(0.05)


def test_slurm_sbatch_builds_the_per_node_launch_and_requeues_on_sigusr1(tmp_path):
    proc = _start(tmp_path)
    try:
        _wait_for(tmp_path / "accelerate", proc)
        time.sleep(0.2)
        args = (tmp_path / "accelerate").read_text().split("\n")[:-1]
        assert args == ["launch", "--config_file", "launch/hsdp.yaml",
                        "--num_machines", "2", "--num_processes", "8",  # SLURM_NNODES x SLURM_GPUS_ON_NODE
                        "--machine_rank", "1",  # this task's SLURM_NODEID
                        "--main_process_ip", "gpu-node-a",  # the first host of the node list
                        "--main_process_port", "29500", "--rdzv_backend", "static", "--same_network",
                        "recipes/scale_study.py", "--config", "my_study.yaml", "train.steps=5"]
        assert (tmp_path / "srun").read_text().startswith("--kill-on-bad-exit=1 bash -c")
        # SLURM's --signal=B:USR1@120 reaches the batch shell: every rank gets SIGTERM (checkpoint), then requeue.
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "accelerate_signal").read_text().strip() == "TERM"
    assert (tmp_path / "scontrol").read_text().strip() == "requeue 4242"

"""Launch the scripts of tests/dist_scripts on 2 CPU ranks (torchrun or accelerate launch), or as one process."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SUITE = HERE / "sharded_suite.py"
_OUT = None
_RESULTS: dict[str, dict] = {}


def out_dir() -> Path:
    """One scratch directory per pytest session, shared by every suite (resume suites read earlier runs)."""
    global _OUT
    if _OUT is None:
        _OUT = Path(tempfile.mkdtemp(prefix="scaling-dist-"))
        atexit.register(shutil.rmtree, _OUT, ignore_errors=True)  # checkpoints of every suite: gone with pytest
    return _OUT


def env(deepspeed: bool = False, **extra: str) -> dict:
    """Environment of a launched suite: one thread per rank (2 ranks share 2 cores), offline, optional DeepSpeed."""
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    e.pop("ACCELERATE_USE_DEEPSPEED", None)
    e.pop("ACCELERATE_USE_FSDP", None)
    if deepspeed:
        # What `accelerate launch --use_deepspeed` sets; scaling then builds the plugin from the strategy.
        e["ACCELERATE_USE_DEEPSPEED"] = "true"
    e.update(extra)
    return e


def command(suite: str, config: str | None = None, script: Path = SUITE, out: Path | None = None,
            nproc: int = 2) -> list[str]:
    """Command line for ``suite`` of ``script`` on ``nproc`` local ranks: torchrun, or ``accelerate launch
    --config_file launch/<config>``; ``nproc=0`` is a plain single process (no launcher, no process group)."""
    if nproc == 0:
        launch = [sys.executable]
    elif config is None:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    else:
        launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                  str(REPO / "launch" / config), "--main_process_port", "0"]
    return [*launch, str(script), suite, str(out or out_dir())]


def run_suite(suite: str, deepspeed: bool = False, timeout: int = 400, config: str | None = None, nproc: int = 2,
              **extra: str) -> dict:
    """Run a suite (cached per session under its name + extra env) and return rank 0's result dict."""
    key = f"{suite}:{config}:{nproc}:{sorted(extra.items())}"
    if key not in _RESULTS:
        proc = subprocess.run(command(suite, config, nproc=nproc), env=env(deepspeed, **extra), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"suite {suite} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-6000:]}")
        _RESULTS[key] = torch.load(out_dir() / f"{suite}.pt", weights_only=False)
    return _RESULTS[key]


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A localhost TCP port for a launch's rendezvous, held for the block: bound here with SO_REUSEADDR and never
    listened on. The kernel then hands it to no other process's bind(0) or outgoing connection (a port picked free
    and closed could go to the other pytest worker's ranks before the launch binds it), while the launch's TCPStore,
    which binds with SO_REUSEADDR too, still can; accelerate's port check finds nobody listening on it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def run_two_nodes(suite: str, config: str = "hsdp.yaml", timeout: int = 400) -> dict:
    """Rehearse a 2-node job on this machine: two ``accelerate launch`` process groups (``--num_machines 2``,
    ``--machine_rank 0`` and ``1``, main process on 127.0.0.1) of 2 processes each, over gloo, as
    ``launch/slurm.sbatch`` starts one per node. Returns rank 0's result dict (cached per session)."""
    key = f"nodes:{suite}:{config}"
    if key not in _RESULTS:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        procs = []
        with reserved_port() as port:
            for node in (0, 1):
                cmd = [accelerate, "launch", "--config_file", str(REPO / "launch" / config), "--num_machines", "2",
                       "--num_processes", "4", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1",
                       "--main_process_port", str(port), "--rdzv_backend", "static", "--same_network",
                       str(SUITE), suite, str(out_dir())]
                procs.append(subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
            try:
                outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
        if any(proc.returncode for proc in procs):
            raise AssertionError(f"2-node suite {suite} failed ({[proc.returncode for proc in procs]}):\n"
                                 + "\n".join(o[-4000:] for o in outputs))
        _RESULTS[key] = torch.load(out_dir() / f"{suite}.pt", weights_only=False)
    return _RESULTS[key]

"""Resumable training state (sharded, atomic) and the consolidated single-file export.

Layout of a run directory::

    <run_dir>/checkpoints/latest            name of the newest complete checkpoint (written last, atomically)
    <run_dir>/checkpoints/step_00000120/    one checkpoint
        trainer_state.json                  step, world size, strategy, model signature, tracker run id
        rng_rank<r>.pt                      torch / numpy / python RNG states of rank r
        model/ ...                          torch.distributed.checkpoint (DCP) shards: model + optimizer
                                            (none/ddp/fsdp*), or DeepSpeed's own ZeRO files (zero1/2/3)

A checkpoint is written into ``.tmp-step_*`` and renamed only when every rank has finished, then ``latest`` is
replaced; a crash or SIGKILL mid-save leaves the previous checkpoint intact. Sharded formats are used for resume
(never a gathered ``state_dict()`` of a ZeRO-3 engine, which holds empty tensors,
https://github.com/deepspeedai/DeepSpeed/issues/2413); the fp32
safetensors export is separate and written once at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from scaling.engine.ranks import barrier as _barrier
from scaling.io import atomic_write, atomic_write_json, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not fit this run; the message names the file and the mismatch."""


def model_signature(names_and_shapes: list[tuple[str, tuple[int, ...]]]) -> str:
    """Short hash of the model's parameter names and global shapes (detects loading another model)."""
    h = hashlib.sha256()
    for name, shape in names_and_shapes:
        h.update(f"{name}:{list(shape)};".encode())
    return h.hexdigest()[:16]


def latest_checkpoint(run_dir: str | Path | None) -> Path | None:
    """The newest complete checkpoint directory of ``run_dir``, or None when it holds none."""
    if run_dir is None:
        return None
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, but {path} does not exist")
    return path


def read_state(ckpt: Path) -> dict:
    """Read and sanity-check ``trainer_state.json`` of a checkpoint."""
    f = ckpt / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable checkpoint state ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: not a scaling checkpoint of format {FORMAT_VERSION}")
    return state


def resume_run_id(run_dir: str | Path) -> str | None:
    """The tracker run id stored in the run's latest checkpoint (pass it to the tracker to continue its run)."""
    ckpt = latest_checkpoint(run_dir)
    return read_state(ckpt).get("run_id") if ckpt else None


def check_compatible(ckpt: Path, state: dict, expected: dict) -> None:
    """Raise :class:`CheckpointError` naming the file and every field where ``state`` differs from ``expected``."""
    diffs = [f"{k}: checkpoint has {state.get(k)!r}, this run has {v!r}" for k, v in expected.items()
             if state.get(k) != v]
    if diffs:
        raise CheckpointError(f"{ckpt / STATE_FILE} does not fit this run: " + "; ".join(diffs))


# --------------------------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------------
# Save / load (collective: every rank calls)
# --------------------------------------------------------------------------------------------------------------


def _dcp_state(module: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(run_dir: str | Path, step: int, state: dict, *, rank: int, module: nn.Module, optimizer,
                    engine=None, keep: int = 1) -> Path:
    """Write a resumable checkpoint of ``step`` atomically and point ``latest`` at it. Every rank must call.

    ``state`` (JSON-safe) is written by rank 0; ``engine`` is the DeepSpeed engine under ZeRO (its own sharded
    format), otherwise model + optimizer go through ``torch.distributed.checkpoint``.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp / "model"), tag="state", save_latest=False)
    else:
        import torch.distributed.checkpoint as dcp

        sd = _dcp_state(module, optimizer)
        if torch.distributed.is_initialized():
            dcp.save(sd, checkpoint_id=str(tmp / "model"))
        else:
            dcp.save(sd, checkpoint_id=str(tmp / "model"), no_dist=True)
    atomic_write(tmp / f"rng_rank{rank}.pt", lambda p: torch.save(rng_state(), p))
    if rank == 0:
        atomic_write_json(tmp / STATE_FILE, {"format": FORMAT_VERSION, "step": step, **state})
    _barrier()
    if rank == 0:
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, name)
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / name


def load_checkpoint(ckpt: Path, *, rank: int, module: nn.Module, optimizer, engine=None) -> None:
    """Load model, optimizer and this rank's RNG state from ``ckpt`` (after :func:`check_compatible`)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    rng_file = ckpt / f"rng_rank{rank}.pt"
    try:
        if engine is not None:
            path, _ = engine.load_checkpoint(str(ckpt / "model"), tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)
            if path is None:
                raise CheckpointError(f"{ckpt / 'model'}: DeepSpeed found no checkpoint with tag 'state'")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            sd = _dcp_state(module, optimizer)
            kw = {} if torch.distributed.is_initialized() else {"no_dist": True}
            dcp.load(sd, checkpoint_id=str(ckpt / "model"), **kw)
            set_state_dict(module, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        rng = torch.load(rng_file, weights_only=False)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # any failure to read a shard: say which checkpoint
        raise CheckpointError(f"{ckpt}: cannot load ({type(e).__name__}: {str(e)[:500]})") from e
    set_rng_state(rng)


# --------------------------------------------------------------------------------------------------------------
# Consolidated export
# --------------------------------------------------------------------------------------------------------------


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any] | None = None):
    """Write ``tensors`` (made contiguous fp32 CPU copies, no shared storage) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda p: save_file(out, str(p), metadata=meta))

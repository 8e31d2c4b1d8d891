"""Resumable training state (sharded, atomic), loaded without running code from the files, and the fp32 export.

Layout of a run directory::

    <run_dir>/checkpoints/latest            name of the newest complete checkpoint (written last, atomically)
    <run_dir>/checkpoints/step_00000120/    a resumable checkpoint, while training runs
        trainer_state.json                  step, world size, strategy, model signature, tracker run id, history
        model/ ...                          torch.distributed.checkpoint (DCP) shards: model + optimizer
                                            (none/ddp/fsdp*), or DeepSpeed's own ZeRO files (zero1/2/3)
        zero_consolidated.safetensors       ZeRO only, once resumed on another world size: the partitions joined
                                            (consolidate_zero)
    <run_dir>/checkpoints/best_00000080/    with train.select other than last: the weights of the best validation
        best.json                           point so far (step, metric, value); the resumable checkpoint's state
        model.safetensors                   names the one it refers to (scaling.engine.selection)
    <run_dir>/checkpoints/final/            what is kept once training has finished (replaces the step_* and
        trainer_state.json                  best_* ones); as above, plus "final": true and the training summary
        model.safetensors                   the consolidated fp32 weights (no optimizer state)

A checkpoint is written into ``.tmp-<name>`` and renamed only when every rank has finished, then ``latest`` is
replaced; a crash or SIGKILL mid-save leaves the previous checkpoint intact, and the next checkpoint written
removes the half-written directory. When training ends, ``final`` is written and the resumable checkpoints are
removed: the optimizer state (1x the parameters for SGD with momentum, 2x for AdamW, in fp32) is only needed to
continue training, the weights are needed to evaluate again (a study killed during evaluation re-runs only the
evaluation). A 928M-parameter backbone keeps 3.7 GB per finished run, and needs room for one resumable checkpoint
plus the one being written while it trains. Sharded formats are used for resume (never a gathered
``state_dict()`` of a ZeRO-3 engine, which holds empty tensors, https://github.com/deepspeedai/DeepSpeed/issues/2413);
the fp32 safetensors export is separate.

There is no RNG state in a checkpoint: every random draw of a run is seeded from (run seed, step, slot)
(``scaling.engine.seeds``), so a resumed step draws what the uninterrupted run drew without restoring anything.

Nothing read from a checkpoint runs code. ``trainer_state.json`` is JSON and ``latest`` a name checked against
``step_<8 digits>``. torch.distributed.checkpoint stores its index (``model/.metadata``) as a pickle and loads
non-tensor values with ``torch.load(weights_only=False)`` (torch 2.14 ``filesystem.py`` / ``default_planner.py``);
here the index is unpickled with an allowlist of DCP's own metadata classes and the values with
``weights_only=True``. DeepSpeed 0.19.8 loads its ZeRO files with ``torch.load(weights_only=False)``
(``runtime/checkpoint_engine/torch_checkpoint_engine.py``); here they are loaded with ``weights_only=True`` and
DeepSpeed's four record classes allowlisted. A file that holds anything else is refused with a
:class:`CheckpointError` naming it. Still, a checkpoint directory is input to a complex deserialiser: scaling
only ever loads the checkpoints of its own store's runs; do not copy checkpoints from sources you do not trust
into a store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from scaling.engine.launch import ZERO_STRATEGIES
from scaling.engine.ranks import barrier as _barrier
from scaling.io import atomic_write, atomic_write_json, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 2  # 2: no per-rank RNG files (seeds are derived per step)
FINAL = "final"
WEIGHTS_FILE = "model.safetensors"
_NAME = re.compile(r"step_\d{8}|final")
BEST_FILE = "best.json"
_BEST = re.compile(r"best_\d{8}")


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, refused, does not fit this run, or could not be written; names the file."""


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
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: unreadable checkpoint pointer ({type(e).__name__}: {e})") from None
    if not _NAME.fullmatch(name):  # also keeps a crafted pointer from naming a directory outside the store
        raise CheckpointError(f"{pointer} holds {name[:80]!r}, not the name of a checkpoint (step_<8 digits> or "
                              f"final)")
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, but {path} does not exist")
    return path


def read_state(ckpt: Path) -> dict:
    """Read and sanity-check ``trainer_state.json`` of a checkpoint."""
    f = ckpt / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable checkpoint state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: not a scaling checkpoint of format {FORMAT_VERSION}")
    return state


def resume_run_id(run_dir: str | Path) -> str | None:
    """The tracker run id stored in the run's latest checkpoint (pass it to the tracker to continue its run)."""
    ckpt = latest_checkpoint(run_dir)
    return read_state(ckpt).get("run_id") if ckpt else None


# Strategies whose checkpoints torch.distributed.checkpoint writes: their tensors are stored by global name and
# offset, so DCP reshards them on load to any world size and any of these strategies (the 1-process run's plain
# tensors and FSDP2's DTensor shards share names).
DCP_STRATEGIES = ("none", "ddp", "fsdp", "fsdp_grad_op", "hsdp")
# What a DCP checkpoint may change on resume: the global batch of every step is the same for any world size and
# accumulation (StepBatchSampler), so only the order of floating-point reductions differs. A final checkpoint holds
# consolidated weights, which any strategy on any world size loads.
_RESHARDABLE = ("world_size", "strategy", "grad_accum")


def check_compatible(ckpt: Path, state: dict, expected: dict) -> None:
    """Raise :class:`CheckpointError` naming the file and every field where ``state`` differs from ``expected``.

    A checkpoint of a DCP strategy (:data:`DCP_STRATEGIES`) resumes with another world size, DCP strategy or
    accumulation; a ZeRO checkpoint with the strategy that wrote it, on any world size (:func:`consolidate_zero`).
    """
    if state.get("final") is True or (
            state.get("strategy") in DCP_STRATEGIES and expected.get("strategy") in DCP_STRATEGIES):
        reshardable = _RESHARDABLE
    elif state.get("strategy") in ZERO_STRATEGIES and state.get("strategy") == expected.get("strategy"):
        reshardable = ("world_size",)  # joined and re-partitioned on load (consolidate_zero)
    else:
        reshardable = ()
    diffs = [f"{k}: checkpoint has {state.get(k)!r}, this run has {v!r}" for k, v in expected.items()
             if state.get(k) != v and k not in reshardable]
    if diffs:
        raise CheckpointError(f"{ckpt / STATE_FILE} does not fit this run: " + "; ".join(diffs))


# --------------------------------------------------------------------------------------------------------------
# Loading without running code from the files
# --------------------------------------------------------------------------------------------------------------

# Globals a DCP index may name besides the classes of torch.distributed.checkpoint.metadata (found by recording
# find_class over indices of none/fsdp checkpoints, SGD and AdamW, torch 2.14): each builds a value, none runs code.
_DCP_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP index, refusing every global but DCP's metadata records, ``torch.Size`` and dtypes."""

    def find_class(self, module: str, name: str):
        from torch.distributed.checkpoint import metadata

        obj = getattr(metadata, name, None) if module == metadata.__name__ else None
        if isinstance(obj, type) and obj.__module__ == metadata.__name__:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "pathlib._local":  # where Python >= 3.13 keeps (and pickles) pathlib's classes
            module = "pathlib"  # so that an index written there reads on 3.10-3.12 too, and the other way round
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint index")


def _dcp_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with an allowlisting unpickler for the index and file names in read errors."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            index = self._get_metadata_path(kwargs.get("rank"))
            try:
                with self.fs.create_stream(index, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except Exception as e:  # refused global, truncated or foreign file
                raise CheckpointError(f"{index}: refused or unreadable checkpoint index ({type(e).__name__}: {e})")
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{index}: holds a {type(metadata).__name__}, not a checkpoint index")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            try:
                return super().read_data(plan, planner)
            except Exception as e:
                files = sorted({str(self.path / self.storage_data[i.storage_index].relative_path) for i in plan.items})
                raise CheckpointError(f"{', '.join(files)}: unreadable checkpoint shard ({type(e).__name__}: {e})")

    return SafeReader(path)


def _dcp_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        """DCP's default planner, loading the non-tensor values (lr, betas, step ...) with ``weights_only=True``."""

        def load_bytes(self, read_item, value) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def _zero_globals() -> list[type]:
    # The record classes DeepSpeed 0.19.8 pickles into ZeRO optimizer files (stage_1_and_2.py / stage3.py
    # state_dict): plain data, rebuilt without calling any method.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _load_zero_file(path, map_location=None, mmap: bool = False):
    """One of DeepSpeed's ZeRO checkpoint files, loaded with ``torch.load(weights_only=True)`` and DeepSpeed's record
    classes allowlisted (``mmap``: tensors are read from the file when used); a refused global or a damaged file is
    a :class:`CheckpointError` naming the file."""
    try:
        with torch.serialization.safe_globals(_zero_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # a refused global or a damaged file: say which file, and what was refused
        why = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), str(e))
        raise CheckpointError(f"{path}: refused or unreadable ZeRO checkpoint file ({type(e).__name__}: "
                              f"{why[:300]})") from None


@contextlib.contextmanager
def _weights_only_deepspeed(engine):
    """Make ``engine``'s checkpoint engine load with ``torch.load(weights_only=True)`` while the block runs."""
    ce = engine.checkpoint_engine
    ce.load = _load_zero_file
    try:
        yield
    finally:
        del ce.load  # back to the class's method


def _unwrap(e: BaseException) -> BaseException:
    """The first :class:`CheckpointError` inside DCP's ``CheckpointException`` (per-rank failures), else ``e``."""
    for exc, _ in getattr(e, "failures", {}).values():
        if isinstance(exc, CheckpointError):
            return exc
    return e


# --------------------------------------------------------------------------------------------------------------
# Save / load (collective: every rank calls)
# --------------------------------------------------------------------------------------------------------------


def _dcp_state(module: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    return {"model": msd, "optim": osd}


@contextlib.contextmanager
def _single_process_dcp():
    """Around a ``torch.distributed.checkpoint`` save or load that we run without a process group on purpose
    (``no_dist=True``: strategy ``none``, one process): silence only torch's UserWarning that it is "assuming the
    intent is to save/load in a single process", which every such checkpoint would otherwise print."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, "
                                r"assuming the intent is to (save|load) in a single process", category=UserWarning)
        yield


def save_checkpoint(run_dir: str | Path, step: int, state: dict, *, rank: int, module: nn.Module, optimizer,
                    engine=None, keep: int = 1) -> Path:
    """Write a resumable checkpoint of ``step`` atomically and point ``latest`` at it. Every rank must call.

    ``state`` (JSON-safe) is written by rank 0; ``engine`` is the DeepSpeed engine under ZeRO (its own sharded
    format), otherwise model + optimizer go through ``torch.distributed.checkpoint``. A write that fails (full disk,
    file size limit) raises :class:`CheckpointError` on every rank and leaves the previous checkpoint as it was.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    name = f"step_{step:08d}"
    if (root / LATEST).is_file() and (root / LATEST).read_text().strip() == name:
        return root / name  # this step is saved already (a periodic checkpoint, then a signal in the same step)
    sd = None if engine is not None else _dcp_state(module, optimizer)
    needed = _zero_bytes(engine, module, rank) if engine is not None else _tensor_bytes(sd)

    def write(tmp: Path) -> None:
        if engine is not None:
            _save_zero(engine, tmp / "model")
        else:
            import torch.distributed.checkpoint as dcp

            if torch.distributed.is_initialized():
                dcp.save(sd, checkpoint_id=str(tmp / "model"))
            else:
                with _single_process_dcp():
                    dcp.save(sd, checkpoint_id=str(tmp / "model"), no_dist=True)
        if rank == 0:
            atomic_write_json(tmp / STATE_FILE, {"format": FORMAT_VERSION, "step": step, **state})

    return _publish(root, name, write, rank, keep_others=keep - 1, needed=needed)


def save_final(run_dir: str | Path, step: int, state: dict, tensors: dict[str, torch.Tensor] | None, *,
               rank: int) -> Path:
    """Write the checkpoint kept after training: consolidated fp32 ``tensors`` (rank 0's; None elsewhere) and
    ``state`` (with the training summary), point ``latest`` at it and remove the resumable checkpoints.
    Every rank must call; a failed write raises :class:`CheckpointError` as :func:`save_checkpoint` does."""

    def write(tmp: Path) -> None:
        if rank == 0:
            save_safetensors(tensors, tmp / WEIGHTS_FILE, {"step": step})
            atomic_write_json(tmp / STATE_FILE, {"format": FORMAT_VERSION, "step": step, "final": True, **state})

    needed = _tensor_bytes(tensors) if rank == 0 else 0
    path = _publish(Path(run_dir) / CHECKPOINT_DIR, FINAL, write, rank, keep_others=0, needed=needed)
    if rank == 0:
        prune_best(run_dir, keep=())  # the final weights are the best ones where a best point was kept
    return path


def best_checkpoint(run_dir: str | Path, step: int) -> Path:
    """The directory holding the weights of the best validation point at ``step`` (:func:`save_best`)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"best_{step:08d}"


def save_best(run_dir: str | Path, step: int, record: dict, tensors: dict[str, torch.Tensor] | None, *,
              rank: int) -> Path:
    """Write the consolidated fp32 ``tensors`` (rank 0's; None elsewhere) of the best validation point ``step`` and
    its ``record`` (metric, value) into :func:`best_checkpoint`, atomically, without touching ``latest``. Every rank
    must call; a failed write raises :class:`CheckpointError` on every rank, as :func:`save_checkpoint` does."""

    def write(tmp: Path) -> None:
        if rank == 0:
            save_safetensors(tensors, tmp / WEIGHTS_FILE, {"step": step})
            atomic_write_json(tmp / BEST_FILE, {"format": FORMAT_VERSION, "step": step, **record})

    needed = _tensor_bytes(tensors) if rank == 0 else 0
    path = best_checkpoint(run_dir, step)
    return _publish(path.parent, path.name, write, rank, keep_others=-1, needed=needed)


def read_best(path: Path) -> dict:
    """``best.json`` of a :func:`save_best` directory; :class:`CheckpointError` naming it when it is missing or
    unreadable (its weights file is checked when loaded)."""
    f = path / BEST_FILE
    try:
        record = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: the best validation point's weights are missing or unreadable "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: not a scaling best-weights record of format {FORMAT_VERSION}")
    return record


def prune_best(run_dir: str | Path, keep) -> None:
    """Remove the best-weights directories of ``run_dir`` except those of the steps in ``keep`` (main process)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return
    names = {best_checkpoint(run_dir, s).name for s in keep if s is not None}
    for p in root.iterdir():
        if p.is_dir() and _BEST.fullmatch(p.name) and p.name not in names:
            shutil.rmtree(p, ignore_errors=True)


def _tensor_bytes(obj) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: what writing it puts on disk, within a few %."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor writes only its shard
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _zero_bytes(engine, module: nn.Module, rank: int) -> int:
    """Bytes a ZeRO rank writes: its optimizer partition (fp32 master + moments), plus the module's parameters on
    rank 0 under ZeRO-1/2 (the model-states file) or this rank's parameter partitions under ZeRO-3."""
    n = _tensor_bytes(engine.optimizer.state_dict())
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_tensor"):
        n += sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    elif rank == 0:
        n += sum(p.numel() * p.element_size() for p in params)
    return n


def _space(root: Path) -> tuple[int, str]:
    """(bytes free on the file system holding ``root``, a note on a per-file size limit if one is set)."""
    import resource

    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    note = f"; files are limited to {soft:,} bytes (RLIMIT_FSIZE, ulimit -f)" if soft != resource.RLIM_INFINITY else ""
    return free, note


def _save_zero(engine, path: Path) -> None:
    """``engine.save_checkpoint`` with every file write of this rank guarded: a write that fails (full disk, file
    size limit) is held until DeepSpeed has passed its closing barrier, then raised here, so that :func:`_publish`
    can agree on it with the other ranks. Unguarded, a rank whose ``torch.save`` raised would leave DeepSpeed's
    ``save_checkpoint`` before that barrier, and every other rank would wait in it until the process-group timeout
    (``deepspeed/runtime/engine.py`` 0.19.8, ``save_checkpoint``: ``dist.barrier()`` after the per-rank files)."""
    writer = engine.checkpoint_engine
    save = writer.save
    failures: list[tuple[str, BaseException]] = []

    def guarded(*args, **kwargs):  # CheckpointEngine.save(state_dict, path), called with either by keyword
        if failures:
            return  # the checkpoint is lost already; do not fill the disk further
        try:
            save(*args, **kwargs)
        except Exception as e:
            failures.append((kwargs.get("path", args[1] if len(args) > 1 else "?"), e))

    own = "save" in vars(writer)  # an instance attribute already (someone else's wrapper): put it back after
    writer.save = guarded
    try:
        engine.save_checkpoint(str(path), tag="state", save_latest=False)
    finally:
        if own:
            writer.save = save
        else:
            del writer.save  # the class's method again
    if failures:
        file, e = failures[0]
        raise OSError(f"{file}: {type(e).__name__}: {e}") from e


def _gather(value) -> list:
    """``value`` of every rank (a barrier too); ``[value]`` without a process group."""
    if not torch.distributed.is_initialized():
        return [value]
    values: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _agree(error: str | None) -> list[str]:
    """Every rank's error of one checkpoint phase, as ``rank <r>: <error>``. All ranks raise, or none: a rank that
    raised alone would leave the others waiting in the next collective."""
    return [f"rank {r}: {e}" for r, e in enumerate(_gather(error)) if e is not None]


def _publish(root: Path, name: str, write, rank: int, keep_others: int, needed: int) -> Path:
    """Run ``write(tmp)`` on every rank into ``root/.tmp-<name>``, then (rank 0) rename it to ``root/<name>``,
    point ``latest`` at it and keep only the newest ``keep_others`` other checkpoints and no half-written one
    (``keep_others=-1``: a side directory, the best weights: ``latest`` and the other checkpoints are left alone).

    Before writing, every rank checks that the file system has room for the ``needed`` bytes it will write; a
    failed check or write raises :class:`CheckpointError` on every rank naming the path and the bytes needed and
    available, with the half-written directory removed and ``latest`` still naming the previous checkpoint.
    Under ZeRO, DeepSpeed's own barrier lies inside the write: :func:`_save_zero` holds a rank's failed file write
    until after it, so that rank reaches the agreement too.
    """
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    tmp, final = root / f".tmp-{name}", root / name
    error = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    errors = _agree(error)
    free, limit = _space(root)
    total = sum(_gather(needed))  # the ranks share the checkpoint's file system
    if not errors and total > free:
        errors = [f"not enough space for about {total:,} bytes"]
    if not errors:
        try:
            write(tmp)
        except (Exception, CheckpointException) as e:  # DCP wraps OSError (ENOSPC, EFBIG) in a BaseException
            inner = [exc for exc, _ in getattr(e, "failures", {}).values()]
            error = f"{type(e).__name__}: {inner[0] if inner else e}"[:500]
            if "unexpected pos" in error:  # torch's zip writer reports a short write (ENOSPC, EFBIG) only this way
                error += " (a short write: the disk, a quota or a file size limit is full)"
        errors = _agree(error)
    if not errors:
        if rank == 0:
            try:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                if keep_others >= 0:
                    atomic_write_text(root / LATEST, name)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        errors = _agree(error)
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pointer = root / LATEST
            if keep_others >= 0 and final.is_dir() and not (pointer.is_file() and pointer.read_text().strip() == name):
                shutil.rmtree(final, ignore_errors=True)  # renamed but never pointed to: not a checkpoint
        _barrier()
        previous = latest_checkpoint(root.parent) if (root / LATEST).is_file() else None
        raise CheckpointError(
            f"cannot write checkpoint {final}: {'; '.join(errors)}. It needs about {total:,} bytes ({needed:,} from "
            f"rank {rank}); {free:,} bytes are available on {root}{limit}. The previous checkpoint "
            f"({previous if previous else 'none'}) is intact.")
    if rank == 0 and keep_others >= 0:
        others = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and p.name != name)
        for old in others[:len(others) - keep_others]:
            shutil.rmtree(old, ignore_errors=True)
        # Half-written by a launch killed mid-save (SIGKILL, a lost node): never loaded, and only one launch works
        # on a run at a time (scaling.study.claims), so nothing writes them now.
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_final_weights(ckpt: Path, module: nn.Module, device: torch.device, engine=None) -> None:
    """Fill ``module`` (plain, FSDP2-sharded or under a ZeRO engine) from a final checkpoint's consolidated
    weights. Every rank must call; each reads only what it holds (the file is memory-mapped)."""
    from scaling.engine.sharding import materialize_from_safetensors

    path = ckpt / WEIGHTS_FILE
    try:
        if engine is None:
            materialize_from_safetensors(module, path, device)
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f, torch.no_grad():
            for name, p in module.named_parameters():
                _set_zero_param(p, f.get_tensor(name))
            for name, b in module.named_buffers():
                if name in f.keys():
                    b.copy_(f.get_tensor(name))
    except CheckpointError:
        raise
    except Exception as e:  # a damaged or foreign weights file: say which
        raise _unloadable(path, e) from e


def read_final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The consolidated weights of a final checkpoint as a state dict on the CPU (a whole model in one process: a
    finished run rebuilt for evaluation); a damaged file is a :class:`CheckpointError` naming it, as in
    :func:`load_final_weights` (safetensors' own error names no file)."""
    from safetensors.torch import load_file

    path = ckpt / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure is a damaged file
        raise _unloadable(path, e) from e


def _unloadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: cannot load the final weights ({type(exc).__name__}: {str(exc)[:500]})")


def _set_zero_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set a parameter under a ZeRO engine to the whole tensor ``value``: the weights the forward uses and this
    rank's part of the fp32 master weights (collective under ZeRO-3)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    # The weights the forward uses: ZeRO-3 partitions each parameter, so gather it, overwrite it and re-partition
    # (a no-op on ZeRO-1/2, whose parameters are whole on every rank) ...
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        param.data.copy_(value)
    # ... and the fp32 master partition in the optimizer, which the optimizer steps and export() reads.
    if hasattr(param, "ds_id"):
        _set_zero3_master(param, value)
    else:
        safe_set_full_fp32_param(param, value)


def _zero3_partition_rank(opt, param: nn.Parameter) -> int:
    """This rank's index among the ranks a ZeRO-3 parameter is partitioned over: the parameter's own process group
    from DeepSpeed 0.19.3 on (``stage3.py`` ``_get_param_partition_rank``), the data-parallel group before."""
    rank_of = getattr(opt, "_get_param_partition_rank", None)
    return rank_of(param) if rank_of is not None else torch.distributed.get_rank(group=opt.dp_process_group)


def _set_zero3_master(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write this rank's part of ``value`` into a ZeRO-3 parameter's fp32 master partition.

    DeepSpeed 0.19.8's own ``safe_set_full_fp32_param`` (``stage3.py`` ``set_full_hp_param``) slices the full value
    at ``rank * partition_size`` for ``partition_size`` elements, which runs past the end on the last rank when the
    partition is padded (a 3-element bias on 2 ranks); here the copy stops at the end of the value.
    """
    if not param.requires_grad:
        return
    opt = param._z3_optimizer
    part, group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    flat = value.flatten()
    start = part.numel() * _zero3_partition_rank(opt, param)
    n = max(0, min(part.numel(), flat.numel() - start))
    part.data[:n].copy_(flat[start:start + n])
    if opt._swappable_optimizer_subgroup(group):  # NVMe-offloaded states go back to disk, as DeepSpeed does
        opt._optimizer_states_and_gradient_swap_out(group)


def load_checkpoint(ckpt: Path, *, module: nn.Module, optimizer, engine=None) -> None:
    """Load model and optimizer state from ``ckpt`` (after :func:`check_compatible`), running no code from it."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        saved_world_size = read_state(ckpt).get("world_size") if engine is not None else None
        if engine is not None and saved_world_size != engine.dp_world_size:
            consolidated = consolidate_zero(ckpt, saved_world_size, torch.distributed.get_rank())
            _load_consolidated_zero(consolidated, module, engine)
        elif engine is not None:
            with _weights_only_deepspeed(engine):
                path, _ = engine.load_checkpoint(str(ckpt / "model"), tag="state", load_optimizer_states=True,
                                                 load_lr_scheduler_states=False, load_module_strict=True)
            if path is None:
                raise CheckpointError(f"{ckpt / 'model'}: DeepSpeed found no checkpoint with tag 'state'")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            sd = _dcp_state(module, optimizer)
            single = not torch.distributed.is_initialized()
            with _single_process_dcp() if single else contextlib.nullcontext():
                dcp.load(sd, storage_reader=_dcp_reader(ckpt / "model"), planner=_dcp_planner(),
                         **({"no_dist": True} if single else {}))
            set_state_dict(module, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # any failure to read a shard: say which checkpoint
        inner = _unwrap(e)
        if isinstance(inner, CheckpointError):
            raise CheckpointError(str(inner)) from e
        raise CheckpointError(f"{ckpt}: cannot load ({type(e).__name__}: {str(e)[:1500]})") from e


# --------------------------------------------------------------------------------------------------------------
# ZeRO checkpoints on another world size
# --------------------------------------------------------------------------------------------------------------

ZERO_CONSOLIDATED = "zero_consolidated.safetensors"
"""A ZeRO checkpoint's training state with its partitioning undone (:func:`consolidate_zero`): written next to
``model/`` the first time the checkpoint resumes on another world size, and read by every later such resume."""
_ZERO_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
_ZERO_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # DeepSpeed's, in its model files


def _zero_optim_files(state_dir: Path, world_size: int) -> list[Path]:
    """The optimizer-state file of each of the ``world_size`` ranks that wrote ``state_dir``, in rank order."""
    files = {int(m.group(1)): f for f in state_dir.glob("*_optim_states.pt")
             if (m := _ZERO_OPTIM_FILE.fullmatch(f.name))}
    if sorted(files) != list(range(world_size)):
        raise CheckpointError(f"{state_dir}: holds the optimizer-state files of ranks {sorted(files)}, but "
                              f"{world_size} ranks wrote this checkpoint (zero_pp_rank_<r>_mp_rank_00_optim_states.pt "
                              f"for r = 0 .. {world_size - 1})")
    return [files[r] for r in range(world_size)]


def _zero_fragments(optim: dict, model: dict, rank: int, world_size: int):
    """Per parameter group of one rank's ZeRO optimizer file: its flat fp32 master and optimizer-state partitions
    by key (``fp32``, ``momentum_buffer``, ``exp_avg`` ...; ``step`` included) and the ``(name, start, numel)``
    of each parameter's fragment in them.

    ZeRO-1/2 (DeepSpeed 0.19.8 ``stage_1_and_2.py`` ``state_dict``) record each fragment (``param_slice_mappings``);
    ZeRO-3 (``stage3.py``) gives every rank ``ceil(numel / world_size)`` elements of every parameter, in the order
    of the model file's ``param_shapes``, the last rank's cut short (as ``ds_to_universal.py`` reads them)."""
    if int(optim["zero_stage"]) == 3:
        states = optim["optimizer_state_dict"]["state"]
        for group, (shapes, fp32) in enumerate(zip(model["param_shapes"], optim["fp32_flat_groups"])):
            spans, offset = [], 0
            for name, shape in shapes.items():
                numel = shape.numel()
                part = -(-numel // world_size)
                spans.append((name, offset, max(0, min(part, numel - rank * part))))
                offset += part
            yield {"fp32": fp32, **states.get(group, {})}, spans
    else:
        states = optim["base_optimizer_state"]["state"]
        for group, fp32 in enumerate(optim["single_partition_of_fp32_groups"]):
            spans = [(name, a.start, a.numel) for name, a in optim["param_slice_mappings"][group].items()]
            yield {"fp32": fp32, **states.get(group, {})}, spans


def _zero_whole_state(ckpt: Path, world_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The training state of a ZeRO-1/2/3 checkpoint written by ``world_size`` ranks, without its partitioning:
    ``fp32/<name>`` (the fp32 master weights) and ``<key>/<name>`` for every optimizer state (``momentum_buffer``
    for SGD, ``exp_avg`` and ``exp_avg_sq`` for AdamW) of every trained parameter, ``buffer/<name>`` for the
    module's buffers; and the global state (optimizer step, DeepSpeed's step counters and loss scaler) as JSON.
    The ranks' files are memory-mapped (:func:`_load_zero_file`: no code runs), so the joined tensors are the only
    copy in memory."""
    state_dir = ckpt / "model" / "state"
    pieces: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, torch.Size] = {}
    steps = set()
    model = first = None
    for rank, f in enumerate(_zero_optim_files(state_dir, world_size)):
        optim = _load_zero_file(f, map_location="cpu", mmap=True)["optimizer_state_dict"]
        if int(optim["zero_stage"]) == 3 or model is None:  # ZeRO-3: one model file per rank; ZeRO-1/2: one
            name = (f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if int(optim["zero_stage"]) == 3
                    else "mp_rank_00_model_states.pt")
            model = _load_zero_file(state_dir / name, map_location="cpu", mmap=True)
            for group in model["param_shapes"]:
                shapes.update(group)
        if first is None:
            first = (optim, model)
        for flats, spans in _zero_fragments(optim, model, rank, world_size):
            step = flats.pop("step", None)
            if step is not None:
                steps.add(float(step))
            for name, start, numel in spans:
                for key, flat in flats.items():
                    pieces.setdefault(f"{key}/{name}", []).append(flat.narrow(0, start, numel))
    tensors = {}
    for key in list(pieces):
        shape = shapes[key.split("/", 1)[1]]
        whole = torch.cat(pieces.pop(key))
        if whole.numel() != shape.numel():
            raise CheckpointError(f"{state_dir}: the partitions of {key} hold {whole.numel()} elements, the "
                                  f"parameter has {shape.numel()} ({list(shape)})")
        tensors[key] = whole.view(shape)
    optim, model = first
    buffers = set(model.get("buffer_names") or ())
    tensors.update({f"buffer/{k}": v for k, v in model["module"].items() if k in buffers})
    if len(steps) > 1:
        raise CheckpointError(f"{state_dir}: the parameter groups were stepped {sorted(steps)} times")
    scaler = optim.get("loss_scaler")
    global_state = {
        "world_size": world_size, "zero_stage": int(optim["zero_stage"]),
        "optimizer_step": steps.pop() if steps else None,
        "engine": {k: model[k] for k in _ZERO_ENGINE_COUNTERS if k in model},
        "loss_scaler": {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))} if scaler else {},
    }
    return tensors, global_state


def consolidate_zero(ckpt: Path, world_size: int, rank: int) -> Path:
    """``ckpt/`` :data:`ZERO_CONSOLIDATED`: rank 0 writes it (atomically: a failure leaves nothing) unless it exists,
    the others wait. Every rank must call; a checkpoint that cannot be read or joined raises
    :class:`CheckpointError` on every rank, naming the file and the world size that wrote the checkpoint."""
    from safetensors.torch import save_file

    path = ckpt / ZERO_CONSOLIDATED
    error = None
    if rank == 0 and not path.is_file():
        try:
            tensors, global_state = _zero_whole_state(ckpt, world_size)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"zero": json.dumps(global_state)}),
                         nbytes=nbytes)
        except Exception as e:  # noqa: BLE001 - every failure is agreed on by the ranks, then raised on each
            error = str(e) if isinstance(e, CheckpointError) else f"{ckpt}: {type(e).__name__}: {str(e)[:500]}"
    errors = _agree(error)
    if errors:
        raise CheckpointError(f"cannot resume the ZeRO checkpoint {ckpt} on another number of processes: "
                              f"{'; '.join(errors)}. Nothing was written; without joining, it loads only on the "
                              f"{world_size} processes that wrote it")
    return path


def _zero_flat_optimizer_state(engine, whole) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each flat fp32 partition the ZeRO optimizer steps on this rank: that partition of an optimizer state,
    built from ``whole(param)`` (the state of one parameter, whole). DeepSpeed creates optimizer state only in the
    first step, so it is built here as DeepSpeed's own universal-checkpoint loaders do (0.19.8,
    ``base_optimizer.py`` ``load_hp_checkpoint_state_from_checkpoint_dir`` for ZeRO-1/2, ``stage3.py``
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), which are written for Adam's states only."""
    opt = engine.optimizer
    out = []
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: every parameter's partition in turn, padded
        for flat, params in zip(opt.fp32_partitioned_groups_flat, opt.fp16_groups):
            state, offset = torch.zeros_like(flat), 0
            for p in params:
                part, values = p.partition_numel(), whole(p).flatten()
                start = part * _zero3_partition_rank(opt, p)
                n = max(0, min(part, values.numel() - start))
                state.narrow(0, offset, n).copy_(values.narrow(0, start, n))
                offset += part
            out.append((flat, state))
    else:  # ZeRO-1/2: the fragment of each parameter this rank holds, where DeepSpeed mapped it
        for flat, params in zip(opt.single_partition_of_fp32_groups, opt.bit16_groups):
            state = torch.zeros_like(flat)
            for p in params:
                if p._hp_mapping is not None:
                    hp, lp = p._hp_mapping.get_hp_fragment_address(), p._hp_mapping.lp_fragment_address
                    state.narrow(0, hp.start, hp.numel).copy_(whole(p).flatten().narrow(0, lp.start, lp.numel))
            out.append((flat, state))
    return out


def _load_consolidated_zero(path: Path, module: nn.Module, engine) -> None:
    """Set the state of ``engine`` (ZeRO-1/2/3 on any world size) from a :func:`consolidate_zero` file: each rank
    takes its partition of every parameter's fp32 master weights (DeepSpeed's per-parameter API) and optimizer
    states, then the optimizer step, loss scaler and DeepSpeed's step counters. Every rank must call."""
    from safetensors import safe_open

    names = {p: name for name, p in module.named_parameters()}
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        global_state = json.loads(f.metadata()["zero"])
        keys = set(f.keys())
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue  # frozen: never stepped, so the rebuilt model holds it as the checkpoint did
            if f"fp32/{name}" not in keys:
                raise CheckpointError(f"{path}: holds no fp32 master weights of parameter {name}")
            _set_zero_param(p, f.get_tensor(f"fp32/{name}"))
        optimizer_state = engine.optimizer.optimizer.state
        for key in sorted({k.split("/", 1)[0] for k in keys} - {"fp32", "buffer"}):
            for flat, state in _zero_flat_optimizer_state(engine, lambda p: f.get_tensor(f"{key}/{names[p]}")):
                optimizer_state[flat][key] = state
        for name, b in module.named_buffers():
            if f"buffer/{name}" in keys:
                b.copy_(f.get_tensor(f"buffer/{name}"))
    if global_state["optimizer_step"] is not None:  # AdamW's bias correction: torch keeps a tensor per group
        for state in optimizer_state.values():
            state["step"] = torch.tensor(global_state["optimizer_step"])
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for k, v in global_state["loss_scaler"].items():  # cur_scale, cur_iter ... of DeepSpeed's (dynamic) scaler
        if hasattr(scaler, k) and isinstance(v, (bool, int, float)):
            setattr(scaler, k, v)
    for k in _ZERO_ENGINE_COUNTERS:
        if isinstance(global_state["engine"].get(k), int):
            setattr(engine, k, global_state["engine"][k])


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

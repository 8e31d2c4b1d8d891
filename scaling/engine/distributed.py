"""The launch a run finds itself in, the Accelerator built for it, and how data is split over ranks.

Everything here is decided from the environment the launcher (``accelerate launch``, ``torchrun``, ``srun``) set,
*before* any model is built, so an impossible combination (``zero3`` without a DeepSpeed launch, ``hsdp`` on one
node, an Accelerate FSDP launch with ``strategy: ddp``) stops in seconds instead of after loading a 1B-parameter
backbone.

Why we build the Accelerator ourselves (measured with Accelerate 1.15.0 and DeepSpeed 0.19.8; see ``docs/scaling-out.md``):

* on CPU, DDP needs ``cpu=True`` (otherwise two launched processes silently become two unsharded runs) and DeepSpeed
  needs ``InitProcessGroupKwargs(backend="gloo")`` (otherwise every rank believes it is rank 0);
* Accelerate's FSDP plugin never activates without a GPU; scaling applies FSDP2 itself (``sharding.py``), so an
  Accelerate FSDP launch is routed to that path and the plugin is kept out of the Accelerator;
* the study runs many cells in one process, each with its own precision and DeepSpeed config, so the per-cell
  Accelerator state is reset while the process group (``PartialState``) stays up.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from scaling.config import ConfigError, ShardingConfig, TrainConfig
from scaling.engine.seeds import AUGMENT, derive_seed

log = logging.getLogger(__name__)

FSDP_STRATEGIES = ("fsdp", "fsdp_grad_op", "hsdp")
ZERO_STRATEGIES = ("zero1", "zero2", "zero3")

# Generous: rank 0 may compute metrics or write predictions while the others wait in a collective
# (NCCL watchdog timeouts during long evaluations: https://github.com/huggingface/accelerate/issues/3861).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


class LaunchError(RuntimeError):
    """The requested strategy cannot run in the way this process was launched."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process (read from the environment; no process group needed)."""

    world_size: int
    """Number of processes in the job (``WORLD_SIZE``)."""
    local_world_size: int
    """Processes on this node (``LOCAL_WORLD_SIZE``)."""
    rank: int
    """Global rank (``RANK``)."""
    deepspeed: bool
    """Launched with Accelerate's DeepSpeed plugin (``ACCELERATE_USE_DEEPSPEED``)."""
    accelerate_fsdp: bool
    """Launched with an Accelerate FSDP config (``ACCELERATE_USE_FSDP``)."""
    cuda: bool
    """A CUDA device is usable."""

    @property
    def num_nodes(self) -> int:
        """Number of nodes (world size over processes per node)."""
        return max(1, self.world_size // max(1, self.local_world_size))


def detect_launch() -> LaunchInfo:
    """Read the launch from the environment set by ``accelerate launch`` / ``torchrun`` / ``srun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return LaunchInfo(
        world_size=world,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        rank=int(os.environ.get("RANK", "0")),
        deepspeed=_env_flag("ACCELERATE_USE_DEEPSPEED"),
        accelerate_fsdp=_env_flag("ACCELERATE_USE_FSDP"),
        cuda=torch.cuda.is_available(),
    )


def check_launch(sharding: ShardingConfig, train: TrainConfig, launch: LaunchInfo | None = None) -> LaunchInfo:
    """Reject a strategy/precision/batch that cannot run in this launch, before any model is built.

    Returns the :class:`LaunchInfo` it checked. Call it first in a recipe (the :class:`~scaling.engine.Trainer`
    calls it again) so a wrong launch fails in seconds.
    """
    launch = launch or detect_launch()
    s = sharding.strategy
    how = "see launch/README.md for the matching `accelerate launch --config_file launch/<...>.yaml`"
    if s in ZERO_STRATEGIES and not launch.deepspeed:
        raise LaunchError(
            f"sharding.strategy={s!r} needs a DeepSpeed launch (ACCELERATE_USE_DEEPSPEED=true), e.g. "
            f"`accelerate launch --config_file launch/{s}.yaml ...`; this process was launched without it ({how})"
        )
    if launch.deepspeed and s not in ZERO_STRATEGIES:
        raise LaunchError(
            f"this process was launched with Accelerate's DeepSpeed plugin but sharding.strategy={s!r}; "
            f"set sharding.strategy to zero1/zero2/zero3 or launch without DeepSpeed ({how})"
        )
    if launch.accelerate_fsdp and s not in FSDP_STRATEGIES:
        raise LaunchError(
            f"this process was launched with an Accelerate FSDP config (ACCELERATE_USE_FSDP=true) but "
            f"sharding.strategy={s!r}; scaling shards with FSDP2 itself: set sharding.strategy=fsdp (or "
            f"fsdp_grad_op/hsdp), or launch with launch/multi_gpu.yaml ({how})"
        )
    if s == "hsdp" and launch.num_nodes < 2:
        raise LaunchError(
            f"sharding.strategy='hsdp' shards within a node and replicates across nodes, but this launch has "
            f"{launch.num_nodes} node (WORLD_SIZE={launch.world_size}, LOCAL_WORLD_SIZE={launch.local_world_size}); "
            f"use 'fsdp' on one node"
        )
    if s == "none" and launch.world_size > 1:
        raise LaunchError(
            f"sharding.strategy='none' with {launch.world_size} processes would train {launch.world_size} "
            f"independent copies; use 'ddp' (or launch one process)"
        )
    if sharding.offload_params and s not in ("fsdp", "fsdp_grad_op", "hsdp", "zero3"):
        raise LaunchError(f"sharding.offload_params needs fsdp/fsdp_grad_op/hsdp or zero3, not {s!r}")
    if sharding.offload_optimizer and s not in ZERO_STRATEGIES:
        raise LaunchError(
            f"sharding.offload_optimizer is a DeepSpeed ZeRO option, not available with {s!r}; under FSDP2 "
            f"sharding.offload_params also keeps gradients and optimizer state on the CPU"
        )
    if sharding.offload_params and s in FSDP_STRATEGIES and not launch.cuda:
        raise LaunchError("sharding.offload_params moves FSDP shards from the GPU to the CPU; there is no GPU here")
    mp = train.mixed_precision
    if mp == "fp16" and not launch.cuda:
        raise LaunchError("train.mixed_precision='fp16' needs a CUDA GPU (loss scaling); use 'bf16' on the CPU")
    if mp == "fp16" and s in FSDP_STRATEGIES:
        raise LaunchError(
            "train.mixed_precision='fp16' under FSDP2 needs a sharded gradient scaler, which scaling does not "
            "provide; use 'bf16' (no loss scaling needed)"
        )
    compute = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[mp]
    if sharding.param_dtype not in ("fp32", compute):
        raise ConfigError(
            f"sharding.param_dtype={sharding.param_dtype!r} contradicts train.mixed_precision={mp!r}; "
            f"train.mixed_precision is the one precision switch (set it, and leave sharding.param_dtype='fp32')"
        )
    per_step = launch.world_size * train.grad_accum
    if train.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={train.batch_size} must be divisible by world size x train.grad_accum = "
            f"{launch.world_size} x {train.grad_accum} = {per_step}"
        )
    return launch


def compute_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype the forward/backward runs in (master weights and optimizer state always stay fp32)."""
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[train.mixed_precision]


@contextlib.contextmanager
def _without_env(*names: str):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_accelerator(train: TrainConfig, sharding: ShardingConfig, launch: LaunchInfo, deepspeed_config: dict | None):
    """Build a fresh :class:`accelerate.Accelerator` for one training cell.

    The per-cell Accelerator state (precision, DeepSpeed plugin) is reset; the process group is kept, so many
    cells can run one after another in one launched process.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    backend = "nccl" if launch.cuda else "gloo"
    # Only a launched job has a process group; in a plain single process a backend would make Accelerate ask
    # torch.distributed for a world size that does not exist.
    launched = "LOCAL_RANK" in os.environ
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)] if launched else []
    if sharding.strategy in ZERO_STRATEGIES:
        plugin = DeepSpeedPlugin(
            hf_ds_config=deepspeed_config,
            gradient_accumulation_steps=train.grad_accum,
            gradient_clipping=train.clip_grad_norm,
            zero3_init_flag=False,
        )
        acc = Accelerator(
            deepspeed_plugin=plugin,
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.grad_accum,
            kwargs_handlers=handlers,
        )
    else:
        # FSDP strategies get their precision from FSDP2's MixedPrecisionPolicy, not from autocast.
        mp = train.mixed_precision if sharding.strategy in ("none", "ddp") else "no"
        # Keep Accelerate's own FSDP plugin out: it never activates on CPU and would fight our fully_shard.
        # DDP's buckets would otherwise hold a second copy of every gradient (measured: +82 MB on a 22 M-param
        # ViT-S, benchmarks/sharding_memory.py); grads as views into the buckets remove it.
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=True))
        with _without_env("ACCELERATE_USE_FSDP"):
            acc = Accelerator(cpu=not launch.cuda, mixed_precision=mp, kwargs_handlers=handlers)
    if acc.num_processes != launch.world_size:
        raise LaunchError(
            f"Accelerate sees {acc.num_processes} process(es) but the launcher started WORLD_SIZE="
            f"{launch.world_size}; refusing to train {launch.world_size} unsynchronised copies "
            f"(on CPU use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu`, see launch/README.md)"
        )
    return acc


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches, optimizer step by optimizer step, as lists of ``(position, draw_seed)``.

    The global batch of step ``s`` is a fixed slice of a seeded per-epoch permutation, the same for every world
    size; it is cut into ``world_size * grad_accum`` equal micro-batches and micro-batch ``j`` of rank ``r`` is piece
    ``j * world_size + r``. So 1 process and N processes (and k x b vs k·b) see exactly the same examples per
    optimizer step, and resuming at step ``s`` is just starting the stream at ``s`` (the data-loader position).
    Incomplete global batches at the end of an epoch are dropped.

    ``draw_seed`` seeds the augmentation of one sample: ``derive_seed(seed, AUGMENT, step, slot)`` with ``slot`` the
    sample's place in the global batch (:mod:`scaling.engine.seeds`). It depends on nothing else, so augmentation is
    the same for any world size, accumulation, number of DataLoader workers, and after a resume. Datasets take such
    a pair as their key (``scaling.data.dataset.split_key``).
    """

    def __init__(self, n: int, global_batch: int, world_size: int, rank: int, grad_accum: int, seed: int,
                 start_step: int, total_steps: int):
        if n < global_batch:
            raise ConfigError(f"the training set has {n} examples, fewer than train.batch_size={global_batch}")
        self.n, self.global_batch, self.world_size, self.rank = n, global_batch, world_size, rank
        self.grad_accum, self.seed, self.start_step, self.total_steps = grad_accum, seed, start_step, total_steps
        self.micro = global_batch // (world_size * grad_accum)
        self.steps_per_epoch = n // global_batch

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = None, None
        for step in range(self.start_step, self.total_steps):
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            batch = perm[i * self.global_batch:(i + 1) * self.global_batch].tolist()
            for j in range(self.grad_accum):
                lo = (j * self.world_size + self.rank) * self.micro
                yield [(batch[k], derive_seed(self.seed, AUGMENT, step, k)) for k in range(lo, lo + self.micro)]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.grad_accum


def check_training_keys(dataset) -> None:
    """Fail early, with the contract, when ``dataset`` does not take the ``(position, draw_seed)`` training keys.

    Loads one sample (``dataset[(0, 0)]``); a dataset written for integer keys fails here with a message instead of
    in a DataLoader worker.
    """
    try:
        dataset[(0, 0)]
    except (TypeError, KeyError) as e:
        raise TypeError(
            f"{type(dataset).__name__}[(0, 0)] raised {type(e).__name__}: {e}. Training datasets take (position, "
            f"draw_seed) keys (StepBatchSampler): seed any augmentation of that sample with draw_seed, never with a "
            f"global RNG; scaling.data.dataset.split_key unpacks an int or a pair"
        ) from e


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Contiguous, equal-sized per-rank slices for prediction, padded by wrapping around.

    Every rank runs the same number of batches (sharded models need all ranks in every forward); the padding
    duplicates are removed after gathering, by sample index (the duplicates of
    https://github.com/huggingface/accelerate/issues/350).
    """

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int):
        self.n, self.batch_size = n, batch_size
        self.per_rank = math.ceil(n / world_size) if n else 0
        start = rank * self.per_rank
        self.positions = [(start + i) % n for i in range(self.per_rank)] if n else []

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.positions), self.batch_size):
            yield self.positions[i:i + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

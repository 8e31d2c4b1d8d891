"""The launch a run finds itself in and the Accelerator built for it.

Everything here is read from the environment the launcher (``accelerate launch``, ``torchrun``, ``srun``) set,
*before* any model is built. :func:`scaling.engine.distributed.check_launch` turns it into an early, clear error
for an impossible combination.

Why we build the Accelerator ourselves (measured with Accelerate 1.15.0 and DeepSpeed 0.19.8; see
``docs/scaling-out.md``):

* on CPU, DDP needs ``cpu=True`` (otherwise two launched processes silently become two unsharded runs) and DeepSpeed
  needs ``InitProcessGroupKwargs(backend="gloo")`` (otherwise every rank believes it is rank 0);
* Accelerate's FSDP plugin never activates without a GPU; scaling applies FSDP2 itself
  (``scaling.engine.strategies.fsdp``), so an Accelerate FSDP launch is routed to that path and the plugin is kept
  out of the Accelerator;
* the study runs many cells in one process, each with its own precision and DeepSpeed config, so the per-cell
  Accelerator state is reset while the process group (``PartialState``) stays up.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch

from scaling.config import ShardingConfig, TrainConfig

FSDP_STRATEGIES = ("fsdp", "fsdp_grad_op", "hsdp")
ZERO_STRATEGIES = ("zero1", "zero2", "zero3")

# Generous: rank 0 may compute metrics or write predictions while the others wait in a collective
# (NCCL watchdog timeouts during long evaluations: https://github.com/huggingface/accelerate/issues/3861).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


class LaunchError(RuntimeError):
    """The requested strategy cannot run in the way this process was launched."""


LAUNCH_SETTINGS = {
    "mixed_precision": "ACCELERATE_MIXED_PRECISION",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
}
"""Training settings an Accelerate launch config (or ``accelerate launch``'s command line) may set, by their name
there, and the variable ``accelerate launch`` passes each in (Accelerate 1.15.0, ``utils/launch.py``). The study
config owns all of them (:func:`scaling.engine.distributed.check_launch` refuses a contradiction)."""
DS_FIELDS = "ACCELERATE_CONFIG_DS_FIELDS"
"""The fields a DeepSpeed launch config wrote in its ``deepspeed_config`` section (and ``mixed_precision``)."""


def _launch_settings() -> dict[str, str]:
    """The :data:`LAUNCH_SETTINGS` this launch set. Accelerate always passes a precision (``no`` by default), so
    ``no`` counts only when a DeepSpeed launch config names ``mixed_precision``."""
    settings = {field: os.environ[var] for field, var in LAUNCH_SETTINGS.items() if var in os.environ}
    if settings.get("mixed_precision") == "no" and "mixed_precision" not in os.environ.get(DS_FIELDS, "").split(","):
        del settings["mixed_precision"]
    return settings


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
    settings: dict[str, str] = field(default_factory=dict)
    """Training settings the launch config set (:data:`LAUNCH_SETTINGS` names), as text."""

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
        settings=_launch_settings(),
    )


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
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

    # A DeepSpeed Accelerator marks the shared process state DEEPSPEED for good; a later non-ZeRO cell in the same
    # process would then look for a DeepSpeed plugin. Re-read the process state then (the process group is reused).
    was_deepspeed = PartialState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED
    AcceleratorState._reset_state(reset_partial_state=was_deepspeed and sharding.strategy not in ZERO_STRATEGIES)
    GradientState._reset_state()
    backend = "nccl" if launch.cuda else "gloo"
    # Only a launched job has a process group; in a plain single process a backend would make Accelerate ask
    # torch.distributed for a world size that does not exist.
    launched = "LOCAL_RANK" in os.environ
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)] if launched else []
    if sharding.strategy in ZERO_STRATEGIES:
        # The launch config's DeepSpeed fields were checked to agree with the study config (check_launch) and are
        # filled into the config from it; hidden here, Accelerate would refuse them next to a config dict.
        with _without_env(DS_FIELDS):
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
        # ViT-S, benchmarks/sharding_memory.py); grads as views into the buckets remove it. broadcast_buffers=False:
        # each rank keeps the BatchNorm statistics of its own batches, as under FSDP2, and the Trainer averages them
        # over the ranks (Trainer.sync_norm_statistics) instead of DDP overwriting them with rank 0's every step.
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=True, broadcast_buffers=False))
        with _without_env("ACCELERATE_USE_FSDP"):
            acc = Accelerator(cpu=not launch.cuda, mixed_precision=mp, kwargs_handlers=handlers)
    if acc.num_processes != launch.world_size:
        raise LaunchError(
            f"Accelerate sees {acc.num_processes} process(es) but the launcher started WORLD_SIZE="
            f"{launch.world_size}; refusing to train {launch.world_size} unsynchronised copies "
            f"(on CPU use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu`, see launch/README.md)"
        )
    return acc

"""DeepSpeed ZeRO-1/2/3 through Accelerate's DeepSpeed plugin.

Every ``"auto"`` of the launch JSON is filled from scaling's config in :func:`deepspeed_config` and nowhere else
(batch, accumulation, clipping — DeepSpeed's default clipping is 1.0 and Accelerate fills ``auto`` with 1.0 too —
and precision; https://github.com/huggingface/accelerate/issues/1101). Under ZeRO, DeepSpeed owns gradient
accumulation, averaging and clipping (docs/design.md, "one switch per concern").

ZeRO-3 host overhead: DeepSpeed installs forward and backward hooks on *every* submodule and fetches/releases
parameters module by module; on a ViT that is ~12 hooked modules per block, and at small per-GPU batches those
hooks, not the GPU, set the step time. Each backbone block (the family table's block classes, the same units FSDP2
shards) is therefore declared one ZeRO-3 leaf (``deepspeed.utils.set_z3_leaf_modules``): its parameters are
gathered together when the block starts and released when it ends, with no hooks inside. The prefetch and
persistence thresholds left ``"auto"`` in the JSON are sized from those blocks (:func:`zero3_sizes`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from scaling.config import ShardingConfig, TrainConfig
from scaling.engine.launch import ZERO_STRATEGIES, LaunchError, LaunchInfo, compute_dtype, make_accelerator
from scaling.engine.sharding import ShardingError, ShardReport, block_classes_for, blocks_of, has_meta
from scaling.engine.strategies.base import HOW, Strategy, warn_if_nothing_to_shard


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _autos(cfg, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _autos(v, key + ".")
        elif v == "auto":
            out.append(key)
    return out


@dataclass(frozen=True)
class Zero3Sizes:
    """Sizes (in elements) that ZeRO-3's fetch thresholds are derived from."""

    block: int
    """Parameters of the largest backbone block (one ZeRO-3 leaf, gathered as a whole)."""
    width: int
    """Largest 1-D parameter (a bias or norm scale): the model's widest feature dimension."""

    def thresholds(self) -> dict[str, int]:
        """``stage3_*`` values: persist what is at most 10 x the width (every bias and norm, as Hugging Face
        transformers' DeepSpeed integration sizes it, ``transformers/integrations/deepspeed.py``), prefetch the
        next two blocks while one computes, and keep at most four blocks gathered."""
        return {
            "zero_optimization.stage3_param_persistence_threshold": 10 * self.width,
            "zero_optimization.stage3_prefetch_bucket_size": 2 * self.block,
            "zero_optimization.stage3_max_live_parameters": 4 * self.block,
        }


def zero3_sizes(model: nn.Module, block_classes: tuple[type, ...]) -> Zero3Sizes:
    """Measure :class:`Zero3Sizes` on the (not yet partitioned) model."""
    blocks = blocks_of(model, block_classes)
    block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    width = max((p.numel() for p in model.parameters() if p.ndim <= 1), default=1)
    return Zero3Sizes(block=block, width=width)


GRANULARITY = "zero_optimization.stage3_module_granularity_threshold"
"""DeepSpeed's automatic ZeRO-3 leaf modules: refused (scaling sets the block leaves itself)."""


FP32_NAMES = ("torch.float32", "fp32", "float32", "float")
"""How a DeepSpeed config names fp32 (DeepSpeed 0.19.8 ``runtime/config.py``, ``DtypeEnum.fp32``)."""


def deepspeed_config(train: TrainConfig, sharding: ShardingConfig, world_size: int, base: dict | None = None,
                     source: str = "<built-in>", sizes: Zero3Sizes | None = None) -> dict:
    """The DeepSpeed config for this cell: ``base`` (a ``launch/*.json``) with every ``"auto"`` filled from scaling's
    config. The one place batch size, accumulation, clipping and precision reach DeepSpeed (Accelerate fills
    "auto" only on the first prepare(): https://github.com/huggingface/accelerate/issues/1101).

    A concrete value in ``base`` that contradicts scaling's config is an error naming the key and ``source``;
    so is an ``"auto"`` scaling does not know how to fill. Under ZeRO-3 with ``sizes``, the fetch thresholds
    (:meth:`Zero3Sizes.thresholds`) fill those that are ``"auto"`` or absent; concrete ones are kept. DeepSpeed's
    automatic leaf modules (:data:`GRANULARITY`) are refused with an error naming ``source``.
    """
    if sharding.strategy not in ZERO_STRATEGIES:
        raise ValueError(f"deepspeed_config is for zero1/zero2/zero3, not {sharding.strategy!r}")
    stage = int(sharding.strategy[-1])
    values = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.batch_size // (world_size * train.grad_accum),
        "gradient_accumulation_steps": train.grad_accum,
        # DeepSpeed (runtime/constants.py) and Accelerate both default to 1.0; 0.0 = off, as in scaling.
        "gradient_clipping": float(train.clip_grad_norm),
        "zero_optimization.stage": stage,
        "bf16.enabled": train.mixed_precision == "bf16",
        "fp16.enabled": train.mixed_precision == "fp16",
        "communication_data_type": sharding.reduce_dtype,
        "zero_optimization.offload_optimizer.device": "cpu" if sharding.offload_optimizer else "none",
        "zero_optimization.offload_param.device": "cpu" if sharding.offload_params else "none",
        # scaling exports consolidated fp32 itself (export), so no 16-bit gather on save.
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
    }
    cfg = copy.deepcopy(base) if base else {}
    for key, value in values.items():
        current = _get(cfg, key)
        if current is None or current == "auto":
            _set(cfg, key, value)
        elif current != value:
            raise ValueError(
                f"{source}: {key}={current!r} contradicts scaling's config (which gives {value!r}); set it to "
                f'"auto" so it is filled from train/sharding settings'
            )
    accumulate = _get(cfg, "data_types.grad_accum_dtype")
    if stage == 1 and train.mixed_precision == "bf16" and str(accumulate).lower() in FP32_NAMES:
        # DeepSpeed 0.19.8 (runtime/engine.py, _do_optimizer_sanity_check) swaps ZeRO-1's optimizer for its
        # BF16_Optimizer here, whose partitions, state dict and checkpoint files are laid out differently: the
        # shard report, the device-side checks and resuming on another world size read ZeRO-1/2's. At stages 2 and 3
        # the key reaches ZeRO's own optimizers.
        raise ValueError(
            f"{source}: data_types.grad_accum_dtype={accumulate!r} with bf16 under zero1 is not supported: DeepSpeed "
            f"then trains with its BF16_Optimizer instead of ZeRO-1's optimizer, and scaling reads ZeRO-1's state. "
            f"Use zero2 (its optimizer takes the key), or remove the key (ZeRO-1 then accumulates gradients in bf16)")
    granularity = _get(cfg, GRANULARITY) if stage == 3 else None
    if granularity not in (None, 0, "auto"):
        # DeepSpeed's automatic leaf modules (0.19.8, deepspeed/runtime/zero/parameter_offload.py) break the backward
        # of timm's ViT even without scaling (tests/test_trainer.py pins it); scaling declares the blocks leaves.
        raise ValueError(
            f"{source}: {GRANULARITY}={granularity!r} is not supported: scaling already makes every backbone block "
            f"one ZeRO-3 leaf (deepspeed.utils.set_z3_leaf_modules), and DeepSpeed 0.19.8's automatic leaves break "
            f"the backward of timm's ViT (RuntimeError: output with shape [1] doesn't match the broadcast shape); "
            f"remove the key")
    if stage == 3 and sizes is not None:
        for key, value in sizes.thresholds().items():
            if _get(cfg, key) in (None, "auto"):
                _set(cfg, key, value)
    if stage == 3 and _get(cfg, "zero_optimization.memory_efficient_linear") is None:
        # DeepSpeed's default replaces torch.nn.functional.linear process-wide ("This will persist unless manually
        # reset", deepspeed/runtime/zero/partition_parameters.py) by a Python autograd Function that binds its
        # arguments with inspect.signature on every call: host time per linear layer, and every later non-ZeRO
        # cell in the same process pays it too. Block leaves keep a block's weights gathered through its backward.
        _set(cfg, "zero_optimization.memory_efficient_linear", False)
    if train.mixed_precision == "fp16" and _get(cfg, "fp16.loss_scale") is None:
        _set(cfg, "fp16.loss_scale", 0)  # dynamic loss scaling
    if sharding.offload_optimizer:
        # scaling builds a torch optimizer (SGD has no DeepSpeed CPU kernel); let ZeRO-Offload step it on the CPU.
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    if _get(cfg, "timers.throughput.enabled") is None:
        # DeepSpeed's throughput timer is on by default and, with its default "synchronized": true, waits for the
        # device in every forward and every engine.step() (deepspeed/utils/timer.py, ThroughputTimer.start/stop):
        # two device-wide synchronisations per step. The Trainer measures throughput itself at its sync points.
        _set(cfg, "timers.throughput.enabled", False)
    left = _autos(cfg)
    if left:
        raise ValueError(f"{source}: scaling does not fill {left}; replace these \"auto\" values with numbers")
    return cfg


def load_deepspeed_base(strategy: str) -> tuple[dict | None, str]:
    """The DeepSpeed JSON the launcher named (``ACCELERATE_DEEPSPEED_CONFIG_FILE``), or None for the built-in."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path in ("", "none"):
        return None, "<built-in>"
    p = Path(path)
    try:
        return json.loads(p.read_text()), str(p)
    except (OSError, json.JSONDecodeError) as e:
        raise LaunchError(f"DeepSpeed config {p} (from the launch config) cannot be read: {e}") from None


def set_block_leaves(model: nn.Module, block_classes: tuple[type, ...]) -> int:
    """Make every backbone block one ZeRO-3 leaf module (hooks on the block, none inside); returns the count."""
    from deepspeed.utils import set_z3_leaf_modules

    return len(set_z3_leaf_modules(model, list(block_classes)))


class ZeRO(Strategy):
    """``zero1`` / ``zero2`` / ``zero3``: DeepSpeed partitions optimizer state, + gradients, + parameters."""

    names = ZERO_STRATEGIES
    deepspeed_launch = True
    shm_unlinked: Path | None = None
    """The /dev/shm buffer whose name this rank removed (a CPU launch that had set ``LOCAL_SIZE``), else None."""

    @classmethod
    def check_launch(cls, sharding: ShardingConfig, train: TrainConfig, launch: LaunchInfo) -> None:
        """A DeepSpeed launch is required; parameter offload exists only at stage 3."""
        s = sharding.strategy
        if not launch.deepspeed:
            raise LaunchError(
                f"sharding.strategy={s!r} needs a DeepSpeed launch (ACCELERATE_USE_DEEPSPEED=true), e.g. "
                f"`accelerate launch --config_file launch/{s}.yaml ...`; this process was launched without it ({HOW})"
            )
        super().check_launch(sharding, train, launch)
        if sharding.offload_params and s != "zero3":
            raise LaunchError(f"sharding.offload_params needs fsdp/fsdp_grad_op/hsdp or zero3, not {s!r}")
        warn_if_nothing_to_shard(sharding, launch)

    def check_model(self, model: nn.Module, weights: str | Path | None) -> None:
        """DeepSpeed partitions a materialised model at prepare time; a meta-device model is refused."""
        super().check_model(model, weights)
        if has_meta(model):
            raise ShardingError("meta-device models are materialised by the FSDP/DDP paths; build the model normally "
                                "for ZeRO (DeepSpeed partitions it at prepare time)")

    def prepare(self, model: nn.Module, *, weights: str | Path | None = None,
                block_classes: tuple[type, ...] | None = None) -> None:
        """Leaf blocks (stage 3), the DeepSpeed config, the engine (Accelerate's prepare), then check the engine."""
        block_classes = self._before_sharding(model, block_classes)
        sizes = None
        if self.name == "zero3":
            block_classes = block_classes or block_classes_for(model)
            sizes = zero3_sizes(model, block_classes)
            set_block_leaves(model, block_classes)
        base, source = load_deepspeed_base(self.name)
        ds_cfg = deepspeed_config(self.train, self.sharding, self.launch.world_size, base, source, sizes)
        self.accelerator = make_accelerator(self.train, self.sharding, self.launch, ds_cfg)
        if not self.launch.cuda:
            # DeepSpeed's CPU accelerator otherwise runs `numactl --hardware` in a subprocess for device_count()
            # at every step; LOCAL_SIZE is what DeepSpeed's own launcher sets for CPU ranks. Set only now that
            # DeepSpeed's communication backend is up: with it set before, that backend also maps a /dev/shm
            # all-reduce buffer per rank that ZeRO training never uses (see unlink_shm_allreduce_buffer).
            self.shm_unlinked = unlink_shm_allreduce_buffer(self.launch.rank)
            os.environ.setdefault("LOCAL_SIZE", str(self.launch.local_world_size))
        optimizer = self._build_optimizer(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.engine = self.model
        self.module = self.engine.module
        if self.train.compile == "model":
            self.engine.compile()  # DeepSpeed's own: the ZeRO hooks stay eager (torch.compiler.disable)
        self._check_engine()

    def _check_engine(self) -> None:
        # What DeepSpeed actually runs with, not what we asked for ("auto", precedence and clipping defaults:
        # https://github.com/yuvalkirstain/PickScore/issues/18).
        got = {"train_batch_size": self.engine.train_batch_size(),
               "gradient_accumulation_steps": self.engine.gradient_accumulation_steps(),
               "gradient_clipping": float(self.engine.gradient_clipping())}
        want = {"train_batch_size": self.train.batch_size, "gradient_accumulation_steps": self.train.grad_accum,
                "gradient_clipping": float(self.train.clip_grad_norm)}
        if got != want:
            raise ShardingError(f"DeepSpeed engine runs with {got}, but the config asks for {want}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """DeepSpeed holds low-precision parameters itself; inputs must match them."""
        return self.engine(images.to(compute_dtype(self.train)))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """ZeRO owns accumulation: it divides by the accumulation steps, averages over ranks, clips (config) and
        steps the optimizer only at the boundary (the last micro-batch)."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)
        self.engine.step()

    @property
    def loss_scale(self) -> int:
        """World size x accumulation steps: DeepSpeed averages over both."""
        return self.launch.world_size * self.train.grad_accum

    def step(self) -> None:
        """Nothing left to do: the engine stepped (and clipped) inside :meth:`backward` at the boundary."""

    def shard_report(self) -> ShardReport:
        """zero3: parameter partitions (``ds_tensor``); zero1/2: the fp32 optimizer partition."""
        params = list(self.module.parameters())
        if self.name == "zero3":
            local = sum(p.ds_tensor.numel() for p in params)
            total = sum(p.ds_numel for p in params)
        else:
            zero_opt = getattr(self.optimizer, "optimizer", self.optimizer)
            local = sum(t.numel() for t in zero_opt.single_partition_of_fp32_groups)
            total = sum(p.numel() for p in params)
        return ShardReport(self.name, 0, local, total, self.launch.world_size)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """From the fp32 master partitions (never the engine's ``state_dict()``: empty tensors under ZeRO-3,
        https://github.com/deepspeedai/DeepSpeed/issues/2413)."""
        from deepspeed.utils import safe_get_full_fp32_param

        sd = {n: safe_get_full_fp32_param(p) for n, p in self.module.named_parameters()}
        # Persistent buffers are never partitioned; take them (and only them) from the module's state dict.
        sd.update({k: v for k, v in self.module.state_dict().items() if k not in sd})
        return sd

    def close(self) -> None:
        """Destroy the engine (its gradient hooks and buffers), release what DeepSpeed keeps of it in module-level
        state (:func:`release_zero3_globals`), then drop the references."""
        if self.engine is not None:
            self.engine.destroy()
            if self.name == "zero3":
                release_zero3_globals()
        super().close()


def release_zero3_globals() -> None:
    """Forget the finished ZeRO-3 engines that DeepSpeed 0.19.8 keeps reachable from module-level state, so that a
    study's next cell does not start with the last one's model, partitions and optimizer still allocated (measured
    on one CPU rank with a 22 M-parameter ViT-S: resident memory +333 MiB per cell without this, +11 MiB with it;
    on a GPU, the partitions stay in device memory).

    * ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK``: modules are pushed in forward and popped in
      backward, so every forward without backward (evaluation, prediction) leaves its module on it;
    * ``PartitionedParameterCoordinator.__params_to_release``: a method under ``functools.lru_cache``, whose one
      class-level cache holds every coordinator and submodule it was ever called with.

    Called between cells only (no forward in flight); safe when DeepSpeed changes these names (nothing to do)."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()
    method = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    # Under DeepSpeed's NVTX wrapper (instrument_w_nvtx), which does not expose the function it wraps.
    for cell in [*(getattr(method, "__closure__", None) or ()), None]:
        target = method if cell is None else cell.cell_contents
        if hasattr(target, "cache_clear"):
            target.cache_clear()


def unlink_shm_allreduce_buffer(rank: int) -> Path | None:
    """Remove the name of this rank's shared-memory all-reduce buffer once every rank has mapped it; return the
    path removed (None when DeepSpeed made none).

    DeepSpeed's CPU communication backend (0.19.8, ``deepspeed/comm/torch.py`` and
    ``ops/csrc/cpu/comm/shm.cpp``) creates one 69 MB buffer per rank in ``/dev/shm`` when it starts with all
    ranks on one machine (``LOCAL_SIZE`` equal to the world size, as DeepSpeed's own launcher sets it) and never
    unlinks it: every such CPU launch left 69 MB per rank of memory-backed files behind after it ended, and
    repeated launches on one machine fill ``/dev/shm`` (RAM) until the kernel kills a rank. Only DeepSpeed's
    tensor-parallel inference all-reduce uses the buffer, so :meth:`ZeRO.prepare` sets ``LOCAL_SIZE`` only after
    the backend is up and none is made; when the launch had set it, this removes it. Each rank maps all ranks'
    buffers while the backend starts, so after a barrier the names can go: the mappings stay valid until the
    processes exit, and the memory is returned then, also after a SIGKILL."""
    try:
        from deepspeed.comm import comm as ds_comm
    except ImportError:
        return None
    backend = getattr(ds_comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None:
        return None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has opened every buffer before any name goes
    # The name shm_initialize gives it: SHM_BUFFER_NAME_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>.
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    path = Path("/dev/shm") / name
    if not path.exists():
        return None
    path.unlink(missing_ok=True)
    return path

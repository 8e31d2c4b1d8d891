"""Whether a strategy can run in this launch, and how data is split over ranks.

:func:`check_launch` is decided from the environment the launcher set (``scaling.engine.launch``) *before* any model
is built, so an impossible combination (``zero3`` without a DeepSpeed launch, ``hsdp`` on one node, an Accelerate
FSDP launch with ``strategy: ddp``) stops in seconds instead of after loading a 1B-parameter backbone. Each strategy
family owns its own checks (``scaling.engine.strategies``); the ones here hold for every strategy.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from scaling.config import ConfigError, ShardingConfig, TrainConfig
from scaling.engine.launch import ZERO_STRATEGIES, LaunchError, LaunchInfo, detect_launch
from scaling.engine.strategies import strategy_class
from scaling.engine.seeds import AUGMENT, derive_seed

__all__ = ["check_launch", "LaunchError", "LaunchInfo", "StepBatchSampler", "ShardedEvalSampler"]


def check_launch(sharding: ShardingConfig, train: TrainConfig, launch: LaunchInfo | None = None) -> LaunchInfo:
    """Reject a strategy/precision/batch that cannot run in this launch, before any model is built.

    Returns the :class:`LaunchInfo` it checked. Call it first in a recipe (the :class:`~scaling.engine.Trainer`
    calls it again) so a wrong launch fails in seconds. The strategy family checks its own requirements
    (``Strategy.check_launch``); precision and batch divisibility are checked here for all.
    """
    launch = launch or detect_launch()
    strategy_class(sharding.strategy).check_launch(sharding, train, launch)
    _check_launch_settings(launch, sharding, train)
    mp = train.mixed_precision
    if mp == "fp16" and not launch.cuda:
        raise LaunchError("train.mixed_precision='fp16' needs a CUDA GPU (loss scaling); use 'bf16' on the CPU")
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


def _check_launch_settings(launch: LaunchInfo, sharding: ShardingConfig, train: TrainConfig) -> None:
    """A launch config may repeat a training setting of the study config, never contradict it: the study config is
    the one switch (docs/design.md, "One switch per concern"), and the launch's value would otherwise be dropped
    without a word (a ``mixed_precision: bf16`` yaml training in fp32)."""
    stage = int(sharding.strategy[-1]) if sharding.strategy in ZERO_STRATEGIES else None
    ours = {
        "mixed_precision": ("train.mixed_precision", train.mixed_precision, str),
        "gradient_accumulation_steps": ("train.grad_accum", train.grad_accum, int),
        "gradient_clipping": ("train.clip_grad_norm", float(train.clip_grad_norm), float),
        "zero_stage": ("sharding.strategy", stage, int),
        "offload_optimizer_device": ("sharding.offload_optimizer", "cpu" if sharding.offload_optimizer else "none",
                                     str.lower),
        "offload_param_device": ("sharding.offload_params", "cpu" if sharding.offload_params else "none", str.lower),
    }
    diffs = []
    for name, text in launch.settings.items():
        key, value, parse = ours[name]
        try:
            same = parse(text) == value
        except ValueError:
            same = False
        if not same:
            diffs.append(f"{name}: {text} where the study config's {key} gives {value!r}")
    if diffs:
        raise LaunchError(
            f"the launch config (accelerate launch --config_file, or its command line) contradicts the study config: "
            f"{'; '.join(diffs)}. The study config is the one switch for these: remove them from the launch config "
            f"(launch/README.md), or set the study config to what you meant")


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
        self.owned = max(0, min(self.per_rank, n - start))
        """How many leading positions are this rank's own samples (the rest wrap around: padding)."""

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.positions), self.batch_size):
            yield self.positions[i:i + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

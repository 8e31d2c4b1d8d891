"""Counter-based seeds: every random draw of a run is a pure function of (run seed, purpose, step, slot).

A global RNG carries state from one draw to the next, so what a sample sees depends on everything drawn before it:
on whether a data-loader iterator was created before or after a checkpoint's RNG state was restored, on the number
of DataLoader workers, on the world size. Deriving a fresh seed for each draw from counters instead (the idea behind
counter-based generators: Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") makes every draw depend
only on *where* it happens in the run, so a resumed run, a run with 8 workers and a run on 4 ranks draw the same.

Users of these seeds: the augmentation of the sample in slot ``k`` of the global batch of step ``s``
(:class:`~scaling.engine.distributed.StepBatchSampler`), MixUp's ``lam`` and permutations, and the global RNGs that
dropout / drop-path read, re-seeded at the start of every optimizer step (:func:`seed_step`). Nothing random is left
to save in a checkpoint.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

# Purposes: draws for different uses never share a seed, even at equal counters.
AUGMENT = 1
MIXUP = 2
STEP = 3

_MASK = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    # SplitMix64's finaliser (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"): every input
    # bit reaches every output bit, so neighbouring counters give unrelated seeds.
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def derive_seed(*counters: int) -> int:
    """A seed in ``[0, 2**63)`` (valid for ``torch.Generator.manual_seed``) from non-negative integer counters.

    The same counters always give the same seed, in any process; the order of the counters matters.
    """
    h = 0
    for c in counters:
        if c < 0:
            raise ValueError(f"seed counters must be >= 0, got {counters}")
        h = _splitmix64(h ^ (int(c) & _MASK))
    return h >> 1


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (CPU and every CUDA device) for one optimizer step of one rank.

    Dropout and drop-path read torch's global RNG; seeding it per step (and per rank, so ranks drop different units)
    makes a resumed step draw exactly what the uninterrupted run drew, with no RNG state in the checkpoint.
    """
    s = derive_seed(seed, STEP, step, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also every CUDA device's generator


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (the one RNG a per-sample or per-step draw may use)."""
    return torch.Generator().manual_seed(seed)


def deterministic_kernels() -> tuple[bool, bool]:
    """Make GPU kernels deterministic for this process; return the previous (deterministic algorithms, cuDNN
    benchmark) settings for :func:`restore_kernels`.

    ``torch.use_deterministic_algorithms(True)`` picks deterministic implementations (and raises, naming the op, for
    one that has none); cuDNN autotuning would pick kernels by timing, differently per run; cuBLAS needs a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, read when its first handle is created: call this before any CUDA
    work of the process, as the Trainer does; PyTorch docs, "Reproducibility").
    """
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    return before


def restore_kernels(before: tuple[bool, bool]) -> None:
    """Undo :func:`deterministic_kernels` (the environment variable stays: cuBLAS has read it)."""
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]

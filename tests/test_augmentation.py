"""Stateless augmentation: each sample's randomness is a function of (run seed, step, slot in the global batch).

Checked against torchvision (same crop/rotation/flip draws), against the global RNG (never read nor advanced),
across world sizes, accumulation, resume positions and DataLoader worker counts, and end to end: a run preempted by
a real SIGTERM and resumed in a fresh Trainer ends with bit-identical parameters and predictions, with augmentation
and MixUp on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from toy import IMAGE_LABELS, IMG, SigtermAt, vit, write_image_table  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.data.dataset import TableDataset, split_key  # noqa: E402
from scaling.data.images import build_transform  # noqa: E402
from scaling.engine.distributed import StepBatchSampler, check_training_keys  # noqa: E402
from scaling.engine.seeds import derive_seed  # noqa: E402
from scaling.engine.trainer import Preempted, Trainer  # noqa: E402

NONE = ShardingConfig(strategy="none")


def test_transform_draws_torchvisions_parameters_from_the_samples_seed():
    """``transform(img, s)`` == torchvision's RandomResizedCrop + RandomRotation + RandomHorizontalFlip after
    ``torch.manual_seed(s)``: the same parameters, drawn from the sample's own generator."""
    img = torch.rand(1, 40, 36)
    reference = v2.Compose([v2.RandomResizedCrop(16, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
                            v2.RandomRotation(7), v2.RandomHorizontalFlip()])
    ours = build_transform(16, train=True, flip=True)
    outputs = []
    for s in range(12):
        torch.manual_seed(s)
        expected = reference(img)
        outputs.append(ours(img, s))
        assert torch.equal(outputs[-1], expected), s
    assert len({o.sum().item() for o in outputs}) == 12  # every seed gives another view
    assert torch.equal(build_transform(16, train=True)(img), build_transform(16, train=False)(img))  # no seed: eval


def test_transform_never_reads_or_advances_the_global_rng():
    img = torch.rand(1, 24, 24)
    t = build_transform(20, train=True, flip=True)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = t(img, 7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert torch.equal(t(img, 7), a)


def _steps(sampler: StepBatchSampler, accum: int) -> list[list[tuple[int, int]]]:
    micro = list(sampler)
    return [sum(micro[i:i + accum], []) for i in range(0, len(micro), accum)]


def test_draw_seeds_are_the_same_for_any_world_size_accumulation_and_resume():
    n, batch, total = 40, 8, 12  # 5 steps per epoch: the run crosses two epoch boundaries
    single = _steps(StepBatchSampler(n, batch, 1, 0, 1, seed=3, start_step=0, total_steps=total), 1)
    assert all(len(s) == batch for s in single) and len(single) == total
    # Slot k of step s carries derive_seed(seed, AUGMENT, s, k), whatever the layout.
    assert single[7][5][1] == derive_seed(3, 1, 7, 5)
    assert len({seed for step in single for _, seed in step}) == total * batch  # no two draws share a seed
    for world, accum in ((2, 1), (2, 2), (4, 2)):
        ranks = [_steps(StepBatchSampler(n, batch, world, r, accum, 3, 0, total), accum) for r in range(world)]
        for s in range(total):
            got = sorted(pair for r in range(world) for pair in ranks[r][s])
            assert got == sorted(single[s]), (world, accum, s)
    resumed = _steps(StepBatchSampler(n, batch, 1, 0, 1, 3, start_step=7, total_steps=total), 1)
    assert resumed == single[7:]
    other_seed = _steps(StepBatchSampler(n, batch, 1, 0, 1, seed=4, start_step=0, total_steps=total), 1)
    assert [p for p, _ in other_seed[0]] != [p for p, _ in single[0]]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    table = write_image_table(d / "src", 32)
    TableDataset(table, IMAGE_LABELS, IMG, cache_dir=d / "cache")  # build the cache once
    return table, d / "cache"


def _train_set(images) -> TableDataset:
    table, cache = images
    return TableDataset(table, IMAGE_LABELS, IMG, train=True, cache_dir=cache, flip=True)


def test_dataloader_workers_do_not_change_a_pixel(images):
    ds = _train_set(images)
    batches = {}
    for workers in (0, 2):
        sampler = StepBatchSampler(len(ds), 8, 1, 0, 1, seed=0, start_step=0, total_steps=6)
        torch.manual_seed(workers)  # the global RNG differs between the two passes; the pixels may not
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        batches[workers] = [b["image"] for b in loader]
    assert len(batches[0]) == 6
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a, b)
    i, seed = split_key((3, 99))
    assert (i, seed) == (3, 99) and not torch.equal(ds[(3, 99)]["image"], ds[3]["image"])  # a pair augments


def test_a_dataset_for_integer_keys_gets_the_contract_in_the_error():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return [1, 2, 3, 4][i]

    with pytest.raises(TypeError, match=r"Plain\[\(0, 0\)\] raised TypeError.*\(position, draw_seed\) keys"):
        check_training_keys(Plain())


def test_sigterm_then_resume_in_a_fresh_trainer_is_bit_identical_with_augmentation_and_mixup(images, tmp_path):
    cfg = TrainConfig(batch_size=8, steps=7, lr=0.05, warmup_steps=2, log_every=1, mixup_alpha=0.4, seed=11)
    ds = _train_set(images)
    test = TableDataset(images[0], IMAGE_LABELS, IMG, train=False, cache_dir=images[1])

    reference = Trainer(vit(), cfg, NONE)
    reference.fit(ds)
    want_params, want_pred = reference.full_state_dict(), reference.predict(test)

    victim = Trainer(vit(), cfg, NONE, output_dir=tmp_path / "run", tracker=SigtermAt(3), num_workers=2)
    with pytest.raises(Preempted) as stop:
        victim.fit(ds)
    assert stop.value.checkpoint.name == "step_00000003"

    resumed = Trainer(vit(seed=9), cfg, NONE, output_dir=tmp_path / "run")  # another init: all from the file
    assert resumed.fit(ds)["resumed_from"] == 3
    params, pred = resumed.full_state_dict(), resumed.predict(test)
    assert all(torch.equal(params[k], want_params[k]) for k in want_params)
    assert (pred["logits"] == want_pred["logits"]).all()


def test_train_deterministic_sets_the_kernels_for_the_trainers_life_and_restores_them(monkeypatch):
    """train.deterministic (default off): deterministic algorithms, cuDNN autotuning off, a fixed cuBLAS workspace,
    set before the Trainer does any device work and undone by close(). That two fresh processes then fit a cell
    bit for bit is tested in tests/test_resume.py (the resume cells run with it)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert TrainConfig().deterministic is False
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    trainer = Trainer(vit(), TrainConfig(batch_size=8, steps=1, deterministic=True), NONE)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    trainer.close()
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_validation_every_few_steps_changes_no_parameter(images):
    """``train.eval_every`` is not part of a run id: a validation pass between steps draws no random number that
    training would see (every loader owns its generator; the global RNGs are re-seeded at each step)."""
    ds, val = _train_set(images), TableDataset(images[0], IMAGE_LABELS, IMG, train=False, cache_dir=images[1])
    runs = []
    for every in (0, 2):
        cfg = TrainConfig(batch_size=8, steps=5, lr=0.05, warmup_steps=1, mixup_alpha=0.4, seed=3, eval_every=every)
        trainer = Trainer(vit(drop_path_rate=0.2, drop_rate=0.1), cfg, NONE)  # dropout draws from the global RNG
        trainer.fit(ds, val_dataset=val)
        runs.append(trainer.full_state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])

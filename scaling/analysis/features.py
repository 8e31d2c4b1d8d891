"""Spatially pooled per-block features of a model, also a sharded one, gathered on the main process.

Forward hooks on the backbone family's block modules (:mod:`scaling.models.families`: ``PreActBottleneck`` for
BiT, ``Block`` for ViT, the Hugging Face layer class for ``hf:`` backbones) record each block's output, pooled
over space (mean over ``H x W`` for feature maps, mean over tokens for ViT sequences), plus ``pre_logits``, the
pooled input of the classifier (what a linear probe sees). Block names are module names relative to the timm
model (``stages.1.blocks.0``, ``blocks.3``), listed in forward order (module registration order, which is the
order timm's ResNetV2, ViT and ConvNeXt and Hugging Face encoders run their blocks in).

A sharded model needs every rank in every forward (FSDP2 all-gathers each block's parameters; ZeRO-3 likewise),
so with a :class:`~scaling.engine.Trainer` the forward pass *is* ``Trainer.predict``: every rank runs its
:class:`~scaling.engine.distributed.ShardedEvalSampler` slice with the hooks attached, the per-rank features are
gathered in rank order, and the padding duplicates are dropped by dataset position exactly as ``predict`` drops
them. ``index`` in the results is the example's position in the dataset, which is the ``index`` every
:class:`~scaling.data.dataset.TableDataset` item carries, so results align with ``Trainer.predict``'s.

Large sets are processed in chunks (:func:`iter_block_features`), so a 100k-image feature set never needs to be
held at once: :func:`scaling.analysis.cka.cka_table` consumes the chunks as they come.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from einops import reduce
from torch import nn
from torch.utils.data import DataLoader, Dataset

from scaling.engine.distributed import ShardedEvalSampler
from scaling.engine.inputs import Normalisation, to_device
from scaling.models.families import family_spec, input_channels, timm_model

PRE_LOGITS = "pre_logits"
"""Name of the pooled classifier input among the recorded layers."""


def pool(output) -> torch.Tensor:
    """``[B, D]`` float32 from a block output: mean over space (``B C H W``) or tokens (``B N D``).

    Hugging Face layers may return tuples (hidden states first); the first element is used.
    """
    if isinstance(output, (tuple, list)):
        output = output[0]
    x = output.detach().float()
    if x.ndim == 4:
        return reduce(x, "b c h w -> b c", "mean")
    if x.ndim == 3:
        return reduce(x, "b n d -> b d", "mean")
    if x.ndim == 2:
        return x
    raise ValueError(f"cannot pool a block output of shape {tuple(x.shape)}; expected [B,C,H,W], [B,N,D] or [B,D]")


def _module_of(runner) -> nn.Module:
    """The plain module inside a Trainer (FSDP2 module, DeepSpeed ``engine.module``, DDP-unwrapped) or a module."""
    return runner.module if hasattr(runner, "accelerator") else runner


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The family's block modules of ``model`` by name (relative to the timm model), in forward order."""
    inner = timm_model(model)
    classes = family_spec(model).block_classes
    return {name: m for name, m in inner.named_modules() if m is not inner and isinstance(m, classes)}


def layer_names(model) -> list[str]:
    """Every layer :func:`iter_block_features` can record for ``model`` (a module or Trainer): blocks, then
    ``pre_logits``."""
    return [*block_modules(_module_of(model)), PRE_LOGITS]


@contextlib.contextmanager
def _capture(model: nn.Module, layers: Sequence[str]):
    """Record pooled outputs of ``layers`` (block names or ``pre_logits``) into lists while the context is open."""
    blocks = block_modules(model)
    unknown = [n for n in layers if n != PRE_LOGITS and n not in blocks]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; this model has {[*blocks, PRE_LOGITS]}")
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = []
    for name in layers:
        if name == PRE_LOGITS:
            # The classifier's input is the pooled, normalised pre-logit feature (timm forward_head(pre_logits=True));
            # a pre-hook reads it without calling forward_features, which a sharded model must not do.
            head = timm_model(model).get_classifier()
            handles.append(head.register_forward_pre_hook(
                lambda m, args, name=name: store[name].append(pool(args[0]).flatten(1))))
        else:
            handles.append(blocks[name].register_forward_hook(
                lambda m, args, out, name=name: store[name].append(pool(out))))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class _Positions(Dataset):
    """Items ``lo..hi-1`` of a dataset with ``index`` replaced by their position in it (the de-duplication key)."""

    def __init__(self, dataset: Dataset, lo: int, hi: int):
        self.dataset, self.lo, self.hi = dataset, lo, hi
        # Integer images are normalised on the device with the dataset's statistics (scaling.engine.inputs).
        self.mean, self.std = getattr(dataset, "mean", None), getattr(dataset, "std", None)

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> dict:
        return dict(self.dataset[self.lo + i], index=self.lo + i)


def _run_trainer(trainer, chunk: _Positions, layers: Sequence[str], batch_size: int) -> dict | None:
    """Features of one chunk through ``Trainer.predict`` on every rank, gathered and de-duplicated on the main one."""
    with _capture(trainer.module, layers) as store:
        out = trainer.predict(chunk, batch_size=batch_size)
    local = [torch.cat(store[n]) for n in layers]
    widths = [t.shape[1] for t in local]
    n, world = len(chunk), trainer.world_size
    if world > 1:
        # One collective for all layers: every rank holds the same number of rows (ShardedEvalSampler pads).
        gathered = trainer.accelerator.gather(torch.cat(local, 1).to(trainer.device)).cpu()
        local = list(torch.split(gathered, widths, dim=1))
    if not trainer.is_main:
        return None
    positions = np.concatenate([ShardedEvalSampler(n, batch_size, world, r).positions for r in range(world)])
    uniq, first = np.unique(positions, return_index=True)
    keep = torch.from_numpy(first)
    index = chunk.lo + uniq
    if not np.array_equal(index, out["index"]):
        raise RuntimeError("recorded features and Trainer.predict disagree on the examples; was a layer hooked twice?")
    return {"index": index, "features": {name: t[keep] for name, t in zip(layers, local)},
            "logits": out["logits"], "target": out["target"]}


@torch.no_grad()
def _run_module(model: nn.Module, chunk: _Positions, layers: Sequence[str], batch_size: int,
                num_workers: int) -> dict:
    """Features of one chunk through a plain (unsharded) module in this process, in eval mode (no dropout, stored
    norm statistics); the module is left in the mode it came in."""
    device = next(model.parameters(), torch.empty(0)).device
    training = model.training
    model.eval()
    logits, targets = [], []
    loader = DataLoader(chunk, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    norm = Normalisation.of(chunk)
    channels = input_channels(model)
    try:
        with _capture(model, layers) as store:
            for b in loader:
                logits.append(model(to_device(b["image"], device, norm, channels=channels)).float().cpu())
                targets.append(b["target"])
    finally:
        model.train(training)
    if not logits:
        raise ValueError("the dataset is empty")
    return {"index": np.arange(chunk.lo, chunk.hi), "features": {n: torch.cat(store[n]) for n in layers},
            "logits": torch.cat(logits).numpy(), "target": torch.cat(targets).numpy()}


def iter_block_features(runner, dataset: Dataset, *, layers: Sequence[str] | None = None, chunk_size: int = 4096,
                        batch_size: int = 64, num_workers: int = 0) -> Iterator[dict | None]:
    """Yield pooled per-layer features of ``dataset`` chunk by chunk, in dataset order.

    ``runner`` is a :class:`~scaling.engine.Trainer` (any strategy, any world size: every rank must iterate the
    generator in step, and non-main ranks receive None) or a plain ``nn.Module`` (this process only).
    ``layers`` defaults to :func:`layer_names` (every block, then ``pre_logits``). Each chunk is
    ``{"index": [m] dataset positions, "features": {layer: FloatTensor[m, d]}, "logits": [m, L], "target": [m, ...]}``.
    """
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size={chunk_size} and batch_size={batch_size} must be >= 1")
    names = list(layers) if layers is not None else layer_names(runner)
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    for lo in range(0, n, chunk_size):
        chunk = _Positions(dataset, lo, min(n, lo + chunk_size))
        if hasattr(runner, "accelerator"):
            yield _run_trainer(runner, chunk, names, batch_size)
        else:
            yield _run_module(runner, chunk, names, batch_size, num_workers)


def block_features(runner, dataset: Dataset, *, layers: Sequence[str] | None = None, batch_size: int = 64,
                   num_workers: int = 0) -> dict | None:
    """All of :func:`iter_block_features` in one dict (main process; None elsewhere). For sets that fit in memory."""
    chunks = list(iter_block_features(runner, dataset, layers=layers, chunk_size=len(dataset) or 1,
                                      batch_size=batch_size, num_workers=num_workers))
    return chunks[0]

"""Linear CKA between representations, accumulated over minibatches (Nguyen, Raghu & Kornblith 2021).

Centered kernel alignment (Kornblith et al. 2019, arXiv 1905.00414) compares two representations ``X [n, p]`` and
``Y [n, q]`` of the same ``n`` examples: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the linear kernels
``K = X Xᵀ``, ``L = Y Yᵀ``. It is 1 for identical representations and invariant to orthogonal transforms and
isotropic scaling of either, so it says whether two networks (or a network before and after fine-tuning) compute
the same features, block by block.

A full ``n x n`` Gram matrix does not fit for ``n = 100k``. Nguyen, Raghu & Kornblith 2021 ("Do Wide and Deep
Networks Learn the Same Things?", arXiv 2010.15327, Eq. 3) average HSIC over minibatches instead::

    CKA_minibatch = mean_i HSIC_1(K_i, L_i) / sqrt(mean_i HSIC_1(K_i, K_i) · mean_i HSIC_1(L_i, L_i))

where ``HSIC_1`` is the *unbiased* estimator of Song et al. 2012 (JMLR 13, "Feature Selection via Dependence
Maximization", Eq. 5), so the average over batches estimates the same population quantity whatever the batch size
(the biased estimator would depend on it). For ``m`` examples with ``K~``, ``L~`` the Gram matrices with their
diagonals set to zero::

    HSIC_1(K, L) = [tr(K~ L~) + 1ᵀK~1 · 1ᵀL~1 / ((m-1)(m-2)) - 2/(m-2) · 1ᵀK~L~1] / (m(m-3))

It needs ``m >= 4``; smaller batches are skipped (and counted). Memory is one ``m x m`` Gram matrix per layer.

Public API: :func:`hsic_unbiased`, :func:`linear_cka` (one full batch), :class:`MinibatchCKA` (accumulate every
pair of layers of two models batch by batch, from features or from Gram matrices), :func:`cka_table` (run two
feature streams of :mod:`scaling.analysis.features` through it and return a tidy table), :func:`gram_batches` and
:func:`cka_from_grams` (store one model's minibatch Gram matrices, compare two stored models later).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

MIN_BATCH = 4
"""Fewest examples the unbiased HSIC estimator is defined for (it divides by m(m-3))."""


def _grams(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linear Gram matrices ``[layers, m, m]`` in float64 (diagonals included; HSIC zeroes them)."""
    flat = [f.reshape(f.shape[0], -1).to(torch.float64) for f in features]
    return torch.stack([x @ x.T for x in flat])


def _hsic_pairs(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC for every pair of Gram stacks ``k [A, m, m]`` x ``l [B, m, m]`` → ``[A, B]``."""
    m = k.shape[-1]
    trace = torch.einsum("aij,bij->ab", k, l)  # tr(K~ L~) for symmetric matrices
    k_sum, l_sum = k.sum((1, 2)), l.sum((1, 2))
    # 1ᵀ K~ L~ 1 = (K~ 1) · (L~ 1): the column sums' dot product.
    cross = torch.einsum("ai,bi->ab", k.sum(1), l.sum(1))
    value = trace + torch.outer(k_sum, l_sum) / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * cross
    return value / (m * (m - 3))


def _hsic_self(k: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of each Gram matrix of ``k [A, m, m]`` with itself → ``[A]`` (the diagonal of the pairs)."""
    m = k.shape[-1]
    trace = (k * k).sum((1, 2))
    total = k.sum((1, 2))
    cross = (k.sum(1) ** 2).sum(1)
    return (trace + total**2 / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * cross) / (m * (m - 3))


def hsic_unbiased(k: torch.Tensor | np.ndarray, l: torch.Tensor | np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012) of two ``m x m`` kernel matrices (``m >= 4``); diagonals are ignored."""
    k, l = (torch.as_tensor(a, dtype=torch.float64).clone() for a in (k, l))
    if k.shape != l.shape or k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"kernel matrices must be square and of equal shape; got {tuple(k.shape)}, {tuple(l.shape)}")
    if k.shape[0] < MIN_BATCH:
        raise ValueError(f"unbiased HSIC needs at least {MIN_BATCH} examples; got {k.shape[0]}")
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    return float(_hsic_pairs(k[None], l[None])[0, 0])


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of ``x [n, ...]`` and ``y [n, ...]`` from one batch of all ``n`` examples (unbiased HSIC)."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must describe the same examples; got {x.shape[0]} and {y.shape[0]} rows")
    acc = MinibatchCKA(["x"], ["y"])
    acc.update({"x": x}, {"y": y})
    return float(acc.compute()[0, 0])


class MinibatchCKA:
    """Accumulates minibatch linear CKA (Nguyen et al. 2021, Eq. 3) between every layer of A and every layer of B.

    Call :meth:`update` once per minibatch with the features of the *same* examples from both sides; each batch's
    Gram matrices are reduced to per-pair HSIC sums and dropped, so memory does not grow with the number of
    examples. ``names_b=None`` compares A with itself (the diagonal of the result is then 1).
    """

    def __init__(self, names_a: Sequence[str], names_b: Sequence[str] | None = None):
        self.names_a = list(names_a)
        self.names_b = list(names_b) if names_b is not None else None
        if not self.names_a or (self.names_b is not None and not self.names_b):
            raise ValueError("MinibatchCKA needs at least one layer name on each side")
        n_b = len(self.names_b) if self.names_b is not None else len(self.names_a)
        self.cross = torch.zeros(len(self.names_a), n_b, dtype=torch.float64)
        self.self_a = torch.zeros(len(self.names_a), dtype=torch.float64)
        self.self_b = torch.zeros(n_b, dtype=torch.float64)
        self.n_batches = 0
        self.n_examples = 0
        self.skipped_examples = 0

    def _stack(self, features: Mapping[str, torch.Tensor], names: list[str], side: str) -> list[torch.Tensor]:
        missing = [n for n in names if n not in features]
        if missing:
            raise KeyError(f"features of side {side} lack layer(s) {missing}; got {sorted(features)}")
        return [torch.as_tensor(features[n]) for n in names]

    def update(self, features_a: Mapping[str, torch.Tensor],
               features_b: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one minibatch: ``{layer: [m, ...]}`` for side A (and B), rows being the same ``m`` examples."""
        xa = self._stack(features_a, self.names_a, "A")
        if self.names_b is None:
            if features_b is not None:
                raise ValueError("this MinibatchCKA compares A with itself; pass only features_a")
            xb = xa
        else:
            if features_b is None:
                raise ValueError("pass the features of side B as well")
            xb = self._stack(features_b, self.names_b, "B")
        sizes = {t.shape[0] for t in xa + xb}
        if len(sizes) != 1:
            raise ValueError(f"every layer must hold the same examples; got batch sizes {sorted(sizes)}")
        m = sizes.pop()
        if m < MIN_BATCH:
            self.skipped_examples += m
            return
        self.update_grams(_grams(xa), None if self.names_b is None else _grams(xb))

    def update_grams(self, grams_a: torch.Tensor, grams_b: torch.Tensor | None = None) -> None:
        """Add one minibatch given as linear Gram matrices ``[layers, m, m]`` of side A (and B) in layer order.

        The Gram matrices of a minibatch are all CKA needs, so a model's can be stored (:func:`gram_batches`) and
        compared later with another model's on the same examples, without running either model again.
        """
        ka = torch.as_tensor(grams_a, dtype=torch.float64).clone()
        kb = ka if grams_b is None else torch.as_tensor(grams_b, dtype=torch.float64).clone()
        if grams_b is not None and self.names_b is None:
            raise ValueError("this MinibatchCKA compares A with itself; pass only grams_a")
        n_b = len(self.names_b) if self.names_b is not None else len(self.names_a)
        if ka.shape[0] != len(self.names_a) or kb.shape[0] != n_b or ka.shape[1:] != kb.shape[1:]:
            raise ValueError(f"Gram stacks {tuple(ka.shape)} and {tuple(kb.shape)} do not match "
                             f"{len(self.names_a)} and {n_b} layers of one minibatch")
        m = ka.shape[-1]
        if m < MIN_BATCH:
            self.skipped_examples += m
            return
        ka.diagonal(dim1=1, dim2=2).zero_()
        if kb is not ka:
            kb.diagonal(dim1=1, dim2=2).zero_()
        self.cross += _hsic_pairs(ka, kb)
        self.self_a += _hsic_self(ka)
        self.self_b += _hsic_self(kb)
        self.n_batches += 1
        self.n_examples += m

    def compute(self) -> np.ndarray:
        """CKA matrix ``[len(names_a), len(names_b)]`` over the batches seen so far (NaN where a side is constant)."""
        if self.n_batches == 0:
            raise ValueError(f"no minibatch of at least {MIN_BATCH} examples was added "
                             f"({self.skipped_examples} examples in smaller batches)")
        denom = torch.sqrt(torch.outer(self.self_a, self.self_b).clamp_min(0))
        out = self.cross / denom
        out[denom == 0] = float("nan")
        return out.numpy()

    def table(self) -> pd.DataFrame:
        """Tidy result: one row per layer pair with ``layer_a, layer_b, index_a, index_b, cka, n_examples, n_batches``."""
        values = self.compute()
        names_b = self.names_b if self.names_b is not None else self.names_a
        rows = [
            {"layer_a": a, "layer_b": b, "index_a": i, "index_b": j, "cka": float(values[i, j]),
             "n_examples": self.n_examples, "n_batches": self.n_batches}
            for i, a in enumerate(self.names_a) for j, b in enumerate(names_b)
        ]
        return pd.DataFrame(rows)


def cka_table(stream_a: Iterable[Mapping[str, torch.Tensor] | None],
              stream_b: Iterable[Mapping[str, torch.Tensor] | None] | None = None, *,
              layers_a: Sequence[str] | None = None, layers_b: Sequence[str] | None = None,
              batch_size: int = 256) -> pd.DataFrame | None:
    """Minibatch CKA between two feature streams of the same examples, as a tidy table (main process).

    Each stream yields ``{"index": [m], "features": {layer: [m, d]}}`` chunks in the same order (as
    :func:`scaling.analysis.features.iter_block_features` does for two models over one dataset) or None on
    non-main processes, which must iterate too (the models are run on every rank). Chunks are cut into minibatches
    of ``batch_size`` consecutive examples, so the examples must come in a random order: the mean over minibatches
    estimates the CKA of the whole set only when each minibatch is a random draw of it. ``stream_b=None`` compares
    stream A's layers with each other. Layers default to every layer of the first chunk, in its order. Returns None
    on non-main processes.
    """
    acc: MinibatchCKA | None = None
    chunks_b = iter(stream_b) if stream_b is not None else None
    for chunk_a in stream_a:
        chunk_b = next(chunks_b) if chunks_b is not None else None
        if chunk_a is None:
            continue
        if chunk_b is not None and not np.array_equal(np.asarray(chunk_a["index"]), np.asarray(chunk_b["index"])):
            raise ValueError("the two feature streams do not hold the same examples in the same order")
        if acc is None:
            names_a = list(layers_a or chunk_a["features"])
            names_b = None if chunk_b is None else list(layers_b or chunk_b["features"])
            acc = MinibatchCKA(names_a, names_b)
        n = len(chunk_a["index"])
        for lo in range(0, n, batch_size):
            fa = {k: chunk_a["features"][k][lo:lo + batch_size] for k in acc.names_a}
            fb = None if chunk_b is None else {k: chunk_b["features"][k][lo:lo + batch_size] for k in acc.names_b}
            acc.update(fa, fb)
    if acc is None:
        return None
    return acc.table()


def gram_batches(features: Mapping[str, torch.Tensor], names: Sequence[str] | None = None,
                 batch_size: int = 256) -> list[torch.Tensor]:
    """The linear Gram matrices ``[layers, m, m]`` of each minibatch of ``batch_size`` consecutive examples of
    ``{layer: [n, d]}`` (layers in ``names`` order, default the mapping's), in float64: what :meth:`MinibatchCKA.
    update_grams` takes, and what a run stores so that it can be compared later with another model on the same
    examples."""
    names = list(names or features)
    n = {features[k].shape[0] for k in names}
    if len(n) != 1:
        raise ValueError(f"every layer must hold the same examples; got {sorted(n)} rows")
    total = n.pop()
    return [_grams([features[k][lo:lo + batch_size] for k in names]) for lo in range(0, total, batch_size)]


def cka_from_grams(batches_a: Sequence[torch.Tensor], names_a: Sequence[str],
                   batches_b: Sequence[torch.Tensor] | None = None,
                   names_b: Sequence[str] | None = None) -> pd.DataFrame:
    """The :meth:`MinibatchCKA.table` of two models from their per-minibatch Gram stacks (:func:`gram_batches` of
    the same examples in the same minibatches); ``batches_b=None`` compares A's layers with each other."""
    if batches_b is not None and len(batches_a) != len(batches_b):
        raise ValueError(f"{len(batches_a)} and {len(batches_b)} minibatches: not the same examples")
    acc = MinibatchCKA(names_a, None if batches_b is None else names_b)
    for i, ka in enumerate(batches_a):
        acc.update_grams(ka, None if batches_b is None else batches_b[i])
    return acc.table()


def block_cka(runner_a, dataset, runner_b=None, *, layers_a: Sequence[str] | None = None,
              layers_b: Sequence[str] | None = None, chunk_size: int = 4096, batch_size: int = 64,
              cka_batch_size: int = 256) -> pd.DataFrame | None:
    """Block-by-block minibatch CKA of two models on ``dataset`` (e.g. pretrained vs fine-tuned, or two scales).

    ``runner_a`` / ``runner_b`` are Trainers (sharded or not; call on every rank) or plain modules; ``runner_b=None``
    compares A's blocks with each other. Minibatches are consecutive examples of ``dataset``: shuffle its rows
    first (a set sorted by label or site fills a minibatch with one kind of image). Features come chunk by chunk from
    :func:`scaling.analysis.features.iter_block_features` (every block and ``pre_logits`` by default), so only
    ``chunk_size`` examples' features are held at a time. Returns the :meth:`MinibatchCKA.table` on the main
    process, None elsewhere.
    """
    from scaling.analysis.features import iter_block_features

    kw = dict(chunk_size=chunk_size, batch_size=batch_size)
    stream_a = iter_block_features(runner_a, dataset, layers=layers_a, **kw)
    stream_b = None if runner_b is None else iter_block_features(runner_b, dataset, layers=layers_b, **kw)
    return cka_table(stream_a, stream_b, batch_size=cka_batch_size)

"""Linear probe: logistic regression per label on frozen, pooled pre-logit features.

The probe separates "the pretrained features already contain the answer" from "fine-tuning found it": if a linear
read-out of the frozen backbone matches fine-tuning, the gain came from reused features (Kornblith, Shlens & Le
2019, "Do Better ImageNet Models Transfer Better?", arXiv 1805.08974, §3: L-BFGS logistic regression on
penultimate-layer features with the L2 penalty chosen on held-out data; Kolesnikov et al. 2020 BiT §4.4 use the
same read-out for their few-shot linear evaluation).

Steps: (1) the backbone's ``pre_logits`` (:mod:`scaling.analysis.features`; sharded models run on every rank) are
extracted once per evaluation set and cached as safetensors in the run directory; (2) features are standardised
with the training set's mean and standard deviation (the L2 penalty then weighs every feature alike, and L-BFGS
converges in far fewer iterations); (3) for each label, scikit-learn's ``LogisticRegression`` is fitted on the
*labelled* training rows only (NaN = unlabelled, as in the masked fine-tuning loss) for every ``C`` of the grid and
the ``C`` with the best validation AUROC (or log loss) is kept, ties going to the stronger penalty; (4) logits for
every evaluation set come back as ``{"index", "logits", "target"}``, the shape ``Trainer.predict`` returns, so the
metrics machinery applies unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scaling.config import ProbeConfig
from scaling.engine.ranks import broadcast
from scaling.io import UnreadableFile, atomic_write, read_safetensors
from scaling.metrics.discrimination import auroc

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Features, extracted once and cached
# --------------------------------------------------------------------------------------------------------------


def _cache_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}.safetensors"


def _read_cache(path: Path, n: int, key: str) -> dict | None:
    """The cached features at ``path`` if they are for ``n`` examples and ``key``; None (logged) otherwise. A
    damaged file is only a lost cache: warned about and extracted again (then overwritten)."""
    if not path.is_file():
        return None
    try:
        _, meta = read_safetensors(path, tensors=False)
        if meta.get("n") != str(n) or meta.get("key") != key:
            log.info("%s was extracted for %s examples and key %r, not %d and %r: extracting again", path,
                     meta.get("n"), meta.get("key"), n, key)
            return None
        t, _ = read_safetensors(path)
        return {"index": t["index"].numpy(), "features": t["features"], "target": t["target"].numpy()}
    except (UnreadableFile, KeyError) as e:
        cause = e.__cause__ if isinstance(e, UnreadableFile) else e
        log.warning("feature cache %s is damaged (%s: %s): extracting the features again", path,
                    type(cause).__name__, cause)
        return None


def _agree(runner, value: bool) -> bool:
    """The main process's ``value`` on every rank of ``runner`` (a Trainer); the value itself for a module."""
    return bool(broadcast(value)) if getattr(runner, "world_size", 1) > 1 else value


def extract_features(runner, datasets: Mapping[str, object], cache_dir: str | Path | None = None, *,
                     key: str | Mapping[str, str] = "", batch_size: int = 64) -> dict[str, dict] | None:
    """Pooled pre-logit features of each named dataset, read from / written to ``cache_dir/<name>.safetensors``.

    ``runner`` is a Trainer (call on every rank) or a plain module. A cached file is reused when it holds the same
    number of examples and the same ``key`` (e.g. the weight source; a different key re-extracts and overwrites);
    ``key`` may also map each dataset name to its own key. Returns ``{name: {"index": [N], "features":
    FloatTensor[N, D], "target": [N, L]}}`` on the main process, None elsewhere.
    """
    from safetensors.torch import save_file

    from scaling.analysis.features import PRE_LOGITS, block_features

    is_main = getattr(runner, "is_main", True)
    cache = Path(cache_dir) if cache_dir is not None else None
    out: dict[str, dict] = {}
    for name, dataset in datasets.items():
        set_key = key if isinstance(key, str) else key[name]
        path = _cache_path(cache, name) if cache is not None else None
        # The main process decides for every rank, so all of them join the sharded forward or none does (another
        # launch sharing the cache may write the file between two ranks' looks at it).
        cached = _read_cache(path, len(dataset), set_key) if path is not None and is_main else None
        if _agree(runner, cached is not None):
            if is_main:
                out[name] = cached
            continue
        got = block_features(runner, dataset, layers=[PRE_LOGITS], batch_size=batch_size)
        if is_main:
            out[name] = {"index": got["index"], "features": got["features"][PRE_LOGITS], "target": got["target"]}
            if path is not None:
                tensors = {"index": torch.as_tensor(got["index"]).long(), "features": out[name]["features"],
                           "target": torch.as_tensor(got["target"])}
                meta = {"n": str(len(dataset)), "key": set_key, "layer": PRE_LOGITS}
                atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p),
                                                       metadata=meta))
    return out if is_main else None


def subset(features: Mapping, positions) -> dict:
    """The rows ``positions`` of one set's features (as :func:`extract_features` returns them), re-indexed 0..n-1:
    a fraction or k-shot training subset taken from the features of the whole training set."""
    pos = np.asarray(positions, dtype=np.int64)
    return {"index": np.arange(len(pos)), "features": features["features"][torch.from_numpy(pos)],
            "target": np.asarray(features["target"])[pos]}


# --------------------------------------------------------------------------------------------------------------
# The probe itself: arrays in, arrays out
# --------------------------------------------------------------------------------------------------------------


def _log_loss(y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of logits ``z`` for labels ``y`` (stable for large |z|)."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: per-label weights on (standardised) features and the validation search behind each."""

    labels: tuple[str, ...]
    """Label names, in target column order."""
    mean: np.ndarray
    """Feature mean subtracted before the weights apply (zeros without standardisation)."""
    scale: np.ndarray
    """Feature standard deviation divided out (ones without standardisation)."""
    coef: np.ndarray
    """Weights ``[L, D]`` on standardised features."""
    intercept: np.ndarray
    """Biases ``[L]``."""
    search: pd.DataFrame
    """One row per label x C: ``label, C, val_auroc, val_log_loss, selected``."""

    def logits(self, features) -> np.ndarray:
        """Logits ``[N, L]`` of raw (unstandardised) features ``[N, D]``."""
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return x @ self.coef.T + self.intercept

    def chosen(self) -> pd.DataFrame:
        """The selected row of :attr:`search` per label."""
        return self.search[self.search["selected"]].reset_index(drop=True)

    def save(self, path: str | Path) -> None:
        """Write the probe as one safetensors file (weights as tensors, labels and the C search as metadata)."""
        from safetensors.torch import save_file

        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k), dtype=np.float64))
                   for k in ("mean", "scale", "coef", "intercept")}
        meta = {"labels": json.dumps(list(self.labels)), "search": self.search.to_json(orient="records")}
        atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        """Read a probe written by :meth:`save` (tensors and JSON only: nothing in the file is executed); a damaged
        file, or one that is not a probe, is an :class:`~scaling.io.UnreadableFile` naming it."""
        tensors, meta = read_safetensors(path)
        try:
            t = {k: v.numpy() for k, v in tensors.items()}
            search = pd.DataFrame(json.loads(meta.get("search", "[]")))
            return cls(tuple(json.loads(meta["labels"])), t["mean"], t["scale"], t["coef"], t["intercept"], search)
        except (KeyError, ValueError, TypeError) as e:
            raise UnreadableFile(f"{path}: not a linear probe ({type(e).__name__}: {e})") from e


def fit_probe(train_x, train_y, val_x, val_y, labels: Sequence[str] | None = None,
              cfg: ProbeConfig | None = None) -> LinearProbe:
    """Fit one L2 logistic regression per label, ``C`` chosen on validation, on labelled rows only.

    ``*_x`` are features ``[N, D]``, ``*_y`` multi-label targets ``[N, L]`` with NaN = unlabelled. Raises
    ValueError naming the label when its training rows hold one class only or it has no labelled validation row.
    When the validation rows of a label hold one class, AUROC is undefined and that label is selected by log
    loss (logged).
    """
    from sklearn.linear_model import LogisticRegression

    cfg = cfg or ProbeConfig()
    tx, ty = np.asarray(train_x, dtype=np.float64), np.asarray(train_y, dtype=np.float64)
    vx, vy = np.asarray(val_x, dtype=np.float64), np.asarray(val_y, dtype=np.float64)
    if ty.ndim != 2 or vy.ndim != 2:
        raise ValueError(f"targets must be [N, L] multi-label arrays; got {ty.shape} and {vy.shape} "
                         "(the probe does not handle single-label class indices)")
    if tx.shape[0] != ty.shape[0] or vx.shape[0] != vy.shape[0]:
        raise ValueError(f"features and targets disagree on the number of rows: train {tx.shape[0]} vs "
                         f"{ty.shape[0]}, val {vx.shape[0]} vs {vy.shape[0]}")
    labels = tuple(labels) if labels is not None else tuple(f"label_{j}" for j in range(ty.shape[1]))
    if len(labels) != ty.shape[1]:
        raise ValueError(f"{len(labels)} label names for {ty.shape[1]} target columns")
    if cfg.standardize:
        mean, scale = tx.mean(0), tx.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)  # constant features stay constant (zero) instead of NaN
    else:
        mean, scale = np.zeros(tx.shape[1]), np.ones(tx.shape[1])
    tz, vz = (tx - mean) / scale, (vx - mean) / scale
    coef, intercept, rows = [], [], []
    for j, label in enumerate(labels):
        tm, vm = ~np.isnan(ty[:, j]), ~np.isnan(vy[:, j])
        y_t, y_v = ty[tm, j], vy[vm, j]
        n_pos = int(y_t.sum())
        if n_pos == 0 or n_pos == len(y_t):
            raise ValueError(f"label {label!r}: the labelled training rows hold one class only "
                             f"({n_pos} positive of {len(y_t)}); a probe needs both")
        if not vm.any():
            raise ValueError(f"label {label!r} has no labelled validation row to choose C on")
        one_class_val = y_v.min() == y_v.max()
        criterion = "log_loss" if one_class_val else cfg.select
        if one_class_val and cfg.select == "auroc":
            log.info("label %r: validation rows hold one class; C chosen by log loss", label)
        best, best_score, fits = None, -math.inf, []
        for c in sorted(cfg.cs):  # ascending C: a tie keeps the stronger penalty
            clf = LogisticRegression(C=c, max_iter=cfg.max_iter)
            clf.fit(tz[tm], y_t)
            z = clf.decision_function(vz[vm])
            val_auc = float("nan") if one_class_val else auroc(y_v, z)
            val_ll = _log_loss(y_v, z)
            score = val_auc if criterion == "auroc" else -val_ll
            fits.append({"label": label, "C": c, "val_auroc": val_auc, "val_log_loss": val_ll})
            if score > best_score:
                best, best_score = clf, score
        coef.append(best.coef_[0])
        intercept.append(best.intercept_[0])
        rows += [dict(f, selected=f["C"] == best.C, criterion=criterion, n_train=int(tm.sum()), n_train_pos=n_pos)
                 for f in fits]
    return LinearProbe(labels, mean, scale, np.stack(coef), np.asarray(intercept), pd.DataFrame(rows))


def probe_predictions(probe: LinearProbe, sets: Mapping[str, Mapping]) -> dict[str, dict[str, np.ndarray]]:
    """``{name: {"index", "logits", "target"}}`` for feature sets shaped like :func:`extract_features`' output."""
    out = {}
    for name, s in sets.items():
        feats = s["features"].numpy() if torch.is_tensor(s["features"]) else np.asarray(s["features"])
        out[name] = {"index": np.asarray(s["index"]), "logits": probe.logits(feats).astype(np.float32),
                     "target": np.asarray(s["target"])}
    return out


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`linear_probe` returns on the main process."""

    predictions: dict[str, dict[str, np.ndarray]]
    """Per evaluation set (and ``val``): ``{"index", "logits", "target"}`` as ``Trainer.predict`` returns."""
    probe: LinearProbe
    """The fitted probe (weights and the C search)."""


def linear_probe(runner, train, val, eval_sets: Mapping[str, object] | None = None, *,
                 run_dir: str | Path | None = None, labels: Sequence[str] | None = None,
                 cfg: ProbeConfig | None = None, key: str | Mapping[str, str] = "",
                 train_positions=None, cache_dir: str | Path | None = None) -> ProbeResult | None:
    """Linear probe of a frozen backbone: extract (or read cached) features, fit, predict every evaluation set.

    ``runner`` is a Trainer whose model is the frozen backbone (call on every rank; nothing is trained) or a plain
    module; ``train``/``val``/``eval_sets`` are datasets yielding multi-label targets. Features are cached under
    ``cache_dir`` (default ``run_dir/probe_features/``; ``key``: see :func:`extract_features`). With
    ``train_positions`` the probe is fitted on those rows of ``train`` only (a fraction or k-shot subset of a
    training set whose features are cached once for every subset). ``labels`` default to ``train.labels``.
    Returns a :class:`ProbeResult` on the main process (predictions for ``val`` and every evaluation set), None
    elsewhere.
    """
    cfg = cfg or ProbeConfig()
    sets = {"train": train, "val": val, **dict(eval_sets or {})}
    cache = Path(cache_dir) if cache_dir is not None else Path(run_dir) / "probe_features" if run_dir else None
    feats = extract_features(runner, sets, cache, key=key, batch_size=cfg.batch_size)
    if feats is None:
        return None
    fit_on = feats["train"] if train_positions is None else subset(feats["train"], train_positions)
    names = labels if labels is not None else getattr(train, "labels", None)
    probe = fit_probe(fit_on["features"].numpy(), fit_on["target"], feats["val"]["features"].numpy(),
                      feats["val"]["target"], names, cfg)
    chosen = probe.chosen()
    log.info("linear probe: C per label %s", dict(zip(chosen["label"], chosen["C"])))
    return ProbeResult(probe_predictions(probe, {k: v for k, v in feats.items() if k != "train"}), probe)

"""Validation AUROC during training (torchmetrics) against scikit-learn, best-checkpoint selection, early stopping and
resume after a crash past the best point, in one process (2 ranks: tests/test_sharding.py, the fsdp_select cell).

The toy cell below (SGD at a constant lr of 0.3 on the tiny ViT) overshoots: its validation AUROC peaks at step 8
of 12 and its validation loss at step 2, so the selected weights are not the last ones.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from toy import ToyDataset, vit  # noqa: E402

from scaling.config import ShardingConfig, TrainConfig  # noqa: E402
from scaling.engine.checkpoint import CHECKPOINT_DIR, latest_checkpoint, read_state  # noqa: E402
from scaling.engine.schedule import lr_at  # noqa: E402
from scaling.engine.trainer import Trainer  # noqa: E402

NONE = ShardingConfig(strategy="none")
VAL, TEST = ToyDataset(23, seed=2), ToyDataset(30, seed=3)


def cell(**kw) -> TrainConfig:
    base = dict(batch_size=8, steps=12, lr=0.3, schedule="constant", warmup_steps=0, log_every=1, eval_every=2,
                select="val_auroc")
    return TrainConfig(**{**base, **kw})


def sklearn_macro_auroc(logits: np.ndarray, target: np.ndarray, multiclass: bool = False) -> float:
    """Macro AUROC over the labels with both classes among their labelled samples (one-vs-rest for classes)."""
    from scipy.special import softmax
    from sklearn.metrics import roc_auc_score

    values = []
    for c in range(logits.shape[1]):
        if multiclass:
            keep = target >= 0
            y, s = (target[keep] == c).astype(int), softmax(logits[keep], axis=1)[:, c]
        else:
            keep = ~np.isnan(target[:, c])
            y, s = target[keep, c], logits[keep, c]
        if 0 < y.sum() < len(y):
            values.append(roc_auc_score(y, s))
    return float(np.mean(values))


def masked_bce(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean BCE-with-logits over the labelled entries, by hand."""
    keep = ~np.isnan(target)
    z, y = logits[keep].astype(np.float64), target[keep]
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


class Snapshots:
    """Tracker double: at every validation point, what was logged, the weights and the test predictions."""

    run_id = "run-sel"

    def __init__(self):
        self.trainer, self.val, self.lr = None, {}, {}
        self.params, self.val_logits, self.test_logits = {}, {}, {}

    def log(self, data, step):
        if "train/lr" in data:
            self.lr[step] = data["train/lr"]
        if "val/loss" in data:
            self.val[step] = (data["val/loss"], data["val/auroc"])
            # cloned: in one process the state dict's tensors are the live parameters
            self.params[step] = {k: v.clone() for k, v in self.trainer.full_state_dict().items()}
            self.val_logits[step] = self.trainer.predict(VAL, batch_size=8)["logits"]
            self.test_logits[step] = self.trainer.predict(TEST, batch_size=8)["logits"]


def fit(run_dir, train: TrainConfig, tracker=None):
    trainer = Trainer(vit(), train, NONE, output_dir=run_dir, tracker=tracker)
    if isinstance(tracker, Snapshots):
        tracker.trainer = trainer
    try:
        summary = trainer.fit(ToyDataset(64), val_dataset=VAL)
        return summary, trainer.full_state_dict(), trainer.predict(TEST, batch_size=8)["logits"]
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """The cell selecting on validation AUROC, with a snapshot at every validation point."""
    snaps = Snapshots()
    run_dir = tmp_path_factory.mktemp("select")
    summary, params, test_logits = fit(run_dir, cell(), snaps)
    return snaps, summary, params, test_logits, run_dir


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_auroc_and_loss_equal_sklearn_at_every_point(selected):
    snaps = selected[0]
    assert sorted(snaps.val) == [2, 4, 6, 8, 10, 12]
    target = VAL.targets.numpy()
    for step, (loss, auroc) in snaps.val.items():
        assert auroc == pytest.approx(sklearn_macro_auroc(snaps.val_logits[step], target), abs=1e-6), step
        assert loss == pytest.approx(masked_bce(snaps.val_logits[step], target), rel=1e-6), step


def test_selection_keeps_the_best_validation_point_not_the_last(selected, tmp_path):
    from safetensors.torch import load_file

    snaps, summary, params, test_logits, run_dir = selected
    aurocs = {s: a for s, (_, a) in snaps.val.items()}
    best = max(aurocs, key=lambda s: (aurocs[s], -s))  # the highest; on a tie the earlier step
    assert best == 8 and best != max(aurocs)  # the cell's peak is in the middle
    assert summary["select"] == "val_auroc" and summary["best_step"] == best
    assert summary["best_value"] == aurocs[best] and summary["val_auroc"] == aurocs[best]
    assert summary["val_loss"] == snaps.val[best][0]
    assert summary["steps"] == 12 and summary["stopped_early"] is False
    # The kept weights and what they predict are the model's at the best step, not at the last one.
    assert _same(params, snaps.params[best]) and not _same(params, snaps.params[12])
    np.testing.assert_array_equal(test_logits, snaps.test_logits[best])
    # The stored final checkpoint holds them; the best-weights directories are gone once it is written.
    final = latest_checkpoint(run_dir)
    assert final.name == "final" and read_state(final)["summary"]["best_step"] == best
    assert _same(load_file(str(final / "model.safetensors")), snaps.params[best])
    assert not list((run_dir / CHECKPOINT_DIR).glob("best_*"))
    # A later fit on the finished run loads those weights and returns the stored summary, without training.
    again, again_params, again_logits = fit(run_dir, cell())
    assert again["from_final_checkpoint"] is True and again["best_step"] == best
    assert _same(again_params, params) and np.array_equal(again_logits, test_logits)


def test_selecting_on_the_loss_picks_the_lowest_loss(selected, tmp_path):
    snaps = selected[0]
    losses = {s: l for s, (l, _) in snaps.val.items()}
    best = min(losses, key=lambda s: (losses[s], s))
    summary, params, _ = fit(tmp_path, cell(select="val_loss"))
    assert best == 2 and summary["best_step"] == best and summary["best_value"] == losses[best]
    assert _same(params, snaps.params[best])


def test_early_stopping_stops_after_patience_points_without_improvement(selected, tmp_path):
    snaps = selected[0]
    losses = [snaps.val[s][0] for s in sorted(snaps.val)]
    # Independent reference: the first validation point that is the patience-th without a new minimum.
    patience, best, since, expected = 2, np.inf, 0, None
    for step, loss in zip(sorted(snaps.val), losses):
        best, since = (loss, 0) if loss < best else (best, since + 1)
        if since == patience:
            expected = step
            break
    assert expected == 6
    tracker = Snapshots()
    summary, params, _ = fit(tmp_path, cell(select="val_loss", early_stopping_patience=patience), tracker)
    assert summary["stopped_early"] is True and summary["steps"] == expected and summary["best_step"] == 2
    assert sorted(tracker.val) == [2, 4, 6] and max(tracker.lr) == expected
    # The same weights as the full run's step 2, and the full-length schedule's learning rates.
    assert _same(params, snaps.params[2])
    cfg = cell(schedule="cosine", select="val_loss", early_stopping_patience=1)
    cosine = Snapshots()
    summary = fit(tmp_path / "cosine", cfg, cosine)[0]
    assert summary["stopped_early"] and summary["steps"] < 12
    assert cosine.lr == {s: lr_at(s - 1, 12, cfg) for s in range(1, summary["steps"] + 1)}


class Crash(Exception):
    """What a lost node does to a launch: it stops, saving nothing more."""


class CrashAt:
    """Tracker double raising :class:`Crash` when training step ``at`` is logged (before it validates or
    checkpoints)."""

    run_id = "run-sel"

    def __init__(self, at: int):
        self.at = at

    def log(self, data, step):
        if step == self.at and "train/loss" in data:
            raise Crash(step)


def test_crashed_past_the_best_point_and_resumed_ends_with_the_same_weights(selected, tmp_path):
    """Checkpoints every 3 steps; the best point is step 8. Launch 1 crashes at step 9 after best_00000008 was
    written but before a checkpoint names it (resumes at 6, whose state names step 2); launch 2 crashes at step 11
    (resumes at 9, which names step 8, whose weights only launch 2 wrote); launch 3 finishes."""
    snaps, _, params, test_logits, _ = selected
    cfg = cell(checkpoint_every=3)
    ckpts = tmp_path / CHECKPOINT_DIR
    with pytest.raises(Crash):
        fit(tmp_path, cfg, CrashAt(9))
    state = read_state(latest_checkpoint(tmp_path))
    assert state["step"] == 6 and state["selection"]["best_step"] == 2
    assert sorted(p.name for p in ckpts.glob("best_*")) == ["best_00000002", "best_00000008"]
    with pytest.raises(Crash):
        fit(tmp_path, cfg, CrashAt(11))
    state = read_state(latest_checkpoint(tmp_path))
    assert state["step"] == 9 and state["selection"]["best_step"] == 8 and state["selection"]["since_best"] == 0
    assert sorted(p.name for p in ckpts.glob("best_*")) == ["best_00000008"]
    summary, resumed, resumed_logits = fit(tmp_path, cfg)
    assert summary["resumed_from"] == 9 and summary["best_step"] == 8
    assert _same(resumed, params) and np.array_equal(resumed_logits, test_logits)


def test_a_run_preempted_while_validating_validates_that_step_when_resumed(selected, tmp_path):
    """SIGTERM during step 8's validation saves step 8 unvalidated; the relaunch validates it before step 9."""
    import signal

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_trainer import SignalAt

    from scaling.engine.trainer import Preempted

    _, _, params, test_logits, _ = selected
    val = SignalAt(VAL, at=3 * len(VAL) + 3, signum=signal.SIGTERM)  # the 4th pass: step 8
    trainer = Trainer(vit(), cell(), NONE, output_dir=tmp_path)
    with pytest.raises(Preempted):
        trainer.fit(ToyDataset(64), val_dataset=val)
    trainer.close()
    state = read_state(latest_checkpoint(tmp_path))
    assert state["step"] == 8 and state["selection"]["validated"] == 6
    summary, resumed, resumed_logits = fit(tmp_path, cell())
    assert summary["resumed_from"] == 8 and summary["best_step"] == 8
    assert _same(resumed, params) and np.array_equal(resumed_logits, test_logits)


def test_a_label_with_one_class_is_left_out_of_the_macro_and_said_once(caplog):
    trainer = Trainer(vit(), cell(), NONE)
    one_class = ToyDataset(23, seed=2)
    one_class.targets[:, 2] = torch.where(torch.isnan(one_class.targets[:, 2]), float("nan"), 0.0)
    out = trainer.predict(one_class, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="scaling.engine.validation"):
        first, second = trainer.evaluate(one_class), trainer.evaluate(one_class)
    trainer.close()
    expected = sklearn_macro_auroc(out["logits"], one_class.targets.numpy())  # labels 0 and 1 only
    assert first["auroc"] == second["auroc"] == pytest.approx(expected, abs=1e-6)
    warned = [r for r in caplog.records if "left out of the macro" in r.getMessage()]
    assert len(warned) == 1 and "[2]" in warned[0].getMessage()


def test_a_one_label_task_validates_and_evaluates_like_sklearn():
    data = ToyDataset(40, seed=5)
    data.targets = data.targets[:, :1].clone()  # one label: a binary task such as malignant or not
    model = vit()
    model.reset_classifier(1)
    trainer = Trainer(model, TrainConfig(batch_size=8, steps=2, eval_every=1), NONE)
    trainer.fit(data, data)  # validates at every step and at the end
    out = trainer.predict(data, batch_size=8)
    got = trainer.evaluate(data, batch_size=8)
    trainer.close()
    assert out["logits"].shape == (40, 1) and np.isnan(out["target"]).any()
    assert got["auroc"] == pytest.approx(sklearn_macro_auroc(out["logits"], out["target"]), abs=1e-6)


def test_multiclass_validation_auroc_is_one_vs_rest_over_labelled_samples():
    data = ToyDataset(40, seed=4, multiclass=True, unlabelled=0.25)
    trainer = Trainer(vit(), TrainConfig(batch_size=8, steps=1), NONE, loss="multiclass")
    out = trainer.predict(data, batch_size=8)
    got = trainer.evaluate(data, batch_size=8)
    trainer.close()
    assert (out["target"] == -1).any()
    assert got["auroc"] == pytest.approx(sklearn_macro_auroc(out["logits"], out["target"], multiclass=True), abs=1e-6)


def test_selection_needs_a_validation_set_and_a_run_directory(tmp_path):
    trainer = Trainer(vit(), cell(), NONE)
    with pytest.raises(ValueError, match="train.select='val_auroc' needs a validation set and an output_dir"):
        trainer.fit(ToyDataset(64), val_dataset=VAL)
    trainer.close()


def test_bookkeeping_ignores_non_finite_values_and_breaks_ties_early(tmp_path, caplog):
    from scaling.engine.selection import Selection

    sel = Selection(select="val_auroc", patience=2)
    # NaN (a validation set without both classes) never wins; the last step's weights stay, said once
    assert not sel.observe(2, {"loss": 0.7, "auroc": float("nan")})
    with caplog.at_level("WARNING", logger="scaling.engine.selection"):
        assert sel.best_weights(tmp_path) is None
    assert "no validation point had a finite value" in caplog.text and not sel.stop
    assert sel.observe(4, {"loss": 0.6, "auroc": 0.70})
    assert not sel.observe(6, {"loss": 0.5, "auroc": 0.70})  # a tie goes to the earlier step
    assert not sel.observe(8, {"loss": 0.4, "auroc": float("inf")}) and sel.stop  # patience 2 spent
    assert (sel.best_step, sel.best_value, sel.validated) == (4, 0.70, 8)
    assert sel.best_weights(tmp_path).name == "best_00000004"
    lowest = Selection(select="val_loss")
    for step, loss in ((1, 0.9), (2, 0.3), (3, 0.3), (4, 0.5)):
        lowest.observe(step, {"loss": loss, "auroc": 0.5})
    assert lowest.best_step == 2 and not lowest.stop  # no patience: never stops early

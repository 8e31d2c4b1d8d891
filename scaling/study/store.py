"""The run store: the on-disk source of truth of a study.

Layout (everything written atomically: temp file + rename)::

    <output_dir>/
      study.yaml                     the study config of the latest launch (+ config_hash of its shared settings)
      upstream/<name>/               demo pretraining runs (<backbone>.safetensors, settings.json)
      locks/                         run claims (<run_id>.lock + .owner.json) and shared-preparation locks
      events.jsonl                   one line per run started, finished, failed or re-evaluated (who, when)
      runs/<run_id>/
        spec.json                    study axes of the run: backbone, pretrained, fraction, seed, run_id,
                                     n_params, pretrain_images, study (name), config_hash
        config.yaml                  the fully resolved per-run config (of the launch that trained it)
        settings.json                the settings the run id hashes (scaling.study.grid.result_settings)
        evaluation.json              what the stored predictions and metrics were made with: each evaluation
                                     set's identity, the metric settings and the sets scored in metrics.parquet
        predictions/<eval_set>.parquet
                                     one row per sample: sample_id, patient_id, label:<L> (target, NaN = none),
                                     logit:<L>, prob:<L>, plus attribute columns (sex, age, age_group, site, ...)
                                     eval sets: 'val' (thresholds/temperature are fitted here), 'test', OOD names
        metrics.parquet              tidy rows: eval_set, label ('macro' or a label name), attribute ('all' or a
                                     column), group ('all' or a value), metric, value, lo, hi, n
        meta.json                    train summary (steps, seconds, images/s, skipped images, world size, ...,
                                     input_normalisation: the mean / std its images were normalised with)
        checkpoints/                 resumable training state (engine); after training final/model.safetensors,
                                     the fine-tuned weights (new evaluation sets are predicted from them)
        DONE                         written last; a run without it is incomplete and is redone/resumed
        FAILED.json                  written when a run raised; the error text and traceback, and the error
                                     with the study's sample and patient ids and paths redacted (the report's)
      results.csv, report.html       study outputs

docs/run-store.md describes what a run id means, how a study grows and what several jobs on one store do.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import pandas as pd

from scaling.io import (UnreadableFile, atomic_write_json, atomic_write_parquet, atomic_write_text, read_json,
                        read_parquet)
from scaling.metrics.schema import METRIC_COLUMNS
from scaling.study.grid import source_label


class StoreError(RuntimeError):
    """The run store is inconsistent or a requested item is missing; the message names the path."""


REQUIRED_METRIC_COLUMNS = ("eval_set", "label", "metric", "value")
"""Columns without which a ``metrics.parquet`` is not a metrics table (the others of the schema are filled in)."""


def _object(path: Path, value: Any) -> dict[str, Any]:
    """A JSON record of the store (spec, failure): an object, or a StoreError naming the file."""
    if not isinstance(value, dict):
        raise StoreError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def common_samples(predictions: list[pd.DataFrame]) -> pd.Index:
    """The sample ids every one of ``predictions`` (stored prediction frames of one evaluation set) holds, in the
    first frame's order. Index lookups, not ``isin``: pandas' ``isin`` on string ids runs a Python loop per value
    (~0.1 s per 15,000 ids, ~70x slower), and a study report aligns every pair of runs it compares."""
    ids = pd.Index(predictions[0]["sample_id"])
    for pred in predictions[1:]:
        ids = ids[pd.Index(pred["sample_id"]).get_indexer(ids) >= 0]
    return ids


class RunStore:
    """Read/write access to a study's run store directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- paths ------------------------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        """Directory of one run."""
        return self.root / "runs" / run_id

    def upstream_dir(self, name: str) -> Path:
        """Directory of one upstream (pretraining) run."""
        return self.root / "upstream" / name

    def model_path(self, run_id: str) -> Path:
        """The fine-tuned weights of a run (consolidated fp32 safetensors), kept by the Trainer when training ends
        (``checkpoints/final``, see ``scaling.engine.checkpoint.save_final``)."""
        from scaling.engine.checkpoint import CHECKPOINT_DIR, FINAL, WEIGHTS_FILE

        return self.run_dir(run_id) / CHECKPOINT_DIR / FINAL / WEIGHTS_FILE

    def predictions_path(self, run_id: str, eval_set: str) -> Path:
        """The stored predictions of one evaluation set of a run."""
        return self.run_dir(run_id) / "predictions" / f"{eval_set}.parquet"

    def lock_path(self, name: str) -> Path:
        """Lock file of a run id or of a shared preparation step (see ``scaling.study.claims``)."""
        return self.root / "locks" / f"{name}.lock"

    # -- listing ----------------------------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        """All run ids with a directory in the store (complete or not)."""
        d = self.root / "runs"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def is_complete(self, run_id: str) -> bool:
        """True when the run finished and wrote its DONE marker."""
        return (self.run_dir(run_id) / "DONE").is_file()

    def status(self, run_id: str) -> str:
        """``complete``, ``failed``, ``partial`` (started, not finished) or ``missing``.

        A finished run (DONE) whose later work failed (predicting a new evaluation set from its weights, rescoring,
        CKA) is ``failed`` as well: that work removes FAILED.json when it succeeds, so a FAILED.json beside DONE is
        current. Its stored numbers no longer answer the config (a set is missing, or the metrics were made with
        other settings), so it is not reported as complete; the next launch redoes only that work
        (:meth:`is_complete` still holds: nothing is trained again). Decided by the files' contents, not their
        times, so a store copied without keeping times (``cp -r``, ``rsync`` without ``-t``) reads the same.
        """
        d = self.run_dir(run_id)
        failed = d / "FAILED.json"
        if (d / "DONE").is_file():
            if not failed.is_file():
                return "complete"
            return "failed" if self._failure_is_current(d, failed) else "complete"
        if failed.is_file():
            return "failed"
        return "partial" if d.is_dir() else "missing"

    # -- writing ----------------------------------------------------------------------------------------------
    def write_spec(self, run_id: str, spec: dict, config_yaml: str) -> None:
        """Write the run's axes and resolved config; clears an earlier failure marker."""
        d = self.run_dir(run_id)
        atomic_write_json(d / "spec.json", spec)
        atomic_write_text(d / "config.yaml", config_yaml)
        (d / "FAILED.json").unlink(missing_ok=True)

    def update_spec(self, run_id: str, spec: dict) -> None:
        """Rewrite the run's axes (spec.json) alone: those known once its model is built."""
        atomic_write_json(self.run_dir(run_id) / "spec.json", spec)

    def write_predictions(self, run_id: str, eval_set: str, df: pd.DataFrame) -> None:
        """Write per-sample predictions of one evaluation set."""
        if df["sample_id"].duplicated().any():
            raise StoreError(f"predictions for {run_id}/{eval_set} contain duplicate sample ids")
        atomic_write_parquet(self.predictions_path(run_id, eval_set), df)

    def write_metrics(self, run_id: str, rows: pd.DataFrame | list[dict]) -> None:
        """Write the tidy metric rows of a run."""
        df = pd.DataFrame(rows)
        missing = [c for c in METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise StoreError(f"metric rows for {run_id} lack columns {missing}")
        atomic_write_parquet(self.run_dir(run_id) / "metrics.parquet", df[list(METRIC_COLUMNS)])

    def write_settings(self, run_id: str, settings: dict) -> None:
        """Record the settings the run id hashes (``result_settings``), to detect a conflicting config later."""
        atomic_write_json(self.run_dir(run_id) / "settings.json", settings)

    def write_evaluation(self, run_id: str, record: dict) -> None:
        """Record what the stored predictions and metrics were made with (eval-set identities, metric settings)."""
        atomic_write_json(self.run_dir(run_id) / "evaluation.json", record)

    def log_event(self, event: str, run_id: str, **info: Any) -> None:
        """Append one line to ``events.jsonl`` (one ``write`` in append mode: lines of concurrent launches never
        interleave on a local or NFS file system)."""
        from scaling.study.claims import HOST, LAUNCH

        line = json.dumps({"time": time.time(), "event": event, "run_id": run_id, "host": HOST, "pid": os.getpid(),
                           "launch": LAUNCH, **info}, default=str) + "\n"
        fd = os.open(self.root / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def write_meta(self, run_id: str, meta: dict) -> None:
        """Write the run's training summary."""
        atomic_write_json(self.run_dir(run_id) / "meta.json", meta)

    def mark_complete(self, run_id: str) -> None:
        """Write the DONE marker (last step of a run)."""
        atomic_write_text(self.run_dir(run_id) / "DONE", "")

    def mark_failed(self, run_id: str, exc: BaseException, reason: str | None = None) -> None:
        """Record why a run failed, without touching anything else it wrote. ``after_done``: the run had finished
        and work on it since (a new evaluation set, rescoring, CKA) failed. ``reason``: the error as the report may
        show it (no patient or sample id, no path); the error itself stays on this machine."""
        d = self.run_dir(run_id)
        record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                  "after_done": (d / "DONE").is_file()}
        atomic_write_json(d / "FAILED.json", record if reason is None else {**record, "reason": reason})

    def clear_failure(self, run_id: str) -> None:
        """Remove the failure record of a finished run whose later work has now succeeded."""
        (self.run_dir(run_id) / "FAILED.json").unlink(missing_ok=True)

    @staticmethod
    def _failure_is_current(d: Path, failed: Path) -> bool:
        """Whether the FAILED.json of a finished run records its latest work. Records written since work that
        succeeds removes them say so (``after_done``); for older ones the files' times decide, as they did when
        they were written: newer than DONE and evaluation.json (which that work rewrites last) means current."""
        try:
            record = read_json(failed)
        except UnreadableFile:  # treated as current, so the run's work is checked again
            return True
        if not isinstance(record, dict) or "after_done" in record:
            return True
        done = max(p.stat().st_mtime_ns for p in (d / "DONE", d / "evaluation.json") if p.is_file())
        return failed.stat().st_mtime_ns >= done

    # -- reading ----------------------------------------------------------------------------------------------
    def read_spec(self, run_id: str) -> dict[str, Any]:
        """The run's axes (spec.json); ``pretrained`` is the source's label (``scaling.study.grid.source_label``)."""
        p = self.run_dir(run_id) / "spec.json"
        if not p.is_file():
            raise StoreError(f"{p} not found")
        spec = _object(p, read_json(p))
        if isinstance(spec.get("pretrained"), str):
            # Stores written before sources were labelled hold the source as given (a path): read as its label.
            spec["pretrained"] = source_label(spec["pretrained"])
        return spec

    def read_settings(self, run_id: str) -> dict[str, Any] | None:
        """The recorded result settings of a run, or None (not started, or made before they were recorded)."""
        p = self.run_dir(run_id) / "settings.json"
        return read_json(p) if p.is_file() else None

    def read_evaluation(self, run_id: str) -> dict[str, Any]:
        """What the run's predictions and metrics were made with (``evaluation.json``), or {} when absent."""
        p = self.run_dir(run_id) / "evaluation.json"
        return read_json(p) if p.is_file() else {}

    def events(self) -> list[dict[str, Any]]:
        """Every line of ``events.jsonl`` (empty when absent)."""
        p = self.root / "events.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []

    def read_meta(self, run_id: str) -> dict[str, Any]:
        """The run's training summary (meta.json), or {} when absent."""
        p = self.run_dir(run_id) / "meta.json"
        return read_json(p) if p.is_file() else {}

    def eval_sets(self, run_id: str) -> list[str]:
        """Names of the evaluation sets with stored predictions."""
        d = self.run_dir(run_id) / "predictions"
        return sorted(p.stem for p in d.glob("*.parquet")) if d.is_dir() else []

    def read_predictions(self, run_id: str, eval_set: str, columns=None) -> pd.DataFrame:
        """Per-sample predictions of one evaluation set; with ``columns``, only those of them the file holds (a
        statistic over a hundred runs reads the few columns it needs, one run at a time)."""
        p = self.predictions_path(run_id, eval_set)
        if not p.is_file():
            raise StoreError(f"{p} not found (eval sets stored: {self.eval_sets(run_id)})")
        return read_parquet(p, columns=columns)

    def read_metrics(self, run_id: str) -> pd.DataFrame:
        """Tidy metric rows of one run."""
        p = self.run_dir(run_id) / "metrics.parquet"
        if not p.is_file():
            raise StoreError(f"{p} not found")
        df = read_parquet(p)
        missing = [c for c in REQUIRED_METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise StoreError(f"{p}: not a metrics table (no column {missing})")
        return df

    def read_failure(self, run_id: str) -> dict[str, Any] | None:
        """The failure record of a run, if any."""
        p = self.run_dir(run_id) / "FAILED.json"
        return _object(p, read_json(p)) if p.is_file() else None

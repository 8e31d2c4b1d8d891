"""Weights & Biases tracking: one W&B run per grid cell, main process only, scrubbed of anything identifying.

W&B is a view, not the store (``docs/design.md``): everything here is best-effort mirroring of what the run store already
holds. Three rules shape the code:

- ``tracking.wandb: off`` means *nothing*: ``wandb`` is never imported (its import alone costs ~0.3 s and starts
  background machinery) and no file is written. ``WANDB_MODE=disabled`` in the environment means the same.
- Only the main process talks to W&B; other ranks get the same object with every method a no-op (one W&B run per
  GPU is the classic failure, accelerate#644, timm#1309).
- The W&B run id is persisted in the run directory and passed back with ``resume="allow"``, so a resumed cell
  continues its W&B run instead of starting a new one (accelerate#2653); callers log with an explicit ``step``.

Privacy: every key, value, table and caption goes through :class:`Scrubber` before it reaches W&B. Patient ids,
sample ids, file paths and patient images are dropped unless ``tracking.log_identifiers`` opts in. W&B's own
collection of host, user name, program path, command-line arguments, git state and console output is switched
off too, because command lines and logs routinely carry dataset paths.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import re
import secrets
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from scaling.config import TrackingConfig
from scaling.io import atomic_write_json

log = logging.getLogger(__name__)

WANDB_STATE_FILE = "wandb.json"
"""File in the run directory holding the W&B run id (read back on resume)."""

REDACTED = "<redacted>"

SHORT_NUMBER_DIGITS = 6
"""A protected id of only digits, shorter than this, is redacted by :meth:`Scrubber.text` only as a whole string."""

# Column / key tokens that name a per-patient identifier or a location on disk. Matched on whole tokens of the key
# (split at non-alphanumerics and camelCase), so "pretrain_images" or "n_params" are never mistaken for one.
_ID_TOKENS = {
    "patient", "patients", "patientid", "subject", "subjectid", "mrn", "accession", "dicom", "sampleid", "imageid",
    "studyid", "path", "paths", "filepath", "filename", "file", "files", "dir", "directory", "uid",
}
_ID_PAIRS = {("sample", "id"), ("image", "id"), ("img", "id"), ("study", "id"), ("series", "id"), ("patient", "id"),
             ("exam", "id"), ("lesion", "id"), ("sample", "ids"), ("patient", "ids"), ("file", "name")}
# A value that looks like a location on disk: absolute, home- or dot-relative, Windows drive, UNC, or anything with a
# separator ending in an image/volume extension (CheXpert's "patient00001/study1/view1_frontal.jpg").
_PATH_RE = re.compile(
    r"(?:^|(?<=[\s:=\"'(,]))(?:/[^\s\"',)]+|~[/\\][^\s\"',)]*|\.\.?[/\\][^\s\"',)]+|[A-Za-z]:[\\/][^\s\"',)]*"
    r"|\\\\[^\s\"',)]+)"
    r"|[^\s\"',()]*[/\\][^\s\"',()]*\.(?:png|jpe?g|dcm|dicom|tiff?|bmp|nii(?:\.gz)?|npy|npz|h5|parquet|csv)\b",
    re.IGNORECASE,
)


def _tokens(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(key))
    return [t for t in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if t]


def is_identifier_key(key: str) -> bool:
    """True when a key or column name denotes a patient/sample identifier, a file path or an image location.

    Counts are not identifiers: ``n_train_patients`` or ``num_files`` pass.
    """
    toks = _tokens(key)
    if toks and (toks[0] in ("n", "num", "count") or "count" in toks):
        return False
    return any(t in _ID_TOKENS for t in toks) or any(p in _ID_PAIRS for p in zip(toks, toks[1:]))


def redact_paths(text: str) -> str:
    """``text`` with every path-like substring replaced by ``<redacted>``."""
    return _PATH_RE.sub(REDACTED, text)


class Scrubber:
    """Removes identifying content (patient/sample ids, file paths, patient images) from anything to be logged.

    With ``allow_identifiers=True`` (``tracking.log_identifiers``) it passes everything through unchanged.
    ``protect(values)`` registers known identifier values (e.g. a sample table's ids) so that any string holding
    one is redacted even under a harmless-looking key.

    A protected value is found where it stands as a whole token: a span that starts and ends where the kind of
    character (letter, digit, other) changes, so ``10000032`` is found in ``p10000032`` and ``s5.png`` in
    ``'s5.png'``, but ``12`` is not found in ``2012``.

    A short number (all digits, fewer than :data:`SHORT_NUMBER_DIGITS`) is different: NIH ChestX-ray14's patient ids
    are 1 … 30805, so as tokens they would be found in almost any string with a number in it (the run id
    ``bit_r50x1-…-s1``, the age group ``40-60``, the metric ``ece_15``), which :meth:`text` would then blank whole:
    an NIH study's W&B runs lost their names and subgroup rows. :meth:`text` therefore redacts a short-number id only
    where it is the whole string (a table cell holding a patient number), and :meth:`message` still replaces it
    wherever it stands as a token (an error message keeps the rest of its words). Longer numeric ids (MIMIC's
    8-digit subject ids, a hospital's MRNs) are found inside strings as before.

    Values are kept in a set, not a regex alternation: a study
    protects every sample and patient id of its tables (MIMIC-CXR: 440,000), which as one alternation took 35 s to
    compile and ~10 ms to search per string: five minutes for the strings of one cell's metric table.
    """

    def __init__(self, allow_identifiers: bool = False, protected: Iterable[str] = ()):
        self.allow_identifiers = allow_identifiers
        self._protected: set[str] = set()
        self._longest = 0
        self.protect(protected)

    def protect(self, values: Iterable[Any]) -> None:
        """Redact any string that holds one of ``values`` (as a whole token) from now on."""
        new = {str(v) for v in values if v is not None and str(v) != ""}
        self._protected |= new
        self._longest = max([self._longest, *map(len, new)])

    def _occurrences(self, s: str, short_numbers: bool = True) -> list[tuple[int, int]]:
        """Spans of ``s`` holding a protected value as a whole token, left to right, the longest at each start;
        without ``short_numbers``, spans that are only a short number (class docstring) are not counted."""
        if not self._protected or not s:
            return []
        kinds = [c.isalpha() + 2 * c.isdigit() for c in s]
        cuts = [0, *(i for i in range(1, len(s)) if kinds[i] != kinds[i - 1]), len(s)]
        spans, covered = [], 0
        for a, start in enumerate(cuts[:-1]):
            if start < covered:
                continue
            ends = cuts[a + 1:bisect.bisect_right(cuts, start + self._longest)]
            end = next((e for e in reversed(ends) if s[start:e] in self._protected), None)
            if end is not None and not short_numbers and _is_short_number(s[start:end]):
                continue
            if end is not None:
                spans.append((start, end))
                covered = end
        return spans

    def text(self, s: str) -> str:
        """A string with protected ids and path-like substrings redacted (all of it when it holds a protected id;
        a short-number id only when it is the whole string)."""
        if self.allow_identifiers:
            return s
        if s.strip() in self._protected or self._occurrences(s, short_numbers=False):
            return REDACTED
        return redact_paths(s)

    def message(self, s: str) -> str:
        """An error message with each protected id and path-like substring replaced by ``<redacted>``, the rest
        kept, so it still says what went wrong (what the report shows of a failed run)."""
        if self.allow_identifiers:
            return s
        for start, end in reversed(self._occurrences(s)):
            s = s[:start] + REDACTED + s[end:]
        return redact_paths(s)

    def value(self, v: Any) -> Any:
        """Scrub one value recursively (strings, mappings, sequences); numbers pass through."""
        if self.allow_identifiers:
            return v
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, Path):
            return REDACTED
        if isinstance(v, Mapping):
            return self.mapping(v)
        if isinstance(v, (list, tuple)):
            return type(v)(self.value(x) for x in v)
        return v

    def mapping(self, d: Mapping) -> dict:
        """A dict without identifier keys, with every remaining key and value scrubbed."""
        if self.allow_identifiers:
            return dict(d)
        return {self.text(str(k)): self.value(v) for k, v in d.items() if not is_identifier_key(str(k))}

    def frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """A table without identifier columns, with every remaining string cell scrubbed."""
        if self.allow_identifiers:
            return df
        keep = [c for c in df.columns if not is_identifier_key(str(c))]
        out = df[keep].copy()
        out.columns = [self.text(str(c)) for c in keep]
        for c in out.columns:
            if out[c].dtype == object or pd.api.types.is_string_dtype(out[c]):
                out[c] = out[c].map(lambda x: self.text(x) if isinstance(x, str) else x)
        return out


def _is_short_number(s: str) -> bool:
    return s.isdigit() and len(s) < SHORT_NUMBER_DIGITS


def _read_state(run_dir: Path) -> dict:
    p = run_dir / WANDB_STATE_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        log.warning("ignoring unreadable %s; a new W&B run will be started", p)
        return {}


def _new_wandb_id() -> str:
    # Random rather than derived from the run id: a cell deleted and rerun from scratch must not append to the old
    # W&B run (its steps would go back in time).
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_mode(cfg: TrackingConfig) -> str:
    """Effective mode: the config, downgraded by ``WANDB_MODE`` (offline/disabled) from the environment."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if cfg.wandb == "off" or env in ("disabled", "off"):
        return "off"
    if env in ("offline", "dryrun"):
        return "offline"
    return cfg.wandb


class Tracker:
    """Tracking of one grid cell. Use :meth:`create`; an inactive tracker (off, or not rank 0) does nothing."""

    def __init__(self, run: Any = None, scrubber: Scrubber | None = None, run_dir: Path | None = None):
        self._run = run
        self.scrubber = scrubber or Scrubber()
        self.run_dir = run_dir

    @classmethod
    def create(
        cls,
        tracking_cfg: TrackingConfig,
        study_name: str,
        run_id: str,
        axes: Mapping[str, Any],
        run_dir: str | Path,
        is_main_process: bool = True,
        job_type: str | None = None,
    ) -> "Tracker":
        """Start (or resume) the W&B run of one grid cell; a no-op tracker when off or not the main process.

        ``group`` is the study, ``job_type`` the pretraining source (unless given), ``config`` the (scrubbed) study
        axes so the W&B UI can pivot on them. W&B files go under ``<run_dir>/wandb``.
        """
        scrubber = Scrubber(allow_identifiers=tracking_cfg.log_identifiers)
        mode = wandb_mode(tracking_cfg)
        if mode == "off" or not is_main_process:
            return cls(None, scrubber)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)

        import wandb

        state = _read_state(run_dir)
        wandb_id = state.get("wandb_id") or _new_wandb_id()
        config = scrubber.mapping(dict(axes))
        settings = wandb.Settings(
            # W&B would otherwise record the host, user, program path, argv, git state, installed packages and
            # all console output; argv and logs carry dataset paths, so only what we log explicitly is sent. The
            # host name goes into the run record itself (wandb 0.31 fills it in when host is None), not the
            # metadata x_disable_meta switches off.
            console="off", x_disable_meta=True, x_disable_machine_info=True, save_code=False, disable_code=True,
            disable_git=True, x_save_requirements=False, x_disable_stats=True, silent=True, host="",
        )
        run = wandb.init(
            project=tracking_cfg.project, entity=tracking_cfg.entity or None, group=study_name,
            job_type=job_type or str(axes.get("pretrained", "")) or None, name=scrubber.text(run_id), id=wandb_id,
            resume="allow", config=config, dir=str(run_dir), mode=mode, settings=settings, reinit="finish_previous",
        )
        atomic_write_json(run_dir / WANDB_STATE_FILE, {"wandb_id": run.id, "project": tracking_cfg.project,
                                                       "entity": tracking_cfg.entity, "group": study_name,
                                                       "mode": mode})
        return cls(run, scrubber, run_dir)

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True when this tracker sends to W&B (wandb on, main process, not finished)."""
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        """The W&B run id (persisted in the run directory), or None when inactive."""
        return self._run.id if self._run is not None else None

    def protect(self, values: Iterable[Any]) -> None:
        """Register identifier values (patient/sample ids) that must never leave, whatever key carries them."""
        self.scrubber.protect(values)

    # -- logging ----------------------------------------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalars (identifier keys dropped, strings scrubbed); pass ``step`` so resumed runs never go back."""
        if self._run is None:
            return
        clean = self.scrubber.mapping(metrics)
        if clean:
            self._run.log(clean, step=step)

    def log_metrics_table(self, rows: pd.DataFrame | list[dict], key: str = "metrics", step: int | None = None,
                          summary: bool = True) -> None:
        """Log a table (the run's tidy metric rows) as a W&B table, and (``summary``) its headline numbers to the
        run summary.

        Summary keys are ``<eval_set>/<metric>`` for macro, all-sample rows (e.g. ``test/auroc``) and
        ``<eval_set>/<attribute>/<metric>`` for the per-attribute fairness summaries (e.g. ``test/sex/auroc_gap``),
        so the W&B UI and the study Report can plot them against the config axes.
        """
        if self._run is None:
            return
        import wandb

        df = self.scrubber.frame(pd.DataFrame(rows))
        self._run.log({key: wandb.Table(dataframe=df.reset_index(drop=True))}, step=step)
        if summary:
            self._run.summary.update(summary_metrics(df))

    def log_images(self, images: Mapping[str, Any], step: int | None = None, *, patient_data: bool = False,
                   captions: Mapping[str, str] | None = None) -> None:
        """Log plots (matplotlib figures, PNG files or arrays) as W&B images.

        ``patient_data=True`` marks images made from patient pixels (sample grids, saliency maps): these are
        dropped, with a warning, unless ``tracking.log_identifiers`` opts in. Keys and captions are scrubbed.
        """
        if self._run is None:
            return
        if patient_data and not self.scrubber.allow_identifiers:
            warnings.warn("patient images are not sent to W&B (set tracking.log_identifiers: true to opt in)",
                          stacklevel=2)
            return
        import wandb

        captions = captions or {}
        out = {}
        for k, img in images.items():
            if is_identifier_key(k) and not self.scrubber.allow_identifiers:
                continue
            cap = self.scrubber.text(captions[k]) if k in captions else None
            out[self.scrubber.text(k)] = wandb.Image(str(img) if isinstance(img, Path) else img, caption=cap)
        if out:
            self._run.log(out, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (idempotent)."""
        if self._run is None:
            return
        run, self._run = self._run, None
        run.finish(exit_code=exit_code)
        import wandb

        # wandb 0.31's finish() can return before its service has written the run's records to the offline
        # .wandb file (we saw 7-byte files right after finish); teardown waits for the service to flush and stop,
        # so a cell's W&B files are complete — and syncable — as soon as the cell is done. It costs ~0.25 s.
        wandb.teardown()


def summary_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """Headline numbers of a run's tidy metric rows as flat ``eval_set/[attribute/]metric`` keys (macro label),
    e.g. ``test/auroc``, ``test/sex/auroc_gap`` and ``<ood set>/auroc_drop`` (test − OOD AUROC on the labels both
    sets can score, see :mod:`scaling.metrics.run_metrics`), and a one-of-K task's ``test/accuracy``, ...."""
    out: dict[str, float] = {}
    if rows.empty or not {"eval_set", "label", "attribute", "group", "metric", "value"} <= set(rows.columns):
        return out
    # macro over labels, and a one-of-K task's rows over all classes (label 'all', run_metrics.MULTICLASS_LABEL:
    # test/accuracy, test/nll_multiclass, ...; tracking sits below metrics in the layering, hence the literal)
    macro = rows[rows["label"].isin(["macro", "all"])]
    for r in macro.itertuples(index=False):
        if r.group != "all":
            continue
        v = float(r.value) if r.value is not None else math.nan
        key = f"{r.eval_set}/{r.metric}" if r.attribute == "all" else f"{r.eval_set}/{r.attribute}/{r.metric}"
        out[key] = v
    return out

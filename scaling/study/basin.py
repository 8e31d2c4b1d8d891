"""``python -m scaling.study basin``: the loss-basin analysis of a finished store (Neyshabur, Sedghi & Zhang 2020,
§3.3), a post-hoc command, not a grid axis: nothing is trained and no run id changes.

For every complete plain fine-tuned cell (backbone × source × fraction) with at least two seeds whose fine-tuned
weights are stored, the runs of its two lowest seeds are interpolated linearly
(:func:`scaling.analysis.interpolation.interpolation_curve`) and each point is evaluated on one fixed, seeded
sample of an evaluation set under the runs' own sharding (the path of ``runner.evaluate_run``). The curves and their
barriers go to ``<store>/analysis/basin.parquet``, one row per pair and α
(docs/analysis.md, "Loss basins: do two fine-tuned seeds share one?"); a pair already there with the same settings
(its two runs, the evaluation set, the sample and the α's) is skipped, a pair computed with other settings is
computed again and its rows replaced.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd

from scaling.config import StudyConfig
from scaling.engine.ranks import broadcast, init_distributed, is_main_process, process_group
from scaling.io import atomic_write_parquet
from scaling.study import protocols
from scaling.study.analysis_tables import BASIN_COLUMNS, basin_path, read_basin
from scaling.study.coordination import on_main
from scaling.study.grid import FINETUNE, RunSpec, run_config, run_id
from scaling.study.store import RunStore

log = logging.getLogger(__name__)

KEYS = ["run_1", "run_2", "eval_set", "sample", "n_alphas"]
"""What a pair's rows depend on: the same values mean the same curve, so the pair is skipped."""


def basin_pairs(cfg: StudyConfig, store: RunStore) -> list[tuple[RunSpec, RunSpec]]:
    """For each plain fine-tuned cell of the study's grid, its two lowest seeds among the complete runs with stored
    weights; cells with fewer are left out (and logged)."""
    from scaling.study.runner import study_cells

    cells: dict[tuple, list[RunSpec]] = {}
    for spec in study_cells(cfg):
        if (spec.protocol, spec.shots, spec.reinit, spec.shuffle) != (FINETUNE, 0, "none", "none"):
            continue
        cells.setdefault((spec.backbone, spec.source, spec.fraction), []).append(spec)
    pairs = []
    for key, specs in cells.items():
        ready = sorted((s for s in specs if store.is_complete(run_id(cfg, s))
                        and store.model_path(run_id(cfg, s)).is_file()), key=lambda s: s.seed)
        if len(ready) >= 2:
            pairs.append((ready[0], ready[1]))
        else:
            log.info("basin: %s x %s x fraction %g has %d complete run(s) with stored weights; needs 2", key[0],
                     specs[0].pretrained, key[2], len(ready))
    return pairs


def basin_sample(table: pd.DataFrame, max_examples: int) -> pd.DataFrame:
    """The fixed, seeded sample every pair is evaluated on: the CKA sample's draw (``protocols.cka_sample``, seed
    ``CKA_SAMPLE_SEED``) of at most ``max_examples`` rows (0: the whole set), so the sample of a size is the same
    images as the CKA sample of that size on that set."""
    if max_examples <= 0 or max_examples >= len(table):
        max_examples = len(table)
    return protocols.cka_sample(table, dataclasses.replace(protocols.CKAConfig(), max_examples=max_examples))


def _pair_curve(cfg: StudyConfig, store: RunStore, pair: tuple[RunSpec, RunSpec], table: pd.DataFrame,
                labels: list[str], alphas: np.ndarray) -> pd.DataFrame | None:
    """One pair's curve (every rank calls; the rows on the main process)."""
    from scaling.analysis.interpolation import interpolation_curve
    from scaling.models import build_model
    from scaling.study.runner import _datasets, _starting_model_on_meta, _trained_model, _with_trainer

    first, second = pair
    rcfg = run_config(cfg, first)  # the two runs differ in their seed only: one architecture, one sharding
    states = [_trained_model(run_config(cfg, s), store, run_id(cfg, s), len(labels)).state_dict() for s in pair]
    # inputs normalised as the source's (both runs share it), the images as they are (a plain cell)
    _, sets = _datasets(cfg, _starting_model_on_meta(rcfg, first), {"basin": table}, labels, spec=first)

    def model():
        return build_model(dataclasses.replace(rcfg.model, pretrained="scratch"), num_outputs=len(labels),
                           image_size=rcfg.data.image_size)

    def predict(m):
        return _with_trainer(rcfg, m, lambda t: t.predict(sets["basin"], batch_size=cfg.eval.batch_size))

    return interpolation_curve(states[0], states[1], model, alphas, predict, kind=cfg.data.task)


def run_basin(cfg: StudyConfig, *, eval_set: str = "test", max_examples: int = 512, n_alphas: int = 11,
              force: bool = False) -> pd.DataFrame:
    """Compute the curves the store lacks (every rank calls; under ``accelerate launch`` every rank evaluates each
    point under the runs' sharding) and return the store's basin table (main process; an empty frame elsewhere).
    The table is written atomically after each pair, so an interrupted command keeps the pairs it finished."""
    from scaling.config import ConfigError
    from scaling.study.data import check_roots, load_study_data
    from scaling.study.runner import eval_identities

    if n_alphas < 2:
        raise ConfigError(f"--alphas must be at least 2 (alpha 0 and 1), got {n_alphas}")
    if eval_set not in eval_identities(cfg):
        raise ConfigError(f"--eval-set {eval_set!r} is not an evaluation set of the study; choose one of "
                          f"{list(eval_identities(cfg))}")
    alphas = np.linspace(0.0, 1.0, n_alphas)
    store = RunStore(cfg.output_dir)
    check_roots(cfg.data)
    init_distributed()
    pairs = broadcast(basin_pairs(cfg, store) if is_main_process() else None)
    if not pairs:
        log.warning("basin: no plain fine-tuned cell has two complete seeds with stored weights")
        return _stored(store)
    data = load_study_data(cfg)
    labels = list(data.labels)
    table = basin_sample(data.eval_sets()[eval_set], max_examples)
    sample = protocols.sample_key(table)
    for pair in pairs:
        r1, r2 = (run_id(cfg, s) for s in pair)
        done = broadcast(_already(store, r1, r2, eval_set, sample, n_alphas) if is_main_process() else None)
        if done and not force:
            if is_main_process():
                log.info("basin: %s vs %s already computed with these settings", r1, r2)
            continue
        group = process_group()
        if is_main_process():  # one line per pair, not one per rank
            log.info("basin: %s vs %s on %d images of %s, %d alphas, %d process(es)", r1, r2, len(table),
                     eval_set, n_alphas, group.get_world_size() if group is not None else 1)
        curve = _pair_curve(cfg, store, pair, table, labels, alphas)
        first, second = pair
        rows = None if curve is None else curve.assign(
            backbone=first.backbone, pretrained=first.pretrained, fraction=first.fraction,
            seeds=f"{first.seed},{second.seed}", seed_1=first.seed, seed_2=second.seed, run_1=r1, run_2=r2,
            eval_set=eval_set, n_examples=len(table), sample=sample, n_alphas=n_alphas,
            norm_stats="interpolated")
        on_main(lambda: _write(store, rows))
    return _stored(store)


def _stored(store: RunStore) -> pd.DataFrame:
    """The store's table on the main process, an empty frame elsewhere or when there is none."""
    out = read_basin(store.root) if is_main_process() else None
    return out if out is not None else pd.DataFrame()


def _already(store: RunStore, r1: str, r2: str, eval_set: str, sample: str, n_alphas: int) -> bool:
    old = read_basin(store.root)
    if old is None or old.empty:
        return False
    mine = old[(old["run_1"] == r1) & (old["run_2"] == r2)]
    return bool(len(mine)) and (mine[KEYS[2:]].drop_duplicates().values.tolist() == [[eval_set, sample, n_alphas]]) \
        and len(mine) == n_alphas


def _write(store: RunStore, rows: pd.DataFrame) -> None:
    """Replace the pair's rows in the store's table (atomically)."""
    old = read_basin(store.root)
    if old is not None and len(old):
        old = old[~((old["run_1"] == rows["run_1"].iloc[0]) & (old["run_2"] == rows["run_2"].iloc[0]))]
    new = pd.concat([t for t in (old, rows[BASIN_COLUMNS]) if t is not None and len(t)], ignore_index=True)
    new = new.sort_values(["backbone", "pretrained", "fraction", "run_1", "alpha"], kind="stable")
    basin_path(store.root).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(basin_path(store.root), new.reset_index(drop=True))

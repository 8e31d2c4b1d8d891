"""Run a transfer-learning scaling study: backbone × pretraining source × data fraction × seed.

    accelerate launch recipes/scale_study.py                                  # the offline demo study (CPU)
    accelerate launch recipes/scale_study.py --config recipes/configs/chexpert_bit.yaml data.root=/data/chexpert
    python recipes/scale_study.py --config ... --dry-run                      # the plan, no training

Arguments that are not options are dotted overrides (``train.lr=0.01 'grid.seeds=[0,1,2]'``), before or after the
options; quote one that holds brackets, braces or spaces, which the shell would otherwise expand or split.
Re-running the same command skips the runs already complete in the store and finishes the rest; a grown config
(more seeds, backbones, fractions, OOD sets) does only the new work; a changed setting that counts (another
learning rate) trains new runs beside the old ones, and the report covers the runs of the launch's config; any
number of launches may share one store (docs/run-store.md).

Exit status: 0 done, 1 some runs failed (each has its FAILED.json; the others are complete) or the report could not
be rebuilt after training (the runs are stored; the message says how to rebuild it), 2 bad input (config, data, a
store that contradicts the config, a grid with no cell left), nothing trained.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from scaling.config import ConfigError, load_config, where_set
from scaling.data.table import DataError, OptionError
from scaling.engine.distributed import LaunchError
from scaling.engine.launch import detect_launch
from scaling.models import CheckpointMismatch, WeightsUnavailable
from scaling.engine.ranks import is_main_process
from scaling.io import UnreadableFile
from scaling.study.runner import DEPRECATED_PARAMS, StudyFailed, describe_augmentation, plan, run_study
from scaling.study.store import StoreError

USER_ERRORS = (ConfigError, DataError, StoreError, LaunchError, WeightsUnavailable, CheckpointMismatch,
               UnreadableFile)

DEMO = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def print_supported_comparisons(path: Path, alpha: float = 0.05) -> None:
    """The study's answer in a few lines: the macro-AUROC comparisons (bigger backbone, more pretraining) whose
    difference holds after Holm's adjustment over all of them."""
    if not path.is_file() or path.stat().st_size == 0:  # --no-report, or nothing complete yet
        return
    c = pd.read_csv(path)
    macro = c[c["label"] == "macro"]
    if macro.empty:  # no two cells differ in backbone or pretraining source only
        return
    held = macro[macro["p_holm"] < alpha]
    print(f"\n{len(held)} of {len(macro)} paired comparisons (macro AUROC) hold after Holm's adjustment at {alpha}"
          + (":" if len(held) else "."))
    for r in held.itertuples(index=False):
        what = (f"{r.backbone} vs {r.vs} ({r.pretrained})" if r.axis == "backbone"
                else f"{r.pretrained} vs {r.vs} ({r.backbone})")
        print(f"  {r.eval_set:>12s}  fraction {r.fraction:g}  {what}: {r.diff:+.3f} [{r.diff_lo:+.3f}, "
              f"{r.diff_hi:+.3f}]  p_holm {r.p_holm:.2g}")
    few = macro["n_seeds"].between(2, 4).any() if "n_seeds" in macro else False
    if few and len(held) < len(macro):
        print("  (2-4 seeds: each test has r - 1 degrees of freedom and little power; a comparison that does not "
              "hold is no evidence that scale does not help)")
    print("  every comparison: python -m scaling.study compare " + str(path.parent))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run (or plan) the study, print the results table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEMO, help="study YAML (default: the offline demo study)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs, which are done, and their cost; no training")
    ap.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01 (anywhere on the line)")
    args = ap.parse_intermixed_args(argv)  # overrides before and after an option are all overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
            if args.dry_run:
                if detect_launch().rank != 0:  # under `accelerate launch` every rank runs this: plan once
                    return 0
                p = plan(cfg)
                print(p.drop(columns=["run_id"]).to_string(index=False))
                print(f"\n{len(p)} runs, {int((p.status == 'complete').sum())} complete, {int((p.todo != '').sum())} "
                      f"with work to do; {int(p.images_todo.sum()):,} images to process")
                print(describe_augmentation(cfg.data))
                return 0
            table = run_study(cfg, report=not args.no_report)
            if is_main_process():
                cols = [c for c in table.columns if c not in ("run_id", "status", DEPRECATED_PARAMS)]
                print(table[cols].to_string(index=False))
                if not args.no_report:
                    print_supported_comparisons(Path(cfg.output_dir) / "comparisons.csv", cfg.eval.alpha)
                print(f"\nresults: {Path(cfg.output_dir) / 'results.csv'}"
                      + ("" if args.no_report else f"   report: {Path(cfg.output_dir) / 'report.html'}"))
    except USER_ERRORS as e:
        # Bad input: one clear line naming the file/field/row; the run store is left as it was. A setting found
        # wrong only once the data is read (a label, split or loader option) is traced to the file or override.
        where = where_set(str(e), args.config, args.overrides) if isinstance(e, OptionError) else ""
        print(f"error: {e}{where}", file=sys.stderr)
        return 2
    except StudyFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

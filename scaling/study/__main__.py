"""Command line for a study's run store.

    python -m scaling.study summary <store>        completion, problems and the AUROC table (mean [CI] over seeds)
    python -m scaling.study fits <store>           fitted scaling-law exponents
    python -m scaling.study compare <store>        paired tests: bigger backbone, more pretraining (test and OOD)
    python -m scaling.study report <store> [-o F]  rebuild report.html, comparisons.csv and results.csv in the store
                                                   (with -o: only the HTML report, written to F)
    python -m scaling.study wandb-report <store>   create the study's W&B Report (online; after `wandb sync`)
    python -m scaling.study basin <store|config>   loss along the line between two seeds' fine-tuned weights, and
                                                   its barrier, per plain cell (<store>/analysis/basin.parquet)

A store that holds runs of several study configs (a launch with another learning rate on the same output_dir) is
refused with the list of its config hashes: choose one with --config-hash HASH, or --allow-mixed for all together.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from scaling.config import ConfigError
from scaling.io import UnreadableFile
from scaling.study.aggregate import LOW_DF, StoreError, headline_table, level_text, load_study, summarise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scaling.study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("summary", "print completion and the results table"),
                        ("fits", "print the fitted scaling-law exponents"),
                        ("compare", "print the paired tests of bigger backbones and more pretraining"),
                        ("report", "write the HTML report"),
                        ("wandb-report", "create the W&B Report of the study (needs online W&B)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("store", help="the study's output_dir (run store)")
        mixed = s.add_mutually_exclusive_group()
        mixed.add_argument("--config-hash", metavar="HASH",
                           help="the runs of this study config only (a store may hold runs of several)")
        mixed.add_argument("--allow-mixed", action="store_true", help="aggregate runs of different study configs")
        if name == "summary":
            s.add_argument("--metric", default="auroc", help="metric to tabulate (default: auroc)")
            s.add_argument("--label", default="macro", help="label to tabulate (default: macro)")
            s.add_argument("--attribute", default="all",
                           help="subgroup attribute (e.g. sex): one row per cell and group, and the attribute's "
                                "summaries such as worst_group_auroc (default: all = the overall rows)")
            s.add_argument("--csv", help="also write the seed summary (every metric) to this CSV")
        if name == "compare":
            s.add_argument("--label", default="macro", help="label to print, or 'all' (default: macro)")
            s.add_argument("--csv", help="also write every comparison (all labels) to this CSV")
            which = s.add_mutually_exclusive_group()
            which.add_argument("--subgroups", action="store_true",
                               help="the comparisons within each patient subgroup (full data) instead")
            which.add_argument("--brier", action="store_true",
                               help="the comparisons of the macro Brier score, raw and temperature-scaled (full "
                                    "data) instead")
        if name in ("fits", "report"):
            s.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates of each fit (default 200)")
        if name in ("fits", "report", "compare"):
            s.add_argument("--workers", type=_workers, default=None,
                           help="threads for the per-run replicates and the comparisons (default: every usable "
                                "core); the numbers do not depend on it")
        if name == "report":
            s.add_argument("-o", "--out", help="write only the HTML report, to this path, and nothing into the store "
                                               "(default: report.html, comparisons.csv and results.csv in the store)")
        if name == "wandb-report":
            s.add_argument("--project", help="W&B project (default: tracking.project of the study)")
            s.add_argument("--entity", help="W&B entity (default: tracking.entity of the study, else yours)")
    b = sub.add_parser("basin", help="interpolate two seeds of every plain fine-tuned cell (Neyshabur et al. 2020)")
    b.add_argument("store", help="the study's output_dir (run store), or the study's config file")
    b.add_argument("--eval-set", default="test", help="evaluation set the points are scored on (default: test)")
    b.add_argument("--max-examples", type=int, default=512,
                   help="size of the fixed, seeded sample of it (0: the whole set; default 512)")
    b.add_argument("--alphas", type=int, default=11,
                   help="number of evenly spaced interpolation points from 0 to 1, both included (default 11)")
    b.add_argument("--force", action="store_true", help="recompute pairs already in the table with these settings")
    return p


def _workers(text: str) -> int:
    """``--workers``: a whole number of threads, at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers must be a whole number >= 1, got {text!r}")
    return n


def _print_status(runs: pd.DataFrame) -> None:
    counts = runs["status"].value_counts()
    print(f"{int(counts.get('complete', 0))}/{len(runs)} runs complete "
          f"({', '.join(f'{v} {k}' for k, v in counts.items())})")
    bad = runs[~runs["status"].isin(["complete", "not started"])]
    for r in bad.itertuples(index=False):
        print(f"  {r.status:8s} {r.run_id}: {r.reason}")


def _wandb_report(args) -> int:
    import dataclasses

    from scaling.config import TrackingConfig
    from scaling.study.aggregate import read_study_config
    from scaling.study.wandb_report import check_available, save_wandb_report

    cfg = read_study_config(args.store)
    tracking = cfg.tracking if cfg is not None else TrackingConfig()
    tracking = dataclasses.replace(tracking, wandb="online", project=args.project or tracking.project,
                                   entity=args.entity or tracking.entity)
    check_available(tracking)
    print(save_wandb_report(args.store, tracking, config_hash=args.config_hash, allow_mixed=args.allow_mixed))
    return 0


def _basin(args) -> int:
    """The basin command: a store (its study.yaml, the store where it now is) or a config file (its output_dir)."""
    import dataclasses
    from pathlib import Path

    from scaling.config import load_config
    from scaling.engine.ranks import is_main_process
    from scaling.study.aggregate import check_store, read_study_config
    from scaling.study.analysis_tables import BASIN_FILE, basin_summary
    from scaling.study.basin import run_basin

    path = Path(args.store)
    if path.is_file():
        cfg = load_config(path)
    else:
        check_store(path)
        cfg = read_study_config(path)
        if cfg is None:
            raise StoreError(f"{path} has no readable study.yaml: give the study's config file instead")
        cfg = dataclasses.replace(cfg, output_dir=str(path))
    logging.getLogger("scaling.study.basin").setLevel(logging.INFO)  # progress: every point runs the model
    table = run_basin(cfg, eval_set=args.eval_set, max_examples=args.max_examples, n_alphas=args.alphas,
                      force=args.force)
    if not is_main_process():
        return 0
    if table.empty:
        print("no pair (needs a plain fine-tuned cell with two complete seeds and stored weights)")
        return 0
    print(f"Performance barriers (Frankle et al. 2020) along the line between two seeds' weights, "
          f"{Path(cfg.output_dir) / BASIN_FILE}: loss_barrier = max over alpha of loss − the chord of the end "
          f"points' losses; error_barrier the same of 1 − macro AUROC")
    print(basin_summary(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def _compare(args, df: pd.DataFrame, alpha: float = 0.05) -> int:
    """The report's pairwise comparisons (or, with ``--subgroups``, those within each patient subgroup; with
    ``--brier``, those of the Brier score), on the plain fine-tuning cells, for test and every OOD set, with
    intervals at 1 − ``alpha`` (the runs' eval.alpha)."""
    from scaling.study.aggregate import plain_cells
    from scaling.study.compare import HOLM_FAMILIES, brier_comparisons, pairwise_comparisons, subgroup_comparisons
    from scaling.study.tables import ood_sets

    plain = plain_cells(df)
    sets = ["test", *ood_sets(plain)]
    if args.subgroups:
        table = subgroup_comparisons(args.store, plain, eval_sets=sets, workers=args.workers, alpha=alpha)
    elif args.brier:
        table = brier_comparisons(args.store, plain, eval_sets=sets, workers=args.workers, alpha=alpha)
    else:
        table = pairwise_comparisons(args.store, plain, eval_sets=sets, workers=args.workers, alpha=alpha)
    if args.csv:
        table.to_csv(args.csv, index=False)
    per_label = not (args.subgroups or args.brier)
    shown = table[table["label"] == args.label] if per_label and args.label != "all" else table
    what = ("the macro AUROC within each patient subgroup, full data" if args.subgroups else
            "the macro Brier score (lower is better), raw and temperature-scaled, full data" if args.brier else
            "the macro AUROC" if args.label == "macro" else
            "the AUROC of every label and its macro" if args.label == "all" else f"the AUROC of label {args.label}")
    if shown.empty:
        print("no comparison (needs two cells that differ in backbone or in pretraining source only, with stored "
              "predictions"
              + (", and subgroups with metric rows" if args.subgroups else "")
              + ("" if args.label == "all" or not per_label or table.empty else f", and label {args.label!r}")
              + ")")
        return 0
    families = "; ".join(f"{f}: {HOLM_FAMILIES[f]}" for f in pd.unique(shown["holm_family"]))
    print(f"Paired comparisons of {what}: diff = compared cell − vs, [diff_lo, diff_hi] at {level_text(1 - alpha)}; "
          f"p_holm adjusted over the rows of one holm_family ({families})")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def _summary(args, df: pd.DataFrame, confidence: float = 0.95) -> int:
    """The seed summary of one metric, label and attribute, at the runs' ``confidence`` (1 − eval.alpha); an empty
    selection is an error listing what there is."""
    summary = summarise(df, confidence)
    table = headline_table(summary, args.metric, args.label, args.attribute)
    if table.empty:
        print(f"error: {_no_rows(df, args.metric, args.label, args.attribute)}", file=sys.stderr)
        return 2
    where = "" if args.attribute == "all" else f", per group of {args.attribute}"
    print(f"{args.metric} (label {args.label}{where}): mean over seeds [{level_text(confidence)} interval: seeds and "
          f"test patients], one column per evaluation set; (df x): fewer than {LOW_DF} degrees of freedom")
    print(table.to_string(index=False))
    if args.csv:
        summary.to_csv(args.csv, index=False)
    return 0


def _no_rows(df: pd.DataFrame, metric: str, label: str, attribute: str) -> str:
    """Why a summary selection is empty: the metrics and labels there are for the attribute, and where the metric
    is stored instead (a per-subgroup metric such as worst_group_auroc under its attribute)."""
    rows = df[df["attribute"] == attribute]
    attributes = sorted(a for a in df["attribute"].dropna().unique() if a != "all")
    where = "overall rows (attribute all)" if attribute == "all" else f"rows of attribute {attribute!r}"
    if rows.empty:
        return (f"no {where} in the complete runs; attributes: {', '.join(attributes) or 'none'} "
                f"(--attribute)")
    metrics, labels = sorted(rows["metric"].unique()), sorted(rows["label"].unique())
    text = f"no {where} for metric {metric!r} and label {label!r}."
    if metric in metrics:
        text += f" Labels with {metric}: {', '.join(sorted(rows.loc[rows['metric'] == metric, 'label'].unique()))}."
    else:
        elsewhere = sorted(df.loc[df["metric"] == metric, "attribute"].unique())
        if elsewhere:
            text += f" {metric} is stored under --attribute {', '.join(elsewhere)}."
        text += f" Metrics: {', '.join(metrics)}."
    return text + f" Labels: {', '.join(labels)}; attributes: {', '.join(attributes) or 'none'} (--attribute)."


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 50)
    pd.set_option("display.max_rows", 500)
    chosen = dict(allow_mixed=getattr(args, "allow_mixed", False), config_hash=getattr(args, "config_hash", None))
    try:
        if args.command == "report":
            from scaling.study.report import write_report
            from scaling.study.runner import rebuild_outputs

            logging.getLogger("scaling.study.report").setLevel(logging.INFO)  # progress: a large study takes a while

            if args.out:  # elsewhere: nothing is written into the store (which may be read-only)
                print(write_report(args.store, args.out, n_boot_fit=args.n_boot, workers=args.workers, **chosen))
            else:
                for path in rebuild_outputs(args.store, n_boot_fit=args.n_boot, workers=args.workers, **chosen):
                    print(path)
            return 0
        if args.command == "wandb-report":
            return _wandb_report(args)
        if args.command == "basin":
            return _basin(args)
        study = load_study(args.store, **chosen)
        df = study.results
        _print_status(study.runs)
        if df.empty:
            return 0
        if args.command == "fits":
            from scaling.study.aggregate import plain_cells
            from scaling.study.fits import fit_table

            # the scaling laws are fitted to plain fine-tuning cells, as in the report
            table, _ = fit_table(plain_cells(df), n_boot=args.n_boot, store_root=args.store, workers=args.workers,
                                 confidence=study.confidence)
            print(f"Fitted laws error = a·x^(−b) + c, error = 1 − macro AUROC; *_lo, *_hi: "
                  f"{level_text(study.confidence)} intervals (ci says what was resampled)")
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            return 0
        if args.command == "compare":
            return _compare(args, df, alpha=1 - study.confidence)
        return _summary(args, df, study.confidence)
    except (StoreError, ConfigError, UnreadableFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

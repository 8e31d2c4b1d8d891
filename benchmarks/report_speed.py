"""Report-speed benchmark: what building a study's report costs, section by section, at a size you choose.

    python benchmarks/report_speed.py                          # 4 backbones x 2 sources x 3 fractions x 3 seeds
    python benchmarks/report_speed.py --test-images 20000 --ood-images 100000 --labels 14

A store of complete runs is written first (``--out``, default a temporary folder): per run, spec.json, Gaussian
predictions for ``val``, ``test`` and one OOD set (each label's AUROC grows with the backbone and the pretraining,
two images per patient, sex and age-group attributes) and the metric rows of the real
``scaling.metrics.compute_run_metrics`` (``--eval-boot`` replicates). Then each statistic that reads the stored
predictions is timed on its own — the scaling-law fits, effective robustness, the paired comparisons overall, per
subgroup and on the Brier score — and finally the whole ``build_report``. Wall and CPU seconds of this process are
printed per section, with the process's peak resident memory while it ran (the high-water mark is reset before each
section); the report's own bootstrap count is ``--n-boot`` (``python -m scaling.study report --n-boot``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from scaling.config import DataConfig, EvalConfig, EvalSetConfig, GridConfig, StudyConfig, UpstreamConfig, to_dict
from scaling.io import atomic_write_text
from scaling.metrics import compute_run_metrics
from scaling.study.grid import config_hash, expand_grid, run_id
from scaling.study.runner import metric_settings
from scaling.study.store import RunStore


def _predictions(rng, n: int, labels: list[str], aurocs: np.ndarray, set_seed: int, prefix: str) -> pd.DataFrame:
    """Two images per patient; fixed labels and attributes per set (so runs pair on the same samples), scores
    drawn for the given per-label AUROCs."""
    fixed = np.random.default_rng(set_seed)
    patients = np.repeat([f"{prefix}{i:07d}" for i in range((n + 1) // 2)], 2)[:n]
    df = pd.DataFrame({"sample_id": [f"{prefix}s{i:08d}" for i in range(n)], "patient_id": patients,
                       "sex": fixed.choice(["F", "M"], n),
                       "age_group": fixed.choice(["0-40", "40-60", "60-80", "80+"], n)})
    for lab, a in zip(labels, aurocs):
        y = (fixed.random(n) < fixed.uniform(0.05, 0.4)).astype(float)
        d = np.sqrt(2) * stats.norm.ppf(a)
        logit = y * d - d / 2 + rng.normal(size=n) - 1.0
        df[f"label:{lab}"], df[f"logit:{lab}"], df[f"prob:{lab}"] = y, logit, 1 / (1 + np.exp(-logit))
    return df


def build_store(root: Path, args) -> StudyConfig:
    backbones = {f"bb{i}": 1e6 * 4**i for i in range(args.backbones)}
    sources = {"scratch": 0.0, **{f"upstream:src{i}": 1e3 * 10**i for i in range(args.sources - 1)}}
    labels = [f"L{i}" for i in range(args.labels)]
    cfg = StudyConfig(
        name="report_speed", output_dir=str(root),
        data=DataConfig(root="synthetic", labels=tuple(labels),
                        ood=(EvalSetConfig(name="ood", root="synthetic:ood"),)),
        upstream=tuple(UpstreamConfig(name=s.split(":", 1)[1], num_images=int(v)) for s, v in sources.items()
                       if s != "scratch"),
        grid=GridConfig(backbones=tuple(backbones), pretrained=tuple(sources),
                        fractions=tuple(args.fractions), seeds=tuple(range(args.seeds))))
    store = RunStore(root)
    atomic_write_text(root / "study.yaml", yaml.safe_dump({**to_dict(cfg), "_meta": {"config_hash": config_hash(cfg)}},
                                                          sort_keys=False))
    eval_cfg = EvalConfig(n_boot=args.eval_boot)
    sizes = {"val": args.val_images, "test": args.test_images, "ood": args.ood_images}
    for spec in expand_grid(cfg):
        rid = run_id(cfg, spec)
        rng = np.random.default_rng(zlib.crc32(rid.encode()))
        base = (0.70 + 0.03 * list(backbones).index(spec.backbone) + 0.02 * list(sources).index(spec.pretrained)
                + 0.03 * np.log10(spec.fraction) + 0.005 * rng.normal())
        aurocs = np.clip(base + np.linspace(-0.05, 0.05, len(labels)), 0.55, 0.97)
        preds = {e: _predictions(rng, n, labels, aurocs - (0.06 if e == "ood" else 0.0), k, e[0])
                 for k, (e, n) in enumerate(sizes.items())}
        rows, info = compute_run_metrics(preds, labels, ["sex", "age_group"], eval_cfg)
        store.write_spec(rid, {"run_id": rid, "study": cfg.name, "config_hash": config_hash(cfg),
                               "backbone": spec.backbone, "pretrained": spec.pretrained, "fraction": spec.fraction,
                               "seed": spec.seed, "n_params": int(backbones[spec.backbone]),
                               "pretrain_images": sources[spec.pretrained],
                               "n_train_images": int(100_000 * spec.fraction), "n_train_patients": 0,
                               "family": "benchmark"}, "{}\n")
        for e, p in preds.items():
            store.write_predictions(rid, e, p)
        store.write_meta(rid, {"fitted_on_val": info})
        # what the runner records with its metrics: without it every run reads as scored under an older definition
        store.write_evaluation(rid, {"metrics": metric_settings(cfg), "scored": sorted(preds)})
        store.write_metrics(rid, rows)
        store.mark_complete(rid)
    return cfg


def _reset_peak_rss() -> bool:
    """Start a new resident-memory high-water mark for this process (Linux: ``/proc/self/clear_refs``, 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(name: str, fn, out: list):
    peak = _reset_peak_rss()
    w, c = time.perf_counter(), time.process_time()
    result = fn()
    out.append((name, time.perf_counter() - w, time.process_time() - c, _peak_rss_mb() if peak else float("nan")))
    print(f"  {name}: {out[-1][1]:.1f} s", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", type=int, default=4)
    p.add_argument("--sources", type=int, default=2, help="pretraining sources, scratch included")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--labels", type=int, default=14)
    p.add_argument("--val-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--ood-images", type=int, default=30000)
    p.add_argument("--eval-boot", type=int, default=100, help="replicates of each run's own metric intervals")
    p.add_argument("--n-boot", type=int, default=200, help="the report's replicates (fits, effective robustness)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads for the per-run replicates and the comparisons (default: every usable core)")
    p.add_argument("--out", help="store folder (default: a temporary one, removed afterwards); a folder this script "
                   "wrote before with the same store arguments is reused, so two versions of the code can be timed "
                   "on one store")
    args = p.parse_args()

    from scaling.study.aggregate import load_study, plain_cells, summarise
    from scaling.study.compare import brier_comparisons, pairwise_comparisons, subgroup_comparisons
    from scaling.study.fits import fit_table
    from scaling.study.report import build_report
    from scaling.study.tables import effective_robustness
    from scaling.study.threads import resolve_workers

    tmp = None if args.out else tempfile.TemporaryDirectory()
    root = Path(args.out or tmp.name)
    runs = args.backbones * args.sources * len(args.fractions) * args.seeds
    print(f"writing {runs} runs: {args.labels} labels; val {args.val_images}, test {args.test_images}, "
          f"ood {args.ood_images} images", flush=True)
    made_with = {k: v for k, v in vars(args).items() if k not in ("n_boot", "out", "workers")}
    marker = root / "report_speed_args.json"
    if marker.is_file() and json.loads(marker.read_text()) == made_with:
        print(f"  reusing the store in {root}", flush=True)
    else:
        t0 = time.perf_counter()
        build_store(root, args)
        marker.write_text(json.dumps(made_with))
        print(f"  store written in {time.perf_counter() - t0:.0f} s", flush=True)

    times: list[tuple[str, float, float, float]] = []  # name, wall s, CPU s, peak RSS MB
    study = timed("load_study (tidy table of every run)", lambda: load_study(root), times)
    df = plain_cells(study.results)
    summary = summarise(df)
    w = args.workers
    print(f"  {resolve_workers(w)} thread(s) for the per-run replicates and the comparisons", flush=True)
    timed(f"fit_table ({args.n_boot} patient replicates)", lambda: fit_table(df, n_boot=args.n_boot,
                                                                            store_root=root, workers=w), times)
    timed(f"effective_robustness ({args.n_boot} replicates)", lambda: effective_robustness(
        summary, "ood", df=df, store_root=root, n_boot=args.n_boot, workers=w), times)
    timed("pairwise_comparisons (macro + per label)",
          lambda: pairwise_comparisons(root, df, ["test", "ood"], workers=w), times)
    timed("subgroup_comparisons", lambda: subgroup_comparisons(root, df, ["test", "ood"], workers=w), times)
    timed("brier_comparisons", lambda: brier_comparisons(root, df, ["test", "ood"], workers=w), times)
    timed("build_report (everything, figures included)",
          lambda: build_report(root, n_boot_fit=args.n_boot, workers=w), times)
    total = times[-1][1]
    print("\n| section | wall s | CPU s | share of build_report | peak RSS MB |\n|---|---|---|---|---|")
    for name, wall, cpu, rss in times:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / total:.0%} | {rss:.0f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""Metric-speed benchmark: cluster-bootstrap AUROC, DeLong, and one study run's compute_run_metrics.

    python benchmarks/metrics_speed.py [--n 100000] [--patients 20000] [--n-boot 1000] [--sklearn-reps 20]
    python benchmarks/metrics_speed.py --real-run-boot 0     # without the real-size run of 4.

1. 1,000 patient-level bootstrap replicates of AUROC at n = 100,000 images of 20,000 patients with
   ``scaling.metrics.bootstrap_ci`` (goal <= 2 s on 2 cores; goal >= 20x faster than the obvious alternative: a
   Python loop that resamples patients, gathers their images and calls ``sklearn.metrics.roc_auc_score``).
   The sklearn loop runs ``--sklearn-reps`` replicates (its per-replicate cost is constant) and is scaled
   linearly to ``--n-boot``.
2. DeLong CI at n = 1,000,000 (goal <= 2 s) and the paired DeLong test of two models on the same samples; the
   report's comparison of two backbones over seeds (``or_test_macro``: 5 seeds each, 14 labels, clustered by
   patient) on a test set the size of NIH ChestX-ray14's, 25,596 images of 2,797 patients (goal well under 1 s, as
   a report runs tens of them per evaluation set).
3. ``compute_run_metrics`` for one demo-sized run: val + test + OOD sets of 1,000 samples, 5 labels,
   3 subgroup attributes, 200 replicates (goal: well under 1 s).
4. ``compute_run_metrics`` for one run at a real size: NIH ChestX-ray14's test list (25,596 images of 2,797
   patients) with a validation and an OOD set of 5,000 images each, 14 labels, 3 subgroup attributes and
   ``--real-run-boot`` replicates (1,000, as the shipped study configs set ``eval.n_boot``), as it runs (one BLAS
   thread) and with the BLAS threads the process has by default (``compute_run_metrics.__wrapped__``): the
   ratio of the two, and the rows compared.

Each timing is the best of ``--repeats`` runs, as wall time and as this process's CPU time (on a shared machine
the wall time includes waiting for a core). The ratio against sklearn is given for both.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
from scipy.special import expit


def best_of(fn, repeats: int) -> tuple[str, float, object]:
    """Best wall and CPU time of ``repeats`` calls of ``fn`` as text, the best wall time, and the last result.

    On a shared machine wall time includes waiting for a core; CPU time (this process) does not, and is what the
    code costs on an idle machine (the metric code is single-threaded, so the two agree when nothing else runs).
    """
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return f"{min(walls):.2f} s wall ({min(cpus):.2f} s CPU)", (min(walls), min(cpus)), out


def sklearn_loop(y, p, pid, reps: int, seed: int = 0) -> tuple[float, float]:
    """(wall, CPU) seconds for ``reps`` cluster-bootstrap AUROC replicates the straightforward way: draw patients, gather their
    images (one vectorised np.repeat, so the loop is not penalised for Python-level gathering), call
    ``roc_auc_score``."""
    from sklearn.metrics import roc_auc_score

    _, codes = np.unique(pid, return_inverse=True)
    g = int(codes.max()) + 1
    rows = np.arange(y.size)
    rng = np.random.default_rng(seed)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        multiplicity = np.bincount(rng.integers(0, g, g), minlength=g)
        idx = np.repeat(rows, multiplicity[codes])
        roc_auc_score(y[idx], p[idx])
    return time.perf_counter() - w0, time.process_time() - c0


def demo_predictions(n: int, seed: int) -> pd.DataFrame:
    """A prediction frame shaped like the demo study's (5 labels, sex / age_group / site)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"sample_id": np.arange(n).astype(str), "patient_id": rng.integers(0, n // 2, n).astype(str),
                       "sex": rng.choice(["F", "M"], n), "age_group": rng.choice(["0-40", "40-60", "60-80", "80+"], n),
                       "site": rng.choice(["a", "b", "c"], n)})
    for lab in ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "No Finding"]:
        y = (rng.random(n) < 0.3).astype(float)
        z = 1.5 * y - 1.0 + rng.normal(size=n)
        df[f"label:{lab}"], df[f"logit:{lab}"], df[f"prob:{lab}"] = y, z, expit(z)
    return df


def real_size_predictions(n: int, n_patients: int, n_labels: int, seed: int) -> pd.DataFrame:
    """A prediction frame of ``n`` images of ``n_patients`` patients (images of a patient together, as a dataset
    lists them), ``n_labels`` findings of 2-20 % prevalence, and sex / age group / view attributes per patient."""
    rng = np.random.default_rng(seed)
    patient = np.sort(rng.integers(0, n_patients, n))
    df = pd.DataFrame({"sample_id": [f"{seed}-{i}" for i in range(n)], "patient_id": [f"p{seed}-{k}" for k in patient],
                       "sex": np.array(["F", "M"])[patient % 2],
                       "age_group": np.array(["0-40", "40-60", "60-80", "80+"])[patient % 4],
                       "view": rng.choice(["PA", "AP"], n)})
    for j in range(n_labels):
        y = (rng.random(n) < rng.uniform(0.02, 0.2)).astype(float)
        z = 1.5 * y - 1.5 + rng.normal(size=n)
        df[f"label:L{j}"], df[f"logit:L{j}"], df[f"prob:L{j}"] = y, z, expit(z)
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--patients", type=int, default=20_000)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--sklearn-reps", type=int, default=20)
    ap.add_argument("--delong-n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real-run-boot", type=int, default=1000,
                    help="replicates of the real-size run of 4. (0: leave it out)")
    args = ap.parse_args()

    from scaling.config import EvalConfig
    from scaling.metrics import bootstrap_ci, compute_run_metrics, delong_ci, delong_test, or_test_macro

    print(f"cpu cores: {os.cpu_count()}; load average: {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(0)
    pid = rng.integers(0, args.patients, args.n)
    y = (rng.random(args.n) < 0.3).astype(float)
    p = expit(1.2 * y - 0.8 + rng.normal(size=args.n))

    text, ours, res = best_of(lambda: bootstrap_ci("auroc", y, p, cluster=pid, n_boot=args.n_boot, seed=0),
                              args.repeats)
    scale = args.n_boot / args.sklearn_reps
    sk_wall, sk_cpu = (t * scale for t in sklearn_loop(y, p, pid, args.sklearn_reps))
    print(f"cluster bootstrap AUROC, n={args.n:,} ({args.patients:,} patients), {args.n_boot} replicates: "
          f"{text}  [goal <= 2 s]  AUROC {res.estimate:.4f} CI [{res.lo:.4f}, {res.hi:.4f}]")
    print(f"sklearn roc_auc_score loop: {sk_wall:.1f} s wall ({sk_cpu:.1f} s CPU) for {args.n_boot} replicates "
          f"(measured {args.sklearn_reps}, scaled x{scale:g})  ->  {sk_wall / ours[0]:.0f}x faster in wall time, "
          f"{sk_cpu / ours[1]:.0f}x in CPU time  [goal >= 20x]")

    rng = np.random.default_rng(1)
    y1 = (rng.random(args.delong_n) < 0.3).astype(float)
    p_a = expit(1.2 * y1 - 0.8 + rng.normal(size=args.delong_n))
    p_b = expit(1.0 * y1 - 0.8 + rng.normal(size=args.delong_n))
    t_ci, _, ci = best_of(lambda: delong_ci(y1, p_a), args.repeats)
    t_test, _, test = best_of(lambda: delong_test(y1, p_a, p_b), args.repeats)
    print(f"DeLong CI, n={args.delong_n:,}: {t_ci}  [goal <= 2 s]  AUROC {ci.auroc:.4f} +- {ci.se:.5f}")
    print(f"DeLong paired test, n={args.delong_n:,}, 2 models: {t_test}  diff {test.diff:.4f} "
          f"p={test.p_value:.2g}")

    n_img, n_pat, n_lab, seeds = 25_596, 2_797, 14, 5
    pid2 = rng.integers(0, n_pat, n_img)
    y2 = (rng.random((n_img, n_lab)) < 0.1).astype(float)
    scores = [np.stack([1.0 * y2 + rng.normal(size=y2.shape) for _ in range(seeds)]) for _ in range(2)]
    t_or, _, res = best_of(lambda: or_test_macro(y2, scores[0], scores[1], cluster=pid2), args.repeats)
    print(f"Obuchowski-Rockette macro AUROC, {seeds} seeds x 2 models, {n_lab} labels, n={n_img:,} "
          f"({n_pat:,} patients): {t_or}  [goal well under 1 s]  diff {res.diff:.4f} df {res.df:.1f}")

    preds = {name: demo_predictions(1000, seed) for seed, name in enumerate(["val", "test", "ood_site_b"])}
    labels = [c[len("label:"):] for c in preds["val"].columns if c.startswith("label:")]
    cfg = EvalConfig(n_boot=200)
    t_run, _, (rows, _) = best_of(lambda: compute_run_metrics(preds, labels, ["sex", "age_group", "site"], cfg),
                                  args.repeats)
    print(f"compute_run_metrics, 3 sets x 1,000 samples x 5 labels x 3 attributes, 200 replicates: {t_run} "
          f"({len(rows)} rows)  [goal well under 1 s]")

    if args.real_run_boot:
        from threadpoolctl import threadpool_info

        per_patient = n_img / n_pat
        preds = {name: real_size_predictions(n, round(n / per_patient), n_lab, seed)
                 for seed, (name, n) in enumerate([("val", 5_000), ("test", n_img), ("ood", 5_000)])}
        labels = [f"L{j}" for j in range(n_lab)]
        cfg = EvalConfig(n_boot=args.real_run_boot)
        blas = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)
        what = (f"compute_run_metrics at NIH ChestX-ray14 size (val 5,000 + test {n_img:,} + OOD 5,000 images, "
                f"{n_lab} labels, 3 attributes, {args.real_run_boot} replicates)")
        t_one, one, (rows_one, _) = best_of(lambda: compute_run_metrics(preds, labels, ["sex", "age_group", "view"],
                                                                        cfg), 1)
        print(f"{what}, one BLAS thread (as it runs): {t_one}", flush=True)
        t_all, all_, (rows_all, _) = best_of(lambda: compute_run_metrics.__wrapped__(
            preds, labels, ["sex", "age_group", "view"], cfg), 1)
        moved = int((rows_one[["lo", "hi"]].fillna(0) != rows_all[["lo", "hi"]].fillna(0)).any(axis=1).sum())
        print(f"  the same with the process's {blas} BLAS thread(s): {t_all}  ->  {all_[0] / one[0]:.2f}x the wall "
              f"time, {all_[1] / one[1]:.2f}x the CPU time of one thread; {moved} of {len(rows_one)} rows' "
              f"intervals differ in their last bits")


if __name__ == "__main__":
    main()

"""Scaling-law fit speed: one ``fit_power_law`` with its bootstrap, the curve_fit implementation against the
variable-projection one, on the same data in one run.

    python benchmarks/fit_speed.py                     # n_boot 200 and 1000, three study shapes
    python benchmarks/fit_speed.py --n-boot 200 --repeats 5

Each study shape is a law the report fits (error = 1 − macro AUROC against parameter count): 4, 5 or 6 backbone
sizes with 3, 5 or 4 seeds each, seed noise of 0.004 and 200 patient-level replicates per run (a shared patient
effect, as every run is scored on one resample of the test patients, plus each run's own noise), so the fit
resamples ``seeds+patients`` as the report's do. ``old`` is the implementation before (scipy ``curve_fit`` per
replicate and per jackknife refit, from the full-data estimate; kept here as the reference, not in the library),
``new`` is :func:`scaling.study.fits.fit_power_law`. Printed per shape and ``n_boot``: CPU seconds of this process
(best of ``--repeats``; the fits are single-threaded, so on an idle machine wall time is the same), the ratio, the
largest difference of the estimates (relative), of an interval end (relative to the interval's larger end), and
how much larger the old estimate's sse is than the new one's.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from scaling.metrics import rescale_resample, satterthwaite_widening
from scaling.study.fits import B_MAX, FitError, fit_power_law


def _law(z, amp, b, c):
    return amp * z ** (-b) + c


def old_fit_once(z, y, start=None):
    """scaling/study/fits.py's ``_fit_once`` at 72f0dcb: bounded TRF curve_fit, three starts or the estimate."""
    best, best_sse = None, math.inf
    hi_c = max(float(y.min()), 1e-9)
    c0 = 0.5 * hi_c
    starts = [(max(float(y.mean()) - c0, 1e-6), b0, c0) for b0 in (0.1, 0.5, 1.0)]
    if start is not None:
        starts = [(start[0], start[1], min(start[2], hi_c * 0.999))]
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p, _ = curve_fit(_law, z, y, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, B_MAX, hi_c]), maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((_law(z, *p) - y) ** 2))
        if sse < best_sse:
            best, best_sse = p, sse
    if best is None:
        if start is not None:
            return old_fit_once(z, y)
        raise FitError("the power law did not converge from any starting point")
    return tuple(float(v) for v in best)


def old_fit_power_law(x, error, *, n_boot=200, seed=0, confidence=0.95, replicates=None, record=None):
    """fit_power_law at 72f0dcb (its validation left out; the ``method`` logic as in the library); ``record``
    collects each replicate's resampled errors. tests/test_fits_varpro.py checks the library against it."""
    x, y = np.asarray(x, dtype=float), np.asarray(error, dtype=float)
    reps = None if replicates is None else np.asarray(replicates, dtype=float)
    x0 = float(np.exp(np.log(x).mean()))
    amp, b, c = old_fit_once(x / x0, y)
    strata = [np.flatnonzero(x == v) for v in np.unique(x)]
    seeds_vary = any(len(s) > 1 and np.ptp(y[s]) > 0 for s in strata)
    patients_vary = reps is not None and bool((np.nanmax(reps, axis=0) > np.nanmin(reps, axis=0)).any())
    method = "seeds+patients" if patients_vary else ("seeds" if seeds_vary else "none")
    rng = np.random.default_rng(seed)
    boots = []
    for r in range(n_boot if method != "none" else 0):
        picks = [rng.choice(s, size=len(s), replace=True) for s in strata]
        base = y if reps is None else reps[r % len(reps)]
        idx = np.concatenate(picks)
        yb = np.concatenate([rescale_resample(base[p], base[s].mean(), len(s)) for p, s in zip(picks, strata)])
        if record is not None:
            record.append(yb)
        if not np.isfinite(yb).all():
            continue
        try:
            ab, bb, cb = old_fit_once(x[idx] / x0, yb, start=(amp, b, c))
        except FitError:
            continue
        boots.append((ab * x0**bb, bb, cb))
    q = (50 * (1 - confidence), 50 * (1 + confidence))
    arr = np.array(boots)
    jackknife = []
    for s in strata:
        values = []
        for i in range(len(s) if len(s) > 1 else 0):
            keep = np.ones(x.size, dtype=bool)
            keep[s[i]] = False
            ab, bb, cb = old_fit_once(x[keep] / x0, y[keep], start=(amp, b, c))
            values.append((ab * x0**bb, bb, cb))
        jackknife.append(np.array(values).reshape(-1, 3))
    factor, _ = satterthwaite_widening(jackknife, confidence)
    centre = np.median(arr, axis=0)
    arr = np.clip(centre + factor * (arr - centre), [0.0, 0.0, 0.0], [np.inf, B_MAX, np.inf])
    cis = [tuple(float(v) for v in np.percentile(arr[:, j], q)) for j in range(3)]
    return {"a": amp * x0**b, "b": b, "c": c, "a_ci": cis[0], "b_ci": cis[1], "c_ci": cis[2], "n_boot": len(boots)}


def study(sizes: int, seeds: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (parameter counts), each run's error and its 200 patient replicates, for one law of the report."""
    x = np.repeat(np.geomspace(5.7e6, 6.3e8, sizes), seeds)
    y = 0.9 * (x / 1e6) ** -0.3 + 0.12 + rng.normal(0, 0.004, x.size)
    shared = rng.normal(0, 0.008, (200, 1))  # one resample of the test patients for every run
    return x, y, y + shared + rng.normal(0, 0.004, (200, x.size))


def best_cpu(fn, repeats: int):
    out, best = None, math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-boot", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--repeats", type=int, default=3, help="timings per fit (the best is printed); old: 1 at 1000")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    shapes = [(4, 3), (5, 5), (6, 4)]
    data = {shape: study(*shape, rng) for shape in shapes}
    print("| sizes × seeds | n_boot | old CPU s | new CPU s | old / new | max Δ estimate (rel) | max Δ interval end "
          "(rel to interval) | sse (old − new) / new |\n|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for n_boot in args.n_boot:
        for shape, (x, y, reps) in data.items():
            slow = 1 if n_boot >= 1000 else args.repeats
            t_old, old = best_cpu(lambda: old_fit_power_law(x, y, n_boot=n_boot, replicates=reps), slow)
            t_new, new = best_cpu(lambda: fit_power_law(x, y, n_boot=n_boot, replicates=reps), args.repeats)
            est = max(abs(getattr(new, k) - old[k]) / abs(old[k]) for k in "abc")
            ends = max(float(np.max(np.abs(np.subtract(getattr(new, f"{k}_ci"), old[f"{k}_ci"]))
                                    / np.max(np.abs(old[f"{k}_ci"])))) for k in "abc")
            worst = max(worst, ends)
            sse_old = np.sum((_law(x, old["a"], old["b"], old["c"]) - y) ** 2)
            sse_new = np.sum((new.predict(x) - y) ** 2)
            print(f"| {shape[0]} × {shape[1]} | {n_boot} | {t_old:.2f} | {t_new:.3f} | {t_old / t_new:.0f} × | "
                  f"{est:.1e} | {ends:.1e} | {(sse_old - sse_new) / sse_new:.1e} |", flush=True)
    print(f"\nlargest interval-end difference: {worst:.1e} of the interval's scale")


if __name__ == "__main__":
    main()

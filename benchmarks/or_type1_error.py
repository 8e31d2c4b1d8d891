"""How often the two-model test over seeds (``or_test``) rejects a true null, per number of seeds and df rule.

Simulated studies in which seeds matter and the two models are equal in expectation: every training (model × seed)
draws its own class separation 1 + τ·N(0, 1), the same distribution for both models, and scores the same patients
(a case difficulty shared by all runs, plus the run's own noise):

    score = separation · y + 0.7 · u_patient + N(0, 1),   y ~ Bernoulli(0.3),   300 patients.

The Obuchowski & Rockette (1995) statistic t = diff / se of each study is referred to Student's t with two
denominator degrees of freedom, on the same data:

* ``hillis``: Hillis's (2007) ddf = D² / (MS(T×R)² / (r − 1)), computed here from the result's ``se`` and
  ``ms_seed_interaction`` (D = r se² / 2) — what ``or_test`` used for every number of seeds before;
* ``r-1``: Obuchowski & Rockette's original ddf (t − 1)(r − 1) = r − 1;
* ``library``: the p-value ``or_test`` returns now (``method`` says which ddf: ``or`` below
  :data:`scaling.metrics.mrmc.HILLIS_MIN_SEEDS` seeds, ``or-hillis`` from there on).

Prints the share of studies with p < 0.05 per τ and number of seeds (nominal 0.05; ``se``: its standard error),
and the same share under a true difference (the first model's separation 0.5 higher: power) for the largest τ.

    python benchmarks/or_type1_error.py                     # 4,000 studies per row, ~2 min on one core
    python benchmarks/or_type1_error.py --studies 500       # quicker, coarser
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from scaling.metrics import or_test
from scaling.metrics.mrmc import HILLIS_MIN_SEEDS

LEVEL = 0.05


def study(rng, n_seeds: int, tau: float, gap: float, n_patients: int):
    """One simulated study: labels (N,) and the two models' scores (seeds, N)."""
    y = (rng.random(n_patients) < 0.3).astype(float)
    y[:2], y[2:4] = 1.0, 0.0  # both classes, always
    u = rng.normal(size=n_patients)

    def run(shift):
        return (1.0 + shift + tau * rng.normal()) * y + 0.7 * u + rng.normal(size=n_patients)

    return y, np.stack([run(gap) for _ in range(n_seeds)]), np.stack([run(0.0) for _ in range(n_seeds)])


def p_values(res) -> dict:
    """The study's p-value under each df rule, from one ``or_test`` result."""
    r = res.n_seeds
    d = res.se**2 * r / 2.0  # OR's D = MS(T×R) + r · max(Cov2 − Cov3, 0)
    ms = res.ms_seed_interaction
    ddf = np.inf if ms == 0 else d**2 * (r - 1) / ms**2
    return {"hillis": 2 * stats.t.sf(abs(res.t), ddf), "r-1": 2 * stats.t.sf(abs(res.t), r - 1),
            "library": res.p_value, "hillis df": ddf, "method": res.method}


def rejections(studies: int, n_seeds: int, tau: float, gap: float, n_patients: int, rng) -> dict:
    rows = []
    for _ in range(studies):
        res = or_test(*study(rng, n_seeds, tau, gap, n_patients))
        if np.isfinite(res.t):
            rows.append(p_values(res))
    df = pd.DataFrame(rows)
    out = {"tau": tau, "seeds": n_seeds, "studies": len(df), "method": "/".join(sorted(set(df["method"])))}
    out.update({rule: float((df[rule] < LEVEL).mean()) for rule in ("hillis", "r-1", "library")})
    out["se"] = float(np.sqrt(LEVEL * (1 - LEVEL) / len(df)))
    out["median_hillis_df"] = float(df["hillis df"].median())
    return out


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4000, help="simulated studies per row (default 4000)")
    ap.add_argument("--seeds", default="2,3,4,5", help="numbers of seeds, comma-separated (default 2,3,4,5)")
    ap.add_argument("--taus", default="0.15,0.3", help="sd of a training's class separation (default 0.15,0.3)")
    ap.add_argument("--patients", type=int, default=300, help="patients per study (default 300)")
    ap.add_argument("--gap", type=float, default=0.5, help="separation gap of the power rows (default 0.5; 0: none)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    if min(seeds) < 2:
        ap.error("--seeds must be at least 2: with one seed the test is DeLong's")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a study without a defined p-value is left out and counted
        null = pd.DataFrame([rejections(args.studies, r, tau, 0.0, args.patients, rng) for tau in taus for r in seeds])
        power = (pd.DataFrame([rejections(args.studies, r, max(taus), args.gap, args.patients, rng) for r in seeds])
                 if args.gap else None)
    fmt = {"float_format": lambda v: f"{v:.3f}", "index": False}
    print(f"or_test at the {LEVEL:g} level, {args.patients} patients, {args.studies} simulated studies per row "
          f"({time.perf_counter() - t0:.0f} s); Hillis's ddf from {HILLIS_MIN_SEEDS} seeds on")
    print("type-I error (true null):")
    print(null.to_string(**fmt))
    if power is not None:
        print(f"power (separation gap {args.gap:g}):")
        print(power.drop(columns="se").to_string(**fmt))
    return null


if __name__ == "__main__":
    main()

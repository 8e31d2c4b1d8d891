"""How often the report's seed-resampled 95 % intervals cover the truth, with and without the rescaling.

Simulated studies with seed noise only (no patient resampling), five seeds unless ``--seeds`` says otherwise:

* effective robustness: six cells on a probit line, one 0.03 above it, N(0, 0.01) noise on both AUROCs;
* the fitted law error = 30·x^(−0.3) + 0.08 at five sizes, N(0, 0.008) noise: exponent ``b`` and floor ``c``;
* data efficiency: AUROC linear in log fraction (0.70 at 1 %, +0.05 per decade), N(0, 0.01) noise, reference 0.78.

Each interval is computed twice on the same simulated data: ``plain`` is the percentile bootstrap of the seeds as
drawn, ``now`` what the library does (:func:`scaling.metrics.rescale_resample`: Rao & Wu's rescaling; then the
widening to Student's tails, with the degrees of freedom of one sample of seeds for data efficiency and
:func:`scaling.metrics.satterthwaite_widening`'s for the fits and effective robustness). Prints coverage and the
median width of ``now`` over ``plain``.

    python benchmarks/interval_coverage.py                  # 300 studies each, ~3 min on one core
    python benchmarks/interval_coverage.py --studies 50     # quicker, coarser
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import pandas as pd
from scipy import stats

import scaling.metrics.efficiency as efficiency_module
import scaling.study.fits as fits_module
import scaling.study.tables as tables_module
from scaling.metrics import data_efficiency, fraction_to_reach
from scaling.study.fits import fit_power_law
from scaling.study.tables import effective_robustness

MODULES = (efficiency_module, fits_module, tables_module)


def _as_drawn(drawn, center, n, confidence=None):
    """The resample as drawn: what the intervals were before the rescaling."""
    return np.broadcast_to(np.asarray(drawn, float), np.broadcast_shapes(np.shape(drawn), np.shape(center))).copy()


def _not_widened(jackknife, confidence=0.95):
    """No widening to Student's tails: what the intervals were before it."""
    return np.float64(1.0), np.float64(np.inf)


@contextlib.contextmanager
def plain_bootstrap():
    """Every seed resample as drawn and not widened, for the A/B (the library's modules look the helpers up by
    name)."""
    saved = [(m, name, getattr(m, name)) for m in MODULES for name in ("rescale_resample", "satterthwaite_widening")
             if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, _as_drawn if name == "rescale_resample" else _not_widened)
    try:
        yield
    finally:
        for m, name, f in saved:
            setattr(m, name, f)


def _robustness_runs(seeds_per_cell: list, cells: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-run rows effective_robustness resamples (test and OOD AUROC of every seed of every cell) and the
    per-cell summary it fits the line to (their seed means)."""
    rows = []
    for (backbone, n_params), runs in zip(cells, seeds_per_cell):
        for seed, (a_id, a_ood) in enumerate(runs):
            for metric, v in (("auroc_id", a_id), ("auroc_ood", a_ood)):
                rows.append({"run_id": f"{backbone}-{seed}", "pretrained": "scratch", "backbone": backbone,
                             "n_params": n_params, "fraction": 1.0, "seed": seed, "eval_set": "ood",
                             "label": "macro", "attribute": "all", "group": "all", "metric": metric, "value": v})
    df = pd.DataFrame(rows)
    keys = ["pretrained", "backbone", "n_params", "fraction", "eval_set", "label", "attribute", "group", "metric"]
    return df, df.groupby(keys, as_index=False)["value"].mean().rename(columns={"value": "mean"})


def robustness(studies: int, n_seeds: int, n_boot: int, rng) -> list[tuple]:
    ids = np.array([0.68, 0.72, 0.76, 0.80, 0.84, 0.88])
    ood = stats.norm.cdf(-0.3 + 0.95 * stats.norm.ppf(ids))
    ood[2] += 0.03
    slope, icept = np.polyfit(stats.norm.ppf(ids), stats.norm.ppf(ood), 1)
    truth = ood - stats.norm.cdf(icept + slope * stats.norm.ppf(ids))
    cells = [(f"b{i}", 10.0 ** (i + 5)) for i in range(ids.size)]
    out = []
    for _ in range(studies):
        seeds = [[(a + rng.normal(0, 0.01), o + rng.normal(0, 0.01)) for _ in range(n_seeds)]
                 for a, o in zip(ids, ood)]
        (df, summary), seed = _robustness_runs(seeds, cells), int(rng.integers(1 << 30))
        for kind in ("plain", "now"):
            with plain_bootstrap() if kind == "plain" else contextlib.nullcontext():
                table, _ = effective_robustness(summary, "ood", df=df, n_boot=n_boot, seed=seed)
            table = table.sort_values("n_params")
            lo, hi = table["er_lo"].to_numpy(), table["er_hi"].to_numpy()
            out += [("effective robustness", kind, lo[k] <= truth[k] <= hi[k], hi[k] - lo[k]) for k in range(ids.size)]
    return out


def power_law(studies: int, n_seeds: int, n_boot: int, rng) -> list[tuple]:
    x = np.repeat([1e6, 1e7, 3e7, 1e8, 4e8], n_seeds)
    a, b, c = 30.0, 0.3, 0.08
    out = []
    for _ in range(studies):
        y, seed = a * x**-b + c + rng.normal(0, 0.008, x.size), int(rng.integers(1 << 30))
        for kind in ("plain", "now"):
            with plain_bootstrap() if kind == "plain" else contextlib.nullcontext():
                fit = fit_power_law(x, y, n_boot=n_boot, seed=seed)
            out += [("law exponent b", kind, fit.b_ci[0] <= b <= fit.b_ci[1], fit.b_ci[1] - fit.b_ci[0]),
                    ("law floor c", kind, fit.c_ci[0] <= c <= fit.c_ci[1], fit.c_ci[1] - fit.c_ci[0])]
    return out


def efficiency(studies: int, n_seeds: int, n_boot: int, rng) -> list[tuple]:
    fractions = np.array([0.01, 0.03, 0.1, 0.3, 1.0])
    true = 0.70 + 0.05 * np.log10(fractions / 0.01)
    truth = fraction_to_reach(fractions, true, 0.78)
    out = []
    for _ in range(studies):
        values, seed = true[:, None] + rng.normal(0, 0.01, (fractions.size, n_seeds)), int(rng.integers(1 << 30))
        for kind in ("plain", "now"):
            with plain_bootstrap() if kind == "plain" else contextlib.nullcontext():
                res = data_efficiency(fractions, values, 0.78, n_boot=n_boot, seed=seed)
            out.append(("data efficiency", kind, res.lo <= truth <= res.hi, res.hi - res.lo))
    return out


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=300, help="simulated studies per interval (default 300)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per cell (default 5)")
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates per interval (default 200)")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds must be at least 2: one seed has nothing to resample")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    rows = [r for part in (robustness, power_law, efficiency)
            for r in part(args.studies, args.seeds, args.n_boot, rng)]
    df = pd.DataFrame(rows, columns=["interval", "kind", "covered", "width"])
    cover = df.pivot_table(index="interval", columns="kind", values="covered", aggfunc="mean", sort=False)
    # median: a data-efficiency interval whose curve may never reach the reference is infinitely wide
    width = df.pivot_table(index="interval", columns="kind", values="width", aggfunc="median", sort=False)
    out = pd.DataFrame({"plain": cover["plain"], "now": cover["now"],
                        "median width now / plain": width["now"] / width["plain"]})
    print(f"95 % intervals, {args.seeds} seeds, {args.studies} simulated studies each, {args.n_boot} replicates "
          f"({time.perf_counter() - t0:.0f} s): coverage of the truth")
    print(out.to_string(float_format=lambda v: f"{v:.3f}"))
    return out


if __name__ == "__main__":
    main()

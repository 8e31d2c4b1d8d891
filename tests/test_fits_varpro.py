"""The variable-projection fit of error = a·x^(−b) + c (``scaling.study.fits._fit_many``) against independent
references: scipy's ``curve_fit`` from many starts at tight tolerance (never a lower sse), a Gauss-Newton polish of
its own answer (the same parameters to ~1e-8), scipy's ``lsq_linear`` for the bounded linear step, exact power-law
data, and the curve_fit implementation the library used before (kept in ``benchmarks/fit_speed.py`` as the
reference only): the same draws, and intervals within the old optimiser's tolerance.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import OptimizeWarning, curve_fit, lsq_linear

import scaling.study.fits as fits
from scaling.study.fits import B_MAX, fit_power_law

REPO = Path(__file__).resolve().parents[1]

# ---- the implementation before variable projection (scaling/study/fits.py at 72f0dcb), the reference ----------
# It lives in benchmarks/fit_speed.py, which times the library against it.

_spec = importlib.util.spec_from_file_location("fit_speed", REPO / "benchmarks" / "fit_speed.py")
fit_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_speed)
_law, old_fit_once, old_fit_power_law = fit_speed._law, fit_speed.old_fit_once, fit_speed.old_fit_power_law


# ---- references for one fit -------------------------------------------------------------------------------------


def _fit_new(x, y):
    """(a on the z = x / geometric-mean scale, b, c) from the library, for one dataset."""
    t = -np.log(x / np.exp(np.log(x).mean()))
    return tuple(float(v[0]) for v in fits._fit_many(t[None], np.asarray(y, dtype=float)[None]))


def _sse(z, y, p):
    return float(np.sum((_law(z, *p) - y) ** 2))


def _multistart(z, y):
    """The best curve_fit over 8 × 3 starts at tight tolerance: a careful local optimiser, run many times."""
    hi_c = max(float(y.min()), 1e-9)
    best, best_sse = None, math.inf
    for b0 in (0.02, 0.1, 0.3, 0.6, 1.0, 2.0, 3.5, 4.9):
        for c0 in (0.0, 0.5 * hi_c, 0.99 * hi_c):
            a0 = max(float(np.mean((y - c0) * z**b0)), 1e-6)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", OptimizeWarning)
                    p, _ = curve_fit(_law, z, y, p0=(a0, b0, c0), bounds=([0, 0, 0], [np.inf, B_MAX, hi_c]),
                                     ftol=1e-15, xtol=1e-15, gtol=1e-15, maxfev=20000)
            except (RuntimeError, ValueError):
                continue
            if _sse(z, y, p) < best_sse:
                best, best_sse = p, _sse(z, y, p)
    return best, best_sse


def _datasets():
    """(name, x, y): random laws with noisy seeds, and the adversarial cases a study meets."""
    rng = np.random.default_rng(20261207)
    out = []
    for i in range(60):  # random laws: 4-6 sizes over 2-6 decades, 1-5 seeds, noise from none to large
        k, seeds = rng.integers(4, 7), rng.integers(1, 6)
        lo = rng.uniform(2, 6)
        x = np.repeat(np.geomspace(10**lo, 10 ** (lo + rng.uniform(2, 6)), k), seeds)
        a, b, c = rng.uniform(0.05, 0.6), rng.uniform(0.05, 1.5), rng.uniform(0.0, 0.3)
        z = x / x.min()
        y = a * z**-b + c + rng.normal(0, rng.choice([0.0, 1e-3, 1e-2, 5e-2]), x.size)
        out.append((f"random{i}", x, np.abs(y)))
    x6 = np.repeat(np.geomspace(1e3, 1e9, 6), 3)
    out += [
        ("flat", x6, 0.2 + rng.normal(0, 0.01, x6.size)),  # b -> 0 or a -> 0
        ("rising", np.geomspace(1e5, 1e8, 4), np.array([0.10, 0.12, 0.14, 0.16])),  # b = 0, a + c = mean
        ("step", x6, 0.3 * (x6 / 1e3) ** -7.0 + 0.05 + rng.normal(0, 1e-4, x6.size)),  # one high point, then flat
        ("steep", np.repeat(np.geomspace(10, 100, 5), 2), 0.5 * np.repeat(np.geomspace(1, 10, 5), 2) ** -8.0 + 0.05
         + np.tile([1e-3, -1e-3], 5)),  # b at B_MAX
        ("floor_zero", x6, 0.4 * (x6 / 1e3) ** -0.2 + rng.normal(0, 0.003, x6.size)),  # c at 0
        ("floor_min", x6, np.r_[0.3 * (x6[:-3] / 1e3) ** -0.5 + 0.1, [0.05, 0.06, 0.055]]),  # c at min error
        ("four_points", np.array([1e4, 1e5, 1e6, 1e7]), np.array([0.31, 0.22, 0.2, 0.16])),
        ("huge_range", np.geomspace(1e3, 1e9, 5), 2.0 * np.geomspace(1e3, 1e9, 5) ** -0.25 + 0.01
         + np.array([1e-3, -2e-3, 1e-3, 0.0, 5e-4])),
        ("noisy_seeds", np.repeat([1e6, 4e6, 1.6e7, 6.4e7, 2.56e8], 5),
         np.repeat(0.2 * np.array([1.0, 0.8, 0.64, 0.51, 0.41]) + 0.1, 5) + rng.normal(0, 0.04, 25)),
        ("zero_error", np.geomspace(1e4, 1e7, 4), np.array([0.2, 0.1, 0.05, 0.0])),  # c bounded to [0, 1e-9]
    ]
    return out


@pytest.mark.parametrize("name,x,y", _datasets(), ids=[d[0] for d in _datasets()])
def test_never_worse_than_curve_fit_from_many_starts_and_a_polish_of_it_moves_nothing(name, x, y):
    z = x / np.exp(np.log(x).mean())
    new = _fit_new(x, y)
    ref, ref_sse = _multistart(z, y)
    new_sse = _sse(z, y, new)
    scale = float(np.sum((y - y.mean()) ** 2)) + 1e-300
    assert new_sse <= ref_sse * (1 + 1e-9) + 1e-13 * scale, (name, new, ref, new_sse, ref_sse)
    hi_c = max(float(y.min()), 1e-9)
    assert new[0] >= 0 and 0 <= new[1] <= B_MAX and 0 <= new[2] <= hi_c
    # Gauss-Newton (trust region) from the new answer at the tightest tolerance: where the optimum is unique it
    # stays put, so the answer is a minimum to ~1e-8 relative, not a point near one
    if new[0] > 1e-6 and new[1] > 1e-6:  # b = 0 or a = 0: only a + c, or only c, is determined
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            pol, _ = curve_fit(_law, z, y, p0=new, bounds=([0, 0, 0], [np.inf, B_MAX, hi_c]), ftol=1e-15,
                               xtol=1e-15, gtol=1e-15, maxfev=20000)
        assert _sse(z, y, new) <= _sse(z, y, pol) * (1 + 1e-9) + 1e-13 * scale
        np.testing.assert_allclose(new, pol, rtol=2e-7, atol=1e-9 * max(1.0, abs(new[0])), err_msg=name)
        # and the multi-start optimum is the same point, unless curve_fit stopped in another (worse) local one
        if ref_sse <= new_sse * (1 + 1e-6) + 1e-12 * scale:
            np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-6, err_msg=name)


def test_global_where_curve_fit_from_the_old_three_starts_stops_in_a_local_minimum():
    """A noisy dataset whose profile sse(b) has two minima, near b = 0.24 (sse 0.07384) and b = 1.04 (0.07240):
    curve_fit from the old three starts settles in the worse one, the grid finds the better one. (In 400 random
    noisy laws like it, the old fit was worse in this one by over 0.01 %, and better in none.)"""
    x = np.array([1e3, 5.32e3, 2.834e4, 1.5089e5, 8.0328e5, 4.27643e6])
    y = np.array([0.4904, 0.1562, 0.1059, 0.3063, 0.2055, 0.2569])
    z = x / np.exp(np.log(x).mean())
    new, old = _fit_new(x, y), old_fit_once(z, y)
    assert old[1] == pytest.approx(0.2406, abs=1e-3) and new[1] == pytest.approx(1.0370, abs=1e-3)
    assert _sse(z, y, old) > 1.017 * _sse(z, y, new)
    # so did curve_fit from all 24 starts of _multistart; a scan of b every 0.002 with scipy's bounded linear least
    # squares for (a, c) finds nothing lower either
    assert _sse(z, y, new) < 0.99 * _multistart(z, y)[1]
    hi_c = y.min()
    scan = min(2 * lsq_linear(np.c_[z**-b, np.ones_like(z)], y, bounds=([0, 0], [np.inf, hi_c]), tol=1e-12).cost
               for b in np.linspace(0, B_MAX, 2501))
    assert _sse(z, y, new) <= scan * (1 + 1e-12)


@pytest.mark.parametrize("b", [0.05, 0.3, 1.5, 4.0, B_MAX])
@pytest.mark.parametrize("c", [0.0, 0.07])
@pytest.mark.parametrize("x", [np.geomspace(1e5, 1e9, 6), np.geomspace(1e3, 1e9, 4),
                               np.repeat([10.0, 20.0, 40.0, 80.0, 160.0], 3)])
def test_exact_power_law_data_is_recovered_to_1e_8(b, c, x):
    a = 2.0 * x.min() ** b  # error 2.07 at the smallest x, ~c at the largest
    y = a * x**-b + c
    f = fit_power_law(x, y, n_boot=0)
    assert f.b == pytest.approx(b, rel=1e-8, abs=1e-12)
    assert f.a == pytest.approx(a, rel=1e-8)
    assert f.c == pytest.approx(c, rel=1e-8, abs=1e-10)
    assert f.rmse < 1e-10


def test_an_exponent_on_its_bound_comes_back_exactly():
    """b = 0 and b = B_MAX are answers, not the limits of a search: at_bound names them, and for a flat law the tie
    a + c = mean goes to the floor at the lowest error (only a + c is determined there)."""
    rising = fit_power_law(np.geomspace(1e5, 1e8, 4), [0.10, 0.12, 0.14, 0.16], n_boot=0)
    assert (rising.b, rising.c) == (0.0, 0.10) and rising.a == pytest.approx(0.03, rel=1e-12)
    assert rising.at_bound == "b=0, c=min error"
    x = np.repeat(np.geomspace(10, 100, 5), 2)
    steep = fit_power_law(x, 0.5 * (x / 10) ** -8.0 + 0.05 + np.tile([1e-3, -1e-3], 5), n_boot=50)
    assert steep.b == B_MAX and steep.b_ci == (B_MAX, B_MAX) and steep.at_bound == "b=5"


def test_bounded_linear_step_matches_scipys_lsq_linear():
    """The closed form for fixed b (four active-set cases of a ≥ 0, 0 ≤ c ≤ min error) against scipy's bounded
    least squares, on random data where every case is the optimum somewhere."""
    rng = np.random.default_rng(0)
    t = -np.log(np.geomspace(1e-2, 1e2, 6))
    ys, bs = [], []
    for _ in range(300):
        ys.append(np.abs(rng.uniform(-0.5, 0.5) * np.exp(rng.uniform(0, 2) * t) + rng.uniform(0, 0.4)
                         + rng.normal(0, rng.choice([1e-3, 0.1]), t.size)))
        bs.append(rng.choice([0.0, rng.uniform(0, B_MAX)]))
    y, b = np.array(ys), np.array(bs)
    hi = np.maximum(y.min(axis=1), 1e-9)[:, None]
    amp, c, sse = fits._bounded_ls(t[None, None], y[:, None], hi, b[:, None])
    cases = set()
    for r in range(len(y)):
        u = np.exp(b[r] * (t - t.max()))
        ref = lsq_linear(np.c_[u, np.ones_like(u)], y[r], bounds=([0, 0], [np.inf, hi[r, 0]]), tol=1e-14,
                         method="bvls")
        assert sse[r, 0] == pytest.approx(2 * ref.cost, rel=1e-9, abs=1e-14)
        if b[r] > 0:
            np.testing.assert_allclose([amp[r, 0], c[r, 0]], ref.x, rtol=1e-7, atol=1e-10)
        cases.add((bool(amp[r, 0] == 0), bool(c[r, 0] == 0), bool(c[r, 0] == hi[r, 0])))
    # the interior, c = 0 and c = min error all occurred (a = 0 never beats c = min error with its a ≥ 0, as no error
    # is below the lowest one; it is there for b = 0, where only a + c is determined)
    assert len(cases) >= 3


def test_rows_fitted_together_equal_rows_fitted_alone():
    """The replicates are fitted in chunks of rows; a row's answer does not depend on its neighbours."""
    rng = np.random.default_rng(1)
    x = np.repeat(np.geomspace(1e4, 1e8, 5), 4)
    t = -np.log(x / np.exp(np.log(x).mean()))
    y = 0.3 * (x / 1e4) ** -0.4 + 0.05 + rng.normal(0, 0.01, (300, x.size))  # over 4 chunks of rows
    together = np.stack(fits._fit_many(t[None], y), axis=1)
    alone = np.array([np.array(fits._fit_many(t[None], y[r:r + 1]))[:, 0] for r in range(0, 300, 37)])
    np.testing.assert_array_equal(together[::37], alone)


FIXTURES = {  # the data of the interval tests in test_study_fits.py
    "noisy_seeds": dict(
        x=np.repeat(np.geomspace(1e5, 2.56e7, 5), 3),
        y=lambda x: 0.3 * (x / 1e5) ** -0.35 + 0.05 + np.random.default_rng(0).normal(0, 0.003, x.size),
        kw=dict(n_boot=200, seed=1)),
    "no_floor": dict(
        x=np.repeat([1e3, 3e3, 1e4, 3e4, 1e5], 2),
        y=lambda x: 2.0 * x ** -0.3 + np.random.default_rng(6).normal(0, 0.01, x.size), kw=dict(n_boot=100)),
    "two_seeds": dict(
        x=np.repeat([3e2, 1e3, 3e3, 1e4], 2),
        y=lambda x: 0.5 * (x / 3e2) ** -0.3 + 0.1 + np.tile([0.004, -0.004], 4), kw=dict(n_boot=100)),
    "two_seeds_patients": dict(
        x=np.repeat([3e2, 1e3, 3e3, 1e4], 2),
        y=lambda x: 0.5 * (x / 3e2) ** -0.3 + 0.1 + np.tile([0.004, -0.004], 4),
        kw=dict(n_boot=100, replicates=lambda y: y + np.random.default_rng(1).normal(0, 0.01, (100, y.size)))),
    "five_seeds_patients": dict(
        x=np.repeat(np.geomspace(1e5, 2.56e7, 5), 5),
        y=lambda x: 0.3 * (x / 1e5) ** -0.35 + 0.05 + np.random.default_rng(4).normal(0, 0.004, x.size),
        kw=dict(n_boot=300, seed=2,
                replicates=lambda y: y + np.random.default_rng(5).normal(0, 0.006, (200, y.size)))),
}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_intervals_agree_with_the_old_curve_fit_implementation(name, monkeypatch):
    """Same draws (the replicates' resampled errors are bit for bit the old loop's), the estimates within 1e-5
    relative, and every interval end within 1e-4 of its interval's larger end. What is left is curve_fit's own
    tolerance (ftol = xtol = 1e-8 by default): its refits stopped up to ~1e-5 from the replicates' optima in b (the
    new ones have the lower sse), and the widening about the median carries that to the ends. Measured: at most
    3.5e-5 (no_floor's c interval), 7e-6 for b."""
    fx = FIXTURES[name]
    x = fx["x"]
    y = fx["y"](x)
    kw = dict(fx["kw"])
    if "replicates" in kw:
        kw["replicates"] = kw["replicates"](y)
    drawn_old, drawn_new = [], []
    old = old_fit_power_law(x, y, record=drawn_old, **kw)
    real = fits._fit_many
    monkeypatch.setattr(fits, "_fit_many", lambda t, yb: drawn_new.append(np.array(yb)) or real(t, yb))
    new = fit_power_law(x, y, **kw)
    np.testing.assert_array_equal(np.array(drawn_old), drawn_new[1])
    assert new.n_boot == old["n_boot"] == kw["n_boot"]
    for key in ("a", "b", "c"):
        assert getattr(new, key) == pytest.approx(old[key], rel=1e-5, abs=1e-7), key
        ends, ref = np.array(getattr(new, f"{key}_ci")), np.array(old[f"{key}_ci"])
        np.testing.assert_allclose(ends, ref, rtol=0, atol=1e-4 * np.max(np.abs(ref)), err_msg=key)


def test_fit_speed_benchmark_runs_and_agrees_with_its_reference():
    """benchmarks/fit_speed.py end to end at a small n_boot: its table's rows, and old and new within 1e-4."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "fit_speed.py"), "--n-boot", "30", "--repeats",
                           "1"], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in proc.stdout.splitlines()
            if ln.startswith("| ") and "×" in ln.split("|")[1] and ln.split("|")[2].strip().isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("4 × 3", "30"), ("5 × 5", "30"), ("6 × 4", "30")]
    assert all(float(r[5]) < 1e-4 and float(r[6]) < 1e-4 for r in rows), proc.stdout

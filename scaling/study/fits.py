"""Scaling-law fits: error = a·x^(−b) + c, with bootstrap-over-runs uncertainty.

``error`` is 1 − AUROC and ``x`` is the parameter count, the pretraining-set size or the labelled-set size. ``c``
is the irreducible error the curve levels off at and ``b`` the exponent the tables report. Three parameters need
at least four distinct ``x`` values to leave a degree of freedom; with fewer the fit is refused (an exactly
interpolating curve would report an exponent with no meaning).

Uncertainty: each bootstrap replicate resamples the runs *within* each ``x`` value (the seeds: seed-to-seed
variation, with the design of ``x`` values kept fixed) and, when the runs' stored predictions are at hand, also the
evaluation patients — one resample of patients shared by every run, so a replicate is "the same study scored on
another sample of patients" and the error correlation between runs evaluated on one test set is kept. Then the law
is refitted. Few seeds make a plain percentile interval too short, so each x's drawn runs are rescaled about that
x's mean (:func:`scaling.metrics.rescale_resample`) and the refitted parameters widened to Student's tails
(:func:`scaling.metrics.satterthwaite_widening`, degrees of freedom from refits with each run left out): 94-95 %
coverage with five seeds in ``benchmarks/interval_coverage.py``, where the plain interval had 88 %. Resampling
whole runs across ``x`` values instead (a pairs bootstrap) is degenerate at the few points
a scaling study has: with four runs at four sizes only the 24 of 256 resamples that keep four distinct sizes
could be fitted, and each is the original data. With one run per ``x`` and no predictions there is nothing to
resample, and the intervals are NaN (``ci`` says so); so it is when the runs within every ``x`` are identical and
there are no patient replicates either: every resample would be the data itself, and its zero-width "interval"
would claim a certainty that nothing measured.

A parameter that ends on its bound (``b`` at 0 or 5, ``c`` at 0 or at the lowest observed error) is named in
``at_bound``: its interval is cut off there, and the law may not describe the points (a flat curve: b = 0).

How the law is fitted (:func:`_fit_many`): for a fixed exponent ``b`` the law is linear in ``a`` and ``c``, and
the least squares of ``a ≥ 0``, ``0 ≤ c ≤ lowest error`` has a closed form; only the profile sse(b) is minimised
(variable projection), on a grid over [0, 5] and then to the zero of its slope, to the last bits of ``b``. This
is done for every bootstrap replicate at once with array arithmetic: a report's 46 fits × 200 replicates took
~60 s of scipy ``curve_fit`` calls, one at a time and holding the GIL; now a fit with its 200 replicates costs
30-40 ms (``benchmarks/fit_speed.py``). It finds the global minimum over b (up to two minima within one grid step
of 0.05), where ``curve_fit`` from three starts could stop in a local one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scaling.metrics import rescale_resample, satterthwaite_widening
from scaling.study.aggregate import full_fraction, plain_cells
from scaling.study.store import RunStore, common_samples
from scaling.study.threads import thread_map

MIN_POINTS = 4
"""Fewest distinct x values a three-parameter law is fitted to."""

B_MAX = 5.0
"""Upper bound of the exponent b in the fit."""

X_AXES = {
    "n_params": "parameters",
    "pretrain_images": "pretraining images",
    "n_train_images": "labelled training images",
    "fraction": "fraction of labelled training data",
}
"""Scaling axes and their readable names."""


class FitError(ValueError):
    """A power law cannot be fitted to these points (too few distinct x, or an x ≤ 0)."""


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted law error = a·x^(−b) + c with percentile-bootstrap intervals of each parameter."""

    a: float
    b: float
    c: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    c_ci: tuple[float, float]
    n_points: int
    """Runs the law was fitted to."""
    n_x: int
    """Distinct x values among them."""
    rmse: float
    """Root-mean-square residual of the fit on its runs."""
    n_boot: int
    """Bootstrap replicates refitted (the intervals' sample size): those whose errors are all finite."""
    ci: str = "seeds"
    """What the intervals resample: ``seeds+patients``, ``seeds`` (runs within each x only) or ``none`` (nothing
    varies: one run per x, or identical runs within every x, and no patient replicates; intervals NaN)."""
    at_bound: str = ""
    """The parameters that sit on a bound of the fit, e.g. ``b=0`` or ``c=min error`` ("" when none)."""

    def predict(self, x) -> np.ndarray:
        """The fitted error at ``x``."""
        return self.a * np.asarray(x, dtype=float) ** (-self.b) + self.c


GRID = 101
"""Exponents tried on the coarse grid over [0, B_MAX] (a step of 0.05) before each fit's bracket is refined."""

_STEPS = 100
"""Most refinement steps of a fit's bracket (one grid step, 0.05 wide); ~10 reach the last bit of b."""


def _law(z, amp, b, c):
    return amp * z ** (-b) + c


def _bounded_ls(t: np.ndarray, y: np.ndarray, hi: np.ndarray, b: np.ndarray, slope: bool = False,
                exact: bool = False):
    """For fixed exponents ``b``, the least-squares ``(A, c)`` of ``y ≈ A·u + c`` with ``A ≥ 0``, ``0 ≤ c ≤ hi``.

    ``u = exp(b·(t − max t))`` with ``t = −ln z``, so ``u`` is in (0, 1] (no overflow for any x range) and the law's
    amplitude on ``z`` is ``A·exp(−b·max t)``. Shapes: ``t`` and ``y`` ``(R, 1, n)`` (``t`` may be ``(1, 1, n)``),
    ``hi`` ``(R, 1)``, ``b`` ``(R, K)``; returns ``A, c, sse`` of shape ``(R, K)`` and, with ``slope``, half the
    profile's derivative d sse / d b (envelope theorem: the partial derivative at the optimal ``A, c``, whose
    constraints do not depend on b). At b = 0 only ``A + c`` is determined; the tie goes to the largest ``c``, the
    smallest ``A``, whose slope has the sign of the profile's derivative from the right.

    A convex quadratic in two variables over a box-like set: its minimum is the unconstrained one if that is
    feasible, else the best of the minima along the three edges (A = 0, c = 0, c = hi), each a one-variable
    least-squares clipped to its interval; all four are computed and the feasible one with the least sse kept. The
    candidates' sse come from the centred sums, ``n·(A·mean u + c − mean y)² + A²·Sww − 2A·Swy + Syy``, at no pass
    over the points but without the digits below ~1e-16·Syy, which near-exact data needs (``exact`` sums each
    candidate's squared residuals instead, for the final choice of a fit); the sse returned, which the exponents
    are compared by, is always the kept candidate's squared residuals summed. ``u − mean u`` is
    ``expm1(…) − mean expm1(…)``, exact as b → 0, where ``u`` itself rounds to 1.
    """
    w = np.expm1(b[..., None] * (t - t.max(axis=-1, keepdims=True)))      # u − 1, (R, K, n)
    n = y.shape[-1]
    ybar = y.mean(axis=-1)                                                 # (R, 1)
    yc = y - ybar[..., None]
    syy = np.einsum("...i,...i->...", yc, yc)
    wbar = w.mean(axis=-1)
    w -= wbar[..., None]                                                   # now u − mean u
    sww = np.einsum("...i,...i->...", w, w)
    swy = np.einsum("...i,...i->...", w, np.broadcast_to(yc, w.shape))
    ubar = 1.0 + wbar
    suu = sww + n * ubar**2                                                # Σu², Σu·y from the centred sums
    suy = swy + n * ubar * ybar
    with np.errstate(divide="ignore", invalid="ignore"):
        a1 = swy / sww                                                     # unconstrained
    c1 = ybar - a1 * ubar
    ok1 = (sww > 0) & (a1 >= 0) & (c1 >= 0) & (c1 <= hi)
    a1, c1 = np.where(ok1, a1, 0.0), np.where(ok1, c1, 0.0)
    a2 = np.maximum((suy - n * hi * ubar) / suu, 0.0)                      # c = hi
    a3 = np.maximum(suy / suu, 0.0)                                        # c = 0
    c4 = np.broadcast_to(np.clip(ybar, 0.0, hi), a1.shape)                 # A = 0
    hi_ = np.broadcast_to(hi, a1.shape)
    zero = np.zeros_like(a1)
    amps, cs = [a1, a2, a3, zero], [c1, hi_, zero, c4]
    if exact:  # every candidate's residuals summed (the final choice of a fit)
        sse = np.stack([np.einsum("...i,...i->...", r := a[..., None] * w + (a * ubar + c - ybar)[..., None] - yc, r)
                        for a, c in zip(amps, cs)])
    else:
        sse = np.stack([n * (a * ubar + c - ybar) ** 2 + a * (a * sww - 2 * swy) + syy for a, c in zip(amps, cs)])
    sse[0][~ok1] = np.inf
    sse[2][sww == 0] = np.inf  # b = 0: c = hi fits the same a + c (with a ≥ 0 when mean y ≥ hi, else A = 0 does)
    pick = np.argmin(sse, axis=0)                                          # ties: interior, c = hi, c = 0, A = 0
    amp, c = np.choose(pick, amps), np.choose(pick, cs)
    resid = amp[..., None] * w + (amp * ubar + c - ybar)[..., None] - yc  # A·u + c − y, from the centred terms
    out = amp, c, np.einsum("...i,...i->...", resid, resid)
    if not slope:
        return out
    u = w + ubar[..., None]
    return (*out, amp * np.einsum("...i,...i->...", resid * u, np.broadcast_to(t, u.shape)))


def _fit_many(t: np.ndarray, y: np.ndarray, grid: int = GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares ``(amp, b, c)`` of ``y ≈ amp·z^(−b) + c`` for every row of ``y`` at once, on ``t = −ln z``.

    ``t`` has shape ``(R, n)`` or ``(1, n)`` (every row on the same x), ``y`` ``(R, n)``. Bounds: ``amp ≥ 0``,
    ``0 ≤ b ≤ B_MAX``, ``0 ≤ c ≤ max(min(y), 1e-9)`` (the row's lowest error). Variable projection (Golub & Pereyra,
    SIAM J. Numer. Anal. 10, 1973): for a fixed b the law is linear in (amp, c), whose bounded least squares has a
    closed form (:func:`_bounded_ls`), so only the profile sse(b) is minimised: on a grid of ``grid`` exponents
    over [0, B_MAX], then by finding the zero of its derivative in the grid step on the downhill side of the best
    grid point, bracketed (Illinois regula falsi with a bisection every fourth step; ~10 steps), to the last bits
    of b. An exponent on a bound (b = 0 for a flat or rising curve, b = B_MAX) comes back exactly. The result is
    never worse than the best grid point, which it is checked against, so the minimum found is the global one
    unless two minima lie within one grid step.
    """
    y = np.asarray(y, dtype=float)
    t = np.asarray(t, dtype=float)
    rows, n = y.shape
    hi = np.maximum(y.min(axis=1), 1e-9)[:, None]
    bs = np.linspace(0.0, B_MAX, grid)
    best = np.empty(rows, dtype=int)
    chunk = max(1, 2**17 // (grid * n))  # rows at a time: the grid's (rows, grid, n) arrays stay ~1 MB
    for s in range(0, rows, chunk):
        part = slice(s, s + chunk)
        y3 = y[part, None, :]
        t3 = (t[part] if t.shape[0] > 1 else t)[:, None, :]
        best[part] = np.argmin(_bounded_ls(t3, y3, hi[part], np.broadcast_to(bs, (y3.shape[0], grid)))[2], axis=1)
    t3, y3 = t[:, None, :], y[:, None, :]
    # The profile's slope at the best grid point and its neighbours (the same point at a bound) picks the side the
    # minimum is on; with the slope negative at one end and positive at the other the bracket is refined, else the
    # minimum is the grid point: on a bound with the slope pointing out of [0, B_MAX], or a flat stretch (a = 0).
    three = np.stack([bs[np.maximum(best - 1, 0)], bs[best], bs[np.minimum(best + 1, grid - 1)]], axis=1)
    g_lo, g_mid, g_up = _bounded_ls(t3, y3, hi, three, slope=True)[3].T
    right, left = (g_mid < 0) & (g_up > 0), (g_mid > 0) & (g_lo < 0)
    b = three[:, 1].copy()
    rows = np.flatnonzero(right | left)
    lo, up = np.where(right, three[:, 1], three[:, 0])[rows], np.where(right, three[:, 2], three[:, 1])[rows]
    g0, g1 = np.where(right, g_mid, g_lo)[rows], np.where(right, g_up, g_mid)[rows]
    kept = np.zeros(rows.size, dtype=int)  # the end the last step kept: -1 lower, 1 upper
    for step in range(_STEPS):
        if not rows.size:
            break
        # Illinois (regula falsi that halves the slope at an end kept twice: superlinear, the root always
        # bracketed), a bisection every fourth step and wherever the secant leaves the bracket
        with np.errstate(divide="ignore", invalid="ignore"):
            mid = (lo * g1 - up * g0) / (g1 - g0)
        mid = np.where((mid > lo) & (mid < up) & (step % 4 != 3), mid, 0.5 * (lo + up))
        gm = _bounded_ls(t3 if t.shape[0] == 1 else t3[rows], y3[rows], hi[rows], mid[:, None], slope=True)[3][:, 0]
        down = gm < 0  # sse still falling: the minimum is above
        g1 = np.where(down & (kept == 1), 0.5 * g1, g1)  # the upper end kept a second time in a row
        g0 = np.where(~down & (kept == -1), 0.5 * g0, g0)  # the lower end kept a second time in a row
        lo, g0 = np.where(down, mid, lo), np.where(down, gm, g0)
        up, g1 = np.where(down, up, mid), np.where(down, g1, gm)
        kept = np.where(down, 1, -1)
        done = (gm == 0) | (up - lo <= 4e-16 * up) | (step == _STEPS - 1)
        b[rows[done]] = np.where(gm == 0, mid, 0.5 * (lo + up))[done]
        rows, lo, up, g0, g1, kept = rows[~done], lo[~done], up[~done], g0[~done], g1[~done], kept[~done]
    cand = np.stack([b, bs[best]], axis=1)
    amp, c, sse = _bounded_ls(t3, y3, hi, cand, exact=True)
    k = np.argmin(sse, axis=1)[:, None]  # the refined exponent unless the grid point is strictly better
    b = np.take_along_axis(cand, k, 1)[:, 0]
    amp, c = np.take_along_axis(amp, k, 1)[:, 0], np.take_along_axis(c, k, 1)[:, 0]
    return amp * np.exp(-b * t.max(axis=1)), b, c


def fit_power_law(x, error, *, n_boot: int = 200, seed: int = 0, min_points: int = MIN_POINTS,
                  confidence: float = 0.95, replicates=None) -> PowerLawFit:
    """Fit error = a·x^(−b) + c to one point per run, with bootstrap intervals (module docstring).

    ``replicates`` (optional, shape ``(n_replicates, n_runs)``): each run's error under patient-level bootstrap
    replicates that resample the same patients for every run (:func:`patient_replicates`); replicate ``r`` of the
    fit uses row ``r mod n_replicates``. ``c`` is bounded to [0, min observed error] (an irreducible error above the
    best run would be contradicted by it) and ``b`` to [0, 5]. Raises :class:`FitError` when there are fewer than
    ``min_points`` distinct x values, or any x ≤ 0.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(error, dtype=float)
    reps = None if replicates is None else np.asarray(replicates, dtype=float)
    if reps is not None and (reps.ndim != 2 or reps.shape[1] != x.size):
        raise ValueError(f"replicates must have shape (n, {x.size}), got {reps.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    reps = None if reps is None else reps[:, ok]
    if np.any(x <= 0):
        raise FitError(f"x must be > 0 for a power law; got {sorted(set(x[x <= 0].tolist()))}")
    n_x = len(np.unique(x))
    if n_x < min_points:
        raise FitError(f"too few points: {n_x} distinct x value(s) ({len(x)} runs); a three-parameter law needs "
                       f"at least {min_points}")
    # Fitting on x / geometric mean keeps amp and b on comparable scales for x from 1e3 to 1e9.
    x0 = float(np.exp(np.log(x).mean()))
    t = -np.log(x / x0)
    amp, b, c = (float(v[0]) for v in _fit_many(t[None], y[None]))
    strata = [np.flatnonzero(x == v) for v in np.unique(x)]
    # A stratum whose runs are all equal resamples to itself; patient replicates that never move add nothing either.
    seeds_vary = any(len(s) > 1 and np.ptp(y[s]) > 0 for s in strata)
    with warnings.catch_warnings():  # a run with no defined replicate (all NaN) has no spread
        warnings.simplefilter("ignore", RuntimeWarning)
        patients_vary = reps is not None and bool((np.nanmax(reps, axis=0) > np.nanmin(reps, axis=0)).any())
    method = "seeds+patients" if patients_vary else ("seeds" if seeds_vary else "none")
    rng = np.random.default_rng(seed)
    n_rep = n_boot if method != "none" else 0
    # replicate r draws each x's runs in turn: rng.choice(s, len(s)) as before, called as the draw it makes, the
    # indices integers(0, len(s), len(s)) of s (numpy's Generator.choice with replacement and no p), at half its cost
    picks = np.array([np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
                      for _ in range(n_rep)], dtype=int).reshape(n_rep, x.size)
    base = np.broadcast_to(y, picks.shape) if reps is None else reps[np.arange(n_rep) % len(reps)]
    drawn = np.take_along_axis(base, picks, axis=1)
    at = np.cumsum([0] + [len(s) for s in strata])
    for k, s in enumerate(strata):  # each x's drawn runs rescaled about that x's mean (Rao & Wu): a few seeds'
        drawn[:, at[k]:at[k + 1]] = rescale_resample(  # resample alone runs short
            drawn[:, at[k]:at[k + 1]], base[:, s].mean(axis=1, keepdims=True), len(s))
    drawn = drawn[np.isfinite(drawn).all(axis=1)]
    q = (50 * (1 - confidence), 50 * (1 + confidence))
    if len(drawn):
        # every replicate's runs come x by x, so all share one x vector: they are refitted together
        ab, bb, cb = _fit_many(t[np.concatenate(strata)][None], drawn)
        arr = np.stack([ab * x0**bb, bb, cb], axis=1)
        # widened about their median to Student's tails, with the degrees of freedom of the seeds the parameters
        # rest on (satterthwaite_widening: each x's runs left out one at a time, the law refitted)
        factor, _ = satterthwaite_widening(_jackknife(t, y, x0, strata), confidence)
        centre = np.median(arr, axis=0)
        arr = centre + factor * (arr - centre)
        # the widening can reach past what every fit allows (a ≥ 0, 0 ≤ b ≤ B_MAX, c ≥ 0): cut there
        arr = np.clip(arr, [0.0, 0.0, 0.0], [np.inf, B_MAX, np.inf])
        cis = [tuple(float(v) for v in np.percentile(arr[:, j], q)) for j in range(3)]
    else:
        cis = [(math.nan, math.nan)] * 3
    resid = _law(x / x0, amp, b, c) - y
    return PowerLawFit(a=amp * x0**b, b=b, c=c, a_ci=cis[0], b_ci=cis[1], c_ci=cis[2], n_points=len(x), n_x=n_x,
                       rmse=float(np.sqrt(np.mean(resid**2))), n_boot=len(drawn), ci=method,
                       at_bound=_at_bound(b, c, float(y.min())))


def _at_bound(b: float, c: float, min_error: float, rtol: float = 1e-6) -> str:
    """The parameters on a bound of the fit (b in [0, B_MAX], c in [0, lowest error]), e.g. ``b=0, c=min error``."""
    out = []
    if b <= rtol * B_MAX:
        out.append("b=0")
    elif b >= B_MAX * (1 - rtol):
        out.append(f"b={B_MAX:g}")
    scale = max(min_error, 1e-9)
    if c <= rtol * scale:
        out.append("c=0")
    elif c >= scale * (1 - rtol):
        out.append("c=min error")
    return ", ".join(out)


def _jackknife(t: np.ndarray, y: np.ndarray, x0: float, strata: list[np.ndarray]) -> list[np.ndarray]:
    """Per stratum of more than one run, ``(a, b, c)`` refitted with each of its runs left out in turn (delete-one
    jackknife values, shape ``(n_runs, 3)``; empty for a stratum of one run), all refits at once."""
    left_out = np.concatenate([s for s in strata if len(s) > 1] or [np.empty(0, dtype=int)])
    if not left_out.size:
        return [np.empty((0, 3)) for _ in strata]
    keep = np.ones((left_out.size, t.size), dtype=bool)
    keep[np.arange(left_out.size), left_out] = False
    ab, bb, cb = _fit_many(np.broadcast_to(t, keep.shape)[keep].reshape(left_out.size, -1),
                           np.broadcast_to(y, keep.shape)[keep].reshape(left_out.size, -1))
    values = np.stack([ab * x0**bb, bb, cb], axis=1)
    out, i = [], 0
    for s in strata:
        k = len(s) if len(s) > 1 else 0
        out.append(values[i:i + k])
        i += k
    return out


def patient_replicates(predictions, n_boot: int = 200, seed: int = 0, labels=None, patients=None,
                       workers: int | None = None) -> np.ndarray:
    """``1 − macro AUROC`` of each run under ``n_boot`` patient-level bootstrap replicates shared by all runs:
    shape ``(n_boot, n_runs)``.

    ``predictions`` are the runs' stored predictions of one evaluation set (``sample_id``, ``patient_id``,
    ``label:<L>``, ``logit:<L>``), scored on the samples every run has. Each may be a DataFrame or a loader
    ``load(columns) -> DataFrame`` (e.g. ``lambda cols: store.read_predictions(run, eval_set, columns=cols)``):
    loaders are read run by run — first their sample ids, then each run's scores, dropped once its replicates are
    taken — so memory holds one run's predictions per thread (``workers``), not every run's (a 240,000-image OOD
    set with 14 labels is ~30 MB per run; a study has over a hundred runs). The macro is the mean over the labels
    with both classes labelled, as in the stored metrics (a replicate where a label has one class leaves it out),
    or over those of ``labels`` (e.g. the labels an OOD set shares with test).

    ``patients`` (optional): every patient id the resample draws from, when it must be shared with another set
    (an OOD set of the test patients' other images): two calls with the same ``patients`` and ``seed`` draw each
    patient the same number of times in both sets. Default: this set's own patients.

    ``workers``: runs scored at once, on threads (:mod:`scaling.study.threads`; None: every usable core), each
    holding one run's predictions; the result does not depend on it.
    """
    from scaling.metrics.bootstrap import ClusterBootstrap

    def load(j: int, columns=None) -> pd.DataFrame:
        p = predictions[j]
        return (p if columns is None else p[columns]) if isinstance(p, pd.DataFrame) else p(columns)

    common = common_samples([load(j, ["sample_id"]) for j in range(len(predictions))]).sort_values()

    def aligned(j: int, columns=None) -> pd.DataFrame:
        f = load(j, columns)
        return f.iloc[pd.Index(f["sample_id"]).get_indexer(common)]

    first = aligned(0)
    names = [c.split(":", 1)[1] for c in first.columns if c.startswith("label:")]
    labels = [lab for lab in names if labels is None or lab in labels]
    truth = {}
    for lab in labels:
        yl = first[f"label:{lab}"].to_numpy(float)
        known = yl[np.isfinite(yl)]
        if known.size and known.min() != known.max():
            truth[lab] = yl
    own = first["patient_id"].to_numpy(dtype=object)
    del first
    if patients is None:
        boot = ClusterBootstrap(own, n=len(own), n_boot=n_boot, seed=seed)
    else:  # number the clusters over the whole universe, then keep this set's rows
        universe = pd.unique(np.asarray(patients, dtype=object))
        ids = np.concatenate([universe, own])
        boot = ClusterBootstrap(ids, n=ids.size, n_boot=n_boot, seed=seed).subset(np.arange(universe.size, ids.size))

    def score(j: int) -> list[np.ndarray]:  # one run's AUROC replicates per label: on a thread of its own
        f = aligned(j, None if isinstance(predictions[j], pd.DataFrame) else ["sample_id", *[
            f"logit:{lab}" for lab in truth]])
        return [boot.replicates("auroc", yl, f[f"logit:{lab}"].to_numpy(float))
                for lab, yl in truth.items() if f"logit:{lab}" in f]  # f is dropped here, before the next run

    out = np.full((n_boot, len(predictions)), np.nan)
    for j, per_label in enumerate(thread_map(score, range(len(predictions)), workers)):
        if per_label:  # the macro in this thread: warnings filters are process-wide, not for worker threads to set
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                out[:, j] = 1.0 - np.nanmean(np.array(per_label), axis=0)
    return out


def _row(fit_or_error, **keys) -> dict:
    if isinstance(fit_or_error, PowerLawFit):
        f = fit_or_error
        return {**keys, "n_runs": f.n_points, "n_x": f.n_x, "a": f.a, "b": f.b, "b_lo": f.b_ci[0], "b_hi": f.b_ci[1],
                "c": f.c, "c_lo": f.c_ci[0], "c_hi": f.c_ci[1], "rmse": f.rmse, "ci": f.ci, "at_bound": f.at_bound,
                "status": "ok"}
    return {**keys, "status": f"refused: {fit_or_error}"}


def fit_table(df: pd.DataFrame, *, metric: str = "auroc", label: str = "macro", eval_sets=None, n_boot: int = 200,
              seed: int = 0, store_root=None, workers: int | None = None,
              confidence: float = 0.95) -> tuple[pd.DataFrame, dict]:
    """Fitted exponents for every scaling axis, per pretraining source (or backbone) and evaluation set.

    From the tidy table (:func:`scaling.study.aggregate.load_results`), error = 1 − ``metric`` per run:

    - ``n_params``: per pretraining source × eval set, at the full data fraction;
    - ``pretrain_images``: per backbone × eval set, at the full data fraction (scratch, 0 images, left out);
    - ``n_train_images`` (labelled images): per pretraining source × backbone × eval set, one x per data fraction
      (the mean over its seeds, whose patient draws differ by a few images).

    Returns the table (one row per fit; ``status`` is ``ok`` or the reason it was refused; ``ci`` what its intervals
    resample, at ``confidence``; ``at_bound`` the parameters on a bound of the fit) and the fitted laws keyed by
    ``(x_axis, pretrained, backbone, eval_set)`` for plotting.
    ``eval_sets=None`` uses every set but ``val``. With ``store_root`` (the run store the rows came from) the macro
    AUROC fits also resample the evaluation patients, from the runs' stored predictions (``workers`` runs at once,
    :func:`patient_replicates`). Only plain fine-tuning cells are used (:func:`scaling.study.aggregate.plain_cells`,
    as in the report): probe, k-shot and re-initialised cells of ``df`` are dropped, since pooling them with
    fine-tuned runs would be wrong.
    """
    df = plain_cells(df)
    rows = df[(df["metric"] == metric) & (df["label"] == label) & (df["attribute"] == "all") & (df["group"] == "all")]
    if eval_sets is None:
        eval_sets = sorted(e for e in rows["eval_set"].unique() if e != "val")
    rows = rows[rows["eval_set"].isin(eval_sets)].assign(error=lambda d: 1 - d["value"])
    full = rows[rows["fraction"] == full_fraction(rows)] if len(rows) else rows
    out, laws = [], {}
    store, by_set = (RunStore(store_root) if store_root is not None else None), {}

    def resampled(axis: str, g: pd.DataFrame) -> bool:
        """Only fits that will be made resample patients (a refused one needs no replicates)."""
        return (store is not None and metric == "auroc" and label == "macro" and "run_id" in g
                and g[axis].nunique() >= MIN_POINTS)

    def replicates_of(eval_set: str, run_ids) -> np.ndarray:
        """The runs' columns of one resample of the set's patients shared by every run of the set that a fit
        resamples: each run is read (one at a time) and resampled once per set, whichever fits it takes part in."""
        if eval_set not in by_set:
            runs = list(pd.unique(pd.concat(
                [g["run_id"] for axis, data, by in plans for _, g in data.groupby(by, sort=True)
                 if g["eval_set"].iloc[0] == eval_set and resampled(axis, g)])))
            loaders = [lambda cols, r=r: store.read_predictions(r, eval_set, columns=cols) for r in runs]
            by_set[eval_set] = ({r: j for j, r in enumerate(runs)},
                                patient_replicates(loaders, n_boot=n_boot, seed=seed, workers=workers))
        index, reps = by_set[eval_set]
        return reps[:, [index[r] for r in run_ids]]

    # Stores written before labelled-image counts were recorded fall back to the fraction: a constant factor on x
    # leaves the exponent b and the floor c unchanged.
    labelled = "n_train_images" if rows["n_train_images"].notna().all() else "fraction"
    if labelled == "n_train_images" and len(rows):
        # One x per data fraction: each seed draws its own patients, so their image counts differ by a few, and as
        # x values of their own they would pass for extra points of the law (2 fractions × 3 seeds ≠ 6 sizes).
        cell = ["pretrained", "backbone", "eval_set", "fraction"]
        rows = rows.assign(n_train_images=rows.groupby(cell)["n_train_images"].transform("mean"))
    plans = [
        ("n_params", full, ["pretrained", "eval_set"]),
        ("pretrain_images", full[full["pretrain_images"] > 0], ["backbone", "eval_set"]),
        (labelled, rows, ["pretrained", "backbone", "eval_set"]),
    ]
    for axis, data, by in plans:
        for key, g in data.groupby(by, sort=True):
            keys = {"x_axis": axis, "pretrained": "", "backbone": "", **dict(zip(by, key))}
            reps = replicates_of(keys["eval_set"], g["run_id"]) if resampled(axis, g) else None
            try:
                fit = fit_power_law(g[axis], g["error"], n_boot=n_boot, seed=seed, replicates=reps,
                                    confidence=confidence)
            except FitError as e:
                out.append(_row(e, **keys))
                continue
            laws[(axis, keys["pretrained"], keys["backbone"], keys["eval_set"])] = fit
            out.append(_row(fit, **keys))
    cols = ["x_axis", "pretrained", "backbone", "eval_set", "n_runs", "n_x", "a", "b", "b_lo", "b_hi", "c", "c_lo",
            "c_hi", "rmse", "ci", "at_bound", "status"]
    return pd.DataFrame(out, columns=cols), laws

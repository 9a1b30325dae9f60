"""Every scaling law a results table allows, with bootstrap intervals, as report lines and plots.

What `python -m lm.fit_scaling` prints and draws, callable from a notebook: Kaplan et al.
(2020) power laws on the frontier, Chinchilla's (Hoffmann et al. 2022) Approach 2 (IsoFLOP)
and Approach 3 (parametric L(N, D)), the compute-optimal N and D at a budget, and the
error of Approach 3 on held-out highest-compute runs.
"""

from __future__ import annotations

import os

import numpy as np

from lm.scaling import laws, plots


def fit_all(runs: laws.Runs, samples: int, seed: int) -> tuple[dict, dict, dict]:
    """(fits, intervals, skipped reasons) for Kaplan, Approach 2 and Approach 3."""
    fits, intervals, skipped = {}, {}, {}
    for name, fit in (("kaplan", laws.kaplan), ("approach_2", laws.isoflop), ("approach_3", laws.parametric)):
        try:
            fits[name] = fit(runs)
        except laws.FitError as e:
            skipped[name] = str(e)
            continue
        if samples:
            if name == "approach_3":  # each resample starts from the full fit and the grid's best two
                start = laws.theta_of(fits[name])
                fit = lambda r, start=start: laws.parametric(r, starts=2, initial=[start])
            intervals[name] = laws.bootstrap(fit, runs, samples, seed)
    if "kaplan" in fits:  # the laws it could fit are shown; say why the others are not
        skipped.update({f"kaplan L({x})": why for x, why in laws.kaplan_skipped(runs).items()})
    return fits, intervals, skipped


def _interval(intervals: dict, key: str) -> str:
    lo_hi = intervals.get(key)
    return f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ""


def report(runs: laws.Runs, fits: dict, intervals: dict, skipped: dict, budget: float) -> list[str]:
    lines = [f"{len(runs)} runs: N {runs.n.min():.3g}..{runs.n.max():.3g}, D {runs.d.min():.3g}..{runs.d.max():.3g}, "
             f"C {runs.c.min():.3g}..{runs.c.max():.3g}, loss {runs.loss.min():.4f}..{runs.loss.max():.4f}"]
    if "kaplan" in fits:
        lines.append("Kaplan power laws on the frontier, L(X) = E + (X_c / X)^alpha (95% intervals):")
        columns = {"N": runs.n, "D": runs.d, "C": runs.c}
        for x, law in fits["kaplan"].items():
            iv = intervals.get("kaplan", {})
            # E is exactly 0 only when not fitted: under 4 frontier points (laws.kaplan) fit Kaplan's own form.
            fixed = " (not fitted: under 4 frontier points)" if law.E == 0.0 else _interval(iv, f"{x}.E")
            points, fitted = len(laws.frontier(columns[x], runs.loss)), 2 if law.E == 0.0 else 3
            # A fit with under 2 points to spare passes near every point: its bootstrap says little.
            spare = (f"  ({points} frontier points for {fitted} parameters: the fit has little to spare and its "
                     "intervals mean little)" if points - fitted < 2 else "")
            lines.append(f"  L({x}): E={law.E:.4f}{fixed}  X_c={law.x_c:.4g}  "
                         f"alpha={law.alpha:.4f}{_interval(iv, f'{x}.alpha')}{spare}")
    if "approach_2" in fits:
        f, iv = fits["approach_2"], intervals.get("approach_2", {})
        lines.append(f"Approach 2 (IsoFLOP, {len(f.budgets)} budgets): N_opt = {f.k_n:.4g} C^a, a={f.a:.4f}"
                     f"{_interval(iv, 'a')}; D_opt = {f.k_d:.4g} C^b, b={f.b:.4f}{_interval(iv, 'b')}")
    if "approach_3" in fits:
        f, iv = fits["approach_3"], intervals.get("approach_3", {})
        lines.append("Approach 3, L(N, D) = E + A/N^alpha + B/D^beta: " + "  ".join(
            f"{k}={getattr(f, k):.4g}{_interval(iv, k)}" for k in ("E", "A", "B", "alpha", "beta")))
    for name in ("approach_2", "approach_3"):
        if name in fits:
            n_opt, d_opt = fits[name].optimal(budget)
            lines.append(f"compute-optimal at C={budget:.3g} ({name}): N={float(n_opt):.4g}, D={float(d_opt):.4g} "
                         f"({float(d_opt) / float(n_opt):.1f} tokens per parameter)")
    for name, why in skipped.items():
        lines.append(f"{name}: skipped: {why}")
    return lines


def holdout_error(runs: laws.Runs, k: int) -> str:
    order = np.argsort(runs.c)
    train, held = runs.take(order[:-k]), runs.take(order[-k:])
    fit = laws.parametric(train)
    predicted = fit(held.n, held.d)
    error = np.abs(predicted - held.loss)
    return (f"held out the {k} highest-compute runs (C {held.c.min():.3g}..{held.c.max():.3g}): Approach 3 fitted "
            f"without them predicts their loss with mean absolute error {error.mean():.4f} "
            f"({(error / held.loss).mean():.2%}), worst {error.max():.4f}")


def make_plots(runs: laws.Runs, fits: dict, directory: str) -> list[str]:
    """The plots the fits allow (an IsoFLOP plot needs Approach 2's fit)."""
    paths = plots.loss_vs_compute(runs, fits.get("kaplan", {}).get("C"), directory)
    if "approach_2" in fits:
        paths += plots.isoflop_profiles(runs, fits["approach_2"], directory)
    if "approach_3" in fits:
        paths += plots.loss_contours(runs, fits["approach_3"], directory)
    optimal = {k: fits[k] for k in ("approach_2", "approach_3") if k in fits}
    if optimal:
        paths += plots.optimal_allocation(optimal, runs.c, directory)
    return [p for p in paths if os.path.exists(p)]

"""Fit scaling laws to a results table, print them with intervals, and plot them.

    python -m lm.fit_scaling --results=/tmp/isoflop/results.csv --plots=/tmp/isoflop/plots

Prints Kaplan-style power laws L(N), L(D), L(C) on the frontier, Chinchilla's Approach 2
(when the table has IsoFLOP budgets) and Approach 3, each with bootstrap 95% intervals;
the compute-optimal N and D for --budget (default 10x the largest run's FLOPs); and,
with --holdout=K, Approach 3's error on the K highest-compute runs, fitted without them.
Any table works once its columns are named, e.g. the Chinchilla runs:

    python -m lm.fit_scaling --results=tests/data/chinchilla/svg_extracted_data.csv \
        --n_column="Model Size" --c_column="Training FLOP" --loss_column=loss --drop_highest=5
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from lm.config import ConfigError
from lm.errors import exit_with_error, reject_positional
from lm.scaling import laws, plots, results

_RESULTS = flags.DEFINE_string("results", None, "The results table (CSV or JSONL), e.g. <sweep>/results.csv.")
_PLOTS = flags.DEFINE_string("plots", None, "Directory for the four plots (PNG and SVG); none if unset.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the fitted constants and intervals as JSON here.")
_BUDGET = flags.DEFINE_float("budget", 0.0, "FLOPs to give the compute-optimal N and D for; 0: 10x the largest run.")
_HOLDOUT = flags.DEFINE_integer("holdout", 0, "Hold out this many highest-compute runs and report the error on them.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples for the intervals (0: none).")
_DROP_HIGHEST = flags.DEFINE_integer("drop_highest", 0, "Drop this many highest-loss runs before fitting.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_N = flags.DEFINE_string("n_column", "parameters", "Column of the parameter count N.")
_D = flags.DEFINE_string("d_column", "tokens", "Column of the training tokens D (absent: C / 6N).")
_C = flags.DEFINE_string("c_column", "flops", "Column of the training FLOPs C (absent: 6ND).")
_LOSS = flags.DEFINE_string("loss_column", "val_loss", "Column of the loss to fit.")
_BUDGET_COLUMN = flags.DEFINE_string("budget_column", "budget", "Column of the IsoFLOP budget (optional).")


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
    return fits, intervals, skipped


def _interval(intervals: dict, key: str) -> str:
    lo_hi = intervals.get(key)
    return f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ""


def report(runs: laws.Runs, fits: dict, intervals: dict, skipped: dict, budget: float) -> list[str]:
    lines = [f"{len(runs)} runs: N {runs.n.min():.3g}..{runs.n.max():.3g}, D {runs.d.min():.3g}..{runs.d.max():.3g}, "
             f"C {runs.c.min():.3g}..{runs.c.max():.3g}, loss {runs.loss.min():.4f}..{runs.loss.max():.4f}"]
    if "kaplan" in fits:
        lines.append("Kaplan power laws on the frontier, L(X) = E + (X_c / X)^alpha (95% intervals):")
        for x, law in fits["kaplan"].items():
            iv = intervals.get("kaplan", {})
            lines.append(f"  L({x}): E={law.E:.4f}{_interval(iv, f'{x}.E')}  X_c={law.x_c:.4g}  "
                         f"alpha={law.alpha:.4f}{_interval(iv, f'{x}.alpha')}")
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


def main(argv: list[str]) -> None:
    reject_positional(argv)
    if not _RESULTS.value:
        exit_with_error("--results is required, e.g. python -m lm.fit_scaling --results=/tmp/isoflop/results.csv")
    columns = results.Columns(_N.value, _D.value, _C.value, _LOSS.value, _BUDGET_COLUMN.value)
    try:
        runs = results.to_runs(results.read_rows(_RESULTS.value), _RESULTS.value, columns, _DROP_HIGHEST.value)
    except ConfigError as e:
        exit_with_error(str(e))
    fits, intervals, skipped = fit_all(runs, _BOOTSTRAP.value, _SEED.value)
    if not fits:
        exit_with_error("no law could be fitted: " + " ".join(skipped.values()))
    budget = _BUDGET.value or 10 * runs.c.max()
    for line in report(runs, fits, intervals, skipped, budget):
        print(line, flush=True)
    if _HOLDOUT.value:
        if len(runs) - _HOLDOUT.value <= 5:
            exit_with_error(f"--holdout={_HOLDOUT.value} leaves {len(runs) - _HOLDOUT.value} runs; Approach 3 "
                            "needs more than 5. Fix: hold out fewer runs.")
        print(holdout_error(runs, _HOLDOUT.value), flush=True)
    if _PLOTS.value:
        for path in make_plots(runs, fits, _PLOTS.value):
            print(f"plot: {path}", flush=True)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            json.dump({"fits": {k: laws.scalars(v) for k, v in fits.items()}, "intervals": intervals,
                       "skipped": skipped}, f, indent=2)


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


if __name__ == "__main__":
    app.run(main)

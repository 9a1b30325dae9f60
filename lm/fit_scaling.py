r"""Fit scaling laws to a results table, print them with intervals, and plot them.

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

from absl import app, flags

from lm.config import parse_flags
from lm.errors import UsageError, exit_with_error, reject_positional
from lm.files import atomic, paths
from lm.scaling import laws, results
from lm.scaling.fits import fit_all, holdout_error, make_plots, report

_RESULTS = flags.DEFINE_string("results", None, "The results table (CSV or JSONL), e.g. <sweep>/results.csv.")
_PLOTS = flags.DEFINE_string("plots", None, "Directory for the four plots (PNG and SVG); none if unset.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the fitted constants and intervals as JSON here.")
# Each number has its range: absl refuses one outside it in one line, before the table is read.
_BUDGET = flags.DEFINE_float("budget", 0.0, "FLOPs to give the compute-optimal N and D for; 0: 10x the largest run.",
                             lower_bound=0.0)
_HOLDOUT = flags.DEFINE_integer("holdout", 0, "Hold out this many highest-compute runs and report the error on them.",
                                lower_bound=0)
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples for the intervals (0: none).", lower_bound=0)
_DROP_HIGHEST = flags.DEFINE_integer("drop_highest", 0, "Drop this many highest-loss runs before fitting.",
                                     lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_N = flags.DEFINE_string("n_column", "parameters", "Column of the parameter count N.")
_D = flags.DEFINE_string("d_column", "tokens", "Column of the training tokens D (absent: C / 6N).")
_C = flags.DEFINE_string("c_column", "flops", "Column of the training FLOPs C (absent: 6ND).")
_LOSS = flags.DEFINE_string("loss_column", "val_loss", "Column of the loss to fit.")
_BUDGET_COLUMN = flags.DEFINE_string("budget_column", "budget", "Column of the IsoFLOP budget (optional).")


def main(argv: list[str]) -> None:
    reject_positional(argv)
    if not _RESULTS.value:
        exit_with_error("--results is required, e.g. python -m lm.fit_scaling --results=/tmp/isoflop/results.csv")
    try:
        runs = read_runs()
    except UsageError as e:
        exit_with_error(str(e))
    fits, intervals, skipped = fit_all(runs, _BOOTSTRAP.value, _SEED.value)
    if not fits:
        exit_with_error("no law could be fitted: " + " ".join(skipped.values()))
    budget = _BUDGET.value or 10 * runs.c.max()
    for line in report(runs, fits, intervals, skipped, budget):
        print(line, flush=True)
    if _HOLDOUT.value:
        print(holdout_error(runs, _HOLDOUT.value), flush=True)
    if _PLOTS.value:
        for path in make_plots(runs, fits, _PLOTS.value):
            print(f"plot: {path}", flush=True)
    if _OUTPUT.value:
        atomic.write_json(_OUTPUT.value, {"fits": {k: laws.scalars(v) for k, v in fits.items()},
                                          "intervals": intervals, "skipped": skipped}, indent=2)


def read_runs() -> laws.Runs:
    """The table's runs, once the outputs and --holdout are known to work: nothing is
    fitted or printed for a request that would fail at its end."""
    if _OUTPUT.value:
        paths.check_output_file(_OUTPUT.value, "--output")
    if _PLOTS.value:
        paths.check_output_dir(_PLOTS.value, "--plots")
    columns = results.Columns(_N.value, _D.value, _C.value, _LOSS.value, _BUDGET_COLUMN.value)
    runs = results.to_runs(results.read_rows(_RESULTS.value), _RESULTS.value, columns, _DROP_HIGHEST.value)
    if _HOLDOUT.value and len(runs) - _HOLDOUT.value <= 5:
        raise UsageError(f"--holdout={_HOLDOUT.value} leaves {len(runs) - _HOLDOUT.value} runs; Approach 3 "
                         "needs more than 5. Fix: hold out fewer runs.")
    return runs

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

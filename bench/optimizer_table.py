"""The README's optimizer table: every optimizer on the character Shakespeare recipe at its
best of a small learning-rate sweep (configs/scaling/shakespeare_optimizers.py).

    .venv/bin/python bench/optimizer_table.py --workdir=/tmp/optimizers --parallel=2

Runs (or resumes) the sweep with lm.sweep, then prints one row per optimizer: its best
final validation loss, the rate that reached it, and the loss at every rate tried (a best
rate at the edge of its sweep is marked, since a wider sweep might do better). About 30
minutes on 2 cores; `--quick` runs 20-step points to check the plumbing in a few minutes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/sweep_runs.py, when loaded by path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sweep_runs  # noqa: E402
from absl import flags  # noqa: E402

SWEEP = os.path.join(sweep_runs.REPO, "configs", "scaling", "shakespeare_optimizers.py")

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when run, not on import (tests import `table`)."""
    sweep_runs.define_flags("Directory of the sweep.")
    flags.DEFINE_bool("quick", False, "20 steps a point: checks the bench, its losses mean little.")


def table(rows: list[dict], rate_of, order: list[str]) -> list[str]:
    """Markdown lines: per optimizer (in `order`), the best validation loss, its rate
    (`rate_of(overrides)`), and every rate's loss; "(edge)" marks a best rate at either end
    of that optimizer's sweep."""
    by_name: dict[str, dict[float, float]] = {}
    for row in rows:
        overrides = json.loads(row["overrides"])
        by_name.setdefault(overrides["optim.name"], {})[rate_of(overrides)] = row["val_loss"]
    lines = ["| optimizer | best val loss | its learning rate | val loss at each rate tried |", "|---|---:|---:|---|"]
    for name in (n for n in order if n in by_name):
        losses = by_name[name]
        rates = sorted(losses)
        best = min(rates, key=lambda r: losses[r])
        edge = " (edge)" if len(rates) > 1 and best in (rates[0], rates[-1]) else ""
        tried = ", ".join(f"{r:g}: {losses[r]:.4f}" for r in rates)
        lines.append(f"| {name} | {losses[best]:.4f} | {best:g}{edge} | {tried} |")
    return lines


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit("usage: bench/optimizer_table.py --workdir=DIR [--parallel=1] [--quick]")
    spec = importlib.util.spec_from_file_location("shakespeare_optimizers", SWEEP)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    rows = sweep_runs.run_sweep(SWEEP + (":quick" if FLAGS.quick else ""), os.path.abspath(FLAGS.workdir),
                                FLAGS.parallel)
    print("\n".join(table(rows, sweep.rate_of, list(sweep.RATES))))


if __name__ == "__main__":
    _define_flags()
    sweep_runs.run(main)

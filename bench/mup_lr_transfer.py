"""µP learning-rate transfer: the best rate at width 128 against the best at 512, under µP
and under the standard parametrization.

    .venv/bin/python bench/mup_lr_transfer.py --workdir=/tmp/mup_lr --parallel=2

Runs the two sweeps of configs/scaling/shakespeare_mup.py with lm.sweep (each resumes if
rerun): "standard" and "mup", each 6 learning rates 2x apart x widths 128 and 512. Prints,
per parametrization, the final validation loss per (rate, width), the best rate per width
and whether they agree. Issue 23 (acceptance 4) asks for the same best rate at 128 and 512
under µP. --steps=20 checks the bench itself in a few minutes (its losses mean little).
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/sweep_runs.py, when loaded by path

import sweep_runs  # noqa: E402
from absl import flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(REPO, "configs", "scaling", "shakespeare_mup.py")
PARAMETRIZATIONS = ("standard", "mup")

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when run, not on import (a test may import `best_rates` beside other flags)."""
    sweep_runs.define_flags("Directory for the two sweeps (standard/, mup/).")
    flags.DEFINE_integer("steps", 200, "Training steps of every point.", lower_bound=10)


def run_sweep(parametrization: str, workdir: str) -> list[dict]:
    """Runs (or resumes) one sweep and returns its results rows."""
    return sweep_runs.run_sweep(f"{SWEEP}:{parametrization},{FLAGS.steps}", os.path.join(workdir, parametrization),
                                FLAGS.parallel)


def losses(rows: list[dict]) -> dict[tuple[float, int], float]:
    """{(lr, d_model): final validation loss} of a sweep's results rows."""
    out = {}
    for row in rows:
        overrides = row["overrides"] if isinstance(row["overrides"], dict) else json.loads(row["overrides"])
        out[float(overrides["optim.lr"]), int(overrides["model.d_model"])] = float(row["val_loss"])
    return out


def best_rates(by_point: dict[tuple[float, int], float]) -> dict[int, float]:
    """{d_model: the rate of its lowest validation loss} (a diverged, NaN loss never wins)."""
    best: dict[int, tuple[float, float]] = {}
    for (lr, width), loss in by_point.items():
        if loss == loss and (width not in best or loss < best[width][1]):
            best[width] = (lr, loss)
    return {width: lr for width, (lr, _) in best.items()}


def table(parametrization: str, by_point: dict[tuple[float, int], float]) -> list[str]:
    """The markdown table of one sweep (a row per rate, a column per width, the best starred)."""
    rates, widths = sorted({lr for lr, _ in by_point}), sorted({w for _, w in by_point})
    best = best_rates(by_point)
    lines = [f"{parametrization}: final validation loss", "| lr | " + " | ".join(f"width {w}" for w in widths) + " |",
             "|---:|" + "---:|" * len(widths)]
    for lr in rates:
        cells = [f"{by_point[lr, w]:.4f}{' *' if best.get(w) == lr else ''}" if (lr, w) in by_point else "-"
                 for w in widths]
        lines.append(f"| 2^{_log2(lr)} ({lr:.3g}) | " + " | ".join(cells) + " |")
    return lines


def _log2(lr: float) -> str:
    exponent = math.log2(lr)
    return f"{exponent:.0f}" if exponent == round(exponent) else f"{exponent:.2f}"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit("usage: bench/mup_lr_transfer.py --workdir=DIR [--steps=200] [--parallel=1]")
    workdir = os.path.abspath(FLAGS.workdir)
    results = {p: losses(run_sweep(p, workdir)) for p in PARAMETRIZATIONS}
    for p in PARAMETRIZATIONS:
        best = best_rates(results[p])
        print("\n" + "\n".join(table(p, results[p])))
        print(f"{p}_best_lr: " + ", ".join(f"width {w}: 2^{_log2(lr)} ({lr:.3g})" for w, lr in sorted(best.items())))
        print(f"{p}_same_best_lr_at_128_and_512: {'yes' if len(set(best.values())) == 1 else 'no'}")


if __name__ == "__main__":
    _define_flags()
    sweep_runs.run(main)

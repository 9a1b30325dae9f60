"""Every learning-rate schedule over one run, printed (and drawn with --plot=FILE).

    .venv/bin/python bench/schedules.py --config=configs/shakespeare_char.py --plot=schedules.png

Builds each schedule of lm.training.schedules from the config's `optim` section (lr,
warmup, final_lr, the decay length `optim.decay_steps or train.steps`: the Shakespeare
recipe's 2,000 steps) as a run would, and prints one row per schedule: the learning rate
at --points steps spread over the run. The kinds with fields are shown as configured
(`--config.optim.cooldown_fraction=0.1` and so on), except `step_boundaries`, which
defaults to nothing: --step_boundaries (default: half and three quarters of the run)
fills it. --plot draws them all with matplotlib (`pip install -e '.[scaling]'`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm.config import COOLDOWN_SHAPES, CYCLE_MODES, SCHEDULES, ConfigError, parse_flags, validate  # noqa: E402
from lm.errors import exit_with_error, quiet_logging, reject_positional  # noqa: E402
from lm.training import schedules  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose optim section to draw.", lock_config=False)
_POINTS = flags.DEFINE_integer("points", 9, "Steps printed per schedule, evenly spread from 0 to the end.")
_BOUNDARIES = flags.DEFINE_list("step_boundaries", [], "Steps of the 'step' schedule (default: 50% and 75% of the "
                                                       "run; config.optim.step_boundaries wins if set).")
_PLOT = flags.DEFINE_string("plot", "", "Also draw every schedule into this image file (needs matplotlib).")


def variants(optim, total: int) -> list[tuple[str, dict]]:
    """(label, optim fields) of each schedule to show: every kind, each WSD cooldown shape
    and each cyclical mode."""
    shown = []
    for kind in SCHEDULES:
        if kind == "wsd":
            shown += [(f"wsd {shape}", dict(schedule=kind, cooldown_shape=shape)) for shape in COOLDOWN_SHAPES]
        elif kind == "cyclical":
            shown += [(f"cyclical {mode}", dict(schedule=kind, cycle_mode=mode)) for mode in CYCLE_MODES]
        elif kind == "step":
            bounds = (tuple(optim.step_boundaries) or tuple(int(b) for b in _BOUNDARIES.value)
                      or (total // 2, 3 * total // 4))
            shown.append((f"step {bounds}", dict(schedule=kind, step_boundaries=bounds)))
        else:
            shown.append((kind, dict(schedule=kind)))
    return shown


def curves(config) -> dict[str, np.ndarray]:
    """Each variant's learning rate at steps 0..total (total: the decay length), by label."""
    total = config.optim.decay_steps or config.train.steps
    out = {}
    for label, fields in variants(config.optim, total):
        optim = config.optim.copy_and_resolve_references()
        optim.update(fields)
        config_for_check = config.copy_and_resolve_references()
        config_for_check.optim = optim
        try:
            validate(config_for_check)  # a field's problem, named as the config's
        except ConfigError as e:
            exit_with_error(str(e))
        schedule = schedules.from_config(optim, config.train.steps)
        out[label] = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total + 1)), np.float64)
    return out


def draw(path: str, rates: dict[str, np.ndarray]) -> None:
    try:
        import matplotlib
    except ImportError:
        exit_with_error(f"--plot={path} needs matplotlib. Fix: pip install -e '.[scaling]', or leave out --plot.")
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rates), 1, figsize=(7, 1.3 * len(rates)), sharex=True)
    for ax, (label, values) in zip(axes, rates.items()):
        ax.plot(values, linewidth=1.2)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_ylim(0, max(values) * 1.05)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv):
    reject_positional(argv)
    quiet_logging()
    if _CONFIG.value is None:
        exit_with_error("--config is required, e.g. --config=configs/shakespeare_char.py")
    rates = curves(_CONFIG.value)
    total = len(next(iter(rates.values()))) - 1
    steps = sorted({round(total * i / (_POINTS.value - 1)) for i in range(_POINTS.value)})
    width = max(map(len, rates)) + 2
    print(f"learning rate at step ({total} steps, lr {_CONFIG.value.optim.lr:g}, warmup "
          f"{_CONFIG.value.optim.warmup_steps}, final_lr {_CONFIG.value.optim.final_lr:g})")
    print(f"{'schedule':<{width}}" + "".join(f"{s:>10}" for s in steps))
    for label, values in rates.items():
        print(f"{label:<{width}}" + "".join(f"{values[s]:>10.2e}" for s in steps))
    if _PLOT.value:
        draw(_PLOT.value, rates)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""The learning-rate schedule's fields (`config.optim`): what they mean in steps, and the
problems validation reports.

Kept apart from `lm.config.validation` (which calls `problem` and raises its ConfigError)
so that the step arithmetic has one home: `lm.training.schedules` builds the schedules
from `cooldown_start` and `restart_periods`, and WSD branches (`lm.scaling`) branch at
`cooldown_start`.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from lm.config import choices

# SGD with warm restarts joins one optax schedule per period, each a piece of the step's
# graph: more would only slow the compile (restart every few steps? use "cyclical").
MAX_RESTART_PERIODS = 1000

# Schedules that go from lr down to final_lr (the others do not read final_lr).
_READ_FINAL_LR = ("cosine", "linear", "wsd", "cyclical", "cosine_restarts")

# Schedules that may spend the whole decay length warming up (the others need a step after it).
_MAY_END_AT_WARMUP = ("linear", "constant", "rsqrt")

# Update c of a run trains at schedule(c), c = 0 .. total - 1 (optax's count), and a cooldown
# reaches final_lr at total: its first update is at the peak, so one step would cool nothing.
MIN_COOLDOWN_STEPS = 2

Problem = tuple[str, Any, str, str]  # field, value, problem, fix: validation.fail's arguments


def cooldown_start(total: int, fraction: float) -> int:
    """The step at which WSD's cooldown starts: `total` x (1 - `fraction`), rounded half up.
    A WSD run of `total` steps is its stable phase until there, so a run of any length
    equals one stable run branched at this step and cooled down."""
    return math.floor(total * (1.0 - fraction) + 0.5)


def restart_periods(steps: int, first: int, mult: float) -> list[int]:
    """SGDR's period lengths in steps (Loshchilov & Hutter 2017): `first` x `mult`**i,
    rounded, for i = 0, 1, ... until they cover `steps` (at least one period), or until
    there are MAX_RESTART_PERIODS + 1 of them (too many: validation refuses that)."""
    periods, covered = [first], first
    while covered < steps and len(periods) <= MAX_RESTART_PERIODS:
        periods.append(round(first * mult ** len(periods)))
        covered += periods[-1]
    return periods


def problem(optim: ml_collections.ConfigDict, train_steps: int) -> Problem | None:
    """The first problem of the schedule fields of `optim` (those of `optim.schedule`
    only: another schedule's fields mean nothing to this run), as validation.fail's
    arguments, or None. `train_steps` > 0 is the run's length."""
    o, total = optim, optim.decay_steps or train_steps
    if o.schedule not in choices.SCHEDULES:
        return _not_a_choice("optim.schedule", o.schedule, choices.SCHEDULES)
    if o.warmup_steps > total or (o.warmup_steps == total and o.schedule not in _MAY_END_AT_WARMUP):
        after = "to decay" if o.schedule not in ("constant", "rsqrt") else f"at the {o.schedule} rate"
        return ("optim.warmup_steps", o.warmup_steps, f"leaves no room {after} in the decay length ({total} steps)",
                "shorten the warmup or lengthen optim.decay_steps / train.steps")
    if o.schedule in _READ_FINAL_LR and o.final_lr > o.lr:
        return ("optim.final_lr", o.final_lr, f"is above optim.lr={o.lr!r}: schedule {o.schedule!r} goes from lr "
                "down to final_lr, so it would rise instead", f"set optim.final_lr <= optim.lr, e.g. {o.lr / 10:g} "
                "(a tenth of the peak; final_lr is a rate, not a fraction, so it does not follow a new lr)")
    checks = {"wsd": _wsd, "step": _step, "cyclical": _cyclical, "cosine_restarts": _restarts}
    return checks[o.schedule](o, total) if o.schedule in checks else None


def _not_a_choice(field: str, value: Any, allowed: tuple[str, ...]) -> Problem:
    return field, value, "is not a known choice", f"use one of {', '.join(map(repr, allowed))}"


def _not_a_positive_int(field: str, value: Any) -> Problem | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return field, value, "must be a positive number of steps", "set an integer >= 1"
    return None


def _wsd(o: ml_collections.ConfigDict, total: int) -> Problem | None:
    fraction = o.cooldown_fraction
    if not 0.0 < fraction < 1.0:
        return ("optim.cooldown_fraction", fraction, "must lie in (0, 1): the share of the run spent cooling down",
                "use e.g. 0.2 (Hägele et al. 2024: a 20% cooldown matches a cosine run)")
    start = cooldown_start(total, fraction)
    if total - start < MIN_COOLDOWN_STEPS:
        return ("optim.cooldown_fraction", fraction, f"leaves {total - start} cooldown step(s) in a decay length of "
                f"{total} steps; the cooldown's first update is at the peak rate, so it takes "
                f"{MIN_COOLDOWN_STEPS} to lower the rate at all",
                f"use a fraction >= {MIN_COOLDOWN_STEPS / total:.3g}, or lengthen optim.decay_steps / train.steps")
    if o.warmup_steps > start:
        return ("optim.warmup_steps", o.warmup_steps, f"runs past the cooldown's start (step {start} of {total})",
                "shorten the warmup or lower optim.cooldown_fraction")
    if o.cooldown_shape not in choices.COOLDOWN_SHAPES:
        return _not_a_choice("optim.cooldown_shape", o.cooldown_shape, choices.COOLDOWN_SHAPES)
    return None


def _step(o: ml_collections.ConfigDict, total: int) -> Problem | None:
    bounds = tuple(o.step_boundaries)
    if (not bounds or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
            or list(bounds) != sorted(set(bounds)) or bounds[0] <= o.warmup_steps or bounds[-1] >= total):
        return ("optim.step_boundaries", bounds, "must be increasing steps after the warmup and before the decay "
                f"length's end: {o.warmup_steps} < b1 < b2 < ... < {total}",
                f"give the steps at which to multiply the rate by optim.step_gamma, e.g. {_example(o, total)}")
    if not 0.0 < o.step_gamma <= 1.0:
        return ("optim.step_gamma", o.step_gamma, "must lie in (0, 1]: the rate is multiplied by it at each boundary, "
                "so above 1 it would rise past optim.lr", "use e.g. 0.1 (a tenth at each boundary)")
    return None


def _example(o: ml_collections.ConfigDict, total: int) -> tuple[int, ...]:
    """Boundaries at 50% and 75% of the run, or of the steps after the warmup if it is longer."""
    if total // 2 > o.warmup_steps:
        return total // 2, 3 * total // 4
    room = total - o.warmup_steps
    return tuple(sorted({o.warmup_steps + room // 2, o.warmup_steps + 3 * room // 4} - {o.warmup_steps}))


def _cyclical(o: ml_collections.ConfigDict, total: int) -> Problem | None:
    if o.cycle_mode not in choices.CYCLE_MODES:
        return _not_a_choice("optim.cycle_mode", o.cycle_mode, choices.CYCLE_MODES)
    return _not_a_positive_int("optim.cycle_steps", o.cycle_steps) if o.cycle_mode == "triangular" else None


def _restarts(o: ml_collections.ConfigDict, total: int) -> Problem | None:
    found = _not_a_positive_int("optim.restart_steps", o.restart_steps)
    if found:
        return found
    if not o.restart_mult >= 1.0:
        return ("optim.restart_mult", o.restart_mult, "must be >= 1 (each period as long as the one before, or "
                "longer)", "use 1 for equal periods or 2 as in SGDR")
    if len(restart_periods(total - o.warmup_steps, o.restart_steps, o.restart_mult)) > MAX_RESTART_PERIODS:
        return ("optim.restart_steps", o.restart_steps, f"gives more than {MAX_RESTART_PERIODS} restart periods "
                f"in {total - o.warmup_steps} steps", "lengthen the period, raise optim.restart_mult, or use "
                "optim.schedule='cyclical'")
    return None


def doubts(optim: ml_collections.ConfigDict, train_steps: int) -> list[str]:
    """Warnings for a valid schedule (`problem` found none) that probably does not do what
    was meant: a period longer than the steps after the warmup (the triangular cycle's
    default 1000 in a short run), so the schedule never repeats."""
    o = optim
    after_warmup = min(o.decay_steps or train_steps, train_steps) - o.warmup_steps
    if o.schedule == "cyclical" and o.cycle_mode == "triangular":
        field, period, effect = "optim.cycle_steps", o.cycle_steps, "its first cycle (lr -> final_lr -> lr) is not " \
            "over by the run's end"
    elif o.schedule == "cosine_restarts":
        field, period, effect = "optim.restart_steps", o.restart_steps, "it never restarts: a single cosine decay " \
            "that does not reach final_lr"
    else:
        return []
    if period <= after_warmup:
        return []
    return [f"config.{field}={period} is longer than the {after_warmup} steps after the warmup: {effect}. Shorten "
            f"it (e.g. {max(after_warmup // 4, 1)}) to see the schedule repeat."]

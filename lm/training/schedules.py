"""Learning-rate schedules: step -> learning rate, from `config.optim` (optax).

Every schedule starts with a linear warmup from 0 to `lr` over `warmup` steps (one_cycle's
rise is its own, see `cyclical`), then follows its kind over the decay length `total`
(`optim.decay_steps or train.steps`) and, past it, holds its last value:

- "cosine", "linear": decay to `final_lr` at step `total`; "constant": `lr`; "rsqrt":
  `lr` / sqrt(step / warmup) from the warmup's end.
- "wsd": warmup, stable at `lr`, then a cooldown to `final_lr` over the last
  `cooldown_fraction` of the run, "linear", "cosine" or "1-sqrt" shaped (Hägele et al.
  2024). The cooldown starts at `cooldown_start(total, cooldown_fraction)`, so a run of
  any length is the same stable run branched there and cooled down.
- "step": `lr`, multiplied by `step_gamma` at each of `step_boundaries`.
- "cyclical": "triangular" (Smith 2017) between `lr` and `final_lr`, period `cycle_steps`;
  or "one_cycle" (Smith & Topin 2018).
- "cosine_restarts": SGDR (Loshchilov & Hutter 2017), cosine from `lr` to `final_lr` over
  periods of `restart_steps`, each `restart_mult` times the one before.

Each schedule is a pure function of the step (a Python int or a traced int32), usable
under jit; optax's own schedules are used wherever optax has the shape. `lm.config`
validates the fields (`lm.config.schedule_fields`); here a bad kind raises ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lm.config.schedule_fields import cooldown_start, restart_periods

__all__ = ["FIELDS", "build", "cooldown_start", "from_config", "restart_periods"]

# The config fields (of `config.optim`) each kind reads besides lr, warmup, total and final_lr.
FIELDS: dict[str, tuple[str, ...]] = {
    "cosine": (), "linear": (), "constant": (), "rsqrt": (),
    "wsd": ("cooldown_fraction", "cooldown_shape"),
    "step": ("step_boundaries", "step_gamma"),
    "cyclical": ("cycle_mode", "cycle_steps"),
    "cosine_restarts": ("restart_steps", "restart_mult"),
}

ONE_CYCLE_DIV = 25.0  # one_cycle starts at lr / 25 (Smith & Topin's and optax's default div_factor)


def from_config(optim: ml_collections.ConfigDict, train_steps: int) -> optax.Schedule:
    """`optim.schedule` with `optim`'s fields, over `optim.decay_steps or train_steps`."""
    options = {name: optim[name] for name in FIELDS.get(optim.schedule, ())}
    return build(optim.schedule, optim.lr, optim.warmup_steps, optim.decay_steps or train_steps, optim.final_lr,
                 **options)


def build(kind: str, lr: float, warmup: int, total: int, final_lr: float, **options) -> optax.Schedule:
    """The schedule `kind` (one of FIELDS), peak `lr`, over `total` steps of which the
    first `warmup` warm up; `options` are the kind's fields (FIELDS[kind]) by name.
    Raises ValueError for an unknown kind, TypeError for missing or foreign options."""
    builders = {"cosine": cosine, "linear": linear, "constant": constant, "rsqrt": rsqrt, "wsd": wsd,
                "step": step_decay, "cyclical": cyclical, "cosine_restarts": cosine_restarts}
    if kind not in builders:
        raise ValueError(f"unknown schedule {kind!r}: use one of {', '.join(map(repr, builders))}")
    return builders[kind](lr, warmup, total, final_lr, **options)


def _after_warmup(lr: float, warmup: int, after: optax.Schedule) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup` steps, then `after`, which counts its
    steps from the warmup's end."""
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def cosine(lr: float, warmup: int, total: int, final_lr: float) -> optax.Schedule:
    """Warmup, then cosine decay from `lr` to `final_lr` at step `total` (Loshchilov & Hutter 2017)."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=final_lr)


def linear(lr: float, warmup: int, total: int, final_lr: float) -> optax.Schedule:
    """Warmup, then linear decay from `lr` to `final_lr` at step `total`."""
    return _after_warmup(lr, warmup, optax.linear_schedule(lr, final_lr, total - warmup))


def constant(lr: float, warmup: int, total: int, final_lr: float) -> optax.Schedule:
    """Warmup, then `lr`."""
    del total, final_lr  # a constant rate has neither
    return _after_warmup(lr, warmup, optax.constant_schedule(lr))


def rsqrt(lr: float, warmup: int, total: int, final_lr: float) -> optax.Schedule:
    """Warmup, then `lr` x sqrt(warmup / step) (Vaswani et al. 2017), never reaching a floor."""
    del total, final_lr
    scale = max(warmup, 1)
    return _after_warmup(lr, warmup, lambda count: lr * jax.lax.rsqrt((count + scale) / scale))


def wsd(lr: float, warmup: int, total: int, final_lr: float, cooldown_fraction: float,
        cooldown_shape: str) -> optax.Schedule:
    """Warmup-stable-decay: warmup, `lr` until `cooldown_start(total, cooldown_fraction)`,
    then the cooldown to `final_lr` at `total`, shaped "linear", "cosine" or "1-sqrt".

    Source: Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
    Training Durations" (arXiv:2405.18392), whose 1-sqrt cooldown, 1 - sqrt((t - t0) / (T - t0)),
    beat linear, and whose 20% cooldown matched a cosine run of the same length."""
    start = cooldown_start(total, cooldown_fraction)
    cooldowns = {"linear": lambda steps: optax.linear_schedule(lr, final_lr, steps),
                 "cosine": lambda steps: optax.cosine_decay_schedule(lr, steps, alpha=final_lr / lr),
                 "1-sqrt": lambda steps: one_minus_sqrt(lr, final_lr, steps)}
    if cooldown_shape not in cooldowns:
        raise ValueError(f"unknown cooldown shape {cooldown_shape!r}: use one of {', '.join(map(repr, cooldowns))}")
    stable = optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), stable, cooldowns[cooldown_shape](
        total - start)], [warmup, start])


def one_minus_sqrt(lr: float, final_lr: float, steps: int) -> optax.Schedule:
    """From `lr` at step 0 to `final_lr` at `steps` (and after) along 1 - sqrt(step / steps),
    Hägele et al. 2024's cooldown shape (optax has none like it): it falls fast at first and
    flattens at the end."""

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        done = jnp.clip(jnp.asarray(count, jnp.float32) / steps, 0.0, 1.0)
        return lr - (lr - final_lr) * jnp.sqrt(done)  # so, exactly lr at the cooldown's first step

    return schedule


def step_decay(lr: float, warmup: int, total: int, final_lr: float, step_boundaries: Sequence[int],
               step_gamma: float) -> optax.Schedule:
    """Warmup, then `lr` multiplied by `step_gamma` at each step of `step_boundaries` (all
    after the warmup): the rate at boundary b and after carries one more factor.
    optax.piecewise_constant_schedule, counted from the warmup's end."""
    del total, final_lr  # the boundaries and gamma say where the rate ends
    after = optax.piecewise_constant_schedule(lr, {b - warmup: step_gamma for b in step_boundaries})
    return _after_warmup(lr, warmup, after)


def cyclical(lr: float, warmup: int, total: int, final_lr: float, cycle_mode: str,
             cycle_steps: int) -> optax.Schedule:
    """Cyclical learning rates.

    "triangular" (Smith 2017, "Cyclical Learning Rates for Training Neural Networks",
    arXiv:1506.01186): after the warmup, straight down from `lr` to `final_lr` over half a
    period of `cycle_steps` and straight back up, again and again (Smith's triangle, begun
    at its peak, where the warmup ends). optax has no such schedule.

    "one_cycle" (Smith & Topin 2018, "Super-Convergence", arXiv:1708.07120): one cosine
    rise from `lr` / 25 to `lr` over the `warmup` steps (it replaces the linear warmup)
    and one cosine fall to `final_lr` at `total`; optax.piecewise_interpolate_schedule, the
    schedule behind optax.cosine_onecycle_schedule, given the steps exactly rather than as
    a fraction of the run (which rounds down). `cycle_steps` is not used."""
    if cycle_mode == "one_cycle":
        return optax.piecewise_interpolate_schedule(
            "cosine", lr / ONE_CYCLE_DIV, {warmup: ONE_CYCLE_DIV, total: final_lr / lr})
    if cycle_mode != "triangular":
        raise ValueError(f"unknown cycle mode {cycle_mode!r}: use 'triangular' or 'one_cycle'")

    def triangle(count: jax.typing.ArrayLike) -> jax.Array:
        # [0, 1) along a period; the remainder in integers, exact at any step (float32 is not past 2**24)
        phase = jnp.mod(jnp.asarray(count), cycle_steps).astype(jnp.float32) / cycle_steps
        return final_lr + (lr - final_lr) * jnp.abs(1.0 - 2.0 * phase)

    return _after_warmup(lr, warmup, triangle)


def cosine_restarts(lr: float, warmup: int, total: int, final_lr: float, restart_steps: int,
                    restart_mult: float) -> optax.Schedule:
    """SGDR (Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm
    Restarts", arXiv:1608.03983): after the warmup, cosine decay from `lr` to `final_lr`
    over a period of `restart_steps`, then a restart at `lr` for a period `restart_mult`
    times longer (rounded), and so on until `total` (`restart_periods`). optax.sgdr_schedule."""
    periods = restart_periods(total - warmup, restart_steps, restart_mult)
    after = optax.sgdr_schedule([dict(init_value=lr, peak_value=lr, warmup_steps=0, decay_steps=p,
                                      end_value=final_lr) for p in periods])
    return _after_warmup(lr, warmup, after)

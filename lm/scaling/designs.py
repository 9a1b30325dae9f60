"""Sweep designs: the override dicts a config file's `get_sweep()` returns.

A model size is derived from a target non-embedding parameter count N with a fixed
aspect ratio (d_model / num_layers) and head size: N ≈ 12 · num_layers · d_model² for a
4x MLP, so d_model ≈ (12⁻¹ · N · aspect_ratio)^(1/3), rounded to whole heads. The exact
counts (total and non-embedding) and FLOPs of each run are recorded in its results, so the
rounding never leaks into a fit.

Every point is a flat dict of dotted config fields (`{"model.d_model": 64, ...}`);
`sweep.*` fields are bookkeeping the results table carries (the IsoFLOP budget, the
target size), not settings.

`wsd_branches` gives each size one stable run and cooldown branches that start from its
checkpoints (`lm.scaling.branches`): the losses at many token budgets for little more
than the compute of the largest.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

from lm.config.schedule_fields import MIN_COOLDOWN_STEPS, cooldown_start
from lm.model import ModelConfig
from lm.model.counting import train_flops_per_token
from lm.scaling import branches
from lm.scaling.sweeps import point_name


def _positive(design: str, argument: str, values: Iterable[float]) -> list[float]:
    """`values` as a list, or ValueError naming `design`'s `argument` and its first value that
    is not a finite number > 0 (a count of parameters, tokens or FLOPs)."""
    values = list(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{design}: `{argument}` holds {v!r}, not a finite number > 0. Fix: give positive "
                             f"{argument}, e.g. [1e6, 4e6].")
    return values


def shape_for(non_embedding: float, aspect_ratio: float = 32.0, head_dim: int = 16) -> dict[str, int]:
    """Model fields whose non-embedding parameter count is nearest `non_embedding` (in
    log), with d_model / num_layers near `aspect_ratio` and heads of `head_dim`."""
    d_ideal = (non_embedding * aspect_ratio / 12) ** (1 / 3)
    best = None
    for heads in range(max(1, round(d_ideal / head_dim) - 2), round(d_ideal / head_dim) + 3):
        d_model = heads * head_dim
        layers = max(1, round(d_model / aspect_ratio))
        error = abs(math.log(12 * layers * d_model ** 2 / non_embedding))
        if best is None or error < best[0]:
            best = (error, dict(num_layers=layers, d_model=d_model, num_heads=heads, head_dim=head_dim,
                                d_ff=4 * d_model))
    return best[1]


def model_overrides(shape: dict[str, int]) -> dict[str, int]:
    return {f"model.{k}": v for k, v in shape.items()}


def flops_per_token(config: ml_collections.ConfigDict, shape: dict[str, int], vocab_size: int) -> float:
    """Training FLOPs per token of `config` with the model fields of `shape`."""
    model = ml_collections.ConfigDict(config.model.to_dict())
    model.update(shape)
    return train_flops_per_token(ModelConfig.from_config(model, vocab_size, config.data.seq_len, strict=False),
                                 config.data.seq_len)


def steps_for(config: ml_collections.ConfigDict, tokens: float) -> int:
    return max(1, round(tokens / (config.train.batch_size * config.data.seq_len)))


def _training(config: ml_collections.ConfigDict, steps: int) -> dict:
    """Steps, and a warmup that fits in them (a fifth at most)."""
    return {"train.steps": steps, "optim.warmup_steps": min(config.optim.warmup_steps, max(1, steps // 5))}


def isoflop(config: ml_collections.ConfigDict, budgets: Sequence[float], sizes: int = 5, span: float = 4.0,
            tokens_per_parameter: float = 20.0, vocab_size: int = 256, aspect_ratio: float = 32.0,
            head_dim: int = 16) -> list[dict]:
    """IsoFLOP profiles: for each budget C, `sizes` models log-spaced over [N_c / span,
    N_c · span] around N_c, the size that C buys at `tokens_per_parameter` (Chinchilla: 20),
    each trained on D = C / (FLOPs per token) tokens. Targets that round to a shape already
    in the profile are dropped."""
    points = []
    for budget in _positive("isoflop", "budgets", budgets):
        centre, shapes = math.sqrt(budget / (6 * tokens_per_parameter)), []
        for target in np.geomspace(centre / span, centre * span, sizes):
            shape = shape_for(target, aspect_ratio, head_dim)
            if shape in shapes:
                continue  # small targets can round to one shape; a profile needs distinct sizes
            shapes.append(shape)
            tokens = budget / flops_per_token(config, shape, vocab_size)
            points.append({**model_overrides(shape), **_training(config, steps_for(config, tokens)),
                           "sweep.budget": float(budget), "sweep.target_parameters": float(round(target))})
    return points


def size_by_tokens(config: ml_collections.ConfigDict, sizes: Iterable[float], tokens: Iterable[float],
                   aspect_ratio: float = 32.0, head_dim: int = 16) -> list[dict]:
    """Every model size trained on every token count (Kaplan's grid)."""
    sizes, tokens = _positive("size_by_tokens", "sizes", sizes), _positive("size_by_tokens", "tokens", tokens)
    return [{**model_overrides(shape_for(n, aspect_ratio, head_dim)), **_training(config, steps_for(config, d)),
             "sweep.target_parameters": float(n)} for n, d in itertools.product(sizes, tokens)]


def learning_rates(points: Iterable[dict], lrs: Iterable[float]) -> list[dict]:
    """Each point at each peak learning rate (a learning-rate sweep per size)."""
    return [{**point, "optim.lr": float(lr)} for point, lr in itertools.product(points, lrs)]


def wsd_branches(config: ml_collections.ConfigDict, sizes: Iterable[float] | None, tokens: Iterable[float],
                 cooldown_fraction: float = 0.2, aspect_ratio: float = 32.0, head_dim: int = 16) -> list[dict]:
    """WSD cooldown branches (Hägele et al. 2024): for each model size, one stable run and
    one branch per token budget D in `tokens`. A WSD run of B steps is constant (after the
    warmup) until its cooldown starts at step s(B) = (1 - `cooldown_fraction`) B
    (`cooldown_start`), so it equals the stable run's checkpoint at s(B) cooled down over
    the remaining steps. The stable run is the WSD run of the largest budget stopped at
    its cooldown's start, keeping the checkpoint at every branch point (`train.keep_steps`);
    each branch trains to B = D / (tokens per step) under WSD from there, and its results
    row is that of a B-step run. All points share `config`'s `optim.warmup_steps`.
    `sizes`: target non-embedding parameter counts (`shape_for`), or None for `config`'s model.

    Raises ValueError naming `cooldown_fraction` outside (0, 1), and naming `tokens` (with
    the least budget that works) for a budget whose branch point falls inside the warmup or
    whose cooldown rounds to fewer than MIN_COOLDOWN_STEPS steps, and for budgets that round
    to the same steps."""
    if not 0 < cooldown_fraction < 1:
        raise ValueError(f"wsd_branches: cooldown_fraction={cooldown_fraction!r} is not a fraction of a run. Fix: "
                         "give one in (0, 1), e.g. 0.2.")
    budgets = {}
    sizes = None if sizes is None else _positive("wsd_branches", "sizes", sizes)
    for d in _positive("wsd_branches", "tokens", tokens):
        steps = steps_for(config, d)
        _check_budget(config, d, steps, cooldown_fraction)
        if steps in budgets:
            raise ValueError(f"wsd_branches: the token budgets {budgets[steps]:g} and {d:g} are both {steps} steps. "
                             "Fix: give `tokens` distinct budgets.")
        budgets[steps] = d
    if not budgets:
        raise ValueError("wsd_branches: `tokens` is empty. Fix: give at least one token budget.")
    schedule = {"optim.schedule": "wsd", "optim.cooldown_fraction": float(cooldown_fraction)}
    points = []
    longest = max(budgets)
    models = [{}] if sizes is None else [{**model_overrides(shape_for(n, aspect_ratio, head_dim)),
                                          "sweep.target_parameters": float(n)} for n in sizes]
    for model in models:
        stable = {**model, **schedule, "optim.decay_steps": longest,
                  "train.steps": cooldown_start(longest, cooldown_fraction),
                  "train.keep_steps": tuple(sorted({cooldown_start(b, cooldown_fraction) for b in budgets}))}
        points.append(stable)
        parent = branches.PREFIX + point_name(stable)
        points += [{**model, **schedule, "optim.decay_steps": 0, "train.steps": b, "train.branch_from": parent,
                    "train.branch_step": cooldown_start(b, cooldown_fraction)} for b in sorted(budgets)]
    return points


def _check_budget(config: ml_collections.ConfigDict, tokens: float, steps: int, fraction: float) -> None:
    """Raises ValueError naming the budget `tokens` (`steps` steps) if its branch point,
    `cooldown_start(steps, fraction)`, is inside the warmup (or at step 0) or leaves fewer
    than MIN_COOLDOWN_STEPS to cool down, with the least budget that has neither fault."""
    warmup = config.optim.warmup_steps

    def branch_point_fits(s: int) -> bool:
        return max(warmup, 1) <= cooldown_start(s, fraction) <= s - MIN_COOLDOWN_STEPS

    if branch_point_fits(steps):
        return
    least = next(s for s in itertools.count(steps) if branch_point_fits(s))
    start, fix_other = cooldown_start(steps, fraction), "shorten optim.warmup_steps"
    if start == 0:
        problem = "would branch at step 0, before the stable run has trained"
    elif start < warmup:
        problem = f"would branch at step {start}, inside the stable run's warmup (config.optim.warmup_steps={warmup})"
    else:
        problem = (f"leaves its cooldown {steps - start} step(s) ({fraction:g} of {steps} steps, rounded), and a "
                   f"cooldown's first update is at the peak rate: it takes {MIN_COOLDOWN_STEPS} to cool at all")
        fix_other = "raise cooldown_fraction"
    raise ValueError(f"wsd_branches: the token budget {tokens:g} ({steps} steps) {problem}. Fix: drop budgets below "
                     f"{least} steps ({least * config.train.batch_size * config.data.seq_len} tokens) from `tokens`, "
                     f"or {fix_other}.")

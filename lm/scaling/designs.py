"""Sweep designs: the override dicts a config file's `get_sweep()` returns.

A model size is derived from a target non-embedding parameter count N with a fixed
aspect ratio (d_model / num_layers) and head size: N ≈ 12 · num_layers · d_model² for a
4x MLP, so d_model ≈ (12⁻¹ · N · aspect_ratio)^(1/3), rounded to whole heads. The exact
counts (total and non-embedding) and FLOPs of each run are recorded in its results, so the
rounding never leaks into a fit.

Every point is a flat dict of dotted config fields (`{"model.d_model": 64, ...}`);
`sweep.*` fields are bookkeeping the results table carries (the IsoFLOP budget, the
target size), not settings.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

from lm.model import ModelConfig
from lm.model.counting import train_flops_per_token


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
    for budget in budgets:
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
    return [{**model_overrides(shape_for(n, aspect_ratio, head_dim)), **_training(config, steps_for(config, d)),
             "sweep.target_parameters": float(n)} for n, d in itertools.product(sizes, tokens)]


def learning_rates(points: Iterable[dict], lrs: Iterable[float]) -> list[dict]:
    """Each point at each peak learning rate (a learning-rate sweep per size)."""
    return [{**point, "optim.lr": float(lr)} for point, lr in itertools.product(points, lrs)]

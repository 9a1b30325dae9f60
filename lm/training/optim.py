"""Optimizer and learning-rate schedule from config (optax); fine-tuning builds its
optimizer from the same pieces (`learning_rate_schedule`, `adamw`)."""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

from lm.model import param_kinds
from lm.training import schedules


def schedule(optim: ml_collections.ConfigDict, train_steps: int) -> optax.Schedule:
    """`optim.schedule` after linear warmup, over `decay_steps` (default: the whole run):
    one of lm.training.schedules' kinds, with its fields from `optim`."""
    return schedules.from_config(optim, train_steps)


def learning_rate_schedule(kind: str, lr: float, warmup: int, total: int, final_lr: float,
                           **options) -> optax.Schedule:
    """The rate at each step: linear warmup from 0 to `lr` over `warmup` steps, then
    `kind`, e.g. "cosine" or "linear" decay to `final_lr` at step `total`, "constant", or
    "rsqrt" (inverse square root of the step, from the warmup's end); `options` are the
    other kinds' fields (`lm.training.schedules.FIELDS`). Raises ValueError for an unknown `kind`."""
    return schedules.build(kind, lr, warmup, total, final_lr, **options)


def decay_mask(params: Any) -> Any:
    """True for kernels and embedding tables; norm scales, norm biases and biases are not
    decayed. Decided by what each parameter is (`lm.model.param_kinds`), never by its rank:
    scanned layers make every norm scale 2-D. Fine-tuning's tree {"backbone", "head",
    "lora"} gets the same rule: the head's kernel and LoRA's factors are kernels. Raises
    `param_kinds.UnknownParameterError` for a parameter name of no known kind."""
    return param_kinds.decay_mask(params)


def adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float, grad_clip: float, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on `decay_mask`'s parameters, after global-norm
    gradient clipping to `grad_clip` (0: no clipping)."""
    transform = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if not grad_clip:
        return transform
    return optax.chain(optax.clip_by_global_norm(grad_clip), transform)


def make(optim: ml_collections.ConfigDict, train_steps: int) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay, after global-norm gradient clipping."""
    return adamw(schedule(optim, train_steps), optim.weight_decay, optim.grad_clip, optim.b1, optim.b2, optim.eps)

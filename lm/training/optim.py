"""Optimizer and learning-rate schedule from config (optax); fine-tuning builds its
optimizer from the same pieces (`learning_rate_schedule`, `adamw`)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from lm.model import param_kinds


def schedule(optim: ml_collections.ConfigDict, train_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine/linear decay to `final_lr`, constant,
    or inverse square root, over `decay_steps` (default: the whole run)."""
    return learning_rate_schedule(optim.schedule, optim.lr, optim.warmup_steps, optim.decay_steps or train_steps,
                                  optim.final_lr)


def learning_rate_schedule(kind: str, lr: float, warmup: int, total: int, final_lr: float) -> optax.Schedule:
    """The rate at each step: linear warmup from 0 to `lr` over `warmup` steps, then
    `kind`: "cosine" or "linear" decay to `final_lr` at step `total`, "constant", or
    "rsqrt" (inverse square root of the step, from the warmup's end). Raises ValueError
    for another `kind`."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=final_lr)
    warmup_fn = optax.linear_schedule(0.0, lr, warmup)
    if kind == "linear":
        after = optax.linear_schedule(lr, final_lr, total - warmup)
    elif kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "rsqrt":
        after = lambda step: lr * jax.lax.rsqrt((step + max(warmup, 1)) / max(warmup, 1))
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return optax.join_schedules([warmup_fn, after], [warmup])


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

"""Optimizer and learning-rate schedule from config (optax)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from lm.model import param_kinds


def schedule(optim: ml_collections.ConfigDict, train_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine/linear decay to `final_lr`, constant,
    or inverse square root, over `decay_steps` (default: the whole run)."""
    lr, warmup = optim.lr, optim.warmup_steps
    total = optim.decay_steps or train_steps
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=optim.final_lr)
    warmup_fn = optax.linear_schedule(0.0, lr, warmup)
    if optim.schedule == "linear":
        after = optax.linear_schedule(lr, optim.final_lr, total - warmup)
    elif optim.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif optim.schedule == "rsqrt":
        after = lambda step: lr * jax.lax.rsqrt((step + max(warmup, 1)) / max(warmup, 1))
    else:
        raise ValueError(f"unknown schedule {optim.schedule!r}")
    return optax.join_schedules([warmup_fn, after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for kernels and embedding tables; norm scales, norm biases and biases are not
    decayed. Decided by what each parameter is (`lm.model.param_kinds`), never by its rank:
    scanned layers make every norm scale 2-D. Raises `param_kinds.UnknownParameterError`
    for a parameter name of no known kind."""
    return param_kinds.decay_mask(params)


def make(optim: ml_collections.ConfigDict, train_steps: int) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay, after global-norm gradient clipping."""
    adamw = optax.adamw(schedule(optim, train_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    if not optim.grad_clip:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)

"""What fine-tuning trains and how fast: freezing by regex, discriminative (per-layer)
learning rates and gradual unfreezing (ULMFiT, Howard & Ruder 2018).

Parameters live in one tree {"backbone", "head", "lora"}; a path is its keys joined by
"/" (e.g. "backbone/layer_3/attn/qkv/kernel"). Frozen parameters are split off before
differentiation, so they get no gradient, no optimizer state and stay bit-identical.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from lm.config import choices
from lm.errors import UsageError
from lm.training import optim as training_optim

METHODS = choices.FINETUNE_METHODS


def trainable_mask(params: dict, method: str, freeze: str) -> dict:
    """True for each parameter the method trains: everything ("full"), the adapters and
    head ("lora"), or the head alone ("frozen"); minus backbone paths matching `freeze`."""
    if method not in METHODS:
        raise UsageError(f"finetune.method={method!r} is not one of {METHODS}. Fix: pick one.")
    flat = traverse_util.flatten_dict(params)
    mask = {}
    for path in flat:
        joined = "/".join(path)
        trains = {"full": path[0] != "lora", "lora": path[0] in ("lora", "head"), "frozen": path[0] == "head"}[method]
        mask[path] = trains and not (freeze and path[0] == "backbone" and re.search(freeze, joined))
    if freeze and not any(path[0] == "backbone" and re.search(freeze, "/".join(path)) for path in flat):
        raise UsageError(f"finetune.freeze={freeze!r} matches no backbone parameter. Fix: match paths like "
                          f"{'/'.join(next(p for p in flat if p[0] == 'backbone'))!r}.")
    return traverse_util.unflatten_dict(mask)


def partition(params: dict, mask: dict) -> tuple[dict, dict]:
    """(trainable, frozen): two trees with the same keys as `params`, each holding its half."""
    flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    trainable = {p: v for p, v in flat.items() if flat_mask[p]}
    frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
    flat = dict(traverse_util.flatten_dict(frozen))
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def depth(path: tuple[str, ...], num_layers: int) -> np.ndarray:
    """Distance from the output: 0 for the head and final norm, 1 for the top layer, ...,
    num_layers + 1 for the embeddings. A scanned `layers` leaf gets one depth per layer."""
    for key in path:
        if key.startswith("layer_") and key[6:].isdigit():
            return np.array(num_layers - int(key[6:]))
        if key == "layers":
            return num_layers - np.arange(num_layers)
    if any(key in ("embed", "pos_embed") for key in path):
        return np.array(num_layers + 1)
    return np.array(0)


class LayerwiseState(NamedTuple):
    count: jax.Array


def layerwise(depths: Any, decay: float, unfreeze_every: int) -> optax.GradientTransformation:
    """Scales each update by decay**depth (discriminative rates) and by 0 until its layer
    is unfrozen: depth d trains from step d * unfreeze_every (0 = all from the start)."""

    def init(params):
        del params
        return LayerwiseState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params

        def scale(u, d):
            d = jnp.asarray(d).reshape(d.shape + (1,) * (u.ndim - d.ndim))
            factor = jnp.power(decay, d.astype(jnp.float32))
            if unfreeze_every:
                factor = factor * (state.count >= d * unfreeze_every)
            return (u * factor).astype(u.dtype)

        return jax.tree.map(scale, updates, depths), LayerwiseState(state.count + 1)

    return optax.GradientTransformation(init, update)


def learning_rate(ft: ml_collections.ConfigDict) -> float:
    """The method's peak rate: `learning_rate` (full), `lora.learning_rate` or `frozen_learning_rate`."""
    return {"full": ft.learning_rate, "lora": ft.lora.learning_rate, "frozen": ft.frozen_learning_rate}[ft.method]


def make(trainable: dict, num_layers: int, ft: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Pretraining's AdamW (`lm.training.optim.adamw`: clipping, weight decay on kernels,
    embedding tables and LoRA factors only, never on norms or biases) with warmup + cosine
    decay to a tenth of the method's rate, then the layerwise scaling."""
    peak = learning_rate(ft)
    schedule = training_optim.learning_rate_schedule("cosine", peak, max(ft.warmup_steps, 1),
                                                     max(ft.steps, ft.warmup_steps + 1), peak * 0.1)
    depths = traverse_util.path_aware_map(lambda path, x: depth(path, num_layers), trainable)
    return optax.chain(training_optim.adamw(schedule, ft.weight_decay, ft.grad_clip),
                       layerwise(depths, ft.layer_decay, ft.unfreeze_every))

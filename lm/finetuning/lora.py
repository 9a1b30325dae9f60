"""LoRA adapters as a variable collection beside the parameters: created by the model
itself (`layers.LoRA`), trained alone, and merged into the kernels for export."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lm.errors import UsageError
from lm.model import ModelConfig, build
from lm.model.layers import LoRA


def with_lora(model_cfg: ModelConfig, rank: int, alpha: float, targets: str) -> ModelConfig:
    if rank <= 0:
        raise UsageError(f"finetune.lora.rank={rank} must be positive. Fix: try 8.")
    return dataclasses.replace(model_cfg, lora=LoRA(rank, alpha, targets))


def init_adapters(model_cfg: ModelConfig, rng: jax.Array, seq_len: int) -> dict:
    """Fresh adapters (A random, B zero) for every dense layer `model_cfg.lora` targets."""
    tokens_BL = jnp.zeros((1, seq_len), jnp.int32)
    model = build(model_cfg)
    lora = nn.meta.unbox(jax.eval_shape(model.init, rng, tokens_BL).get("lora", {}))
    if not lora:
        raise UsageError(f"finetune.lora.targets={model_cfg.lora.targets!r} matches no dense layer. Fix: "
                          f"match some of {dense_layer_paths(model_cfg, seq_len)}.")
    # Only the adapters leave the jitted init, so XLA drops the base weights' initialisation.
    return nn.meta.unbox(jax.jit(lambda key: model.init(key, tokens_BL)["lora"])(rng))


def dense_layer_paths(model_cfg: ModelConfig, seq_len: int) -> list[str]:
    """The paths LoRA's regex is searched in, e.g. 'layer_0/attn/qkv'."""
    model = build(dataclasses.replace(model_cfg, lora=None))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
    return sorted({"/".join(path[:-1]) for path in traverse_util.flatten_dict(nn.meta.unbox(params))
                   if path[-1] == "kernel"})


def merge(params: Any, lora: Any, model_cfg: ModelConfig) -> Any:
    """`params` with each adapted kernel replaced by W + (alpha / rank) A B (same shape)."""
    flat = traverse_util.flatten_dict(params)
    adapters = traverse_util.flatten_dict(lora)
    scale = model_cfg.lora.alpha / model_cfg.lora.rank
    for path, a in adapters.items():
        if path[-1] != "a":
            continue
        module = path[:-1]
        kernel = flat[module + ("kernel",)]
        delta = jnp.matmul(a, adapters[module + ("b",)]) * scale  # scanned models: the layers axis broadcasts
        flat[module + ("kernel",)] = (kernel + delta.reshape(kernel.shape)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)

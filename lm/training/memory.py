"""Per-device memory of a training run, before anything is allocated.

Parameters, gradients and optimizer state are exact: each array's shard under its
sharding. Activations are an estimate: what one layer keeps for the backward pass
(per the remat policy), times the layers, plus the logits and their gradient. The
ahead-of-time check (`lm.training.aot`) prints XLA's own figure for the compiled step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lm.errors import UsageError
from lm.model import ModelConfig, attention, pipeline

GiB = 1024**3


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs or arrays with shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def attention_kernel(cfg: ModelConfig, config: ml_collections.ConfigDict) -> str:
    """The kernel that serves the run's self-attention: `cfg.attention`, or XLA where that
    kernel falls back (packed rows on cuDNN, prefix-LM rows, lengths its blocks do not divide)."""
    return attention.plan(cfg.attention, causal=cfg.family != "encoder", has_segments=config.data.packing == "pack",
                          has_prefix=config.objective.name == "prefix_lm", length=config.data.seq_len,
                          dtype=cfg.dtype, head_dim=cfg.head_dim)[0]


def activation_bytes(cfg: ModelConfig, config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> int:
    """Estimated activations one device keeps for the backward pass of one microbatch; in a
    pipeline (lm.model.pipeline), of every loop iteration of its stage: M R + S - 1 passes
    through L / (S R) layers, the bubble's included, and the head's over its 1/S of the rows."""
    batch_shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    tensor = mesh_shape.get("tensor", 1)
    tokens = config.train.batch_size // config.train.microbatches // batch_shards * config.data.seq_len
    width = jnp.dtype(cfg.compute_dtype).itemsize
    heads_dims = cfg.num_heads * cfg.head_dim / tensor
    mlp = cfg.d_ff * (3 if cfg.activation == "swiglu" else 2) / tensor
    scores = 2 * cfg.num_heads / tensor * config.data.seq_len  # scores and probabilities, per query
    if attention_kernel(cfg, config) != "xla":
        scores = 0  # a fused kernel keeps only each row's softmax statistics
    whole_layer = 4 * cfg.d_model + 4 * heads_dims + scores + mlp
    kept = {"none": whole_layer, "full": cfg.d_model,
            "dots_saveable": cfg.d_model + 4 * heads_dims + scores / 2 + mlp / 2,
            "dots_with_no_batch_dims_saveable": cfg.d_model + 4 * heads_dims + mlp / 2}[cfg.remat]
    layers = cfg.num_layers + (cfg.num_decoder_layers or cfg.num_layers if cfg.family == "encoder_decoder" else 0)
    recomputed = whole_layer if cfg.remat != "none" else 0  # one layer rebuilt at a time in the backward pass
    logits = 2 * cfg.vocab_size * 4  # float32 logits and their gradient
    logit_tokens = tokens
    if cfg.pipeline_stages > 1:  # every microbatch's activations are held at once (GPipe's order)
        stages, repeats = cfg.pipeline_stages, cfg.pipeline_repeats
        layers = pipeline.iterations(stages, cfg.pipeline_microbatches, repeats) * (layers // (stages * repeats))
        logit_tokens = tokens * cfg.pipeline_microbatches // stages  # the head's rows are split over the stages
    return int(tokens * (layers * kept + recomputed) * width + logit_tokens * logits)


def estimate(abstract_state: Any, cfg: ModelConfig, config: ml_collections.ConfigDict,
             mesh_shape: dict[str, int]) -> dict[str, int]:
    """Bytes per device: parameters, gradients, optimizer state, activations and their total."""
    params = shard_bytes(abstract_state.params)
    parts = {"parameters": params, "gradients": params, "optimizer_state": shard_bytes(abstract_state.opt_state),
             "activations": activation_bytes(cfg, config, mesh_shape)}
    return {**parts, "total": sum(parts.values())}


class DoesNotFitError(UsageError):
    """A train step that needs more memory than a device has; the message says what lowers it."""


def does_not_fit(needed: int, limit: int, breakdown: str, config: ml_collections.ConfigDict,
                 mesh_shape: dict[str, int], cfg: ModelConfig, state_bytes: int) -> str:
    """The message for a step needing `needed` bytes a device against its `limit`: the
    figures, then the settings that lower them, from this run's own values: FSDP where
    the train state (`state_bytes` a device: parameters, gradients, optimizer state) is a
    real share, remat, enough microbatches for the excess, and a fused attention kernel."""
    devices = math.prod(mesh_shape.values())
    fixes = []
    if mesh_shape.get("fsdp", 1) < devices and state_bytes > needed / 10:
        fixes.append(f"shard parameters, gradients and optimizer state over every device (FSDP: "
                     f"config.mesh.shape.fsdp=-1 with data=1; now fsdp={mesh_shape.get('fsdp', 1)}, "
                     f"{human(state_bytes)} of train state a device)")
    if cfg.remat != "full":
        fixes.append(f"rematerialise each layer (config.model.remat='full'; now {cfg.remat!r})")
    rows = config.train.batch_size // (mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1))
    ratio = (needed - state_bytes) / max(limit - state_bytes, 1) * config.train.microbatches
    wanted = next((m for m in range(1, rows + 1) if rows % m == 0 and m >= ratio), 0)
    if cfg.pipeline_stages > 1:  # a pipeline holds every microbatch at once: more of them do not help
        fixes.append(f"more pipeline stages (config.mesh.shape.stage; now {cfg.pipeline_stages}), each holding "
                     "fewer layers")
    elif wanted > config.train.microbatches:
        fixes.append(f"hold fewer rows at once (config.train.microbatches={wanted}: {rows // wanted} of the "
                     f"{rows} rows a device at once; now {config.train.microbatches} microbatch(es))")
    elif limit > state_bytes:
        fixes.append(f"even one of the {rows} rows a device at once is too many: a smaller data.seq_len "
                     f"(now {config.data.seq_len}) or model")
    kernel = attention_kernel(cfg, config)
    if kernel == "xla" and cfg.attention != "xla":
        fixes.append(f"a data.seq_len that {cfg.attention} attention serves (a multiple of 128, not "
                     f"{config.data.seq_len}; it falls back to XLA's [B, H, L, L] scores)")
    elif kernel == "xla":
        fixes.append("a fused attention kernel that never holds the [B, H, L, L] scores (config.model.attention="
                     "'auto' on a TPU or GPU)")
    return (f"the train step needs {human(needed)} a device ({breakdown}) but a device has {human(limit)}. "
            f"Fix: {'; or '.join(fixes)}.")


def human(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 1024**2:.1f} MiB"


def describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {human(value)}" for name, value in parts.items())


def device_limit(device: jax.Device) -> int | None:
    """The device's memory in bytes, if its runtime says (GPUs and TPUs do; CPUs do not)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return (stats or {}).get("bytes_limit")

"""The `Example` every objective produces, the causal objective, and the weighted loss."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Example(NamedTuple):
    inputs_BL: Array  # int32 token ids fed to the model
    targets_BL: Array  # int32 ids the model must predict at each position
    weights_BL: Array  # float32 loss weight per position (0 on padding)
    segment_ids_BL: Array | None = None  # packed rows: document of each input (0 = padding)
    positions_BL: Array | None = None  # packed rows: position of each input in its document
    prefix_BL: Array | None = None  # prefix LM: inputs that attend bidirectionally within the prefix
    decoder_inputs_BL: Array | None = None  # encoder-decoder: targets shifted right (teacher forcing)


def causal_lm(batch: dict[str, Array], pad_id: int) -> Example:
    """Next-token prediction (GPT): predict token t+1 from tokens <= t.

    In packed rows (with `segment_ids`), a target counts only when it belongs to the
    same document as its input, so nothing is predicted across a document boundary.
    """
    tokens_BL1 = batch["tokens"]
    targets_BL = tokens_BL1[:, 1:]
    if "segment_ids" not in batch:
        return Example(tokens_BL1[:, :-1], targets_BL, (targets_BL != pad_id).astype(jnp.float32))
    segments_BL1 = batch["segment_ids"]
    same_document_BL = (segments_BL1[:, 1:] == segments_BL1[:, :-1]) & (segments_BL1[:, 1:] > 0)
    return Example(tokens_BL1[:, :-1], targets_BL, same_document_BL.astype(jnp.float32),
                   segments_BL1[:, :-1], batch["positions"][:, :-1])


def weighted_cross_entropy(logits_BLV: Array, targets_BL: Array, weights_BL: Array) -> tuple[Array, Array]:
    """(sum of weighted token losses, sum of weights), computed in float32.

    Returning sums rather than a mean lets callers normalise over a whole global batch
    or a whole evaluation split.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z_BL - target_logit_BL) * weights_BL), jnp.sum(weights_BL)


def z_loss_sum(logits_BLV: Array, weights_BL: Array) -> Array:
    """Sum of weighted log(Z)^2 (PaLM's auxiliary loss, which keeps the softmax normaliser near 1)."""
    log_z_BL = jax.nn.logsumexp(logits_BLV.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.square(log_z_BL) * weights_BL)


def loss_metrics(loss: float, bytes_per_token: float) -> dict[str, float]:
    """Mean loss in nats per token, its perplexity, and bits per UTF-8 byte."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) / bytes_per_token}

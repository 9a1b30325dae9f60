"""Prefix LM (T5 section 3.2.2, UL2's S-denoiser): a bidirectional prefix, a causal rest.

Each document of a packed row is split at a point drawn uniformly from its interior (or
at a fixed fraction of its length). Inputs before the split attend to each other in
both directions; the rest is causal; loss falls only on tokens after the split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.objectives.causal import Example, causal_lm

Array = jax.Array


def segment_lengths(segment_ids_BL: Array) -> Array:
    """The length of each token's segment, per token ([B, L])."""
    counts_BS = jax.vmap(lambda s: jnp.zeros(s.shape[0] + 1, jnp.int32).at[s].add(1))(segment_ids_BL)
    return jnp.take_along_axis(counts_BS, segment_ids_BL, axis=1)


def prefix_lm(batch: dict[str, Array], rng: Array, pad_id: int, prefix_fraction: float = 0.0) -> Example:
    """Causal inputs/targets with `prefix_BL` marking the bidirectional prefix.

    `prefix_fraction` 0 draws the split point per document, uniformly in [1, n - 1];
    otherwise the prefix is that fraction of the document (at least one token).
    """
    tokens_BL1 = batch["tokens"]
    segments_BL1 = batch.get("segment_ids", jnp.ones_like(tokens_BL1))
    positions_BL1 = batch.get("positions", jnp.broadcast_to(jnp.arange(tokens_BL1.shape[1]), tokens_BL1.shape))
    lengths_BL1 = segment_lengths(segments_BL1)
    if prefix_fraction:
        split_BL1 = jnp.maximum(jnp.floor(lengths_BL1 * prefix_fraction), 1).astype(jnp.int32)
    else:  # one uniform draw per (row, segment), read back through each token's segment id
        u_BS = jax.random.uniform(rng, segments_BL1.shape)
        u_BL1 = jnp.take_along_axis(u_BS, segments_BL1, axis=1)
        split_BL1 = 1 + jnp.floor(u_BL1 * jnp.maximum(lengths_BL1 - 1, 1)).astype(jnp.int32)
    prefix_BL1 = (positions_BL1 < split_BL1) & (segments_BL1 > 0)
    example = causal_lm({**batch, "segment_ids": segments_BL1, "positions": positions_BL1}, pad_id)
    weights_BL = example.weights_BL * (~prefix_BL1[:, 1:]).astype(jnp.float32)  # no loss on the prefix
    return example._replace(weights_BL=weights_BL, prefix_BL=prefix_BL1[:, :-1])

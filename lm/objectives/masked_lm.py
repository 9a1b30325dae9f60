"""Masked language modelling (BERT, Devlin et al. 2019, section 3.1).

Each ordinary token (not padding, `<eos>` or another special id) is selected with
probability `rate` (0.15). A selected token becomes `[MASK]` with probability 0.8, a
random ordinary token with probability 0.1 (never a special id), and stays itself
otherwise. The model sees the corrupted row and is scored only on selected tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.objectives.causal import Example

Array = jax.Array


def masked_lm(batch: dict[str, Array], rng: Array, *, mask_id: int, first_ordinary_id: int,
              num_ordinary_ids: int, rate: float = 0.15, mask_prob: float = 0.8,
              random_prob: float = 0.1) -> Example:
    """Inputs with BERT's corruption of the row's first `L` tokens; targets are the originals.

    Ordinary ids are `[first_ordinary_id, first_ordinary_id + num_ordinary_ids)`.
    """
    tokens_BL = batch["tokens"][:, :-1]  # rows carry one extra token for the causal shift
    select_rng, action_rng, random_rng = jax.random.split(rng, 3)
    ordinary_BL = (tokens_BL >= first_ordinary_id) & (tokens_BL < first_ordinary_id + num_ordinary_ids)
    selected_BL = ordinary_BL & (jax.random.uniform(select_rng, tokens_BL.shape) < rate)
    action_BL = jax.random.uniform(action_rng, tokens_BL.shape)
    random_BL = jax.random.randint(random_rng, tokens_BL.shape, first_ordinary_id,
                                   first_ordinary_id + num_ordinary_ids, dtype=tokens_BL.dtype)
    corrupted_BL = jnp.where(action_BL < mask_prob, mask_id,
                             jnp.where(action_BL < mask_prob + random_prob, random_BL, tokens_BL))
    inputs_BL = jnp.where(selected_BL, corrupted_BL, tokens_BL)
    segments = batch.get("segment_ids")
    positions = batch.get("positions")
    return Example(inputs_BL, tokens_BL, selected_BL.astype(jnp.float32),
                   None if segments is None else segments[:, :-1], None if positions is None else positions[:, :-1])

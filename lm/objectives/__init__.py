"""Pretraining objectives: pure, jit-friendly maps from packed token rows to model
inputs, targets and loss weights, plus the weighted loss they share.

- `causal_lm`: next-token prediction (GPT).
- `prefix_lm`: bidirectional prefix, causal continuation, loss on the continuation (T5, UL2).
- `masked_lm`: BERT's 15% selection, 80/10/10 replacement, loss on selected tokens.
- `span_corruption`: T5's spans replaced by sentinels; targets are the sentinel-delimited spans.
"""

from typing import Callable

import jax
import ml_collections

from lm.objectives.causal import Example, causal_lm, loss_metrics, weighted_cross_entropy, z_loss_sum
from lm.objectives.masked_lm import masked_lm
from lm.objectives.prefix_lm import prefix_lm
from lm.objectives.span_corruption import span_corruption

__all__ = ["Example", "MakeExample", "causal_lm", "prefix_lm", "masked_lm", "span_corruption",
           "weighted_cross_entropy", "z_loss_sum", "loss_metrics", "for_config"]

MakeExample = Callable[[dict, jax.Array], Example]  # (batch, rng) -> Example
DECODER_OBJECTIVES = ("causal", "prefix_lm")  # trainable now; the others need their model families


def for_config(objective: ml_collections.ConfigDict, pad_id: int) -> MakeExample:
    """The config's objective as a pure `(batch, rng) -> Example`."""
    if objective.name == "causal":
        return lambda batch, rng: causal_lm(batch, pad_id)
    if objective.name == "prefix_lm":
        fraction = objective.prefix_lm.prefix_fraction
        return lambda batch, rng: prefix_lm(batch, rng, pad_id, fraction)
    raise ValueError(f"objective {objective.name!r} has no model family to train it yet")

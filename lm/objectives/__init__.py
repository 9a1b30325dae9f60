"""Pretraining objectives: pure, jit-friendly maps from packed token rows to model
inputs, targets and loss weights, plus the weighted loss they share.

- `causal_lm`: next-token prediction (GPT).
- `prefix_lm`: bidirectional prefix, causal continuation, loss on the continuation (T5, UL2).
- `masked_lm`: BERT's 15% selection, 80/10/10 replacement, loss on selected tokens.
- `span_corruption`: T5's spans replaced by sentinels; targets are the sentinel-delimited spans.
"""

from lm.objectives.causal import Example, causal_lm, loss_metrics, weighted_cross_entropy
from lm.objectives.masked_lm import masked_lm
from lm.objectives.prefix_lm import prefix_lm
from lm.objectives.span_corruption import span_corruption

__all__ = ["Example", "causal_lm", "prefix_lm", "masked_lm", "span_corruption", "weighted_cross_entropy",
           "loss_metrics"]

"""µP, the maximal update parametrization (Yang et al. 2022, "Tensor Programs V", Table 3
and Table 8's practitioners' form; EleutherAI and Cerebras, "The practitioner's guide to
µP"), with config `model.parametrization = "mup"` and `model.mup_base_width`.

With the width multiplier m = d_model / mup_base_width, relative to standard (lm's GPT-2
init; the rates are Adam's, each optimizer's rule is below):

| what                                           | standard           | µP                      |
|------------------------------------------------|--------------------|-------------------------|
| token and position embeddings: init std, rate  | init_std, lr       | unchanged               |
| hidden matrices (q, k, v, MLP in): init std    | init_std           | init_std / sqrt(m)      |
| residual projections (attention out, MLP out)  | init_std/sqrt(2L)  | init_std/sqrt(2L)/sqrt(m) |
| hidden matrices: learning rate (`matrix` group)| lr                 | lr / m                  |
| attention scores                               | q.k / sqrt(head_dim) | q.k / head_dim        |
| logits (tied or untied head)                   | h W                | h W / m (output multiplier) |
| untied head: init std, rate; norms, biases     | init_std, lr       | unchanged               |

GPT-2's depth rule for the residual projections is kept: its factor 1/sqrt(2L) does not
depend on width, so it commutes with µP's 1/sqrt(m), and at m = 1 the two
parametrizations initialise identically. At m = 1 they then differ only in the attention
scale (1/head_dim against 1/sqrt(head_dim)). The attention scale is one multiplier
1/sqrt(head_dim) on the queries before any kernel (XLA, cuDNN, splash, the KV cache),
which each then scale by 1/sqrt(head_dim) themselves.

The rates: `lr_multipliers` is passed to `lm.training.optim.make` wherever a run's
optimizer is built (training and `eval_params_reader`). Each optimizer has its own rule,
`lm.config.choices.MUP_RATE_EXPONENTS`: a group's rate is multiplied by m to the power
given (none: unchanged).

- adamw, adam, lion, schedule_free_adamw: hidden matrices lr / m (Table 3: the size of an
  update does not depend on the gradient's scale).
- muon: no change. Muon's orthogonalised update has a spectral norm that does not depend on
  width, which is what µP asks of a hidden matrix (Yang, Simon & Bernstein 2023, "A
  spectral condition for feature learning"); the AdamW on the rest follows Adam's rule,
  which leaves those groups alone.
- adafactor: hidden matrices lr / sqrt(m). optax's Adafactor multiplies an Adam-like update
  by the parameter's RMS, which µP's init makes init_std / sqrt(m) for hidden matrices and
  leaves alone for the rest.

`bench/mup_coord_check.py --optimizer=NAME` checks each rule. SGD has none here: its rule
(Table 3; the `mup` package's MuSGD) multiplies the embeddings', head's, norms' and
biases' rates by m, and its L2 decay, which joins the gradient, would then shrink those
groups m times faster per step unless divided by m; without that the coordinate check
fails (embeddings shrink with width), so validation refuses the pair.

Weight decay: optax multiplies decoupled decay by the group's rate, so a group's decay is
divided by its µP rate multiplier (`lm.training.param_groups.resolve`): the decay per step,
rate x decay, is the base width's at every width, as in the `mup` package's MuAdamW (its
default decoupled_wd=False) and as Wang & Aitchison (2024) find AdamW's decay timescale
should be. Fine-tuning (lm.finetune) builds its
own AdamW without these multipliers: its rate is chosen for the model being fine-tuned,
not transferred from a base width, and its heads and adapters are not µP-parametrised. The
forward pass (attention and logit scaling) is the model's and applies everywhere.
"""

from __future__ import annotations

import math
from typing import Any

from lm.config.choices import MUP_RATE_EXPONENTS


def is_mup(model: Any) -> bool:
    """Whether `model` (a ModelConfig or a config's `model` block) is µP."""
    return getattr(model, "parametrization", "standard") == "mup"


def width_multiplier(model: Any) -> float:
    """m = d_model / mup_base_width under µP; 1.0 under the standard parametrization."""
    if not is_mup(model):
        return 1.0
    return model.d_model / model.mup_base_width


def lr_multipliers(model: Any, optimizer: str) -> dict[str, float]:
    """Each parameter group's learning-rate multiplier (`lm.training.param_groups`) for
    `model` (a ModelConfig or a config's `model` block) trained by `optimizer` (an
    `optim.name`): under µP, m ** MUP_RATE_EXPONENTS[optimizer][group] (e.g. Adam's matrix
    group 1/m); under the standard parametrization none ({}). Raises KeyError for an
    optimizer with no rule (a test keeps every `lm.config.choices.OPTIMIZERS` in the table)."""
    if not is_mup(model):
        return {}
    m = width_multiplier(model)
    return {group: m ** exponent for group, exponent in MUP_RATE_EXPONENTS[optimizer].items()}


def init_scale(model: Any) -> float:
    """The factor on the hidden matrices' init std: 1/sqrt(m) (1.0 when standard)."""
    return 1.0 / math.sqrt(width_multiplier(model))

"""Pretraining objectives: pure, jit-friendly maps from packed token rows to model
inputs, targets and loss weights, plus the weighted loss they share.

- `causal_lm`: next-token prediction (GPT).
- `prefix_lm`: bidirectional prefix, causal continuation, loss on the continuation (T5, UL2).
- `masked_lm`: BERT's 15% selection, 80/10/10 replacement, loss on selected tokens.
- `span_corruption`: T5's spans replaced by sentinels; targets are the sentinel-delimited spans.
- `mixture`: UL2's mixture of denoisers (span corruptions and prefix LM), each with its task token.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from lm.objectives import mixture as mixture_lib
from lm.objectives.causal import Example, causal_lm, loss_metrics, weighted_cross_entropy, z_loss_sum
from lm.objectives.masked_lm import masked_lm
from lm.objectives.mixture import Denoiser, mixture_of_denoisers
from lm.objectives.prefix_lm import prefix_lm
from lm.objectives.span_corruption import span_corruption, span_counts

__all__ = ["Example", "MakeExample", "Denoiser", "causal_lm", "prefix_lm", "masked_lm", "span_corruption",
           "mixture_of_denoisers", "weighted_cross_entropy", "z_loss_sum", "loss_metrics", "for_config",
           "model_vocab_size",
           "extra_ids_needed", "denoisers"]

MakeExample = Callable[[dict, jax.Array], Example]  # (batch, rng) -> Example


def model_vocab_size(objective: ml_collections.ConfigDict, tokenizer_vocab_size: int) -> int:
    """The tokenizer's ids plus the objective's extra ids ([MASK], then sentinels) after them."""
    return tokenizer_vocab_size + objective.extra_ids


def denoisers(objective: ml_collections.ConfigDict) -> tuple[Denoiser, ...]:
    """The mixture's denoisers: `objective.mixture.denoisers` if given, else its preset."""
    given = objective.mixture.denoisers
    if given:
        return tuple(Denoiser(**dict(d)) for d in given)
    return mixture_lib.PRESETS[objective.mixture.preset]


def extra_ids_needed(objective: ml_collections.ConfigDict, seq_len: int, family: str) -> int:
    """Extra ids the objective needs for rows of `seq_len + 1` tokens with `family`'s layout."""
    if objective.name == "masked_lm":
        return 1
    if objective.name == "span_corruption":
        sc = objective.span_corruption
        return span_counts(seq_len + 1, sc.noise_density, sc.mean_span_length)[1]
    if objective.name == "mixture":
        return mixture_lib.extra_ids_needed(denoisers(objective), family, seq_len)
    return 0


def for_config(objective: ml_collections.ConfigDict, family: str, pad_id: int, tokenizer_vocab_size: int,
               eos_id: int = 1, num_special: int = 3) -> MakeExample:
    """The config's objective for a model `family`, as a pure `(batch, rng) -> Example`.

    Extra ids start at `tokenizer_vocab_size`: masked LM's [MASK] is the first; span
    corruption's sentinels are the first `extra_ids`; a mixture's task tokens come
    first, then its sentinels. Ordinary tokens are the tokenizer's ids from
    `num_special` on.
    """
    name = objective.name
    if name == "causal":
        return lambda batch, rng: causal_lm(batch, pad_id)
    if name == "prefix_lm":
        fraction = objective.prefix_lm.prefix_fraction
        return lambda batch, rng: prefix_lm(batch, rng, pad_id, fraction)
    if name == "masked_lm":
        m = objective.masked_lm
        return lambda batch, rng: masked_lm(
            batch, rng, mask_id=tokenizer_vocab_size, first_ordinary_id=num_special,
            num_ordinary_ids=tokenizer_vocab_size - num_special, rate=m.rate, mask_prob=m.mask_prob,
            random_prob=m.random_prob)
    if name == "span_corruption":
        sc = objective.span_corruption
        sentinel_ids = jnp.arange(tokenizer_vocab_size, tokenizer_vocab_size + objective.extra_ids)
        return lambda batch, rng: span_corruption(
            batch, rng, sentinel_ids=sentinel_ids, eos_id=eos_id, pad_id=pad_id,
            noise_density=sc.noise_density, mean_span_length=sc.mean_span_length)
    if name == "mixture":
        chosen = denoisers(objective)
        return lambda batch, rng: mixture_of_denoisers(
            batch, rng, denoisers=chosen, layout=family, extra_ids_start=tokenizer_vocab_size,
            eos_id=eos_id, pad_id=pad_id)
    raise ValueError(f"unknown objective {name!r}")

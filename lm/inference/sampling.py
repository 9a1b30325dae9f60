"""Choosing the next token from a model's logits: the settings (`Sampling`), the
vocabulary mask (`text_only`), the logits filters and penalties (`process_logits`), the
choice itself (`choose`) and the log-probabilities a request may ask for
(`log_probabilities`).

Shape letters follow the legend in lm/model/transformer.py (B rows, V vocabulary, N
positions, A alternatives listed per position).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_p", "repetition_penalty", "presence_penalty",
                                "frequency_penalty"],
                   meta_fields=["top_k"])
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 keep
    every token; repetition_penalty > 1 discourages tokens already in the row, prompt
    included (CTRL's multiplicative penalty); presence_penalty and frequency_penalty
    (OpenAI's, additive, in [-2, 2]) lower a token's logit by
    `count * frequency_penalty + (count > 0) * presence_penalty`, `count` being how often
    the row has GENERATED it (the prompt does not count); negative values encourage repeats.

    Fields are Python numbers (one setting for the batch, a static argument of the jitted
    decoders) or, for all but top_k, arrays [B] of one setting per row (continuous
    batching mixes requests that sample differently)."""

    temperature: Any = 1.0
    top_k: int = 0
    top_p: Any = 1.0
    repetition_penalty: Any = 1.0
    presence_penalty: Any = 0.0
    frequency_penalty: Any = 0.0

    @property
    def per_row(self) -> bool:
        return not isinstance(self.temperature, (int, float))

    def check(self) -> None:
        """Raises ValueError naming every setting out of its range."""
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} (must be >= 0)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} (must be >= 0)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} (must be in (0, 1])")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} (must be > 0)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name}={getattr(self, name)} (must be in [-2, 2])")
        if problems:
            raise ValueError("bad sampling settings: " + ", ".join(problems))


def text_only(logits_NV: jax.Array, text_vocab_size: Any) -> jax.Array:
    """`logits_NV` with every id from `text_vocab_size` on set to -inf, so it is never
    chosen: an objective's extra ids ([MASK], task tokens, sentinels) follow the text
    vocabulary and are not text. 0 keeps every id. `text_vocab_size` may be traced (one
    program serves any limit)."""
    vocab = logits_NV.shape[-1]
    limit = jnp.where(text_vocab_size > 0, text_vocab_size, vocab)
    return jnp.where(jnp.arange(vocab) < limit, logits_NV, -jnp.inf)


def additive_penalties(logits_BV: jax.Array, count_BV: jax.Array, presence_B1: Any, frequency_B1: Any) -> jax.Array:
    """OpenAI's presence and frequency penalties: `logits - count * frequency - (count > 0) * presence`,
    `count_BV` (int [B, V]) being how often each row has generated each id so far.
    Source: OpenAI API reference, "Parameter details" (frequency and presence penalties)."""
    count_BV = count_BV.astype(jnp.float32)
    return logits_BV - count_BV * frequency_B1 - (count_BV > 0) * presence_B1


def process_logits(logits_BV: jax.Array, seen_BV: jax.Array, sampling: Sampling,
                   count_BV: jax.Array | None = None) -> jax.Array:
    """Logits [B, V] after the repetition penalty (on ids in `seen_BV`), the additive
    presence/frequency penalties (on `count_BV`, each row's generated-id counts; None: no
    tokens generated yet), temperature, top-k and top-p (nucleus) filters. With
    Python-number settings, filters that keep everything are left out of the program."""
    logits_BV = logits_BV.astype(jnp.float32)
    rows = sampling.per_row
    column = (lambda v: jnp.asarray(v, jnp.float32)[:, None]) if rows else (lambda v: v)
    if rows or sampling.repetition_penalty != 1.0:
        penalty_B1 = column(sampling.repetition_penalty)
        penalised = jnp.where(logits_BV > 0, logits_BV / penalty_B1, logits_BV * penalty_B1)
        logits_BV = jnp.where(seen_BV, penalised, logits_BV)
    if count_BV is not None and (rows or sampling.presence_penalty != 0 or sampling.frequency_penalty != 0):
        logits_BV = additive_penalties(logits_BV, count_BV, column(sampling.presence_penalty),
                                       column(sampling.frequency_penalty))
    if not rows and sampling.temperature == 0:
        return logits_BV
    temperature_B1 = column(sampling.temperature)
    logits_BV = logits_BV / (jnp.where(temperature_B1 == 0, 1.0, temperature_B1) if rows else temperature_B1)
    if sampling.top_k and sampling.top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if rows or sampling.top_p < 1.0:
        logits_BV = _nucleus(logits_BV, column(sampling.top_p))
    return logits_BV


def _nucleus(logits_BV: jax.Array, top_p_B1: Any) -> jax.Array:
    """Top-p (Holtzman et al. 2019): the smallest set whose probability reaches top_p.
    A token stays while the mass before it is below top_p (the most likely token always stays)."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    keep_BV = (cumulative_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p_B1
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def choose(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Each row's token: argmax where greedy, else a draw. `rng` is one key for the batch
    or a key per row [B] (a row's draws then do not depend on its neighbours)."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if not sampling.per_row and sampling.temperature == 0:
        return greedy_B
    if rng.shape:
        drawn_B = jax.vmap(lambda key, logits_V: jax.random.categorical(key, logits_V))(rng, logits_BV)
    else:
        drawn_B = jax.random.categorical(rng, logits_BV, axis=-1)
    drawn_B = drawn_B.astype(jnp.int32)
    return jnp.where(jnp.asarray(sampling.temperature) == 0, greedy_B, drawn_B) if sampling.per_row else drawn_B


def log_probabilities(logits_NV: jax.Array, token_N: jax.Array, k: int, text_vocab_size: int = 0
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's log-probabilities (log-softmax of raw logits, before any penalty,
    bias or temperature; float32) at N positions: of `token_N` ([N]), and the `k` most
    likely ids among those decoding may choose (below `text_vocab_size`; 0: every id):
    (log p(token) [N], top ids int32 [N, A], their log p [N, A], most likely first; A = k).
    Both come from one log-softmax, so a greedy token's log p equals the top entry exactly."""
    log_p_NV = jax.nn.log_softmax(logits_NV.astype(jnp.float32), axis=-1)
    chosen_N = jnp.take_along_axis(log_p_NV, token_N[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top_NA, ids_NA = jax.lax.top_k(text_only(log_p_NV, text_vocab_size), min(k, log_p_NV.shape[-1]))
    return chosen_N, ids_NA.astype(jnp.int32), top_NA

"""Continuous batching: a fixed number of KV-cache rows ("slots") that requests join and
leave between decoding steps. A slot is a batch row (B in lm/model/transformer.py's shape
legend), never a cache position.

A request is prefilled alone into a free slot (its prompt right-padded to a power-of-two
bucket, so a handful of programs serve every length) while the other slots keep their
state; then one jitted step advances every slot by one token. The step's shape never
changes, so nothing recompiles under load, and a short request never waits for a long
one to finish (as it would in a static batch).

Each slot carries its own sampling settings, logit bias and random key: a request's
tokens depend only on its prompt, settings and seed, not on which requests it shared
steps with.

Both programs also return the model's log-probabilities (`Scores`): admitting, those of
every prompt token given the ones before it; a step, that of each slot's chosen token;
each with the TOP_K most likely ids at that position (A = TOP_K alternatives). TOP_K is
fixed, so asking for log-probabilities (or not, or for fewer) compiles nothing new.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lm.inference import decode
from lm.inference.sampling import Sampling, log_probabilities

MIN_BUCKET = 8
TOP_K = 20  # the most alternatives a request may ask for (OpenAI's top_logprobs allows 20)


class Scores(NamedTuple):
    """The model's log-probabilities at N positions (see `sampling.log_probabilities`):
    of the token taken there, and of the A = TOP_K most likely ids (most likely first)."""

    logprob_N: jax.Array
    top_ids_NA: jax.Array
    top_logprobs_NA: jax.Array


@flax.struct.dataclass
class Slots:
    """The decoding state of `size` slots (B rows): the KV cache and, per slot, the logits of
    its next token, its next position, the ids it has seen (prompt and output), how often
    it has generated each id, its key and step count, its sampling settings and its
    additive logit bias."""

    cache: Any
    logits_BV: jax.Array
    position_B: jax.Array
    seen_BV: jax.Array
    generated_BV: jax.Array
    key_B: jax.Array
    count_B: jax.Array
    temperature_B: jax.Array
    top_p_B: jax.Array
    penalty_B: jax.Array
    presence_B: jax.Array
    frequency_B: jax.Array
    bias_BV: jax.Array


def empty(model: nn.Module, size: int) -> Slots:
    """`size` free slots."""
    cache = decode.init_cache(model, size)
    vocab = model.cfg.vocab_size
    ones = lambda: jnp.ones((size,), jnp.float32)  # distinct buffers: each is donated
    zeros = lambda: jnp.zeros((size,), jnp.float32)
    return Slots(cache=cache, logits_BV=jnp.zeros((size, vocab), jnp.float32),
                 position_B=jnp.zeros((size,), jnp.int32), seen_BV=jnp.zeros((size, vocab), bool),
                 generated_BV=jnp.zeros((size, vocab), jnp.int32),
                 key_B=jax.random.split(jax.random.key(0), size), count_B=jnp.zeros((size,), jnp.int32),
                 temperature_B=ones(), top_p_B=ones(), penalty_B=ones(), presence_B=zeros(), frequency_B=zeros(),
                 bias_BV=jnp.zeros((size, vocab), jnp.float32))


def bucket(length: int, max_len: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), at most max_len."""
    return min(max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()), max_len)


def _put_row(stacked: jax.Array, row: jax.Array, slot: jax.Array, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(stacked, row.astype(stacked.dtype), slot, axis=axis)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnums=(2,))
def admit(model: nn.Module, params: Any, slots: Slots, slot: jax.Array, tokens_1P: jax.Array, length: jax.Array,
          seed: jax.Array, sampling: Sampling, bias_V: jax.Array | None = None,
          text_vocab_size: int = 0) -> tuple[Slots, Scores]:
    """`slots` with slot `slot` holding a new prompt (`tokens_1P`: `length` real tokens,
    then padding) prefilled, and `sampling` (scalars), `seed` and `bias_V` (float [V]
    added to the logits when choosing; None: none) as its settings; and the prompt's
    `Scores` [P]: at position p, log p(token p | tokens before it) (p = 0 and padding:
    meaningless) and the TOP_K ids most likely there (below `text_vocab_size`)."""
    valid_1P = jnp.arange(tokens_1P.shape[1])[None] < length
    positions_1P = jnp.broadcast_to(jnp.arange(tokens_1P.shape[1]), tokens_1P.shape)
    logits_1PV, cache_row = decode.extend(model, params, decode.init_cache(model, 1), tokens_1P, positions_1P,
                                          valid_1P)
    # The next token goes right after the real ones (over the first padding position).
    cache_row = flax.traverse_util.unflatten_dict({
        path: (jnp.full_like(leaf, length) if path[-1] == "index" else leaf)
        for path, leaf in flax.traverse_util.flatten_dict(cache_row).items()})
    axis = 1 if model.cfg.scan_layers else 0
    cache = jax.tree.map(lambda stacked, row: _put_row(stacked, row, slot, axis), slots.cache, cache_row)
    put = lambda values_B, value: _put_row(values_B, jnp.asarray(value)[None], slot, 0)
    vocab = logits_1PV.shape[-1]
    slots = slots.replace(
        cache=cache, logits_BV=put(slots.logits_BV, logits_1PV[0, length - 1]),
        position_B=put(slots.position_B, length),
        seen_BV=put(slots.seen_BV, decode.seen_tokens(tokens_1P, valid_1P, vocab)[0]),
        generated_BV=put(slots.generated_BV, jnp.zeros((vocab,), jnp.int32)),
        key_B=put(slots.key_B, jax.random.key(seed)), count_B=put(slots.count_B, 0),
        temperature_B=put(slots.temperature_B, sampling.temperature), top_p_B=put(slots.top_p_B, sampling.top_p),
        penalty_B=put(slots.penalty_B, sampling.repetition_penalty),
        presence_B=put(slots.presence_B, sampling.presence_penalty),
        frequency_B=put(slots.frequency_B, sampling.frequency_penalty),
        bias_BV=put(slots.bias_BV, jnp.zeros((vocab,), jnp.float32) if bias_V is None else bias_V))
    # Position p's logits predict token p + 1: shift so row p scores token p.
    logprob_P, top_ids_PA, top_logprobs_PA = log_probabilities(
        logits_1PV[0, :-1], tokens_1P[0, 1:], TOP_K, text_vocab_size)
    pad = lambda x: jnp.concatenate([jnp.zeros((1,) + x.shape[1:], x.dtype), x])
    return slots, Scores(pad(logprob_P), pad(top_ids_PA), pad(top_logprobs_PA))


@functools.partial(jax.jit, static_argnames=("model",), donate_argnums=(2,))
def step(model: nn.Module, params: Any, slots: Slots, text_vocab_size: int = 0
         ) -> tuple[jax.Array, Scores, Slots]:
    """Every slot's next token [B], its `Scores` [B] (the model's log-probabilities at
    that step, before penalties, bias and temperature) and the slots advanced by it. Free
    slots compute garbage, which is harmless: rows never mix, and admitting overwrites a
    whole row."""
    sampling = Sampling(temperature=slots.temperature_B, top_p=slots.top_p_B, repetition_penalty=slots.penalty_B,
                        presence_penalty=slots.presence_B, frequency_penalty=slots.frequency_B)
    rng_B = jax.vmap(jax.random.fold_in)(slots.key_B, slots.count_B)
    # A free slot's position keeps growing; clamping keeps its position lookups in range.
    position_B = jnp.minimum(slots.position_B, model.cfg.max_len - 1)
    token_B, cache, logits_BV, position_B, seen_BV, generated_BV = decode.advance(
        model, params, slots.cache, slots.logits_BV, position_B, slots.seen_BV, slots.generated_BV, rng_B, sampling,
        text_vocab_size, slots.bias_BV)
    scores = Scores(*log_probabilities(slots.logits_BV, token_B, TOP_K, text_vocab_size))
    return token_B, scores, slots.replace(cache=cache, logits_BV=logits_BV, position_B=position_B, seen_BV=seen_BV,
                                          generated_BV=generated_BV, count_B=slots.count_B + 1)


def padded_prompt(prompt: np.ndarray, max_len: int, pad_id: int) -> np.ndarray:
    """int32 [1, bucket]: the prompt, right-padded to its bucket."""
    tokens_1P = np.full((1, bucket(len(prompt), max_len)), pad_id, np.int32)
    tokens_1P[0, :len(prompt)] = prompt
    return tokens_1P

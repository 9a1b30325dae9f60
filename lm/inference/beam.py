"""Beam search with a KV cache: the `beam_size` most likely continuations (W beams),
ranked with GNMT's length penalty (Wu et al. 2016), for a decoder's prompt or an
encoder-decoder's input. Shape letters follow lm/model/transformer.py's legend (W
beams, T new tokens, P prompt tokens, S source tokens).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.inference.decode import check_fits, extend, init_cache, model_prompt, start_encoder_decoder
from lm.inference.sampling import text_only
from lm.inference.text import until_eos


def beam_texts(model: nn.Module, params: Any, tokenizer, prompt: str, *, beam_size: int, max_new_tokens: int,
               length_penalty: float = 0.0) -> list[tuple[str, float]]:
    """The `beam_size` best continuations of `prompt` (an encoder-decoder's best outputs
    for it) as (text, score), best first; a beam ends at <eos>. Prompt and continuation
    must fit the context (the cache holds them). Raises ValueError otherwise and for
    beam_size < 1."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be at least 1")
    ids = model_prompt(model, tokenizer, prompt)
    settings = dict(beam_size=beam_size, length_penalty=float(length_penalty), eos_id=tokenizer.eos_id,
                    text_vocab_size=tokenizer.vocab_size)
    if model.cfg.family == "encoder_decoder":
        tokens_WT, scores_W = beam_search_encoder_decoder(
            model, params, jnp.asarray(ids), max_new_tokens=min(max_new_tokens, model.cfg.max_len),
            start_id=tokenizer.pad_id, **settings)
    else:
        check_fits(len(ids), max_new_tokens, model.cfg.max_len)
        tokens_WT, scores_W = beam_search(model, params, jnp.asarray(ids), max_new_tokens=max_new_tokens,
                                          **settings)
    return [(tokenizer.decode(until_eos(tokens, tokenizer.eos_id)), float(score))
            for tokens, score in zip(np.asarray(tokens_WT), np.asarray(scores_W))]


def reorder_cache(cache: Any, rows_W: jax.Array, scanned: bool) -> Any:
    """The cache's rows picked by `rows_W` (beams that survive). A scanned model stacks
    its layers first, so its rows are axis 1."""
    return jax.tree.map(lambda x: jnp.take(x, rows_W, axis=1 if scanned else 0), cache)


_BEAM_STATIC = ("model", "beam_size", "max_new_tokens", "length_penalty")


@functools.partial(jax.jit, static_argnames=_BEAM_STATIC)
def beam_search(model: nn.Module, params: Any, prompt_P: jax.Array, *, beam_size: int, max_new_tokens: int,
                length_penalty: float = 0.0, eos_id: int = -1, text_vocab_size: int = 0
                ) -> tuple[jax.Array, jax.Array]:
    """The `beam_size` best continuations of one prompt: (tokens [W, T], scores [W]), best first.

    A score is the sum of log-probabilities over the tokens up to and including <eos>,
    divided by GNMT's length penalty ((5 + length) / 6) ** length_penalty. A finished
    beam keeps its score and grows no further (its later tokens are <eos>).
    """
    prompt_WP = jnp.broadcast_to(prompt_P, (beam_size,) + prompt_P.shape)
    positions_WP = jnp.broadcast_to(jnp.arange(prompt_P.shape[0]), prompt_WP.shape)
    logits_WPV, cache = extend(model, params, init_cache(model, beam_size), prompt_WP, positions_WP,
                               jnp.ones(prompt_WP.shape, bool))
    return _beams(model, params, cache, logits_WPV[:, -1], prompt_P.shape[0], max_new_tokens, length_penalty,
                  eos_id, text_vocab_size)


@functools.partial(jax.jit, static_argnames=_BEAM_STATIC)
def beam_search_encoder_decoder(model: nn.Module, params: Any, inputs_S: jax.Array, *, beam_size: int,
                                max_new_tokens: int, length_penalty: float = 0.0, eos_id: int = -1,
                                start_id: int = 0, text_vocab_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """`beam_search` for an encoder-decoder: the best `beam_size` outputs for one input
    (tokens [W, T], scores [W], best first). The encoder runs once per beam row, the
    decoder from the start token with cached cross-attention."""
    inputs_WS = jnp.broadcast_to(inputs_S, (beam_size,) + inputs_S.shape)
    logits_WV, cache = start_encoder_decoder(model, params, inputs_WS, jnp.ones(inputs_WS.shape, bool), start_id)
    return _beams(model, params, cache, logits_WV, 1, max_new_tokens, length_penalty, eos_id, text_vocab_size)


def _beams(model: nn.Module, params: Any, cache: Any, logits_WV: jax.Array, first_position: int,
           max_new_tokens: int, length_penalty: float, eos_id: int, text_vocab_size: int
           ) -> tuple[jax.Array, jax.Array]:
    """The beam search proper, from W identical rows' first logits and cache."""
    width, vocab = logits_WV.shape
    frozen_V = jnp.where(jnp.arange(vocab) == jnp.maximum(eos_id, 0), 0.0, -jnp.inf)  # a finished beam's one way on
    scores_W = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)  # all beams start as one
    tokens_WT = jnp.zeros((width, max_new_tokens), jnp.int32)
    lengths_W = jnp.zeros((width,), jnp.int32)
    finished_W = jnp.zeros((width,), bool)

    def step(carry, i):
        cache, logits_WV, scores_W, tokens_WT, lengths_W, finished_W = carry
        log_p_WV = jax.nn.log_softmax(text_only(logits_WV.astype(jnp.float32), text_vocab_size), axis=-1)
        log_p_WV = jnp.where(finished_W[:, None], frozen_V[None], log_p_WV)
        scores_W, flat_W = jax.lax.top_k((scores_W[:, None] + log_p_WV).reshape(-1), width)
        beam_W, token_W = flat_W // vocab, (flat_W % vocab).astype(jnp.int32)
        cache = reorder_cache(cache, beam_W, model.cfg.scan_layers)
        tokens_WT = tokens_WT[beam_W].at[:, i].set(token_W)
        was_finished_W = finished_W[beam_W]
        lengths_W = lengths_W[beam_W] + (~was_finished_W)
        finished_W = was_finished_W | (token_W == eos_id)
        next_W1V, cache = extend(model, params, cache, token_W[:, None],
                                 jnp.full((width, 1), first_position + i), jnp.ones((width, 1), bool))
        return (cache, next_W1V[:, 0], scores_W, tokens_WT, lengths_W, finished_W), None

    carry = (cache, logits_WV, scores_W, tokens_WT, lengths_W, finished_W)
    (_, _, scores_W, tokens_WT, lengths_W, _), _ = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
    normalized_W = scores_W / ((5.0 + lengths_W) / 6.0) ** length_penalty
    order_W = jnp.argsort(-normalized_W)
    return tokens_WT[order_W], normalized_W[order_W]

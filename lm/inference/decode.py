"""Decoding with a KV cache: prompts are prefilled into the cache, then one cached step
runs per new token.

`generate_cached` decodes batched prompts of different lengths (left-padded, each row
with its own positions); `generate_encoder_decoder` does the same for an
encoder-decoder; `generate_windowed` runs one prompt past the context by prefilling the
cache anew; `sample_text` is the text-in, text-out call that lm.sample, lm.evaluate and
the end of training use. How a token is chosen is lm.inference.sampling's; beam search
is lm.inference.beam's. Shape letters follow lm/model/transformer.py's legend (P prompt
tokens, T new tokens).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.inference.sampling import Sampling, choose, process_logits, text_only
from lm.inference.text import decode_documents, encode_prompt, until_eos


def sample_text(model: nn.Module, params: Any, tokenizer, prompt: str, *, max_new_tokens: int,
                max_len: int, temperature: float, top_k: int, seed: int = 0) -> str:
    """The prompt's continuation, decoded to text (the prompt itself is not repeated).

    A decoder writes `max_new_tokens` through the KV cache, seeing at most `max_len`
    tokens (and the model's context) at once: past that, `generate_windowed` goes on.
    An encoder-decoder reads the prompt with its encoder and writes the output with its
    decoder (cached), stopping at <eos>. Raises ValueError for a prompt longer than an
    encoder's context and for bad settings."""
    ids = model_prompt(model, tokenizer, prompt)
    sampling = Sampling(temperature=float(temperature), top_k=int(top_k))
    if model.cfg.family == "encoder_decoder":
        out_BT, _ = generate_encoder_decoder(model, params, ids[None], np.ones((1, len(ids)), bool),
                                             jax.random.key(seed),
                                             max_new_tokens=min(max_new_tokens, model.cfg.max_len),
                                             sampling=sampling, start_id=tokenizer.pad_id,
                                             text_vocab_size=tokenizer.vocab_size)
        return tokenizer.decode(until_eos(np.asarray(out_BT[0]), tokenizer.eos_id))
    new_T = generate_windowed(model, params, ids, tokenizer.pad_id, max_new_tokens=max_new_tokens,
                              window=min(max_len, model.cfg.max_len), sampling=sampling, seed=seed,
                              text_vocab_size=tokenizer.vocab_size)
    return decode_documents(tokenizer, new_T)


def model_prompt(model: nn.Module, tokenizer, prompt: str) -> np.ndarray:
    """The prompt's ids (`text.encode_prompt`: an empty prompt is <eos>). Raises ValueError
    when an encoder-decoder's encoder cannot read them all."""
    ids = encode_prompt(tokenizer, prompt)
    if model.cfg.family == "encoder_decoder" and len(ids) > model.cfg.max_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the encoder reads at most "
                         f"{model.cfg.max_len}. Fix: shorten the prompt.")
    return ids


def generate_windowed(model: nn.Module, params: Any, prompt_P: np.ndarray, pad_id: int, *, max_new_tokens: int,
                      window: int, sampling: Sampling, seed: int = 0, text_vocab_size: int = 0) -> np.ndarray:
    """New tokens [T] continuing one prompt, however many: decoding runs through the KV
    cache until the context holds `window` tokens; then the last `window // 2` are
    prefilled anew and decoding goes on (a prompt of `window` tokens or more is cut to
    its last `window // 2` first). Every token sees at least `window // 2` tokens before
    it, and a refill costs one prefill of half the window per half a window of tokens
    (recomputing the whole window for every token, nanoGPT's way, costs a window's
    forward pass per token).

    Token t is drawn with `fold_in(key(seed), t)` whichever refill it falls in, so a
    continuation that fits in the window is exactly `generate_batch`'s. Raises
    ValueError for bad settings, max_new_tokens < 1 or a window under 2 tokens."""
    if window < 2:
        raise ValueError(f"a window of {window} tokens leaves no room to decode; it must hold at least 2.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if len(prompt_P) + max_new_tokens <= window:
        return generate_batch(model, params, [prompt_P], pad_id, max_new_tokens=max_new_tokens, sampling=sampling,
                              seed=seed, text_vocab_size=text_vocab_size)[0]
    context, pieces, made = prompt_P, [], 0
    while made < max_new_tokens:
        if len(context) >= window:
            context = context[-(window // 2):]
        # The room left, even where fewer tokens are needed: one program serves every refill.
        new = generate_batch(model, params, [context], pad_id, max_new_tokens=window - len(context),
                             sampling=sampling, seed=seed, text_vocab_size=text_vocab_size, first_step=made)[0]
        pieces.append(new[:max_new_tokens - made])
        context, made = np.concatenate([context, new]), made + len(new)
    return np.concatenate(pieces)


def check_fits(prompt_len: int, max_new_tokens: int, max_len: int) -> None:
    """Raises ValueError unless 1 <= max_new_tokens and the prompt plus them fit `max_len`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {max_len} tokens. Fix: shorten the prompt or ask for fewer tokens.")


def generate_batch(model: nn.Module, params: Any, prompts: list[np.ndarray], pad_id: int, *, max_new_tokens: int,
                   sampling: Sampling, seed: int = 0, text_vocab_size: int = 0, first_step: int = 0) -> np.ndarray:
    """New tokens [B, T] for prompts of any lengths, decoded together with a KV cache
    (`generate_cached`; `first_step` numbers the first new token's draw). Raises
    ValueError for bad settings and for prompts plus tokens past the model's context."""
    sampling.check()
    check_fits(max(len(p) for p in prompts), max_new_tokens, model.cfg.max_len)
    tokens_BP, valid_BP, positions_BP = left_pad(prompts, pad_id)
    tokens_BT, _ = generate_cached(model, params, tokens_BP, valid_BP, positions_BP, jax.random.key(seed),
                                   max_new_tokens=max_new_tokens, sampling=sampling, text_vocab_size=text_vocab_size,
                                   first_step=first_step)
    return np.asarray(tokens_BT)


def left_pad(prompts: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, valid, positions) [B, P]: prompts right-aligned, so every row's next token
    goes to the same cache position; positions count each row's own tokens from 0."""
    length = max(len(p) for p in prompts)
    tokens_BP = np.full((len(prompts), length), pad_id, np.int32)
    valid_BP = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens_BP[row, length - len(prompt):] = prompt
        valid_BP[row, length - len(prompt):] = True
    positions_BP = np.maximum(np.cumsum(valid_BP, axis=1) - 1, 0).astype(np.int32)
    return tokens_BP, valid_BP, positions_BP


def init_cache(model: nn.Module, batch: int) -> Any:
    """An empty KV cache for `batch` rows of the model's whole context."""
    tokens_B1 = jnp.zeros((batch, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens_B1, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def extend(model: nn.Module, params: Any, cache: Any, tokens_BL: jax.Array, positions_BL: jax.Array,
           valid_BL: jax.Array) -> tuple[jax.Array, Any]:
    """Logits [B, L, V] of the new tokens, and the cache holding them. (An
    encoder-decoder's new tokens are decoder tokens, all valid; its cache holds the
    encoder's keys and values from `start_encoder_decoder`.)"""
    if model.cfg.family == "encoder_decoder":
        logits_BLV, updated = model.apply({"params": params, "cache": cache}, None, tokens_BL, decode=True,
                                          decoder_positions_BL=positions_BL, mutable=["cache"])
    else:
        logits_BLV, updated = model.apply({"params": params, "cache": cache}, tokens_BL, positions_BL,
                                          valid_BL.astype(jnp.int32), decode=True, mutable=["cache"])
    return logits_BLV, updated["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling"))
def generate_cached(model: nn.Module, params: Any, tokens_BP: jax.Array, valid_BP: jax.Array,
                    positions_BP: jax.Array, rng: jax.Array, *, max_new_tokens: int, sampling: Sampling,
                    text_vocab_size: int = 0, first_step: int = 0) -> tuple[jax.Array, jax.Array]:
    """Prefill the prompts into a KV cache, then one cached step per new token.

    Returns the new tokens [B, T] and the logits each was chosen from [B, T, V] (before
    sampling filters). Prompt plus new tokens must fit the model's context. New token
    i is drawn with `fold_in(rng, first_step + i)`.
    """
    logits_BPV, cache = extend(model, params, init_cache(model, tokens_BP.shape[0]), tokens_BP, positions_BP,
                               valid_BP)
    seen_BV = seen_tokens(tokens_BP, valid_BP, logits_BPV.shape[-1])
    return decode_steps(model, params, cache, logits_BPV[:, -1], positions_BP[:, -1] + 1, seen_BV,
                        jnp.zeros(seen_BV.shape, jnp.int32), rng, max_new_tokens, sampling, text_vocab_size,
                        first_step)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling"))
def generate_encoder_decoder(model: nn.Module, params: Any, inputs_BS: jax.Array, valid_BS: jax.Array,
                             rng: jax.Array, *, max_new_tokens: int, sampling: Sampling, start_id: int = 0,
                             text_vocab_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """An encoder-decoder's outputs for a batch of inputs (right-padded, `valid_BS`
    marking real tokens): the encoder runs once, then one cached decoder step per token
    from the start token (T5's: the pad id). Returns (tokens [B, T], logits [B, T, V])."""
    batch = inputs_BS.shape[0]
    logits_BV, cache = start_encoder_decoder(model, params, inputs_BS, valid_BS, start_id)
    seen_BV = jnp.zeros(logits_BV.shape, bool)
    return decode_steps(model, params, cache, logits_BV, jnp.ones((batch,), jnp.int32), seen_BV,
                        jnp.zeros(logits_BV.shape, jnp.int32), rng, max_new_tokens, sampling, text_vocab_size)


def start_encoder_decoder(model: nn.Module, params: Any, inputs_BS: jax.Array, valid_BS: jax.Array,
                          start_id: int) -> tuple[jax.Array, Any]:
    """Runs the encoder and the decoder's start token: (the first output logits [B, V],
    the cache holding the cross-attention keys and values and the start token)."""
    batch = inputs_BS.shape[0]
    start_B1 = jnp.full((batch, 1), start_id, jnp.int32)
    logits_B1V, updated = model.apply({"params": params}, inputs_BS, start_B1, input_segment_ids_BS=valid_BS.astype(
        jnp.int32), decode=True, decoder_positions_BL=jnp.zeros((batch, 1), jnp.int32), mutable=["cache"])
    return logits_B1V[:, 0], updated["cache"]


def decode_steps(model: nn.Module, params: Any, cache: Any, logits_BV: jax.Array, position_B: jax.Array,
                 seen_BV: jax.Array, count_BV: jax.Array, rng: jax.Array, max_new_tokens: int, sampling: Sampling,
                 text_vocab_size: int, first_step: Any = 0) -> tuple[jax.Array, jax.Array]:
    """`max_new_tokens` cached steps in one scan: (tokens [B, T], the logits each was
    chosen from [B, T, V]); step i draws with `fold_in(rng, first_step + i)`."""

    def one_token(carry, i):
        cache, logits_BV, position_B, seen_BV, count_BV = carry
        token_B, *carry = advance(model, params, cache, logits_BV, position_B, seen_BV, count_BV,
                                  jax.random.fold_in(rng, first_step + i), sampling, text_vocab_size)
        return tuple(carry), (token_B, logits_BV)

    carry = (cache, logits_BV, position_B, seen_BV, count_BV)
    _, (tokens_TB, logits_TBV) = jax.lax.scan(one_token, carry, jnp.arange(max_new_tokens))
    return tokens_TB.T, jnp.swapaxes(logits_TBV, 0, 1)


def seen_tokens(tokens_BP: jax.Array, valid_BP: jax.Array, vocab: int) -> jax.Array:
    """bool [B, V]: which ids each row's prompt holds (for the repetition penalty)."""
    batch = tokens_BP.shape[0]
    return jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], tokens_BP].max(jnp.asarray(valid_BP))


def advance(model: nn.Module, params: Any, cache: Any, logits_BV: jax.Array, position_B: jax.Array,
            seen_BV: jax.Array, count_BV: jax.Array, rng: jax.Array, sampling: Sampling, text_vocab_size: int,
            bias_BV: jax.Array | None = None):
    """Chooses each row's next token from `logits_BV` (plus `bias_BV`, an additive
    per-id bias such as OpenAI's logit_bias; never an id past the text vocabulary) and
    runs it through the cache: (token_B, cache, next logits, positions, seen, generated counts)."""
    biased_BV = logits_BV if bias_BV is None else logits_BV.astype(jnp.float32) + bias_BV
    token_B = choose(process_logits(text_only(biased_BV, text_vocab_size), seen_BV, sampling, count_BV), rng,
                     sampling)
    batch = token_B.shape[0]
    next_B1V, cache = extend(model, params, cache, token_B[:, None], position_B[:, None], jnp.ones((batch, 1), bool))
    rows_B = jnp.arange(batch)
    return (token_B, cache, next_B1V[:, 0], position_B + 1, seen_BV.at[rows_B, token_B].set(True),
            count_BV.at[rows_B, token_B].add(1))

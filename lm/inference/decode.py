"""Decoding text from a trained decoder.

`generate` recomputes the model over the last `max_len` tokens for each new token
(nanoGPT's approach): simple, exact, and able to run past the context by sliding it.
`generate_cached` prefills the prompts into a KV cache and then runs one cached step
per token: batched prompts of different lengths (left-padded, each row with its own
positions), greedy, temperature, top-k, top-p, CTRL's repetition penalty and
OpenAI's additive presence and frequency penalties;
`generate_encoder_decoder` does the same for an encoder-decoder. `beam_search` (and
`beam_search_encoder_decoder`) keep the best `beam_size` continuations with GNMT's
length penalty.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Draws one token per row; temperature 0 is greedy, top_k 0 keeps every token."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k and top_k < logits_BV.shape[-1]:
        kth_BV = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "max_len", "temperature", "top_k"))
def generate(model: nn.Module, params: Any, prompt_P: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             max_len: int, temperature: float, top_k: int, text_vocab_size: int = 0) -> jax.Array:
    """Returns the prompt followed by `max_new_tokens` sampled tokens (int32[P + T]).

    With `text_vocab_size`, ids from it on (an objective's [MASK], task tokens and
    sentinels, which are not text) are never drawn.
    """
    prompt_len = prompt_P.shape[0]
    buffer_len = max(prompt_len + max_new_tokens, max_len)
    tokens_N = jnp.zeros((buffer_len,), jnp.int32).at[:prompt_len].set(prompt_P)

    def step(i, tokens_N):
        length = prompt_len + i  # tokens written so far
        start = jnp.maximum(length - max_len, 0)  # crop the context to the model's window
        window_1L = jax.lax.dynamic_slice(tokens_N, (start,), (max_len,))[None]
        logits_1LV = model.apply({"params": params}, window_1L)
        logits_1V = jax.lax.dynamic_index_in_dim(logits_1LV[0], length - 1 - start, keepdims=True)
        vocab = logits_1V.shape[-1]
        limit = jnp.where(text_vocab_size > 0, text_vocab_size, vocab)  # traced: one program for any limit
        logits_1V = jnp.where(jnp.arange(vocab) < limit, logits_1V, -jnp.inf)
        token = sample_logits(logits_1V, jax.random.fold_in(rng, i), temperature, top_k)[0]
        return tokens_N.at[length].set(token.astype(jnp.int32))

    tokens_N = jax.lax.fori_loop(0, max_new_tokens, step, tokens_N)
    return tokens_N[:prompt_len + max_new_tokens]


def sample_text(model: nn.Module, params: Any, tokenizer, prompt: str, *, max_new_tokens: int,
                max_len: int, temperature: float, top_k: int, seed: int = 0) -> str:
    """The prompt's continuation, decoded to text (the prompt itself is not repeated).

    A decoder uses the KV cache when prompt and continuation fit its context, and
    otherwise recomputes a sliding window of `max_len` tokens per new token. An
    encoder-decoder reads the prompt with its encoder and writes the output with its
    decoder (cached), stopping at <eos>."""
    prompt_ids = _prompt_ids(model, tokenizer, prompt)
    sampling = Sampling(temperature=float(temperature), top_k=int(top_k))
    if model.cfg.family == "encoder_decoder":
        out_BT, _ = generate_encoder_decoder(model, params, prompt_ids[None], np.ones((1, len(prompt_ids)), bool),
                                             jax.random.key(seed),
                                             max_new_tokens=min(max_new_tokens, model.cfg.max_len),
                                             sampling=sampling, start_id=tokenizer.pad_id,
                                             text_vocab_size=tokenizer.vocab_size)
        return tokenizer.decode(_until_eos(np.asarray(out_BT[0]), tokenizer.eos_id))
    if len(prompt_ids) + max_new_tokens <= model.cfg.max_len:
        out = generate_batch(model, params, [prompt_ids], tokenizer.pad_id, max_new_tokens=max_new_tokens,
                             sampling=sampling, seed=seed, text_vocab_size=tokenizer.vocab_size)[0]
        return decode_documents(tokenizer, out)
    out = generate(model, params, jnp.asarray(prompt_ids, jnp.int32), jax.random.key(seed),
                   max_new_tokens=max_new_tokens, max_len=max_len, temperature=float(temperature),
                   top_k=int(top_k), text_vocab_size=tokenizer.vocab_size)
    return decode_documents(tokenizer, np.asarray(out)[len(prompt_ids):])


def beam_texts(model: nn.Module, params: Any, tokenizer, prompt: str, *, beam_size: int, max_new_tokens: int,
               length_penalty: float = 0.0) -> list[tuple[str, float]]:
    """The `beam_size` best continuations of `prompt` (an encoder-decoder's best outputs
    for it) as (text, score), best first; a beam ends at <eos>. Prompt and continuation
    must fit the context (the cache holds them)."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be at least 1")
    prompt_ids = _prompt_ids(model, tokenizer, prompt)
    settings = dict(beam_size=beam_size, length_penalty=float(length_penalty), eos_id=tokenizer.eos_id,
                    text_vocab_size=tokenizer.vocab_size)
    if model.cfg.family == "encoder_decoder":
        tokens_WT, scores_W = beam_search_encoder_decoder(
            model, params, jnp.asarray(prompt_ids), max_new_tokens=min(max_new_tokens, model.cfg.max_len),
            start_id=tokenizer.pad_id, **settings)
    else:
        check_fits(len(prompt_ids), max_new_tokens, model.cfg.max_len)
        tokens_WT, scores_W = beam_search(model, params, jnp.asarray(prompt_ids), max_new_tokens=max_new_tokens,
                                          **settings)
    return [(tokenizer.decode(_until_eos(tokens, tokenizer.eos_id)), float(score))
            for tokens, score in zip(np.asarray(tokens_WT), np.asarray(scores_W))]


def _prompt_ids(model: nn.Module, tokenizer, prompt: str) -> np.ndarray:
    """The prompt's ids (an empty prompt starts a document: <eos>); an encoder reads at most its context."""
    prompt_ids = tokenizer.encode(prompt) if prompt else np.array([tokenizer.eos_id], np.int32)
    if model.cfg.family == "encoder_decoder" and len(prompt_ids) > model.cfg.max_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the encoder reads at most "
                         f"{model.cfg.max_len}. Fix: shorten the prompt.")
    return prompt_ids


def _until_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
    return ids[:np.argmax(ids == eos_id)] if (ids == eos_id).any() else ids


def decode_documents(tokenizer, ids: np.ndarray, separator: str = "\n\n") -> str:
    """Text of `ids`, with each <eos> (a document's end) shown as `separator`."""
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    pieces = np.split(ids, ends)
    return separator.join(tokenizer.decode(p[p != tokenizer.eos_id]) for p in pieces)


# --- KV-cache decoding ---------------------------------------------------------------


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
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # The smallest set whose probability reaches top_p: keep tokens while the mass
        # before them is below top_p (the most likely token always stays).
        keep_BV = (cumulative_BV - jax.nn.softmax(sorted_BV, axis=-1)) < column(sampling.top_p)
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return logits_BV


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


def left_pad(prompts: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, valid, positions) [B, P]: prompts right-aligned, so every row's next token
    goes to the same cache slot; positions count each row's own tokens from 0."""
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
    encoder's keys and values from `prefill_encoder_decoder`.)"""
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
                    text_vocab_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """Prefill the prompts into a KV cache, then one cached step per new token.

    Returns the new tokens [B, T] and the logits each was chosen from [B, T, V] (before
    sampling filters). Prompt plus new tokens must fit the model's context.
    """
    logits_BPV, cache = extend(model, params, init_cache(model, tokens_BP.shape[0]), tokens_BP, positions_BP,
                               valid_BP)
    seen_BV = seen_tokens(tokens_BP, valid_BP, logits_BPV.shape[-1])
    return decode_steps(model, params, cache, logits_BPV[:, -1], positions_BP[:, -1] + 1, seen_BV,
                        jnp.zeros(seen_BV.shape, jnp.int32), rng, max_new_tokens, sampling, text_vocab_size)


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
                 text_vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """`max_new_tokens` cached steps in one scan: (tokens [B, T], the logits each was chosen from [B, T, V])."""

    def one_token(carry, i):
        cache, logits_BV, position_B, seen_BV, count_BV = carry
        token_B, *carry = advance(model, params, cache, logits_BV, position_B, seen_BV, count_BV,
                                  jax.random.fold_in(rng, i), sampling, text_vocab_size)
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
    vocab = logits_BV.shape[-1]
    limit = jnp.where(text_vocab_size > 0, text_vocab_size, vocab)
    biased_BV = logits_BV if bias_BV is None else logits_BV.astype(jnp.float32) + bias_BV
    allowed_BV = jnp.where((jnp.arange(vocab) < limit)[None], biased_BV, -jnp.inf)
    token_B = choose(process_logits(allowed_BV, seen_BV, sampling, count_BV), rng, sampling)
    batch = token_B.shape[0]
    next_B1V, cache = extend(model, params, cache, token_B[:, None], position_B[:, None], jnp.ones((batch, 1), bool))
    rows_B = jnp.arange(batch)
    return (token_B, cache, next_B1V[:, 0], position_B + 1, seen_BV.at[rows_B, token_B].set(True),
            count_BV.at[rows_B, token_B].add(1))


def log_probabilities(logits_NV: jax.Array, token_N: jax.Array, k: int, text_vocab_size: int = 0
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's log-probabilities (log-softmax of raw logits, before any penalty,
    bias or temperature; float32) at N positions: of `token_N` ([N]), and the `k` most
    likely ids among those decoding may choose (below `text_vocab_size`; 0: every id):
    (log p(token) [N], top ids int32 [N, k], their log p [N, k], most likely first).
    Both come from one log-softmax, so a greedy token's log p equals the top entry exactly."""
    log_p_NV = jax.nn.log_softmax(logits_NV.astype(jnp.float32), axis=-1)
    chosen_N = jnp.take_along_axis(log_p_NV, token_N[:, None].astype(jnp.int32), axis=-1)[:, 0]
    vocab = log_p_NV.shape[-1]
    limit = jnp.where(text_vocab_size > 0, text_vocab_size, vocab)
    top_NK, ids_NK = jax.lax.top_k(jnp.where((jnp.arange(vocab) < limit)[None], log_p_NV, -jnp.inf), min(k, vocab))
    return chosen_N, ids_NK.astype(jnp.int32), top_NK


def check_fits(prompt_len: int, max_new_tokens: int, max_len: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {max_len} tokens. Fix: shorten the prompt or ask for fewer tokens.")


def generate_batch(model: nn.Module, params: Any, prompts: list[np.ndarray], pad_id: int, *, max_new_tokens: int,
                   sampling: Sampling, seed: int = 0, text_vocab_size: int = 0) -> np.ndarray:
    """New tokens [B, T] for prompts of any lengths, decoded together with a KV cache."""
    sampling.check()
    check_fits(max(len(p) for p in prompts), max_new_tokens, model.cfg.max_len)
    tokens_BP, valid_BP, positions_BP = left_pad(prompts, pad_id)
    tokens_BT, _ = generate_cached(model, params, tokens_BP, valid_BP, positions_BP, jax.random.key(seed),
                                   max_new_tokens=max_new_tokens, sampling=sampling, text_vocab_size=text_vocab_size)
    return np.asarray(tokens_BT)


def reorder_cache(cache: Any, rows_B: jax.Array, scanned: bool) -> Any:
    """The cache's rows picked by `rows_B` (beams that survive). A scanned model stacks
    its layers first, so its rows are axis 1."""
    return jax.tree.map(lambda x: jnp.take(x, rows_B, axis=1 if scanned else 0), cache)


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
    limit = jnp.where(text_vocab_size > 0, text_vocab_size, vocab)
    text_V = jnp.arange(vocab) < limit
    frozen_V = jnp.where(jnp.arange(vocab) == jnp.maximum(eos_id, 0), 0.0, -jnp.inf)  # a finished beam's one way on
    scores_W = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)  # all beams start as one
    tokens_WT = jnp.zeros((width, max_new_tokens), jnp.int32)
    lengths_W = jnp.zeros((width,), jnp.int32)
    finished_W = jnp.zeros((width,), bool)

    def step(carry, i):
        cache, logits_WV, scores_W, tokens_WT, lengths_W, finished_W = carry
        log_p_WV = jax.nn.log_softmax(jnp.where(text_V[None], logits_WV.astype(jnp.float32), -jnp.inf), axis=-1)
        log_p_WV = jnp.where(finished_W[:, None], frozen_V[None], log_p_WV)
        scores_W, flat_W = jax.lax.top_k((scores_W[:, None] + log_p_WV).reshape(-1), width)
        beam_W, token_W = flat_W // vocab, (flat_W % vocab).astype(jnp.int32)
        cache = reorder_cache(cache, beam_W, model.cfg.scan_layers)
        tokens_WT = tokens_WT[beam_W].at[:, i].set(token_W)
        was_finished_W = finished_W[beam_W]
        lengths_W = lengths_W[beam_W] + (~was_finished_W)
        finished_W = was_finished_W | (token_W == eos_id)
        next_WLV, cache = extend(model, params, cache, token_W[:, None],
                                 jnp.full((width, 1), first_position + i), jnp.ones((width, 1), bool))
        return (cache, next_WLV[:, 0], scores_W, tokens_WT, lengths_W, finished_W), None

    carry = (cache, logits_WV, scores_W, tokens_WT, lengths_W, finished_W)
    (_, _, scores_W, tokens_WT, lengths_W, _), _ = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
    normalized_W = scores_W / ((5.0 + lengths_W) / 6.0) ** length_penalty
    order_W = jnp.argsort(-normalized_W)
    return tokens_WT[order_W], normalized_W[order_W]


"""Scoring text with a loaded model: perplexity and bits per byte of a token stream, and
log-likelihoods of continuations for multiple-choice tasks (zero- and k-shot)."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import UsageError
from lm.evaluation import tasks
from lm.inference.text import encode_prompt
from lm.objectives.causal import loss_metrics
from lm.runs.artifacts import Loaded


def _row_log_likelihoods(loaded: Loaded):
    """jitted (inputs, targets, weights) [B, L] -> per-row sum of weighted log p(target)."""

    @jax.jit
    def score(params, inputs_BL, targets_BL, weights_BL):
        logits_BLV = loaded.model.apply({"params": params}, inputs_BL).astype(jnp.float32)
        log_p_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
        target_BL = jnp.take_along_axis(log_p_BLV, targets_BL[..., None], axis=-1)[..., 0]
        return jnp.sum(target_BL * weights_BL, axis=-1)

    return lambda *arrays: np.asarray(score(loaded.params, *arrays))


def corpus_split(loaded: Loaded, workdir: str, split: str) -> tuple[np.ndarray, int]:
    """A split of the run's corpus, tokenized with the run's own tokenizer (saved in
    `workdir`): (tokens, the split's UTF-8 bytes)."""
    from lm.data.corpus import prepare  # the data stack loads only when a corpus is scored

    corpus = prepare(loaded.config, os.path.join(workdir, "tokenizer.json"))
    tokens = np.asarray(corpus.tokens[split])
    return tokens, int(round(corpus.bytes_per_token[split] * len(tokens)))


def perplexity(loaded: Loaded, tokens: np.ndarray, num_bytes: int, batch_size: int = 8,
               max_windows: int = 0) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a token stream, scored in windows of the
    model's context (each token predicted from the tokens before it in its window)."""
    seq_len = loaded.config.data.seq_len
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise UsageError(f"the text has {len(tokens)} tokens; scoring needs more than the context of {seq_len}. "
                          "Fix: give more text.")
    if max_windows:
        windows = min(windows, max_windows)
    score = _row_log_likelihoods(loaded)
    total = 0.0
    for start in range(0, windows, batch_size):
        index = np.arange(start, min(start + batch_size, windows))
        rows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in index])
        padded = np.zeros((batch_size, seq_len + 1), np.int32)
        padded[:len(rows)] = rows
        weights = np.zeros((batch_size, seq_len), np.float32)
        weights[:len(rows)] = 1.0
        total += float(score(padded[:, :-1], padded[:, 1:], weights).sum())
    count = windows * seq_len
    bytes_per_token = num_bytes / len(tokens)
    return {**loss_metrics(-total / count, bytes_per_token), "tokens": count}


def continuation_log_likelihoods(loaded: Loaded, pairs: Sequence[tuple[str, str]],
                                 batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of log p, tokens) of each continuation given its context. The context is cut
    from the left when the pair exceeds the model's context."""
    tokenizer, max_len = loaded.tokenizer, loaded.config.data.seq_len
    encoded = []
    for context, continuation in pairs:
        # A bare continuation's first token is predicted after <eos> (an empty context encodes to it).
        context_ids, continuation_ids = encode_prompt(tokenizer, context), tokenizer.encode(continuation)
        if len(continuation_ids) == 0:
            raise UsageError(f"the choice {continuation!r} encodes to no tokens. Fix: give non-empty choices.")
        sequence = np.concatenate([context_ids, continuation_ids])[-(max_len + 1):]
        encoded.append((sequence, min(len(continuation_ids), len(sequence) - 1)))
    length = 1 << max(3, math.ceil(math.log2(max(len(s) - 1 for s, _ in encoded))))  # few shapes, few compiles
    length = min(length, max_len)
    score = _row_log_likelihoods(loaded)
    out: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        inputs = np.full((batch_size, length), tokenizer.pad_id, np.int32)
        targets = np.zeros((batch_size, length), np.int32)
        weights = np.zeros((batch_size, length), np.float32)
        for row, (sequence, scored) in enumerate(chunk):
            n = len(sequence) - 1
            inputs[row, :n], targets[row, :n] = sequence[:-1], sequence[1:]
            weights[row, n - scored:n] = 1.0
        sums = score(inputs, targets, weights)
        out.extend((float(sums[row]), scored) for row, (_, scored) in enumerate(chunk))
    return out


def few_shot_prefix(rows: Sequence[dict], k: int, exclude: int, rng: random.Random) -> str:
    """k solved examples (context + correct choice), blank-line separated, never the question itself."""
    if k == 0:
        return ""
    pool = [i for i in range(len(rows)) if i != exclude]
    if len(pool) < k:
        raise UsageError(f"{k}-shot needs {k} other examples; the file has {len(pool)}. Fix: lower --num_shots.")
    shots = [rows[i] for i in rng.sample(pool, k)]
    return "".join(f"{s['context']}{s['choices'][s['answer']]}\n\n" for s in shots)


def multiple_choice(loaded: Loaded, rows: Sequence[dict], num_shots: int = 0, seed: int = 0,
                    fewshot_rows: Sequence[dict] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Picks, for each {"context", "choices", "answer"} row, the choice of highest total
    log-likelihood (`accuracy`) and of highest log-likelihood per UTF-8 byte
    (`accuracy_normalized`, which does not favour short choices)."""
    tasks.check_rows(rows, "multiple-choice")
    tasks.check_rows(fewshot_rows or [], "multiple-choice", " of the few-shot rows")
    rng = random.Random(seed)
    pairs = []
    for i, row in enumerate(rows):
        source = fewshot_rows if fewshot_rows is not None else rows
        prefix = few_shot_prefix(source, num_shots, i if fewshot_rows is None else -1, rng)
        for choice in row["choices"]:
            pairs.append((prefix + row["context"], choice))
    scores = continuation_log_likelihoods(loaded, pairs, batch_size)
    picks, picks_normalized, details, cursor = [], [], [], 0
    for row in rows:
        n = len(row["choices"])
        totals = [scores[cursor + j][0] for j in range(n)]
        per_byte = [t / max(len(c.encode("utf-8")), 1) for t, c in zip(totals, row["choices"])]
        cursor += n
        picks.append(int(np.argmax(totals)))
        picks_normalized.append(int(np.argmax(per_byte)))
        details.append({"log_likelihoods": totals, "pick": picks[-1], "pick_normalized": picks_normalized[-1]})
    answers = [row["answer"] for row in rows]
    return {"accuracy": float(np.mean(np.array(picks) == answers)),
            "accuracy_normalized": float(np.mean(np.array(picks_normalized) == answers)),
            "questions": len(rows), "num_shots": num_shots, "details": details}


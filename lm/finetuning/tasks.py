"""Fine-tuning tasks: rows (from JSONL or a builder) -> fixed-length arrays, task heads
and their losses.

- classification: {"text", "label"}; a head on the last token's hidden state (a
  causal decoder has read the whole text there) or the mean over tokens.
- token_classification: {"words": [...], "tags": [...]}; a head on every token, the
  loss on each word's first token.
- sft: {"prompt", "response"}; the language-model head, loss on the response only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import choices
from lm.data import documents
from lm.data.tokenizers import Tokenizer
from lm.errors import UsageError
from lm.objectives.causal import weighted_cross_entropy

KINDS = choices.TASK_KINDS
IGNORE = -1


@dataclasses.dataclass
class Split:
    """One split as arrays: tokens [N, L] (padded), lengths [N] and the task's labels."""

    tokens_NL: np.ndarray
    lengths_N: np.ndarray
    labels: np.ndarray  # [N] classes, [N, L] tags (IGNORE off first tokens), or [N, L] sft targets
    weights_NL: np.ndarray | None = None  # sft: 1 on response targets

    def __len__(self) -> int:
        return len(self.lengths_N)

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        out = {"tokens": self.tokens_NL[index], "lengths": self.lengths_N[index], "labels": self.labels[index]}
        if self.weights_NL is not None:
            out["weights"] = self.weights_NL[index]
        return out


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file (or `.jsonl.gz`), read as corpora are
    (`lm.data.documents.read_jsonl`: CRLF, lone CR, a byte-order mark and UTF-16/32 with one
    give the same rows as LF UTF-8, string values included)."""
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist. Fix: point the task's *_file at a JSONL file, one example "
                          "per line.")
    try:
        return [row for _, row in documents.read_jsonl(path)]
    except documents.CorpusError as e:
        raise UsageError(str(e)) from None


def _require_fields(rows: list[dict], fields: tuple[str, ...], kind: str) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise UsageError(f"example {i} of the {kind} task lacks {missing}. Fix: every row needs {fields}.")


def encode(kind: str, rows: list[dict], tokenizer: Tokenizer, seq_len: int, label_names: list[str]) -> Split:
    """Rows of one split as a `Split` of `seq_len` tokens (longer texts are truncated)."""
    if not rows:
        raise UsageError(f"a {kind} split is empty. Fix: give it examples.")
    return {"classification": _encode_classification, "token_classification": _encode_tokens,
            "sft": _encode_sft}[kind](rows, tokenizer, seq_len, label_names)


def label_index(label_names: list[str], label: Any) -> int:
    if str(label) not in label_names:
        raise UsageError(f"label {label!r} is not one of the training labels {label_names}. Fix: relabel it, "
                          "or list every label in task.labels.")
    return label_names.index(str(label))


def _pad(sequences: list[np.ndarray], seq_len: int, fill: int) -> np.ndarray:
    out = np.full((len(sequences), seq_len), fill, np.int32)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = s[:seq_len]
    return out


def _encode_classification(rows, tokenizer, seq_len, label_names) -> Split:
    _require_fields(rows, ("text", "label"), "classification")
    ids = [tokenizer.encode(r["text"])[:seq_len] for r in rows]
    lengths = np.array([max(len(s), 1) for s in ids], np.int32)
    labels = np.array([label_index(label_names, r["label"]) for r in rows], np.int32)
    return Split(_pad(ids, seq_len, tokenizer.pad_id), lengths, labels)


def _encode_tokens(rows, tokenizer, seq_len, label_names) -> Split:
    _require_fields(rows, ("words", "tags"), "token_classification")
    tokens, tags = [], []
    for i, row in enumerate(rows):
        if len(row["words"]) != len(row["tags"]):
            raise UsageError(f"example {i} has {len(row['words'])} words but {len(row['tags'])} tags. "
                              "Fix: one tag per word.")
        row_tokens, row_tags = [], []
        for j, (word, tag) in enumerate(zip(row["words"], row["tags"])):
            word_ids = tokenizer.encode(word if j == 0 else " " + word)
            row_tokens.extend(word_ids)
            row_tags.extend([label_index(label_names, tag)] + [IGNORE] * (len(word_ids) - 1))
        tokens.append(np.array(row_tokens, np.int32))
        tags.append(np.array(row_tags, np.int32))
    lengths = np.array([max(min(len(t), seq_len), 1) for t in tokens], np.int32)
    return Split(_pad(tokens, seq_len, tokenizer.pad_id), lengths, _pad(tags, seq_len, IGNORE))


def _encode_sft(rows, tokenizer, seq_len, label_names) -> Split:
    _require_fields(rows, ("prompt", "response"), "sft")
    inputs, targets, weights = [], [], []
    for row in rows:
        prompt, response = tokenizer.encode(row["prompt"]), tokenizer.encode(row["response"])
        sequence = np.concatenate([prompt, response, [tokenizer.eos_id]]).astype(np.int32)[:seq_len + 1]
        inputs.append(sequence[:-1])
        targets.append(sequence[1:])
        # Target t is token t+1: it belongs to the response when t + 1 >= len(prompt).
        weights.append((np.arange(len(sequence) - 1) + 1 >= len(prompt)).astype(np.int32))
    lengths = np.array([max(len(s), 1) for s in inputs], np.int32)
    return Split(_pad(inputs, seq_len, tokenizer.pad_id), lengths, _pad(targets, seq_len, tokenizer.pad_id),
                 _pad(weights, seq_len, 0).astype(np.float32))


def label_names(kind: str, rows: list[dict], given: tuple[str, ...]) -> list[str]:
    """The task's classes: `given`, else the training labels, sorted."""
    if kind == "sft":
        return []
    if given:
        return [str(g) for g in given]
    found = {str(r["label"]) for r in rows} if kind == "classification" else {str(t) for r in rows for t in r["tags"]}
    if len(found) < 2:
        raise UsageError(f"the training split has {len(found)} label(s) {sorted(found)}; a classifier needs 2 "
                          "or more. Fix: check the task's label field.")
    return sorted(found)


def init_head(rng: jax.Array, d_model: int, num_classes: int) -> dict:
    return {"kernel": jax.random.normal(rng, (d_model, num_classes), jnp.float32) * d_model ** -0.5,
            "bias": jnp.zeros((num_classes,), jnp.float32)}


def pool(hidden_BLD: jax.Array, lengths_B: jax.Array, how: str) -> jax.Array:
    if how == "last":
        return jnp.take_along_axis(hidden_BLD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    mask_BL1 = (jnp.arange(hidden_BLD.shape[1])[None] < lengths_B[:, None])[..., None]
    return (hidden_BLD * mask_BL1).sum(1) / lengths_B[:, None]


def loss_and_stats(kind: str, pooling: str, forward: Callable, head: dict | None,
                   batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss, sums for metrics: loss_sum, count, correct) of one batch.

    `forward(tokens, return_hidden)` runs the backbone. Rows whose `valid` is 0 (the
    padding of a last, short evaluation batch) count for nothing.
    """
    valid_B = batch.get("valid", jnp.ones(batch["lengths"].shape, jnp.float32))
    if kind == "sft":
        logits_BLV = forward(batch["tokens"], False)
        weights_BL = batch["weights"] * valid_B[:, None]
        loss_sum, count = weighted_cross_entropy(logits_BLV, batch["labels"], weights_BL)
        correct = jnp.sum((logits_BLV.argmax(-1) == batch["labels"]) * weights_BL)
        return loss_sum / jnp.maximum(count, 1), dict(loss_sum=loss_sum, count=count, correct=correct)
    hidden_BLD = forward(batch["tokens"], True).astype(jnp.float32)
    if kind == "classification":
        logits_BC = pool(hidden_BLD, batch["lengths"], pooling) @ head["kernel"] + head["bias"]
        logits_BLC, labels_BL, weights_BL = logits_BC[:, None], batch["labels"][:, None], valid_B[:, None]
    else:
        logits_BLC = hidden_BLD @ head["kernel"] + head["bias"]
        labels_BL = batch["labels"]
        weights_BL = (labels_BL != IGNORE) * valid_B[:, None]
    labels_BL = jnp.maximum(labels_BL, 0)
    loss_sum, count = weighted_cross_entropy(logits_BLC, labels_BL, weights_BL)
    predictions_BL = logits_BLC.argmax(-1)
    correct = jnp.sum((predictions_BL == labels_BL) * weights_BL)
    return loss_sum / jnp.maximum(count, 1), dict(loss_sum=loss_sum, count=count, correct=correct,
                                                  predictions=predictions_BL)

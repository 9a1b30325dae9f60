"""Text at the two ends of decoding: a prompt's ids, and output ids back to text."""

from __future__ import annotations

import numpy as np


def encode_prompt(tokenizer, text: str) -> np.ndarray:
    """int32 ids of `text`; a text with no tokens (the empty prompt) is <eos>, the start
    of a document, since a model trained on packed documents predicts a document's first
    token after an <eos>. Raises the tokenizer's ValueError for text it cannot encode."""
    ids = tokenizer.encode(text) if text else np.zeros((0,), np.int32)
    return ids if len(ids) else np.array([tokenizer.eos_id], np.int32)


def until_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """`ids` up to (not including) the first <eos>: an output that ends there."""
    return ids[:np.argmax(ids == eos_id)] if (ids == eos_id).any() else ids


def decode_documents(tokenizer, ids: np.ndarray, separator: str = "\n\n") -> str:
    """Text of `ids`, with each <eos> (a document's end) shown as `separator`."""
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    pieces = np.split(ids, ends)
    return separator.join(tokenizer.decode(p[p != tokenizer.eos_id]) for p in pieces)

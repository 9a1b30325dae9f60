"""Tokenizers behind one interface: text <-> int32 ids, with the special ids the
objectives need. Ids 0, 1, 2 are always `<pad>`, `<eos>`, `<unk>`.

A tokenizer is saved as a small JSON file in the run's workdir, so sampling and
evaluation rebuild exactly the vocabulary the model was trained with.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Protocol

import numpy as np

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SPECIAL = 3


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_json(self) -> dict: ...


class CharTokenizer:
    """One id per Unicode character seen in the training text; others map to `<unk>`."""

    kind = "char"
    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self._codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype="<u4")
        self.vocab_size = NUM_SPECIAL + len(self.chars)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise ValueError("cannot build a character vocabulary from empty training text")
        return cls("".join(chars))

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        index = np.searchsorted(self._codes, codes)
        found = self._codes[np.minimum(index, len(self._codes) - 1)] == codes
        return np.where(found, index + NUM_SPECIAL, UNK_ID).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i >= NUM_SPECIAL:
                out.append(self.chars[i - NUM_SPECIAL])
            elif i == UNK_ID:
                out.append("\ufffd")
        return "".join(out)

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    """UTF-8 bytes: 256 ids after the specials; needs no training and has no `<unk>`."""

    kind = "byte"
    pad_id, eos_id = PAD_ID, EOS_ID
    vocab_size = NUM_SPECIAL + 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) - NUM_SPECIAL for i in ids if int(i) >= NUM_SPECIAL)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind}


def train(kind: str, texts: Iterable[str]) -> Tokenizer:
    """A tokenizer of `kind` fitted to `texts` (the training split)."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def from_json(spec: dict) -> Tokenizer:
    if spec["kind"] == "char":
        return CharTokenizer(spec["chars"])
    if spec["kind"] == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer kind {spec['kind']!r}")


def save(tokenizer: Tokenizer, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tokenizer.to_json(), f, ensure_ascii=False)
    os.replace(tmp, path)  # never leave a half-written tokenizer behind


def load(path: str) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        return from_json(json.load(f))

"""Tokenizers behind one interface: text <-> int32 ids, with the special ids the
objectives need. Ids 0, 1, 2 are always `<pad>`, `<eos>`, `<unk>` (except for an
imported Hugging Face tokenizer, whose ids are the checkpoint's own).

Text is data, never control: `encode` maps any text, including text that spells a
control token ("<eos>", "</s>", "<|endoftext|>"), to ids that are not control ids
(`control_ids`: padding, end of document, a Hugging Face tokenizer's special tokens).
Only code inserts those, so a prompt, a fine-tuning example or a corpus document cannot
end a document or inject a marker. `decode` drops control ids and any id outside the
vocabulary (the objectives' extra ids: [MASK], sentinels, task tokens).

A tokenizer is saved as a small JSON file in the run's workdir, so sampling and
evaluation rebuild exactly the vocabulary the model was trained with.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import sentencepiece as spm

from lm.errors import UsageError
from lm.files import atomic

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SPECIAL = 3
# What a SentencePiece model that lm cannot use should be replaced with.
_SP_FIX = ("Fix: give a .model file written by `python -m lm.tokenizer train` (e.g. "
           "--config=configs/shakespeare_bpe.py --output=/tmp/bpe.model)")


class TokenizerError(UsageError):
    """A tokenizer file that is missing or that lm cannot use; the message names it and the fix."""


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    pad_id: int
    eos_id: int
    control_ids: frozenset[int]  # ids only code inserts; `encode` never returns them

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_json(self) -> dict: ...


def text_ids(ids: Iterable[int], vocab_size: int, control_ids: frozenset[int]) -> list[int]:
    """The ids of `ids` that stand for text: inside the vocabulary [0, vocab_size) and not
    control ids (an objective's extra ids, from `vocab_size` on, are not text either)."""
    return [i for i in map(int, ids) if 0 <= i < vocab_size and i not in control_ids]


class CharTokenizer:
    """One id per Unicode character seen in the training text; others map to `<unk>`.

    Every character is data: no text spells `<pad>` or `<eos>` (a character is one id).
    """

    kind = "char"
    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID
    control_ids = frozenset({PAD_ID, EOS_ID})

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self._codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype="<u4")
        self.vocab_size = NUM_SPECIAL + len(self.chars)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i - NUM_SPECIAL] if i >= NUM_SPECIAL else "\ufffd"
                       for i in text_ids(ids, self.vocab_size, self.control_ids))

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    """UTF-8 bytes: 256 ids after the specials; needs no training and has no `<unk>`."""

    kind = "byte"
    pad_id, eos_id = PAD_ID, EOS_ID
    vocab_size = NUM_SPECIAL + 256
    control_ids = frozenset({PAD_ID, EOS_ID, UNK_ID})  # <unk> is never produced: every byte has an id

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i - NUM_SPECIAL for i in text_ids(ids, self.vocab_size, self.control_ids))
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind}


class SentencePieceTokenizer:
    """A trained SentencePiece model (BPE or unigram); ids 0, 1, 2 are <pad>, <eos>, <unk>.

    Trained with identity normalisation, no dummy prefix and whitespace kept, so
    `decode(encode(text)) == text` for any text the model covers (all text, with byte
    fallback).

    SentencePiece never matches a control piece (`<pad>`, `</s>`), `<unk>` or a byte
    piece (`<0x41>`) in text: text spelling one is encoded as ordinary characters.
    User-defined symbols are data: text that spells one encodes to its piece, which
    decodes back to that text and is an ordinary id for every objective.
    """

    kind = "sentencepiece"
    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    def __init__(self, model_proto: bytes, source: str = "the model given"):
        """Raises TokenizerError, naming `source` (where the bytes came from), if
        `model_proto` is not a SentencePiece model with lm's special ids."""
        self.model_proto = model_proto
        try:  # empty bytes would load no model at all, silently
            self.processor = spm.SentencePieceProcessor(model_proto=model_proto or b"\0")
        except RuntimeError:  # SentencePiece's parse failure names only its own C++ source line
            raise TokenizerError(f"{source} is not a SentencePiece model. {_SP_FIX}.") from None
        self.vocab_size = self.processor.get_piece_size()
        specials = (self.processor.pad_id(), self.processor.eos_id(), self.processor.unk_id())
        if specials != (PAD_ID, EOS_ID, UNK_ID):
            raise TokenizerError(f"SentencePiece model {source} has <pad>, <eos>, <unk> ids {specials}, not "
                                 "(0, 1, 2). Fix: train it with `python -m lm.tokenizer train` (or pad_id=0, "
                                 "eos_id=1, unk_id=2, bos_id=-1).")
        self.control_ids = frozenset(i for i in range(self.vocab_size) if self.processor.is_control(i))

    @classmethod
    def from_file(cls, path: str) -> SentencePieceTokenizer:
        """Raises TokenizerError naming `path` if it cannot be read or is no model lm can use."""
        try:
            with open(os.path.expanduser(path), "rb") as f:
                model_proto = f.read()
        except OSError as e:
            raise TokenizerError(f"cannot read the SentencePiece model {path} ({e.strerror}). {_SP_FIX}.") from None
        return cls(model_proto, path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.processor.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self.processor.encode(texts)]  # one C++ call

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode(text_ids(ids, self.vocab_size, self.control_ids))

    def to_json(self) -> dict:
        return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii")}


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json), for imported checkpoints.

    Its ids are the checkpoint's own (GPT-2's byte-level BPE, LLaMA's SentencePiece BPE),
    so the fixed ids 0, 1, 2 of the other kinds do not hold: `pad_id` and `eos_id` are
    whatever the checkpoint declares (pad falls back to eos, as for GPT-2).

    Control ids are `eos_id`, `pad_id` and every added token marked special, except the
    model's unknown token (which stands for text the vocabulary lacks). Special tokens
    are encoded as the text they spell (`encode_special_tokens`), and where the model
    itself holds a control token's or a byte piece's spelling in its vocabulary (a
    unigram vocabulary matches "</s>" and "<0x41>" as text, SentencePiece does not),
    that span is encoded again one character at a time. Raises ValueError if a single
    character still encodes to a control id (no text-only encoding exists).
    """

    kind = "huggingface"

    def __init__(self, tokenizer_json: str, eos_id: int, pad_id: int | None = None):
        from tokenizers import Tokenizer as _HFTokenizer  # only imported checkpoints need it

        self.tokenizer_json = tokenizer_json
        self.processor = _HFTokenizer.from_str(tokenizer_json)
        self.processor.encode_special_tokens = True  # "<|endoftext|>" in text is text, not the token
        self.vocab_size = self.processor.get_vocab_size()
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        model = json.loads(tokenizer_json).get("model", {})
        vocab = self.processor.get_vocab()
        unk_id = vocab.get(model.get("unk_token")) if "unk_token" in model else model.get("unk_id")
        special = {i for i, token in self.processor.get_added_tokens_decoder().items() if token.special}
        self.control_ids = frozenset((special | {self.eos_id, self.pad_id}) - {unk_id})
        # <unk> stands for text the vocabulary lacks and a byte piece for one byte of such
        # text, never for their own spelling ("<unk>", "<0x41>").
        bytes_ = (vocab.get(f"<0x{b:02X}>") for b in range(256)) if model.get("byte_fallback") else ()
        stand_ins = {i for i in (unk_id, *bytes_) if i is not None}
        self._spelling = {i: self.processor.id_to_token(i) for i in self.control_ids | stand_ins}
        self._unk_spelling = self._spelling.get(unk_id) if model.get("type") == "Unigram" else None
        self._not_text = np.array(sorted(self._spelling), np.int32)

    def encode(self, text: str) -> np.ndarray:
        return self._text_only(text, self.processor.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.processor.encode_batch(texts, add_special_tokens=False)
        return [self._text_only(text, e) for text, e in zip(texts, encodings)]

    def _literal(self, text: str, encoding) -> tuple[int, int] | None:
        """(token index, character offset) of the first place where the model matched the
        spelling of a control token, `<unk>` or a byte piece as text (rather than standing
        for unknown text or a fallback byte). A unigram model fuses a matched "<unk>" with
        unknown characters beside it, so an unknown span that holds "<unk>" counts too."""
        ids = np.asarray(encoding.ids, np.int32)
        for i in np.flatnonzero(np.isin(ids, self._not_text)):
            start, end = encoding.offsets[i]
            span, spelling = text[start:end], self._spelling[int(ids[i])]
            if ids[i] in self.control_ids or span == spelling:
                return int(i), start
            if self._unk_spelling and self._unk_spelling in span:
                return int(i), start + span.index(self._unk_spelling)
        return None

    def _text_only(self, text: str, encoding) -> np.ndarray:
        """The encoding's ids; from each literal match on, the text is encoded again with
        the match's first character on its own, so the spelling cannot match."""
        pieces, start = [], 0
        while (hit := self._literal(text[start:], encoding)) is not None:
            index, offset = hit
            pieces.append(np.asarray(encoding.ids[:index], np.int32))
            token_start, first = start + encoding.offsets[index][0], start + offset
            if first > token_start:  # unknown text fused with the match, before it
                pieces.append(self.encode(text[token_start:first]))
            char_ids = np.asarray(self.processor.encode(text[first], add_special_tokens=False).ids, np.int32)
            if any(int(i) in self.control_ids for i in char_ids):
                raise ValueError(f"the tokenizer encodes the character {text[first]!r} only as a control token "
                                 f"(ids {char_ids.tolist()}). Fix: remove it from the text.")
            pieces.append(char_ids)
            start = first + 1
            encoding = self.processor.encode(text[start:], add_special_tokens=False)
        pieces.append(np.asarray(encoding.ids, np.int32))
        return np.concatenate(pieces).astype(np.int32) if len(pieces) > 1 else pieces[0]

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode(text_ids(ids, self.vocab_size, self.control_ids), skip_special_tokens=True)

    def to_json(self) -> dict:
        return {"kind": self.kind, "tokenizer": self.tokenizer_json, "eos_id": self.eos_id, "pad_id": self.pad_id}


_TOO_MANY = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


class IncrementalDecoder:
    """The text of a growing id sequence, delta by delta, decoding only a short tail per id.

    Re-decoding every id at each step costs quadratic time in the output; decoding each
    id alone is wrong whenever a character spans several ids (byte fallback, byte-level
    BPE) or a piece's text depends on its neighbour. So the ids since the last emitted
    boundary are decoded with and without the new ones, and the difference is emitted
    once it no longer ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = self.emitted = 0  # ids[start:emitted] decode to the last delta's context

    def push(self, token: int) -> str:
        """The new text `token` completes ("" while a character is still incomplete)."""
        self.ids.append(int(token))
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.start:self.emitted])
        after = self.tokenizer.decode(self.ids[self.start:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.start, self.emitted = self.emitted, len(self.ids)
        return after[len(before):]


def train_sentencepiece(texts: Iterator[str], vocab_size: int, model_type: str = "bpe",
                        byte_fallback: bool = True, user_defined_symbols: Iterable[str] = (),
                        max_sentences: int = 1_000_000, num_threads: int = 2) -> SentencePieceTokenizer:
    """Trains SentencePiece on `texts` (documents; newlines inside them are kept)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            byte_fallback=byte_fallback, user_defined_symbols=list(user_defined_symbols),
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, character_coverage=1.0, max_sentence_length=1 << 24,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=num_threads,
            minloglevel=2)
    except RuntimeError as e:
        too_many = _TOO_MANY.search(str(e))
        if too_many:
            raise ValueError(f"a SentencePiece vocabulary of {too_many[1]} pieces is more than this corpus "
                             f"supports. Fix: set the vocab size to at most {too_many[2]}, or train on "
                             "more text.") from None
        raise ValueError(f"SentencePiece training failed: {e}") from None
    return SentencePieceTokenizer(model.getvalue())


def train(kind: str, texts: Iterable[str]) -> Tokenizer:
    """A char or byte tokenizer fitted to `texts` (the training split)."""
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
    if spec["kind"] == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(spec["model"]))
    if spec["kind"] == "huggingface":
        return HuggingFaceTokenizer(spec["tokenizer"], spec["eos_id"], spec["pad_id"])
    raise ValueError(f"unknown tokenizer kind {spec['kind']!r}")


def save(tokenizer: Tokenizer, path: str) -> None:
    atomic.write_json(path, tokenizer.to_json(), ensure_ascii=False)  # never a half-written tokenizer


def load(path: str) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        return from_json(json.load(f))

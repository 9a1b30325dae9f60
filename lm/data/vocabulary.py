"""The corpus's tokenizer: fitted once per corpus and settings, cached in the data cache.

`fit(config, built, tokenizers_dir)` returns the config's tokenizer for the built
datasets `built`: a byte tokenizer (nothing to fit), the SentencePiece model at
`data.sentencepiece.model`, or one fitted to the train split(s) and cached under
`<tokenizers_dir>/<corpus>/`: the character vocabulary as `char.json`, a SentencePiece
model as `<settings hash>.model`. The cache makes the tokenizer (and so the token cache
its id names) the same for every command: `lm.prepare` fits it and tokenizes, and a
run's start-up then finds both.

SentencePiece is trained on `sample_texts`: every train document, in order, when the
split holds at most `data.sentencepiece.max_sentences` documents and `SAMPLE_BYTES`
bytes (so small corpora, Tiny Shakespeare among them, train exactly as before); else a
seeded random sample of at most that many documents, read until the bytes run out,
without iterating the rest of the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np

from lm.data import text_files, tokenizers
from lm.data.documents import CorpusError
from lm.files import atomic

SAMPLE_SEED = 0  # fixed, not config.seed: the cached model is keyed by corpus and settings alone
SAMPLE_BYTES = 1 << 30  # UTF-8 bytes SentencePiece trains on at most (it holds them, and more, in memory)
SAMPLE_CHUNK = 4096  # drawn indices mapped to their source at a time


def fit(config: ml_collections.ConfigDict, built: dict[str, text_files.TextFiles],
        tokenizers_dir: str) -> tokenizers.Tokenizer:
    """The config's tokenizer, fitted to the train split(s) of `built` (name -> built
    dataset) where it needs fitting, or read from its cache under `tokenizers_dir`.
    Raises CorpusError for a SentencePiece vocabulary the corpus cannot support."""
    d = config.data
    if d.tokenizer == "byte":
        return tokenizers.ByteTokenizer()
    if d.tokenizer == "sentencepiece" and d.sentencepiece.model:
        return tokenizers.SentencePieceTokenizer.from_file(d.sentencepiece.model)
    corpus_dir = os.path.join(tokenizers_dir, "+".join(b.builder_config.name for b in built.values()))
    if d.tokenizer == "char":
        path = os.path.join(corpus_dir, "char.json")
        if not os.path.exists(path):
            tokenizer = tokenizers.train("char", train_texts(built))
            os.makedirs(corpus_dir, exist_ok=True)
            tokenizers.save(tokenizer, path)
        return tokenizers.load(path)
    settings = d.sentencepiece.to_dict()
    settings["user_defined_symbols"] = list(settings["user_defined_symbols"])
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(corpus_dir, f"{key}.model")
    if not os.path.exists(path):
        tokenizer = train_sentencepiece(config, built)
        os.makedirs(corpus_dir, exist_ok=True)
        atomic.write_bytes(path, tokenizer.model_proto)
    return tokenizers.SentencePieceTokenizer.from_file(path)


def train_sentencepiece(config: ml_collections.ConfigDict,
                        built: dict[str, text_files.TextFiles]) -> tokenizers.SentencePieceTokenizer:
    """SentencePiece trained per `config.data.sentencepiece` on `sample_texts` of every
    source's train split. Raises CorpusError for a vocabulary the sample cannot support."""
    sp = config.data.sentencepiece
    splits = [(b.as_data_source()["train"], b.info.splits["train"].num_bytes) for b in built.values()]
    try:
        return tokenizers.train_sentencepiece(sample_texts(splits, sp.max_sentences), sp.vocab_size,
                                              sp.model_type, sp.byte_fallback, sp.user_defined_symbols,
                                              sp.max_sentences, max(config.data.num_threads, 1))
    except ValueError as e:
        raise CorpusError(f"config.data.sentencepiece.vocab_size={sp.vocab_size}: {e}") from None


def sample_texts(splits: Sequence[tuple[object, int]], max_documents: int, max_bytes: int = SAMPLE_BYTES,
                 seed: int = SAMPLE_SEED) -> Iterator[str]:
    """A bounded, seeded sample of the documents of `splits` ((data source, its bytes) each,
    the data source as `builder.as_data_source()[split]`, treated as one corpus).

    All documents in order when there are at most `max_documents` of them and at most
    `max_bytes` bytes in all; else `max_documents` document indices drawn without
    replacement with `np.random.default_rng(seed)` (memory: the indices, never the
    corpus), read in the drawn order until `max_bytes` UTF-8 bytes have been read. Only
    the drawn documents are read."""
    sizes = np.array([len(source) for source, _ in splits], np.int64)
    if sizes.sum() <= max_documents and sum(num_bytes for _, num_bytes in splits) <= max_bytes:
        for source, _ in splits:
            yield from texts(source)
        return
    drawn = np.random.default_rng(seed).choice(int(sizes.sum()), size=min(max_documents, int(sizes.sum())),
                                               replace=False)
    starts = np.cumsum(sizes) - sizes
    budget = max_bytes
    for first in range(0, len(drawn), SAMPLE_CHUNK):
        chunk = drawn[first:first + SAMPLE_CHUNK]
        which = np.searchsorted(starts, chunk, side="right") - 1
        for index, source_index in zip(chunk, which):
            source = splits[source_index][0]
            text = source[int(index - starts[source_index])]["text"]
            budget -= len(text)
            yield text.decode("utf-8")
            if budget <= 0:
                return


def train_texts(built: dict[str, text_files.TextFiles]) -> Iterator[str]:
    """Every source's train documents, source after source."""
    for builder in built.values():
        yield from texts(builder.as_data_source()["train"])


def texts(source) -> Iterator[str]:
    """The documents of one split of a built dataset (`builder.as_data_source()[split]`), in order."""
    for i in range(len(source)):
        yield source[i]["text"].decode("utf-8")

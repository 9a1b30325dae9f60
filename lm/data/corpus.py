"""The corpus: build each source's TFDS dataset, fit the tokenizer, tokenize each split once.

`prepare(config, tokenizer_path)` returns a `Corpus`. Each split is cached as one token
stream, its documents joined by `<eos>`, plus each document's (start, length), under
`<data_dir>/tokens/<dataset>/<tokenizer id>/`; the cache is keyed by the dataset's
fingerprint and the tokenizer's, so a change to either tokenizes afresh. Rows
(`lm.data.rows`) and batches (`lm.data.batches`) are read from these streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lm.config import resolve_files
from lm.data import text_files, tokenizers
from lm.data.documents import CorpusError
from lm.files import atomic

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: the tokenizer and each split's token stream and documents.

    With several sources (`config.data.sources`), `tokens` and `documents` join all of
    them (validation is scored on the union) and `mixture` keeps each source's train
    split with its weight, for training batches drawn in those proportions.
    """

    tokenizer: tokenizers.Tokenizer
    tokens: dict[str, np.ndarray]  # split -> int32 stream, documents joined by <eos> (memory-mapped)
    documents: dict[str, np.ndarray]  # split -> int64 [num_documents, 2]: (start, length) in `tokens`
    bytes_per_token: dict[str, float]  # split -> UTF-8 bytes per token, for bits per byte
    reports: dict[str, dict]  # source -> its cleaning report (`lm.data.cleaning.Report`)
    mixture: tuple[tuple[float, np.ndarray, np.ndarray], ...] = ()  # (weight, train tokens, documents)


def data_dir(config: ml_collections.ConfigDict) -> str:
    """The data cache (TFDS datasets, tokenizers, token streams): config.data.data_dir,
    else $LM_DATA_DIR, else ~/.cache/lm/data."""
    return os.path.expanduser(config.data.data_dir or os.environ.get("LM_DATA_DIR")
                              or os.path.join("~", ".cache", "lm", "data"))


def sources(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[str, ...], float]]:
    """(dataset name, files, weight) of each corpus the config trains on."""
    d = config.data
    if not d.sources:
        return [(d.name, tuple(d.files), 1.0)]
    return [(f"{d.name}_{name}", tuple(src.files), float(src.weight)) for name, src in d.sources.items()]


def builders(config: ml_collections.ConfigDict, **build_options) -> dict[str, text_files.TextFiles]:
    """Builds (once per content and options) each source's TFDS dataset: dataset name
    (`config.data.name`, or `<name>_<source>` for each of `config.data.sources`) -> builder.
    With `config.data.build="datatrove"`, `lm.data.build.run` builds it (`build_options`:
    its executor, workers, tasks...); a build queued on Slurm is left out until it is done.
    Raises CorpusError (naming the file and the fix) for a file that cannot be read."""
    built = {}
    tfds.disable_progress_bar()
    for (name, files, _), source in zip(sources(config), list(config.data.sources) or [""]):
        options = _with_build(config, text_files.corpus_options(config.data, source))
        builder = text_files.builder(name, resolve_files(files), options, data_dir(config))
        try:
            if config.data.build == "datatrove":
                from lm.data import build  # datatrove: imported by the builds that use it

                build.run(builder, **build_options)
                if not build.is_built(builder):
                    continue
            builder.download_and_prepare()
        except CorpusError as e:
            raise CorpusError(str(e)) from None
        built[name] = builder
    return built


def _with_build(config: ml_collections.ConfigDict, options: dict) -> dict:
    """A corpus's options, naming its build where it is not the in-memory one: near dedup
    differs a little between builds, so each build is its own dataset (and token cache)."""
    return options if config.data.build == "memory" else {**options, "build": config.data.build}


def train_texts(built: dict[str, text_files.TextFiles]) -> Iterator[str]:
    """Every source's train documents, source after source."""
    for builder in built.values():
        yield from texts(builder.as_data_source()["train"])


def prepare(config: ml_collections.ConfigDict, tokenizer_path: str) -> Corpus:
    """Builds the corpus datasets and their token streams.

    The tokenizer is fitted to the train split(s) (or loaded from data.sentencepiece.model)
    and saved at `tokenizer_path`; if that file exists (a resumed run), it is loaded
    instead, so ids never change under a run. Processes preparing into one data cache take
    turns (a sweep's parallel runs): TFDS renames a finished build into place, and two
    builds of one dataset at once collide.
    """
    with _exclusive(data_dir(config)):
        return _prepare(config, tokenizer_path)


@contextlib.contextmanager
def _exclusive(directory: str):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(config: ml_collections.ConfigDict, tokenizer_path: str) -> Corpus:
    built = builders(config)
    if os.path.exists(tokenizer_path):
        tokenizer = tokenizers.load(tokenizer_path)
    else:
        tokenizer = fit_tokenizer(config, built)
        tokenizers.save(tokenizer, tokenizer_path)
    per_source = {split: [] for split in SPLITS}
    for builder in built.values():
        data_sources = builder.as_data_source()
        cache = os.path.join(data_dir(config), "tokens", builder.builder_config.name, _tokenizer_id(tokenizer))
        for split in SPLITS:
            per_source[split].append(token_stream(data_sources[split], tokenizer, cache, split,
                                                   config.data.num_threads))
    tokens, documents, bytes_per_token = {}, {}, {}
    for split in SPLITS:
        tokens[split], documents[split] = _join([(t, d) for t, d, _ in per_source[split]], tokenizer.eos_id)
        _check_split(config, split, tokens[split], documents[split])
        bytes_per_token[split] = sum(b for _, _, b in per_source[split]) / max(len(tokens[split]), 1)
    weights = [weight for _, _, weight in sources(config)]
    mixture = tuple((w, t, d) for w, (t, d, _) in zip(weights, per_source["train"])) if len(weights) > 1 else ()
    reports = {name: text_files.report(builder) for name, builder in built.items()}
    return Corpus(tokenizer, tokens, documents, bytes_per_token, reports, mixture)


def _join(streams: list[tuple[np.ndarray, np.ndarray]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One stream (joined by <eos>) and document table from several."""
    if len(streams) == 1:
        return streams[0]
    pieces, tables, offset = [], [], 0
    for tokens, documents in streams:
        if pieces:
            pieces.append(np.array([eos_id], np.int32))
            offset += 1
        pieces.append(np.asarray(tokens))
        tables.append(documents + np.array([offset, 0]))
        offset += len(tokens)
    return np.concatenate(pieces), np.concatenate(tables)


def _check_split(config: ml_collections.ConfigDict, split: str, tokens: np.ndarray, documents: np.ndarray) -> None:
    if len(tokens) < config.data.seq_len + 1 and config.data.packing == "stream":
        raise CorpusError(
            f"the {split} split of config.data.files has {len(tokens)} tokens, fewer than "
            f"one row of config.data.seq_len + 1 = {config.data.seq_len + 1}. Fix: use more text, "
            "a shorter seq_len, or a different data.validation_fraction.")
    if not len(documents):
        raise CorpusError(f"the {split} split of config.data.files has no documents. Fix: use more "
                          "text, or a different data.validation_fraction / data.split.")


def fit_tokenizer(config: ml_collections.ConfigDict, built: dict[str, text_files.TextFiles]) -> tokenizers.Tokenizer:
    """The config's tokenizer, trained on the train split(s) where it needs training."""
    d = config.data
    if d.tokenizer != "sentencepiece":
        return tokenizers.train(d.tokenizer, train_texts(built))
    if d.sentencepiece.model:
        return tokenizers.SentencePieceTokenizer.from_file(d.sentencepiece.model)
    settings = d.sentencepiece.to_dict()
    settings["user_defined_symbols"] = list(settings["user_defined_symbols"])
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    corpus_id = "+".join(b.builder_config.name for b in built.values())
    path = os.path.join(data_dir(config), "tokenizers", corpus_id, f"{key}.model")
    if not os.path.exists(path):
        tokenizer = train_sentencepiece(config, built)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic.write_bytes(path, tokenizer.model_proto)
    return tokenizers.SentencePieceTokenizer.from_file(path)


def train_sentencepiece(config: ml_collections.ConfigDict,
                        built: dict[str, text_files.TextFiles]) -> tokenizers.SentencePieceTokenizer:
    """SentencePiece trained per `config.data.sentencepiece` on every source's train split."""
    sp = config.data.sentencepiece
    try:
        return tokenizers.train_sentencepiece(train_texts(built), sp.vocab_size, sp.model_type, sp.byte_fallback,
                                              sp.user_defined_symbols, sp.max_sentences,
                                              max(config.data.num_threads, 1))
    except ValueError as e:
        raise CorpusError(f"config.data.sentencepiece.vocab_size={sp.vocab_size}: {e}") from None


def texts(source) -> Iterator[str]:
    """The documents of one split of a built dataset (`builder.as_data_source()[split]`), in order."""
    for i in range(len(source)):
        yield source[i]["text"].decode("utf-8")


def _tokenizer_id(tokenizer: tokenizers.Tokenizer) -> str:
    spec = json.dumps(tokenizer.to_json(), sort_keys=True, ensure_ascii=False)
    return f"{tokenizer.kind}_{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


RECORDS_PER_CHUNK = 256  # records read (one array_record batch read) and encoded per task


def token_stream(source, tokenizer, cache_dir: str, split: str, num_threads: int):
    """(stream, documents, UTF-8 bytes) of the split, tokenized in order; cached as .npy.

    Grain threads each read a chunk of records at once and encode it in one tokenizer
    call: per-record reads and calls cost more than the tokenizing itself.
    """
    paths = {name: os.path.join(cache_dir, f"{split}.{name}") for name in ("tokens.npy", "docs.npy", "json")}
    if not all(os.path.exists(p) for p in paths.values()):
        chunks = -(-len(source) // RECORDS_PER_CHUNK)
        encode = functools.partial(_encode_chunk, tokenizer, source)
        encoded = grain.MapDataset.range(chunks).map(encode).to_iter_dataset(
            grain.ReadOptions(num_threads=max(num_threads, 1), prefetch_buffer_size=4))
        ids, lengths, num_bytes = [], [], 0
        eos = np.array([tokenizer.eos_id], np.int32)
        for chunk_ids, chunk_bytes in encoded:
            for doc_ids in chunk_ids:
                ids.extend((doc_ids, eos))
                lengths.append(len(doc_ids))
            num_bytes += chunk_bytes
        stream = np.concatenate(ids[:-1]) if ids else np.zeros((0,), np.int32)
        lengths = np.asarray(lengths, np.int64)
        docs = np.stack([np.cumsum(lengths + 1) - lengths - 1, lengths], axis=1) if len(lengths) else \
            np.zeros((0, 2), np.int64)
        os.makedirs(cache_dir, exist_ok=True)
        for name, array in (("tokens.npy", stream), ("docs.npy", docs)):
            with atomic.replacing(paths[name], "wb") as f:
                np.save(f, array)
        atomic.write_text(paths["json"], json.dumps({"bytes": num_bytes}))
    with open(paths["json"]) as f:
        num_bytes = json.load(f)["bytes"]
    return np.load(paths["tokens.npy"], mmap_mode="r"), np.load(paths["docs.npy"]), num_bytes


def _encode_chunk(tokenizer: tokenizers.Tokenizer, source, chunk: int) -> tuple[list[np.ndarray], int]:
    records = source.__getitems__(range(chunk * RECORDS_PER_CHUNK,
                                        min((chunk + 1) * RECORDS_PER_CHUNK, len(source))))
    texts = [r["text"] for r in records]
    return tokenizer.encode_batch([t.decode("utf-8") for t in texts]), sum(map(len, texts))



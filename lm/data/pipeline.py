"""From config to batches: build the TFDS dataset, fit the tokenizer, tokenize each
split once, and serve fixed-length rows through Grain.

Each split is cached as one token stream, its documents joined by `<eos>`, plus each
document's (start, length). Rows have `seq_len + 1` tokens; there are two layouts:

- `stream` (nanoGPT): windows of the stream. Epoch `e` starts the windows at a shift
  drawn from (seed, e) and visits them in a permutation drawn from (seed, e).
- `pack`: documents, each followed by `<eos>` (cut into pieces if longer than a row),
  packed first-fit into rows in an order drawn from (seed, e). Rows carry
  `segment_ids` (1, 2, ... per piece, 0 on padding) and `positions` that restart at
  each piece, so attention never crosses documents.

Either way the batch of step `s` is a pure function of (seed, s): a resumed run reads
exactly the batches it would have. Each JAX process reads only its own contiguous
slice of every global batch (`batch(local)[process::processes]`), and `to_global`
assembles the global array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterator

import grain
import jax
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
    return os.path.expanduser(config.data.data_dir or os.environ.get("LM_DATA_DIR")
                              or os.path.join("~", ".cache", "lm", "data"))


def sources(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[str, ...], float]]:
    """(dataset name, files, weight) of each corpus the config trains on."""
    d = config.data
    if not d.sources:
        return [(d.name, tuple(d.files), 1.0)]
    return [(f"{d.name}_{name}", tuple(src.files), float(src.weight)) for name, src in d.sources.items()]


def builders(config: ml_collections.ConfigDict) -> dict[str, text_files.TextFiles]:
    """Builds (once per content and options) each source's TFDS dataset; name -> builder."""
    built = {}
    tfds.disable_progress_bar()
    for name, files, _ in sources(config):
        builder = text_files.builder(name, resolve_files(files), text_files.corpus_options(config.data),
                                     data_dir(config))
        try:
            builder.download_and_prepare()
        except CorpusError as e:
            raise CorpusError(str(e)) from None
        built[name] = builder
    return built


def build(config: ml_collections.ConfigDict) -> text_files.TextFiles:
    """The (first) corpus's built TFDS dataset builder."""
    return next(iter(builders(config).values()))


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
        _atomic_write(path, lambda f: f.write(tokenizer.model_proto))
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
        _atomic_write(paths["tokens.npy"], lambda f: np.save(f, stream))
        _atomic_write(paths["docs.npy"], lambda f: np.save(f, docs))
        _atomic_write(paths["json"], lambda f: f.write(json.dumps({"bytes": num_bytes}).encode()))
    with open(paths["json"]) as f:
        num_bytes = json.load(f)["bytes"]
    return np.load(paths["tokens.npy"], mmap_mode="r"), np.load(paths["docs.npy"]), num_bytes


def _encode_chunk(tokenizer: tokenizers.Tokenizer, source, chunk: int) -> tuple[list[np.ndarray], int]:
    records = source.__getitems__(range(chunk * RECORDS_PER_CHUNK,
                                        min((chunk + 1) * RECORDS_PER_CHUNK, len(source))))
    texts = [r["text"] for r in records]
    return tokenizer.encode_batch([t.decode("utf-8") for t in texts]), sum(map(len, texts))


def _atomic_write(path: str, write) -> None:
    with atomic.replacing(path, "wb") as f:
        write(f)


class _EpochWindow(grain.experimental.MapWithIndexTransform):
    """Element `i` of the repeated, per-epoch-shuffled window indices -> its token row."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, per_epoch: int):
        self.tokens, self.seq_len, self.seed, self.per_epoch = tokens, seq_len, seed, per_epoch

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a few instances per run, each alive for all of it)
    def shift(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch]).integers(self.seq_len))

    def map_with_index(self, index: int, window: int) -> dict[str, np.ndarray]:
        start = self.shift(index // self.per_epoch) + window * self.seq_len
        return {"tokens": np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)}


def train_rows(tokens: np.ndarray, seq_len: int, seed: int, packing: str = "stream",
               documents: np.ndarray | None = None, eos_id: int = tokenizers.EOS_ID,
               pad_id: int = tokenizers.PAD_ID) -> grain.MapDataset:
    """The endless sequence of training rows; row `i` is a pure function of (seed, i)."""
    if packing == "pack":
        return grain.MapDataset.source(PackedRows(tokens, documents, seq_len, seed, eos_id, pad_id))
    per_epoch = (len(tokens) - seq_len) // seq_len  # room for any shift in [0, seq_len)
    if per_epoch < 1:
        raise CorpusError(f"the train split has {len(tokens)} tokens, too few for one shifted row of "
                          f"config.data.seq_len={seq_len}. Fix: use more text or a shorter seq_len.")
    return (grain.MapDataset.range(per_epoch).shuffle(seed=seed).repeat()
            .map_with_index(_EpochWindow(tokens, seq_len, seed, per_epoch)))


def batches(rows: grain.MapDataset, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> grain.MapDataset:
    """Global batches of `rows`, of which this process reads its contiguous slice."""
    local_batch = _local_batch(global_batch, process_count)
    return rows.batch(local_batch, drop_remainder=True)[process_index::process_count]


def train_dataset(tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1, packing: str = "stream",
                  documents: np.ndarray | None = None, eos_id: int = tokenizers.EOS_ID,
                  pad_id: int = tokenizers.PAD_ID) -> grain.MapDataset:
    """Batches of `{'tokens': int32[local_batch, seq_len + 1]}` (plus `segment_ids` and
    `positions` when packing); element `s` is step `s`."""
    rows = train_rows(tokens, seq_len, seed, packing, documents, eos_id, pad_id)
    return batches(rows, global_batch, process_index, process_count)


def pack(lengths, row_len: int, max_open: int = 64) -> list[list[tuple[int, int, int]]]:
    """First-fit packing of documents of `lengths` tokens (each + <eos>) into rows.

    Returns rows of pieces `(document, offset, length)`; a document longer than a row is
    cut into row-sized pieces. At most `max_open` rows are open at once (the fullest is
    closed first), which bounds the work per piece and keeps the order local.
    """
    rows: list[list[tuple[int, int, int]]] = []
    open_rows: list[list[tuple[int, int, int]]] = []
    free: list[int] = []  # plain lists: per-piece NumPy calls would dominate the cost
    for doc, length in enumerate(lengths.tolist() if hasattr(lengths, "tolist") else lengths):
        total = length + 1  # the document and its <eos>
        for offset in range(0, total, row_len):
            size = min(row_len, total - offset)
            i = next((j for j, room in enumerate(free) if room >= size), -1)
            if i < 0:
                if len(open_rows) == max_open:
                    fullest = free.index(min(free))
                    rows.append(open_rows.pop(fullest))
                    free.pop(fullest)
                open_rows.append([])
                free.append(row_len)
                i = len(open_rows) - 1
            open_rows[i].append((doc, offset, size))
            free[i] -= size
    return rows + open_rows


def packed_row(tokens: np.ndarray, documents, pieces: list[tuple[int, int, int]],
               row_len: int, eos_id: int, pad_id: int) -> dict[str, np.ndarray]:
    """One packed row: tokens, segment ids (0 = padding) and per-piece positions.

    `documents` is a sequence of (start, length) pairs (a list is fastest).
    """
    row_tokens = np.full(row_len, pad_id, np.int32)
    segment_ids = np.zeros(row_len, np.int32)
    positions = np.zeros(row_len, np.int32)
    at = 0
    for segment, (doc, offset, size) in enumerate(pieces, start=1):
        start, length = documents[doc]
        body = min(offset + size, length) - offset  # the piece minus its <eos>, if it ends the document
        row_tokens[at:at + body] = tokens[start + offset:start + offset + body]
        row_tokens[at + body:at + size] = eos_id
        segment_ids[at:at + size] = segment
        positions[at:at + size] = _ARANGE[:size]
        at += size
    return {"tokens": row_tokens, "segment_ids": segment_ids, "positions": positions}


_ARANGE = np.arange(1 << 16, dtype=np.int32)


class PackedRows:
    """Row `i` of the endless sequence of packed epochs; epoch `e` shuffles with (seed, e)."""

    def __init__(self, tokens, documents, seq_len: int, seed: int, eos_id: int, pad_id: int):
        if documents is None or not len(documents):
            raise CorpusError("packing needs the split's documents; the train split has none. "
                              "Fix: use more text, or config.data.packing='stream'.")
        self.tokens, self.row_len = np.asarray(tokens).view(np.ndarray), seq_len + 1
        self.documents, self.doc_spans = documents, documents.tolist()
        self.seed, self.eos_id, self.pad_id = seed, eos_id, pad_id
        self.epoch_ends: list[int] = []  # cumulative rows at the end of each planned epoch
        # Grain reads rows on several threads; two extending `epoch_ends` at once would
        # plan an epoch twice and shift every later row.
        self._plan_lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable for Grain worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_plan_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _plan_lock=threading.Lock())

    def __len__(self) -> int:
        return sys.maxsize

    @functools.lru_cache(maxsize=2)  # noqa: B019 (a few instances per run, each alive for all of it)
    def epoch(self, e: int) -> list[list[tuple[int, int, int]]]:
        rng = np.random.default_rng([self.seed, e])
        order = rng.permutation(len(self.documents))
        rows = pack(self.documents[order, 1], self.row_len)
        order = order.tolist()
        return [[(order[d], o, n) for d, o, n in rows[i]] for i in rng.permutation(len(rows)).tolist()]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        with self._plan_lock:
            while not self.epoch_ends or self.epoch_ends[-1] <= i:
                previous = self.epoch_ends[-1] if self.epoch_ends else 0
                self.epoch_ends.append(previous + len(self.epoch(len(self.epoch_ends))))
        e = int(np.searchsorted(self.epoch_ends, i, side="right"))
        first = self.epoch_ends[e - 1] if e else 0
        return packed_row(self.tokens, self.doc_spans, self.epoch(e)[i - first], self.row_len,
                          self.eos_id, self.pad_id)


def packing_efficiency(documents: np.ndarray, seq_len: int, epochs: int = 1, seed: int = 0) -> float:
    """Non-padding tokens over all tokens of the packed rows of `epochs` epochs."""
    rows = PackedRows(np.zeros(0, np.int32), documents, seq_len, seed, 1, 0)
    used = total = 0
    for e in range(epochs):
        plan = rows.epoch(e)
        used += sum(n for row in plan for _, _, n in row)
        total += len(plan) * (seq_len + 1)
    return used / total


class _EvalWindows:
    """Non-overlapping rows covering the split once, padded with `<pad>` rows (zero weight)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, num_rows: int, pad_id: int):
        self.tokens, self.seq_len, self.num_rows, self.pad_id = tokens, seq_len, num_rows, pad_id
        self.num_windows = min((len(tokens) - 1) // seq_len, num_rows)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i >= self.num_windows:
            return {"tokens": np.full(self.seq_len + 1, self.pad_id, np.int32)}
        start = i * self.seq_len
        return {"tokens": np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)}


class _PackedEvalRows:
    """The split's documents packed in order (no shuffle), padded with empty rows."""

    def __init__(self, tokens, documents, rows: list, seq_len: int, num_rows: int, eos_id: int, pad_id: int):
        self.tokens, self.documents = np.asarray(tokens).view(np.ndarray), documents.tolist()
        self.rows, self.row_len, self.num_rows = rows[:num_rows], seq_len + 1, num_rows
        self.eos_id, self.pad_id = eos_id, pad_id

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        pieces = self.rows[i] if i < len(self.rows) else []
        return packed_row(self.tokens, self.documents, pieces, self.row_len, self.eos_id, self.pad_id)


def eval_dataset(tokens: np.ndarray, seq_len: int, global_batch: int, pad_id: int,
                 num_batches: int = 0, process_index: int = 0, process_count: int = 1,
                 packing: str = "stream", documents: np.ndarray | None = None,
                 eos_id: int = tokenizers.EOS_ID) -> grain.MapDataset:
    """The validation split in order, each token scored once; `num_batches=0` covers all of it."""
    local_batch = _local_batch(global_batch, process_count)
    if packing == "pack":
        packed = pack(documents[:, 1], seq_len + 1, max_open=1)  # in order: next-fit
        rows_needed = len(packed)
    else:
        rows_needed = (len(tokens) - 1) // seq_len
    batches = -(-rows_needed // global_batch)
    if num_batches:
        batches = min(batches, num_batches)
    if packing == "pack":
        source = _PackedEvalRows(tokens, documents, packed, seq_len, batches * global_batch, eos_id, pad_id)
    else:
        source = _EvalWindows(tokens, seq_len, batches * global_batch, pad_id)
    return grain.MapDataset.source(source).batch(local_batch)[process_index::process_count]


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise CorpusError(f"a global batch of {global_batch} rows cannot be split evenly over "
                          f"{process_count} processes. Fix: use a multiple of {process_count}.")
    return global_batch // process_count


def iterate(dataset: grain.MapDataset, num_threads: int, prefetch: int) -> grain.DatasetIterator:
    """A checkpointable iterator that prepares batches on `num_threads` threads."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def to_global(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded along the batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def train_data(config: ml_collections.ConfigDict, corpus: Corpus) -> grain.MapDataset:
    """This process's training batches for `config` (step `s` is element `s`).

    With several sources, rows are interleaved deterministically in proportion to their
    weights (`grain.MapDataset.mix`); each source keeps its own seeded order.
    """
    d, tok = config.data, corpus.tokenizer
    if corpus.mixture:
        parts = [train_rows(tokens, d.seq_len, config.seed + i, d.packing, documents, tok.eos_id, tok.pad_id)
                 for i, (_, tokens, documents) in enumerate(corpus.mixture)]
        rows = grain.MapDataset.mix(parts, [weight for weight, _, _ in corpus.mixture])
    else:
        rows = train_rows(corpus.tokens["train"], d.seq_len, config.seed, d.packing,
                          corpus.documents["train"], tok.eos_id, tok.pad_id)
    return batches(rows, config.train.batch_size, jax.process_index(), jax.process_count())


def validation_data(config: ml_collections.ConfigDict, corpus: Corpus) -> grain.MapDataset:
    """This process's validation batches for `config`, covering the split once."""
    return eval_dataset(corpus.tokens["validation"], config.data.seq_len, config.eval.batch_size,
                        corpus.tokenizer.pad_id, config.eval.num_batches, jax.process_index(),
                        jax.process_count(), config.data.packing, corpus.documents["validation"],
                        corpus.tokenizer.eos_id)

"""From config to batches: build the TFDS dataset, fit the tokenizer, tokenize each
split once, and serve fixed-length rows through Grain.

Training rows are windows of `seq_len + 1` tokens of the split's token stream. Epoch
`e` starts the windows at a shift drawn from (seed, e) and visits them in a permutation
drawn from (seed, e), so every token is seen once per epoch and the batch of step `s`
is a pure function of (seed, s): a resumed run reads exactly the batches it would have.

Each JAX process reads only its own contiguous slice of every global batch
(`batch(local)[process::processes]`), and `to_global` assembles the global array.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Iterator

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lm.config import ConfigError, resolve_files
from lm.data import text_files, tokenizers

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: the tokenizer and each split's token stream."""

    tokenizer: tokenizers.Tokenizer
    tokens: dict[str, np.ndarray]  # split -> int32 stream (memory-mapped from the cache)
    bytes_per_token: dict[str, float]  # split -> UTF-8 bytes per token, for bits per byte


def data_dir(config: ml_collections.ConfigDict) -> str:
    return os.path.expanduser(config.data.data_dir or os.environ.get("LM_DATA_DIR")
                              or os.path.join("~", ".cache", "lm", "data"))


def prepare(config: ml_collections.ConfigDict, tokenizer_path: str) -> Corpus:
    """Builds the corpus dataset (once per content) and its token streams.

    The tokenizer is fitted to the train split and saved at `tokenizer_path`; if that
    file exists (a resumed run), it is loaded instead, so ids never change under a run.
    """
    root = data_dir(config)
    builder = text_files.builder(config.data.name, resolve_files(config.data.files),
                                 config.data.validation_fraction, root)
    tfds.disable_progress_bar()
    builder.download_and_prepare()
    sources = builder.as_data_source()
    if os.path.exists(tokenizer_path):
        tokenizer = tokenizers.load(tokenizer_path)
    else:
        tokenizer = tokenizers.train(config.data.tokenizer, _texts(sources["train"]))
        tokenizers.save(tokenizer, tokenizer_path)
    cache = os.path.join(root, "tokens", builder.builder_config.name, _tokenizer_id(tokenizer))
    tokens, bytes_per_token = {}, {}
    for split in SPLITS:
        tokens[split], num_bytes = _token_stream(sources[split], tokenizer, cache, split,
                                                 config.data.num_threads)
        if len(tokens[split]) < config.data.seq_len + 1:
            raise ConfigError(
                f"the {split} split of config.data.files has {len(tokens[split])} tokens, fewer than "
                f"one row of config.data.seq_len + 1 = {config.data.seq_len + 1}. Fix: use more text, "
                "a shorter seq_len, or a different data.validation_fraction.")
        bytes_per_token[split] = num_bytes / len(tokens[split])
    return Corpus(tokenizer, tokens, bytes_per_token)


def _texts(source) -> Iterator[str]:
    for i in range(len(source)):
        yield source[i]["text"].decode("utf-8")


def _tokenizer_id(tokenizer: tokenizers.Tokenizer) -> str:
    spec = json.dumps(tokenizer.to_json(), sort_keys=True, ensure_ascii=False)
    return f"{tokenizer.kind}_{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def _token_stream(source, tokenizer, cache_dir: str, split: str, num_threads: int):
    """The split's records tokenized in order and concatenated; cached as .npy."""
    path = os.path.join(cache_dir, f"{split}.npy")
    meta_path = os.path.join(cache_dir, f"{split}.json")
    if not (os.path.exists(path) and os.path.exists(meta_path)):
        encode = functools.partial(_encode_record, tokenizer)
        pieces = grain.MapDataset.source(source).map(encode).to_iter_dataset(
            grain.ReadOptions(num_threads=max(num_threads, 1), prefetch_buffer_size=16))
        ids, num_bytes = [], 0
        for piece_ids, piece_bytes in pieces:
            ids.append(piece_ids)
            num_bytes += piece_bytes
        stream = np.concatenate(ids) if ids else np.zeros((0,), np.int32)
        os.makedirs(cache_dir, exist_ok=True)
        _atomic_write(path, lambda f: np.save(f, stream))
        _atomic_write(meta_path, lambda f: f.write(json.dumps({"bytes": num_bytes}).encode()))
    with open(meta_path) as f:
        num_bytes = json.load(f)["bytes"]
    return np.load(path, mmap_mode="r"), num_bytes


def _encode_record(tokenizer: tokenizers.Tokenizer, record: dict) -> tuple[np.ndarray, int]:
    return tokenizer.encode(record["text"].decode("utf-8")), len(record["text"])


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


class _EpochWindow(grain.experimental.MapWithIndexTransform):
    """Element `i` of the repeated, per-epoch-shuffled window indices -> its token row."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, per_epoch: int):
        self.tokens, self.seq_len, self.seed, self.per_epoch = tokens, seq_len, seed, per_epoch

    @functools.lru_cache(maxsize=4)
    def shift(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch]).integers(self.seq_len))

    def map_with_index(self, index: int, window: int) -> dict[str, np.ndarray]:
        start = self.shift(index // self.per_epoch) + window * self.seq_len
        return {"tokens": np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)}


def train_dataset(tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Batches of `{'tokens': int32[local_batch, seq_len + 1]}`; element `s` is step `s`."""
    local_batch = _local_batch(global_batch, process_count)
    per_epoch = (len(tokens) - seq_len) // seq_len  # room for any shift in [0, seq_len)
    if per_epoch < 1:
        raise ConfigError(f"the train split has {len(tokens)} tokens, too few for one shifted row of "
                          f"config.data.seq_len={seq_len}. Fix: use more text or a shorter seq_len.")
    rows = (grain.MapDataset.range(per_epoch).shuffle(seed=seed).repeat()
            .map_with_index(_EpochWindow(tokens, seq_len, seed, per_epoch)))
    return rows.batch(local_batch, drop_remainder=True)[process_index::process_count]


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


def eval_dataset(tokens: np.ndarray, seq_len: int, global_batch: int, pad_id: int,
                 num_batches: int = 0, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """The validation split in order; `num_batches=0` covers all of it."""
    local_batch = _local_batch(global_batch, process_count)
    windows = (len(tokens) - 1) // seq_len
    batches = -(-windows // global_batch)
    if num_batches:
        batches = min(batches, num_batches)
    rows = grain.MapDataset.source(_EvalWindows(tokens, seq_len, batches * global_batch, pad_id))
    return rows.batch(local_batch)[process_index::process_count]


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ConfigError(f"a global batch of {global_batch} rows cannot be split evenly over "
                          f"{process_count} processes. Fix: use a multiple of {process_count}.")
    return global_batch // process_count


def iterate(dataset: grain.MapDataset, num_threads: int, prefetch: int) -> grain.DatasetIterator:
    """A checkpointable iterator that prepares batches on `num_threads` threads."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def to_global(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded along the batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}

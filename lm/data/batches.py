"""Batches of rows (`lm.data.rows`): this process's slice of each global batch, and the
global arrays assembled from every process's slices.

Each JAX process reads only its own contiguous slice of every global batch
(`batch(local)[process::processes]`), and `to_global` assembles the global array. The
batch of step `s` is element `s` of `train_data`: a pure function of (seed, s).
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np

from lm.data import rows
from lm.data.corpus import Corpus
from lm.data.documents import CorpusError


def per_process(rows_dataset: grain.MapDataset, global_batch: int, process_index: int = 0,
                process_count: int = 1) -> grain.MapDataset:
    """Global batches of `global_batch` rows, of which this process reads its contiguous
    slice: element `s` is `{key: [global_batch / process_count, ...]}`, the rows
    `s * global_batch + process_index * local_batch` onwards. A last partial batch is
    dropped. Raises CorpusError if `global_batch` does not split evenly over the processes."""
    local_batch = _local_batch(global_batch, process_count)
    return rows_dataset.batch(local_batch, drop_remainder=True)[process_index::process_count]


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
    """This process's training batches for `config` (step `s` is element `s`): each a dict
    of int32 `[config.train.batch_size / processes, seq_len + 1]` arrays, `tokens` (plus
    `segment_ids` and `positions` when packing).

    With several sources, rows are interleaved deterministically in proportion to their
    weights (`grain.MapDataset.mix`); each source keeps its own seeded order.
    """
    d, tok = config.data, corpus.tokenizer
    if corpus.mixture:
        parts = [rows.train_rows(tokens, d.seq_len, config.seed + i, d.packing, documents, tok.eos_id, tok.pad_id)
                 for i, (_, tokens, documents) in enumerate(corpus.mixture)]
        train_rows = grain.MapDataset.mix(parts, [weight for weight, _, _ in corpus.mixture])
    else:
        train_rows = rows.train_rows(corpus.tokens["train"], d.seq_len, config.seed, d.packing,
                                     corpus.documents["train"], tok.eos_id, tok.pad_id)
    return per_process(train_rows, config.train.batch_size, jax.process_index(), jax.process_count())


def validation_data(config: ml_collections.ConfigDict, corpus: Corpus) -> grain.MapDataset:
    """This process's validation batches for `config`, covering the split once (the last
    padded with empty rows; `config.eval.num_batches` > 0 keeps only that many)."""
    d, tok = config.data, corpus.tokenizer
    validation = rows.validation_rows(corpus.tokens["validation"], d.seq_len, config.eval.batch_size, tok.pad_id,
                                      config.eval.num_batches, d.packing, corpus.documents["validation"],
                                      tok.eos_id)
    return per_process(validation, config.eval.batch_size, jax.process_index(), jax.process_count())

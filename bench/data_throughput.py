"""Throughput of the data pipeline on one process: read, tokenize, pack, batch.

    .venv/bin/python bench/data_throughput.py --config=configs/shakespeare_bpe.py

Times, from an already built TFDS dataset: reading and tokenizing the train split
(Grain worker threads, `config.data.num_threads`) into a fresh token cache, then
assembling a full epoch of training batches (packing included) through the same
iterator the trainer uses. Prints tokens/s of each stage and of the whole pipeline, and
the packing efficiency (non-padding tokens over all tokens). Compare the pipeline's
tokens/s with `bench/train_throughput.py` on the same config: the loader must be far
faster than the step so it is never the bottleneck.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm.config import parse_flags, validated_config  # noqa: E402
from lm.data import batches, rows, tokenizers  # noqa: E402
from lm.data.corpus import builders, prepare, token_streams  # noqa: E402
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe to measure.", lock_config=True)
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "Stop batching after this many (0: one epoch).")


def main(argv):
    reject_positional(argv)
    quiet_logging()
    config = validated_config(_CONFIG.value, "configs/shakespeare_bpe.py")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = prepare(config, os.path.join(tmp, "tokenizer.json"))  # builds, trains, caches
            builder = next(iter(builders(config).values()))  # the first source
            start = time.perf_counter()
            tokens, documents, num_bytes = token_streams(
                builder, corpus.tokenizer, os.path.join(tmp, "fresh"))["train"]  # and validation
            tokenize_s = time.perf_counter() - start
    except UsageError as e:
        exit_with_error(str(e))

    row_tokens = config.train.batch_size * (config.data.seq_len + 1)
    if config.data.packing == "pack":
        efficiency = rows.packing_efficiency(documents, config.data.seq_len)
        rows_per_epoch = len(rows.PackedRows(tokens, documents, config.data.seq_len, config.seed,
                                              tokenizers.EOS_ID, tokenizers.PAD_ID).epoch(0))
    else:
        efficiency, rows_per_epoch = 1.0, len(tokens) // config.data.seq_len
    num_batches = max(rows_per_epoch // config.train.batch_size, 1)
    if _MAX_BATCHES.value:
        num_batches = min(num_batches, _MAX_BATCHES.value)
    iterator = batches.iterate(batches.train_data(config, corpus), config.data.num_threads, config.data.prefetch)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    batch_s = time.perf_counter() - start
    batched_tokens = num_batches * row_tokens * efficiency

    tokenize_rate = len(tokens) / tokenize_s
    batch_rate = batched_tokens / batch_s
    pipeline_rate = 1.0 / (1.0 / tokenize_rate + 1.0 / batch_rate)
    print(f"config: {config.data.name}, {corpus.tokenizer.kind} tokenizer ({corpus.tokenizer.vocab_size:,} ids), "
          f"{config.data.packing} rows of {config.data.seq_len + 1} tokens, {config.data.num_threads} threads")
    print(f"train split: {len(documents):,} documents, {len(tokens):,} tokens, {num_bytes:,} bytes")
    print(f"read_and_tokenize_tokens_per_second: {tokenize_rate:,.0f} ({tokenize_s:.2f} s)")
    print(f"pack_and_batch_tokens_per_second: {batch_rate:,.0f} ({num_batches} batches in {batch_s:.2f} s)")
    print(f"pipeline_tokens_per_second: {pipeline_rate:,.0f}")
    print(f"packing_efficiency: {efficiency:.4f}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""Tokens stored once: a built dataset's splits encoded by parallel tasks, joined by streaming.

`tokenize(dataset_dir, splits, tokenizer, cache_dir, ...)` writes, for each split given,
the token cache `lm.data.corpus` reads: `<split>.tokens.npy` (int32, the documents joined
by `<eos>`), `<split>.docs.npy` (int64 [num_documents, 2]: start and length in the
stream) and `<split>.json` (the split's UTF-8 bytes), written last, so the three exist
only once the cache is whole.

It runs as one datatrove stage, `EncodeRecords`: task `t` encodes one contiguous range
of one split's ArrayRecord records (a part of about `PART_BYTES`) with lm's own
tokenizer (`encode_batch`, so the ids are exactly those of `tokenizer.encode`) and
appends them, each document followed by `<eos>`, to its own part files (tokens and
per-document lengths), one chunk of records at a time. datatrove rather than a process
pool: the same stage runs in this process (one worker), in `workers` local processes or
on Ray through `lm.data.build.executors`, and datatrove records each finished task, so a
killed run redoes only the parts it had not finished. The parts are then joined in
order into the split's arrays with `np.lib.format.open_memmap`, a block at a time.
Memory: one chunk of records and its ids per task, one block when joining; never the
corpus.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time

import numpy as np
from datatrove.pipeline.base import PipelineStep

from lm.data import token_cache, tokenizers
from lm.data.build import executors
from lm.data.build.read import PROGRESS_SECONDS, record_progress
from lm.data.build.stages import Layout, Stage

PART_BYTES = 32 << 20  # record bytes a task encodes: parallelism, and what a killed task redoes
RECORDS_PER_CHUNK = 256  # records read (one array_record batch read) and encoded at a time
BLOCK = 1 << 22  # tokens copied at a time when joining the parts


def plan(splits: dict[str, tuple[int, int]], part_bytes: int = PART_BYTES) -> list[tuple[str, int, int]]:
    """The tasks' parts, (split, first record, end record), in split and record order.

    `splits`: split -> (records, bytes). A split of `b` bytes is cut into about
    `b / part_bytes` ranges of equal record counts (at least one, at most one a record)."""
    parts = []
    for split, (records, num_bytes) in splits.items():
        count = max(1, min(records, -(-num_bytes // part_bytes)))
        parts += [(split, i * records // count, (i + 1) * records // count) for i in range(count)]
    return parts


def _part_path(part_dir: str, rank: int, name: str) -> str:
    return os.path.join(part_dir, f"{rank:05d}.{name}")


class EncodeRecords(PipelineStep):
    """Task `rank` encodes the records of `parts[rank]` into its part files: `tokens`
    (int32, each document followed by `<eos>`), `lengths` (int64 per document) and
    `json` (documents, tokens, UTF-8 bytes), renamed into place once whole."""

    name = "lm tokens"
    type = "🔢 - TOKENIZER"

    def __init__(self, dataset_dir: str, parts: list[tuple[str, int, int]], tokenizer: dict, part_dir: str,
                 progress_dir: str):
        super().__init__()
        self.dataset_dir, self.parts, self.tokenizer = dataset_dir, parts, tokenizer  # tokenizer: its to_json
        self.part_dir, self.progress_dir = part_dir, progress_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import tensorflow_datasets as tfds  # imported by the tasks, not by every stage

        split, start, stop = self.parts[rank]
        tokenizer = tokenizers.from_json(self.tokenizer)
        source = tfds.builder_from_directory(self.dataset_dir).as_data_source()[split]
        eos = np.array([tokenizer.eos_id], np.int32)
        os.makedirs(self.part_dir, exist_ok=True)
        temporary = {name: _part_path(self.part_dir, rank, name) + ".tmp" for name in ("tokens", "lengths", "json")}
        totals, last = {"documents": 0, "tokens": 0, "bytes": 0}, time.monotonic()
        with open(temporary["tokens"], "wb") as tokens, open(temporary["lengths"], "wb") as lengths:
            for first in range(start, stop, RECORDS_PER_CHUNK):
                texts = [r["text"] for r in source.__getitems__(range(first, min(first + RECORDS_PER_CHUNK, stop)))]
                with self.track_time(unit="chunk"):
                    ids = tokenizer.encode_batch([t.decode("utf-8") for t in texts])
                tokens.write(np.concatenate([a for doc in ids for a in (doc, eos)]).astype("<i4").tobytes())
                lengths.write(np.array([len(doc) for doc in ids], "<i8").tobytes())
                totals["documents"] += len(ids)
                totals["tokens"] += sum(len(doc) + 1 for doc in ids)
                totals["bytes"] += sum(map(len, texts))
                if time.monotonic() - last > PROGRESS_SECONDS:
                    record_progress(self.progress_dir, rank, totals["documents"], totals["bytes"])
                    last = time.monotonic()
        record_progress(self.progress_dir, rank, totals["documents"], totals["bytes"])
        with open(temporary["json"], "w", encoding="utf-8") as f:
            json.dump(totals, f)
        for name, path in temporary.items():  # json last: a part is whole once its json exists
            os.replace(path, _part_path(self.part_dir, rank, name))
        self.stat_update("documents", value=totals["documents"])
        self.stat_update("tokens", value=totals["tokens"])
        yield from ()


def join(part_dir: str, ranks: list[int], cache_dir: str, split: str, staging: str) -> dict:
    """Joins the parts `ranks` (in order) into the split's cache files; returns their totals.

    The parts' streams end each document with `<eos>`; the split's stream drops the last
    one (documents are joined by `<eos>`, as `lm.data.rows` expects). Written into
    `staging` and renamed into `cache_dir`, the json last."""
    totals = {"documents": 0, "tokens": 0, "bytes": 0}
    for rank in ranks:
        with open(_part_path(part_dir, rank, "json"), encoding="utf-8") as f:
            for key, value in json.load(f).items():
                totals[key] += value
    length = max(totals["tokens"] - 1, 0)
    written = token_cache.paths(staging, split)
    os.makedirs(staging, exist_ok=True)
    _copy_tokens(part_dir, ranks, written["tokens.npy"], length)
    _write_documents(part_dir, ranks, written["docs.npy"], totals["documents"])
    with open(written["json"], "w", encoding="utf-8") as f:
        json.dump({"bytes": totals["bytes"]}, f)
    for name, path in written.items():
        os.replace(path, token_cache.paths(cache_dir, split)[name])
    return {**totals, "tokens": length}


def _copy_tokens(part_dir: str, ranks: list[int], path: str, length: int) -> None:
    if not length:  # an empty memmap cannot be mapped
        np.save(path, np.zeros((0,), np.int32))
        return
    stream = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(length,))
    at = 0
    for rank in ranks:
        part_path = _part_path(part_dir, rank, "tokens")
        if not os.path.getsize(part_path):
            continue
        part = np.memmap(part_path, dtype="<i4", mode="r")
        for first in range(0, len(part), BLOCK):
            block = part[first:min(first + BLOCK, len(part), first + length - at)]
            stream[at:at + len(block)] = block
            at += len(block)
        del part
    stream.flush()
    del stream


def _write_documents(part_dir: str, ranks: list[int], path: str, count: int) -> None:
    if not count:
        np.save(path, np.zeros((0, 2), np.int64))
        return
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(count, 2))
    row = offset = 0
    for rank in ranks:
        lengths = np.fromfile(_part_path(part_dir, rank, "lengths"), dtype="<i8")  # 8 bytes a document
        ends = offset + np.cumsum(lengths + 1)
        table[row:row + len(lengths), 0] = ends - lengths - 1
        table[row:row + len(lengths), 1] = lengths
        row, offset = row + len(lengths), int(ends[-1]) if len(lengths) else offset
    table.flush()
    del table


def tokenize(dataset_dir: str, splits: dict[str, tuple[int, int]], tokenizer: tokenizers.Tokenizer, cache_dir: str,
             *, executor: str = "local", workers: int = 0, executor_options: dict | None = None,
             part_bytes: int = PART_BYTES, verbose: bool = False) -> dict[str, dict]:
    """Encodes the splits of the TFDS dataset at `dataset_dir` into `cache_dir`.

    `splits`: split -> (records, bytes) (the dataset info's). `executor`: "local" (`workers`
    processes; 0: one per core, or this process alone when each split is one part) or
    "ray" (the cluster `ray.init` finds, or `executor_options["address"]`). The parts live
    in `<cache_dir>/incomplete.tokens-<tasks>/`, kept if a task fails (a rerun redoes only
    the unfinished ones) and removed once joined. With `verbose`, prints the progress line
    and one line per split. Returns split -> {"documents", "tokens", "bytes"}."""
    parts = plan(splits, part_bytes)
    layout = Layout(os.path.join(cache_dir, f"incomplete.tokens-{len(parts)}"))
    if not workers:
        workers = 1 if len(parts) <= len(splits) else os.cpu_count() or 1
    stage = Stage("tokenize", [EncodeRecords(dataset_dir, parts, tokenizer.to_json(), layout.parts,
                                             layout.progress)], len(parts))
    start = time.monotonic()
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        if executor == "ray":
            executors.run_ray([stage], layout, workers, executor_options or {})
        else:
            executors.run_local([stage], layout, workers)
    result = {}
    for split in splits:
        ranks = [rank for rank, (name, _, _) in enumerate(parts) if name == split]
        result[split] = join(layout.parts, ranks, cache_dir, split, layout.staging)
    if verbose:
        seconds = max(time.monotonic() - start, 1e-9)
        total = {key: sum(t[key] for t in result.values()) for key in ("documents", "tokens", "bytes")}
        print(f"tokenized {total['documents']:,} documents, {total['bytes'] / 1e6:,.1f} MB into "
              f"{total['tokens']:,} tokens in {seconds:.1f} s ({total['tokens'] / seconds:,.0f} tokens/s, "
              f"{total['bytes'] / 1e6 / seconds:,.2f} MB/s, {len(parts)} task(s))", flush=True)
        for split, totals in result.items():
            print(f"  {split}: {totals['documents']:,} documents, {totals['tokens']:,} tokens: "
                  f"{token_cache.paths(cache_dir, split)['tokens.npy']}", flush=True)
    for name in os.listdir(cache_dir):  # this run's parts, and any an earlier run of other splits left
        if name.startswith("incomplete.tokens-"):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
    return result

"""Rows of `seq_len + 1` tokens from a split's token stream (`lm.data.corpus`).

Training rows come in two layouts:

- `stream` (nanoGPT): windows of the stream. Epoch `e` starts the windows at a shift
  drawn from (seed, e) and visits them in a permutation drawn from (seed, e).
- `pack`: documents, each followed by `<eos>` (cut into pieces if longer than a row),
  packed first-fit into rows in an order drawn from (seed, e). Rows carry
  `segment_ids` (1, 2, ... per piece, 0 on padding) and `positions` that restart at
  each piece, so attention never crosses documents.

Either way row `i` is a pure function of (seed, i), so a resumed run reads exactly the
rows it would have. Validation rows cover the split once, in order, and end in padding
rows (zero weight) up to whole batches. Batches of rows are `lm.data.batches`' job.
"""

from __future__ import annotations

import functools
import sys
import threading

import grain
import numpy as np

from lm.data import tokenizers
from lm.data.documents import CorpusError


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
    """The endless sequence of training rows; row `i` is a pure function of (seed, i).

    A row is `{'tokens': int32[seq_len + 1]}`, plus int32 `segment_ids` and `positions`
    of the same shape when `packing="pack"` (which needs `documents`, the split's
    (start, length) table). Raises CorpusError when the split is too short for a row.
    """
    if packing == "pack":
        return grain.MapDataset.source(PackedRows(tokens, documents, seq_len, seed, eos_id, pad_id))
    per_epoch = (len(tokens) - seq_len) // seq_len  # room for any shift in [0, seq_len)
    if per_epoch < 1:
        raise CorpusError(f"the train split has {len(tokens)} tokens, too few for one shifted row of "
                          f"config.data.seq_len={seq_len}. Fix: use more text or a shorter seq_len.")
    return (grain.MapDataset.range(per_epoch).shuffle(seed=seed).repeat()
            .map_with_index(_EpochWindow(tokens, seq_len, seed, per_epoch)))


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


def validation_rows(tokens: np.ndarray, seq_len: int, rows_per_batch: int, pad_id: int,
                    num_batches: int = 0, packing: str = "stream", documents: np.ndarray | None = None,
                    eos_id: int = tokenizers.EOS_ID) -> grain.MapDataset:
    """The validation split in order, each token scored once, then empty rows (`<pad>`,
    segment 0: zero weight) up to whole batches of `rows_per_batch` rows; `num_batches`
    > 0 keeps only the first `num_batches` batches, 0 covers all of the split. A row has
    the keys and shapes of a training row; a stream's last partial window is dropped."""
    if packing == "pack":
        packed = pack(documents[:, 1], seq_len + 1, max_open=1)  # in order: next-fit
        rows_needed = len(packed)
    else:
        rows_needed = (len(tokens) - 1) // seq_len
    batches = -(-rows_needed // rows_per_batch)
    if num_batches:
        batches = min(batches, num_batches)
    if packing == "pack":
        source = _PackedEvalRows(tokens, documents, packed, seq_len, batches * rows_per_batch, eos_id, pad_id)
    else:
        source = _EvalWindows(tokens, seq_len, batches * rows_per_batch, pad_id)
    return grain.MapDataset.source(source)

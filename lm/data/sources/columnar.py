"""Columnar inputs through pyarrow: Parquet files and `datasets` save_to_disk folders,
read in record batches (never a whole file in memory), the filter applied by pyarrow.

Parquet is scanned with `pyarrow.dataset`, which pushes the filter down: row groups whose
min/max statistics rule it out are skipped unread. A save_to_disk folder is read with
pyarrow directly, not `datasets.load_from_disk`: its `state.json` lists the Arrow IPC
stream files that hold the rows in order (save_to_disk writes them with any shuffle or
selection applied), which pyarrow memory-maps and reads batch by batch; this keeps
`datasets` (and what it imports) out of lm's dependencies and gives both formats one
filter path. Any pyarrow error is a CorpusError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence

import pyarrow as pa

from lm.config import inputs
from lm.config.inputs import Condition
from lm.data.documents import CorpusError
from lm.data.sources import filters

BATCH_ROWS = 256  # rows per record batch (and per batch read ahead): about 1 MB of web text
_FIX = "Fix: check the file is complete (re-download or rewrite it)"


def _pyarrow_dataset():
    """pyarrow.dataset, imported when a Parquet file is read: it imports pandas, 0.45 s of
    every command's start-up otherwise."""
    import pyarrow.dataset as pds

    return pds


def is_columnar(path: str) -> bool:
    return path.endswith(".parquet") or inputs.is_hf_dataset(path)


@contextlib.contextmanager
def _errors(path: str):
    """pyarrow's errors (and the OS's) reading `path` as one CorpusError naming it."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"cannot read {path} ({type(e).__name__}: {e}). {_FIX}.") from None


def hf_files(path: str) -> list[str]:
    """The Arrow stream files of a save_to_disk folder, in row order (its state.json)."""
    with _errors(os.path.join(path, inputs.HF_STATE)):
        try:
            with open(os.path.join(path, inputs.HF_STATE), encoding="utf-8") as f:
                names = [entry["filename"] for entry in json.load(f)["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise CorpusError(f"{path}/{inputs.HF_STATE} does not list the folder's Arrow files ({e}). "
                              "Fix: write the folder with datasets' Dataset.save_to_disk.") from None
    return [os.path.join(path, name) for name in names]


def schema(path: str) -> pa.Schema:
    """A Parquet file's schema (from its footer) or a save_to_disk folder's (its first file's)."""
    if path.endswith(".parquet"):
        with _errors(path):
            return _pyarrow_dataset().dataset(path, format="parquet").schema
    files = hf_files(path)
    if not files:
        raise CorpusError(f"{path} lists no Arrow files in its {inputs.HF_STATE}. Fix: save a non-empty dataset.")
    with _errors(files[0]), pa.memory_map(files[0]) as source:
        return pa.ipc.open_stream(source).schema


def problem(file_schema: pa.Schema, text_column: str, conds: Sequence[Condition]) -> str | None:
    """Why a file of this schema cannot be read with this text column and filter, or None."""
    if text_column not in file_schema.names:
        return f"has no column {text_column!r} (its columns: {', '.join(file_schema.names)})"
    kind = filters.arrow_kind(file_schema.field(text_column).type)
    if kind != "string":
        return f"has text column {text_column!r} of type {file_schema.field(text_column).type}, not string"
    return filters.schema_problem(file_schema, conds)


def batches(path: str, columns: Sequence[str], conds: Sequence[Condition]) -> Iterator[pa.RecordBatch]:
    """The rows passing `conds`, as record batches of `columns`. Raises CorpusError."""
    expression = filters.expression(conds)
    if path.endswith(".parquet"):
        with _errors(path):
            pds = _pyarrow_dataset()
            # pre_buffer (pyarrow's default) reads row groups ahead of the consumer without bound: a
            # 550 MiB file peaked at 569 MiB of Arrow memory read this way, 32 MiB without it.
            parquet = pds.ParquetFileFormat(default_fragment_scan_options=pds.ParquetFragmentScanOptions(
                pre_buffer=False))
            scan = pds.dataset(path, format=parquet).to_batches(
                columns=list(columns), filter=expression, batch_size=BATCH_ROWS, batch_readahead=1,
                fragment_readahead=1)
            yield from scan
        return
    for file in hf_files(path):
        with _errors(file), pa.memory_map(file) as source:
            for batch in pa.ipc.open_stream(source):
                table = pa.Table.from_batches([batch])
                if expression is not None:
                    table = table.filter(expression)
                yield from table.select(list(columns)).to_batches()

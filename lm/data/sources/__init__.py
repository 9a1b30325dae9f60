"""Corpus inputs -> documents: the one place that turns `data.files` patterns into text.

- `expand(patterns)`: paths, directories and globs -> the input files and folders.
- `read(path, text_column, where)`: one input's documents as (text, metadata) pairs,
  streamed: `.txt` (split into units as `lm.data.documents` does), `.jsonl`,
  `.jsonl.gz`, `.jsonl.zst` (one document a line, the text in field `text_column`),
  `.parquet` and folders written by `datasets`' `Dataset.save_to_disk` (the text in
  column `text_column`; `columnar` says how they are read).
- `check_schemas(paths, text_column, where)`: before reading, one error for Parquet or
  `datasets` inputs whose schemas disagree (naming a shard of each kind); `check_inputs`
  does it for a corpus's files and options (both builds, every source before any is built).

Text is normalised as `lm.data.documents` does for `.txt` and `.jsonl`: LF line ends
(CRLF and lone CR in the text become LF), then the Unicode normal form `normalize`. A
blank or null text is no document. `where` (`data.where`, e.g. `language == "en" and
score >= 3`; `lm.config.inputs.parse_where`) keeps the rows whose metadata passes it; a
null in a filtered column fails it. Every problem is one `CorpusError` naming the file
(and line, for JSONL) and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from lm.config import inputs
from lm.config.inputs import Condition
from lm.data import documents
from lm.data.documents import CorpusError
from lm.data.sources import columnar, filters, jsonl

__all__ = ["expand", "read", "check_schemas", "check_inputs", "Condition"]

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz")


def expand(patterns: Iterable[str]) -> list[str]:
    """The inputs that `patterns` name (`lm.config.inputs.matches`: files with a corpus
    suffix and save_to_disk folders, directories searched recursively, globs with `**`):
    each pattern's matches sorted, the patterns in their order, an input named twice (or
    through a link) kept at its first place. Absolute paths. Raises CorpusError naming a pattern that matches
    nothing, or a DatasetDict folder (name one of its splits)."""
    found: dict[str, str] = {}
    for pattern in patterns:
        try:
            matched = inputs.matches(pattern)
        except ValueError as e:
            raise CorpusError(f"{e}.") from None
        except OSError as e:
            raise documents.input_error(e.filename or pattern, e) from None
        if not matched:
            raise CorpusError(f"{pattern!r} matches no corpus input (files ending in "
                              f"{', '.join(inputs.CORPUS_SUFFIXES)}, or datasets save_to_disk folders). "
                              "Fix: correct the path or glob, or check the files exist.")
        inputs.unique(matched, found)
    return list(found.values())


def read(path: str, text_column: str = "text", where: str | Sequence[Condition] | None = None, *,
         unit: str = "file", normalize: str = "none",
         columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict]]:
    """The documents of one input (a path from `expand`), in order, as (text, metadata):
    metadata holds the row's other columns (JSONL fields), or only `columns` of them
    (() for none: cheaper when only the text is wanted). `unit` splits `.txt` files
    ("file", "paragraph", "line"); `normalize` is "none", "NFC" or "NFKC". Streamed:
    memory holds a record batch or a line, not the file. Raises CorpusError."""
    conds = filters.conditions(where)
    if columnar.is_columnar(path):
        yield from _columnar(path, text_column, conds, normalize, columns)
    elif path.endswith(JSONL_SUFFIXES):
        yield from _jsonl(path, text_column, conds, normalize, columns)
    elif path.endswith(TEXT_SUFFIXES):
        if conds:
            raise CorpusError(f"{path} is a text file, with no column {conds[0].column!r} for the filter to "
                              "read. Fix: filter only sources of JSONL, Parquet or datasets inputs.")
        for doc in documents.read_documents(path, unit, normalize):
            yield doc.text, {}
    else:
        raise CorpusError(f"{path} is not a corpus input. Fix: use files ending in "
                          f"{', '.join(inputs.CORPUS_SUFFIXES)}, or a datasets save_to_disk folder.")


def _metadata(row: dict, text_column: str, columns: Sequence[str] | None) -> dict:
    names = [k for k in row if k != text_column] if columns is None else [k for k in columns if k in row]
    return {k: row[k] for k in names}


def _jsonl(path: str, text_column: str, conds: Sequence[Condition], normalize: str,
           columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    example = f'{{"{text_column}": "..."}}'
    for where, row in jsonl.values(path, example):
        if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
            raise CorpusError(f"{where} has no string field \"{text_column}\". Fix: each JSONL line must be an "
                              f"object like {example}, or set config.data.text_column to the field holding the "
                              "text.")
        if filters.keep(row, conds, where) and row[text_column].strip():
            yield documents.normalize(row[text_column], normalize), _metadata(row, text_column, columns)


def _columnar(path: str, text_column: str, conds: Sequence[Condition], normalize: str,
              columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    file_schema = columnar.schema(path)
    wrong = columnar.problem(file_schema, text_column, conds)
    if wrong:
        raise CorpusError(f"{path} {wrong}. Fix: {_fix(wrong)}.")
    names = [n for n in file_schema.names if n != text_column] if columns is None else \
        [n for n in columns if n in file_schema.names and n != text_column]
    for batch in columnar.batches(path, [text_column, *names], conds):
        texts = batch.column(0).to_pylist()
        rows = batch.select(names).to_pylist() if names else [{}] * len(texts)
        for text, row in zip(texts, rows):
            if text is not None and text.strip():
                yield documents.normalize(documents.unix_newlines(text), normalize), row


def _fix(problem: str) -> str:
    if "filter" in problem:
        return "filter on a column every shard has, with a literal of its type (config.data.where)"
    return "set config.data.text_column (or the source's text_column) to the column holding the text"


def check_schemas(paths: Sequence[str], text_column: str = "text",
                  where: str | Sequence[Condition] | None = None) -> None:
    """Raises one CorpusError if any Parquet or datasets input among `paths` cannot be read
    with this text column and filter (no such column, another type), naming that shard and,
    where other shards are fine (mixed schemas), one of those. Reads only schemas (Parquet
    footers), so thousands of shards are checked before any is read."""
    conds = filters.conditions(where)
    good, bad = None, None
    for path in paths:
        if not columnar.is_columnar(path):
            continue
        wrong = columnar.problem(columnar.schema(path), text_column, conds)
        if wrong and bad is None:
            bad = (path, wrong)
        elif not wrong and good is None:
            good = path
        if good and bad:
            break
    if bad is None:
        return
    path, wrong = bad
    if good is None:
        raise CorpusError(f"{path} {wrong}. Fix: {_fix(wrong)}.")
    raise CorpusError(f"the shards' schemas differ: {path} {wrong}, while {good} reads with text column "
                      f"{text_column!r}{' and the filter' if conds else ''}. Fix: give the shards one schema, or "
                      f"read each kind as its own config.data.sources entry; else {_fix(wrong)}.")


def check_inputs(files: Sequence[str], options: dict) -> None:
    """Before a corpus is built: one CorpusError for Parquet or `datasets` inputs whose schemas
    do not fit its options' text column and filter, or disagree (`check_schemas`)."""
    text_column, where = options.get("text_column", "text"), options.get("where", "")
    if all(path.endswith(documents.SUFFIXES) for path in files) and text_column == "text" and not where:
        return  # text files: nothing columnar to check
    check_schemas(files, text_column, where)

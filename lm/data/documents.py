"""Reading text files: corpus files -> documents, and the one reader of every user text file.

Corpus files are `.txt`, `.jsonl` (a `text` field) and their `.gz` forms. A `.jsonl`
line is one document. A `.txt` file is one document, or one per paragraph (blank-line
separated) or per line, as `unit` says. Text is normalised to a Unicode
normal form (NFC, NFKC) or left as is ("none"). Every problem names the file, the line
or byte, and the fix.

Every user text file `lm` reads (corpora, fine-tuning and evaluation JSONL, `lm.evaluate`'s
text files, `lm.scaling`'s results tables) goes through `read_text` or `read_jsonl` here, so that encodings of the same
text give the same documents: the encoding is UTF-8, or UTF-16/UTF-32 when the file starts
with their byte-order mark; a byte-order mark is dropped; line endings (CRLF, lone CR)
become LF, in the file and in JSONL string values, whatever `normalize` says. A file that
looks like UTF-16/32 without a byte-order mark is an error, not text full of NULs.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

from lm.config import TEXT_SUFFIXES as SUFFIXES
from lm.errors import UsageError

# How files become documents; part of a built corpus's fingerprint, so a change here
# rebuilds corpora (and their token caches) built by an older reader. 2: line endings
# and byte-order marks normalised, UTF-16/32 read.
READER_VERSION = 2

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")
_LINE_BREAK = re.compile(r"\r\n?")  # CRLF (Windows) or a lone CR (classic Mac OS)
# Longest first: UTF-32-LE's mark begins with UTF-16-LE's.
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                     (codecs.BOM_UTF16_BE, "utf-16"))


class CorpusError(UsageError):
    """A corpus file that cannot be read as documents; the message says where and how to fix."""


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path" or "path:line", for reports and errors


def input_error(path: str, error: OSError | EOFError) -> CorpusError:
    """The one error for an input that cannot be read, hashed or listed: an OSError with an
    errno (missing, no permission, a directory...) names its text; others (a truncated or
    not-gzip `.gz`: gzip.BadGzipFile, EOFError) say the file is damaged."""
    if isinstance(error, OSError) and error.errno is not None:
        return CorpusError(f"cannot read {path}: {error.strerror}. Fix: check it exists and this user may read it "
                           "(its permissions, and its folders').")
    return CorpusError(f"cannot read {path}: {error}. Fix: check the file is complete "
                       "(a .gz file must be gzip-compressed).")


def read_bytes(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise input_error(path, e) from None


def encoding_of(data: bytes) -> str:
    """The codec of a file's bytes: UTF-16/32 (or UTF-8 with a signature) by their
    byte-order mark, else UTF-8. The returned codec drops the mark when decoding."""
    return next((codec for mark, codec in _BYTE_ORDER_MARKS if data.startswith(mark)), "utf-8")


def unix_newlines(text: str) -> str:
    """`text` with every CRLF and lone CR turned into LF (Python's universal newlines)."""
    return _LINE_BREAK.sub("\n", text) if "\r" in text else text  # no copy of an LF corpus


def decode_text(data: bytes, where: str, line_in_where: bool = False) -> str:
    """A file's bytes as text with LF line endings (see the module docstring).

    Raises `CorpusError` naming `where`, the line and the byte for bytes that are not
    valid in the file's encoding, and for UTF-16/32 without a byte-order mark (its NUL
    bytes are valid UTF-8). With `line_in_where`, the line is given as `where:line`.
    """
    encoding = encoding_of(data)
    head = data[:4096]
    if encoding == "utf-8" and head.count(0) * 4 >= len(head) > 0:
        raise CorpusError(f"{where} looks like UTF-16 or UTF-32 without a byte-order mark ({head.count(0)} NUL "
                          f"bytes in its first {len(head)}). Fix: convert it to UTF-8, e.g. "
                          "`iconv -f utf-16le -t utf-8`, or save it with a byte-order mark.")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = unix_newlines(data[:e.start].decode(encoding, errors="replace")).count("\n") + 1
        place, at = (f"{where}:{line}", "") if line_in_where else (where, f"line {line}, ")
        raise CorpusError(f"{place} is not valid {encoding.upper().replace('-SIG', '')} ({at}byte {e.start}: "
                          f"{data[e.start:e.start + 8]!r}). Fix: convert the file to UTF-8, e.g. "
                          "`iconv -f latin1 -t utf-8`.") from None
    return unix_newlines(text)


def read_text(path: str) -> str:
    """A text file (or its `.gz` form) as one string with LF line endings and no byte-order mark."""
    return decode_text(read_bytes(path), path)


def text_fingerprint(paths: Iterable[str]) -> str:
    """A hash of the files' text as `read_text` reads it, in order: the same for a CRLF,
    BOM-prefixed, UTF-16 or gzipped copy of a file, which give the same documents. Other
    inputs (`.parquet`, `.jsonl.zst`, a `datasets` folder) count by their bytes
    (`file_digest`). Raises `CorpusError` for a text file that cannot be read as text."""
    digest = hashlib.sha256()
    for path in paths:
        if path.endswith(SUFFIXES):
            digest.update(hashlib.sha256(read_text(path).encode("utf-8")).digest())
        else:
            digest.update(bytes.fromhex(file_digest(path)))
    return digest.hexdigest()[:12]


def file_digest(path: str) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks (a shard may be GBs); for a folder
    (a `datasets` save_to_disk folder), of its files' relative names and digests."""
    if not os.path.isdir(path):
        try:
            with open(path, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise input_error(path, e) from None
    digest = hashlib.sha256()

    def unlistable(error: OSError) -> None:
        raise input_error(error.filename or path, error) from None

    for root, dirs, names in os.walk(path, onerror=unlistable):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0" + bytes.fromhex(file_digest(full)))
    return digest.hexdigest()


def read_jsonl(path: str, example: str = "") -> Iterator[tuple[str, Any]]:
    """(`path:line`, value) of each non-blank line of a JSONL file (or its `.gz` form), read
    as `read_text` reads (so CRLF, lone CR and a byte-order mark are fine), with CRLF and
    CR inside string values turned into LF too. Raises `CorpusError` naming the line; its
    fix shows `example`, a line as the caller wants it."""
    yield from jsonl_values(decode_text(read_bytes(path), path, line_in_where=True), path, example)


def jsonl_values(text: str, path: str, example: str = "", first_line: int = 1) -> Iterator[tuple[str, Any]]:
    """(`path:line`, value) of each non-blank line of decoded JSONL `text` (LF line endings)
    whose first line is line `first_line` of `path`; see `read_jsonl`."""
    for number, line in enumerate(text.split("\n"), start=first_line):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where} is not JSON ({e.msg}). Fix: one JSON object per line"
                              f"{', e.g. ' + example if example else ''}.") from None
        yield where, _unix_newlines_in(value)


def _unix_newlines_in(value: Any) -> Any:
    if isinstance(value, str):
        return unix_newlines(value)
    if isinstance(value, list):
        return [_unix_newlines_in(v) for v in value]
    if isinstance(value, dict):
        return {k: _unix_newlines_in(v) for k, v in value.items()}
    return value


def normalize(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def split_units(text: str, unit: str) -> list[str]:
    """A text file's documents: the whole text, its paragraphs or its lines (blank ones dropped)."""
    if unit == "file":
        return [text] if text.strip() else []
    pieces = _PARAGRAPH_BREAK.split(text) if unit == "paragraph" else text.split("\n")
    return [p.strip("\n") for p in pieces if p.strip()]


def read_documents(path: str, unit: str = "file", form: str = "none") -> Iterator[Document]:
    """The documents of one corpus file, in file order."""
    if not path.endswith(SUFFIXES):
        raise CorpusError(f"{path} is not a text corpus file. Fix: use one of {', '.join(SUFFIXES)}, or read "
                          "it with lm.data.sources.read (Parquet, .jsonl.zst, datasets folders).")
    if path.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_documents(path, form)
        return
    for piece in split_units(read_text(path), unit):
        yield Document(normalize(piece, form), path)


def _jsonl_documents(path: str, form: str) -> Iterator[Document]:
    for where, record in read_jsonl(path, example='{"text": "..."}'):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{where} has no string field \"text\". "
                              "Fix: each JSONL line must be an object like {\"text\": \"...\"}.")
        if record["text"].strip():
            yield Document(normalize(record["text"], form), where)

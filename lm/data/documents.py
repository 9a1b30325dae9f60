"""Raw corpus files -> documents: `.txt`, `.jsonl` (a `text` field) and their `.gz` forms.

A `.jsonl` line is one document. A `.txt` file is one document, or one per paragraph
(blank-line separated) or per line, as `unit` says. Text is normalised to a Unicode
normal form (NFC, NFKC) or left as is ("none"). Every problem names the file, the line
or byte, and the fix.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import unicodedata
from typing import Iterator

UNITS = ("file", "paragraph", "line")
NORMAL_FORMS = ("none", "NFC", "NFKC")
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


class CorpusError(ValueError):
    """A corpus file that cannot be read as documents; the message says where and how to fix."""


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path" or "path:line", for reports and errors


def read_bytes(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise CorpusError(f"cannot read {path}: {e}. Fix: check the file is complete "
                          "(a .gz file must be gzip-compressed).") from None


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 8]!r}). "
                          "Fix: convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`.") from None


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
        raise CorpusError(f"{path} has an unknown suffix. Fix: use one of {', '.join(SUFFIXES)}.")
    data = read_bytes(path)
    if path.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_documents(path, data, form)
        return
    for piece in split_units(decode_utf8(data, path), unit):
        yield Document(normalize(piece, form), path)


def _jsonl_documents(path: str, data: bytes, form: str) -> Iterator[Document]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(decode_utf8(line, where))
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where} is not valid JSON ({e.msg}). "
                              "Fix: one JSON object per line, e.g. {\"text\": \"...\"}.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{where} has no string field \"text\". "
                              "Fix: each JSONL line must be an object like {\"text\": \"...\"}.")
        if record["text"].strip():
            yield Document(normalize(record["text"], form), where)

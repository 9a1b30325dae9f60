"""JSONL inputs (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) streamed line by line: memory holds
one compressed chunk and one line, whatever the file's size.

Lines decode as `lm.data.documents.read_jsonl` reads a whole file (UTF-8, a byte-order
mark dropped, CRLF and lone CR as LF, in the file and in string values), with the same
`path:line` in errors. A file in UTF-16/32 (by its byte-order mark) is rare enough to be
read whole through `read_jsonl`'s path. A truncated or corrupt gzip or zstd stream is a
CorpusError naming the file, never a silently short read.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import zstandard

from lm.data import documents
from lm.data.documents import CorpusError

CHUNK = 1 << 20  # bytes read (compressed) per step


def _zstd_chunks(f: BinaryIO, path: str) -> Iterator[bytes]:
    """The decompressed bytes of a zstd file, frame after frame. zstandard's stream reader
    stops quietly at a truncated frame; `eof` tells a finished frame from a cut one."""
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    while chunk := f.read(CHUNK):
        while chunk:
            yield frame.decompress(chunk)
            chunk = frame.unused_data if frame.eof else b""
            if frame.eof and chunk:
                frame = decompressor.decompressobj()
    if not frame.eof:
        raise EOFError("the zstd stream ends inside a frame (a truncated file)")


def _chunks(path: str) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks; CorpusError for a bad or cut stream."""
    kind = "zstd" if path.endswith(".zst") else "gzip" if path.endswith(".gz") else ""
    try:
        with open(path, "rb") as raw:
            if kind == "zstd":
                yield from _zstd_chunks(raw, path)
                return
            f = gzip.GzipFile(fileobj=raw) if kind == "gzip" else raw
            while chunk := f.read(CHUNK):
                yield chunk
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        compressed = f" (a .{'zst' if kind == 'zstd' else 'gz'} file must be complete and {kind}-compressed)" \
            if kind else ""
        raise CorpusError(f"cannot read {path}: {e}. Fix: check the file is complete{compressed}, e.g. "
                          f"re-download or recompress it.") from None


def _lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line bytes without LF) of each LF-terminated line."""
    number, offset, rest = 1, 0, b""
    for chunk in _chunks(path):
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            yield number, offset, line
            number, offset = number + 1, offset + len(line) + 1
    if rest:
        yield number, offset, rest


def values(path: str, example: str = "") -> Iterator[tuple[str, Any]]:
    """(`path:line`, value) of each non-blank line, as `documents.read_jsonl` gives them."""
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        return
    head = first[2][:4096]
    if documents.encoding_of(head) not in ("utf-8", "utf-8-sig") or head.count(0) * 4 >= len(head) > 0:
        # UTF-16/32 (or NUL-filled) text: decode the whole file as read_jsonl does (its errors too).
        data = b"".join(_chunks(path))
        yield from documents.jsonl_values(documents.decode_text(data, path, line_in_where=True), path, example)
        return
    if head.startswith(codecs.BOM_UTF8):
        first = (first[0], first[1] + len(codecs.BOM_UTF8), first[2][len(codecs.BOM_UTF8):])
    extra = 0  # lines that lone CRs (classic Mac OS line ends) added, as read_jsonl counts them
    for number, offset, raw in itertools.chain([first], lines):
        try:
            text = raw.removesuffix(b"\r").decode("utf-8")  # the CR of a CRLF
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}:{number + extra} is not valid UTF-8 (byte {offset + e.start}: "
                              f"{raw[e.start:e.start + 8]!r}). Fix: convert the file to UTF-8, e.g. "
                              "`iconv -f latin1 -t utf-8`.") from None
        text = documents.unix_newlines(text)
        yield from documents.jsonl_values(text, path, example, first_line=number + extra)
        extra += text.count("\n")

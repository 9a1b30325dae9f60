"""Reading: each task's share of the corpus files as datatrove documents, with progress.

Task `rank` of `world_size` reads a contiguous run of the (sorted) files, so the tasks'
outputs joined in rank order are the corpus in file order, as the in-memory build keeps
it. A task holds one file's reader at a time: memory follows the largest file (how the
reader streams it), never the corpus.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lm.data import documents
from lm.files import atomic

PROGRESS_SECONDS = 2.0  # how often a task records its progress for the parent's progress line


def task_files(files: Sequence[str], rank: int, world_size: int) -> Sequence[str]:
    """Task `rank`'s contiguous share of `files` (possibly none when tasks outnumber files)."""
    return files[rank * len(files) // world_size:(rank + 1) * len(files) // world_size]


def file_texts(path: str, options: dict) -> Iterator[str]:
    """The normalised texts of one corpus input, in order, read as the in-memory build reads
    them (`lm.data.text_files`): `.txt`/`.jsonl`(`.gz`) with the default text column and no
    filter through `lm.data.documents`; any other input (`.jsonl.zst`, Parquet, `datasets`
    folders), or with `options["text_column"]`/`options["where"]`, through
    `lm.data.sources.read`, streamed. Raises `CorpusError` naming the input (and line).
    """
    text_column, where = options.get("text_column", "text"), options.get("where", "")
    if path.endswith(documents.SUFFIXES) and text_column == "text" and not where:
        for doc in documents.read_documents(path, options["unit"], options["normalize"]):
            yield doc.text
        return
    from lm.data import sources  # the other inputs' readers

    for text, _ in sources.read(path, text_column, where, unit=options["unit"], normalize=options["normalize"],
                                columns=()):
        yield text


class ReadFiles(PipelineStep):
    """Reads this task's files (`task_files`) as documents tagged with the task's rank.

    Every `PROGRESS_SECONDS` it writes `{progress_dir}/{rank:05d}.json` (documents and
    UTF-8 bytes read so far), which `Progress` sums into the build's progress line.
    """

    name = "lm corpus files"
    type = "📖 - READER"

    def __init__(self, files: Sequence[str], options: dict, progress_dir: str = ""):
        super().__init__()
        self.files, self.options, self.progress_dir = tuple(files), options, progress_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        count, num_bytes, last = 0, 0, time.monotonic()
        for path in task_files(self.files, rank, world_size):
            for text in file_texts(path, self.options):
                count += 1
                num_bytes += len(text.encode("utf-8"))
                if self.progress_dir and time.monotonic() - last > PROGRESS_SECONDS:
                    record_progress(self.progress_dir, rank, count, num_bytes)
                    last = time.monotonic()
                yield Document(text=text, id=f"{rank}/{count - 1}", metadata={"task": rank})
        if self.progress_dir:
            record_progress(self.progress_dir, rank, count, num_bytes)


def record_progress(progress_dir: str, rank: int, documents: int, num_bytes: int) -> None:
    """Task `rank`'s progress so far (documents, UTF-8 bytes), which `Progress` sums into the
    progress line; replaced whole, so the parent never reads a half-written record."""
    os.makedirs(progress_dir, exist_ok=True)
    atomic.write_json(os.path.join(progress_dir, f"{rank:05d}.json"), {"documents": documents, "bytes": num_bytes})


class Progress:
    """The build's progress line: documents and MB read by all tasks so far, and MB/s."""

    def __init__(self, progress_dir: str):
        self.progress_dir, self.start = progress_dir, time.monotonic()

    def totals(self) -> tuple[int, int]:
        """(documents, UTF-8 bytes) read so far, over the tasks' progress files."""
        docs = num_bytes = 0
        for name in os.listdir(self.progress_dir) if os.path.isdir(self.progress_dir) else ():
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self.progress_dir, name), encoding="utf-8") as f:
                        record = json.load(f)
                except (OSError, ValueError):  # replaced under us: next time
                    continue
                docs, num_bytes = docs + record["documents"], num_bytes + record["bytes"]
        return docs, num_bytes

    def line(self) -> str:
        docs, num_bytes = self.totals()
        seconds = max(time.monotonic() - self.start, 1e-9)
        return (f"read {docs:,} documents, {num_bytes / 1e6:,.1f} MB in {seconds:.0f} s "
                f"({num_bytes / 1e6 / seconds:.2f} MB/s)")

"""Near-duplicate candidates verified by the exact Jaccard similarity of their shingle sets.

MinHash LSH (`lm.data.build.dedup`) proposes candidate pairs: documents that share a band.
Its bands are chosen for recall, so many candidates fall below the threshold; this module
keeps a pair only if the Jaccard similarity of the two documents' shingle sets (each
shingle as its 32-bit hash, the very values the MinHash signatures are computed from)
reaches the threshold, then joins the kept pairs into clusters and removes all but the
first document of each, in corpus order.

On disk, per signature task `r` (`writing_shingles`), under the shingles folder:
    <r>.hashes.npy   uint32 [total shingles]: each document's sorted unique shingle hashes, one after another
    <r>.offsets.npy  int64 [documents + 1]: document `i`'s hashes are hashes[offsets[i]:offsets[i + 1]]
`i` is the document's index in the task, the index datatrove's signature and duplicate
files record. 4 bytes per distinct shingle: about 0.7 times the text for English words.
The cluster stage (`VerifiedCluster`) reads a candidate's hashes when it compares it, so it
holds the candidate pairs of one band group at a time and the union-find of the verified ones.
"""

from __future__ import annotations

import array
import contextlib
import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.binaryio import read_tuples_from_file

from lm.files import atomic

HASH = np.dtype("<u4")
OFFSET = np.dtype("<i8")
# A document that shares a band value with many others (boilerplate with small variations)
# is compared with at most this many clusters of that band value: bounded work per document.
MAX_PEERS = 64


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype.str, "fortran_order": False, "shape": (length,)})
    return header.getvalue()


@contextlib.contextmanager
def writing_shingles(folder: str, rank: int) -> Iterator[Callable[[np.ndarray], None]]:
    """Writes signature task `rank`'s shingle hashes as the two .npy files the module
    docstring describes, each appearing whole or not at all (`lm.files.atomic`). Yields
    `add(hashes)`, called once per document in order with its sorted unique uint32 hashes;
    the files are finished when the block ends without an exception."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{rank:05d}")
    offsets = array.array("q", [0])  # 8 bytes a document of the task's share, never the corpus
    with atomic.replacing(f"{stem}.hashes.npy", "wb") as f:
        f.write(_npy_header(HASH, 0))  # rewritten with the length at the end: numpy pads it for that

        def add(hashes: np.ndarray) -> None:
            f.write(hashes.astype(HASH, copy=False).tobytes())
            offsets.append(offsets[-1] + len(hashes))

        yield add
        header = _npy_header(HASH, offsets[-1])
        if len(header) != len(_npy_header(HASH, 0)):
            raise RuntimeError(f"{offsets[-1]} shingle hashes do not fit numpy's .npy header for {stem}")
        f.seek(0)
        f.write(header)
    with atomic.replacing(f"{stem}.offsets.npy", "wb") as f:
        np.save(f, np.frombuffer(offsets, dtype=OFFSET))


class ShingleTable:
    """Every task's shingle hashes, read from disk a document at a time: `table[(task, doc)]`
    is a document's sorted unique uint32 hashes. Read with `os.pread`, not memory-mapped:
    the pages a memory map touches stay resident, and over a whole corpus's candidates they
    grew the cluster stage by 440 MiB at 800 MB of text. Raises FileNotFoundError for a
    task that wrote none."""

    def __init__(self, folder: str):
        self.folder = folder
        self._starts: dict[int, tuple[int, int]] = {}  # task -> where its two arrays' data begin

    def _path(self, task: int, name: str) -> str:
        return os.path.join(self.folder, f"{task:05d}.{name}.npy")

    def _data_starts(self, task: int) -> tuple[int, int]:
        if task not in self._starts:
            starts = []
            for name in ("hashes", "offsets"):
                with open(self._path(task, name), "rb") as f:
                    header = {(1, 0): np.lib.format.read_array_header_1_0,
                              (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
                    header(f)  # leaves the file at the array's first byte
                    starts.append(f.tell())
            self._starts[task] = (starts[0], starts[1])
        return self._starts[task]

    def __getitem__(self, key: tuple[int, int]) -> np.ndarray:
        task, doc = key
        hashes_at, offsets_at = self._data_starts(task)
        start, end = np.frombuffer(_pread(self._path(task, "offsets"), 2 * OFFSET.itemsize,
                                          offsets_at + doc * OFFSET.itemsize), dtype=OFFSET)
        return np.frombuffer(_pread(self._path(task, "hashes"), int(end - start) * HASH.itemsize,
                                    hashes_at + int(start) * HASH.itemsize), dtype=HASH)


def _pread(path: str, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)  # opened per read: a corpus's tasks may outnumber open files
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two sorted arrays of distinct values (0 for two empty ones)."""
    if len(a) > len(b):
        a, b = b, a
    if not len(a):
        return 0.0
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    common = int(np.count_nonzero(b[at] == a))
    return common / (len(a) + len(b) - common)


def bands_of(pairs: Iterable[tuple[int, int, int, int]]) -> Iterator[list[tuple[int, int]]]:
    """The groups of documents that share one band value, from one datatrove `.dups` file.

    datatrove's MinhashDedupBuckets writes, per band, the pairs of documents adjacent in
    signature order that share the band: a group x1..xk arrives as (x1, x2), (x2, x3), ...
    A document appears once per band, so a pair continues the group when it starts where
    the pair before ended."""
    group: list[tuple[int, int]] = []
    for f1, d1, f2, d2 in pairs:
        if group and group[-1] != (f1, d1):
            yield group
            group = []
        group += [(f1, d1), (f2, d2)] if not group else [(f2, d2)]
    if group:
        yield group


class Clusters:
    """Union-find over (task, doc) documents; each cluster's root is its first document in
    corpus order (the one a build keeps, as the in-memory build keeps the first copy)."""

    def __init__(self):
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(self, x: tuple[int, int]) -> tuple[int, int]:
        parent = self.parent
        while parent.get(x, x) != x:  # path halving: iterative, so long chains cannot overflow the stack
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    def union(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            first, later = min(ra, rb), max(ra, rb)
            self.parent[later] = first
            self.parent.setdefault(first, first)

    def removed(self) -> Iterator[tuple[int, int]]:
        """Every document that is not its cluster's root, in corpus order."""
        return (x for x in sorted(self.parent) if self.find(x) != x)


def verify_band(group: list[tuple[int, int]], table: ShingleTable, threshold: float, clusters: Clusters) -> int:
    """Joins the documents of one band group whose exact Jaccard reaches `threshold`. Each
    document is compared with one member of every other cluster met earlier in the group
    (at most MAX_PEERS clusters a group: work linear in the group, however large), so a
    pair the adjacent-pairs chain hides (A, B, C with A~C) is still checked. Returns the
    comparisons made."""
    compared, peers, hashes = 0, [], {}  # peers: the first member of each cluster met in this group

    def shingles(doc):
        if doc not in hashes:
            hashes[doc] = table[doc]
        return hashes[doc]

    for doc in group:
        checked = {clusters.find(doc)}
        for peer in peers:
            root = clusters.find(peer)
            if root in checked:
                continue  # the same cluster as `doc`, or one already compared with
            checked.add(root)
            compared += 1
            if jaccard(shingles(peer), shingles(doc)) >= threshold:
                clusters.union(peer, doc)
        if len(peers) < MAX_PEERS and clusters.find(doc) not in {clusters.find(peer) for peer in peers}:
            peers.append(doc)
    return compared


class VerifiedCluster(PipelineStep):
    """Stands in for datatrove's MinhashDedupCluster: reads the `.dups` files of
    MinhashDedupBuckets, keeps the candidate pairs whose exact Jaccard (over
    `writing_shingles`' hashes in `shingles_folder`) reaches `threshold`, clusters them and
    writes the `<task>.remove` files (sorted uint32 document indices) MinhashDedupFilter
    reads. One task. Stats: candidates (pairs read), compared (Jaccards computed),
    to_remove."""

    type = "🫂 - DEDUP"
    name = "lm verified MinHash clusters"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, shingles_folder: str,
                 threshold: float):
        super().__init__()
        self.input_folder, self.output_folder = get_datafolder(input_folder), get_datafolder(output_folder)
        self.shingles_folder, self.threshold = shingles_folder, threshold

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        assert world_size == 1, "the cluster stage is one task"
        table, clusters = ShingleTable(self.shingles_folder), Clusters()
        with self.track_time():
            for name in self.input_folder.list_files(glob_pattern="*.dups"):
                with self.input_folder.open(name, "rb") as f:
                    for group in bands_of(read_tuples_from_file(f, "4I", lines_to_buffer=4096)):
                        self.stat_update("candidates", value=len(group) - 1)
                        self.stat_update("compared", value=verify_band(group, table, self.threshold, clusters))
            with self.output_folder.get_output_file_manager(mode="wb") as out:
                for task, doc in clusters.removed():
                    out.write(f"{task:06d}.remove", struct.pack("<I", doc))
                    self.stat_update("to_remove")
        yield from ()

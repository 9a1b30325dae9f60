"""`config.data.dedup` as datatrove's exact and MinHash dedup stages, meaning what it means in memory.

Exact: datatrove's ExactDedupSignature / ExactFindDedups / ExactDedupFilter over each
document's whole text (64-bit xxhash). Of a set of copies datatrove keeps the one of
highest priority, then the lowest document index within a task; the priority here falls
with the task's rank, so the copy kept is the first in corpus order, as in memory.

Near: candidates by MinHash LSH, verified by exact Jaccard. The signatures are the
in-memory build's own MinHash values (`cleaning.minhash`: its shingles of `shingle_words`
lower-cased whitespace words, each hashed to 32 bits, and its permutations), cut into `b`
bands of `r` values; datatrove's MinhashDedupBuckets pairs the documents that share a
band, which happens with probability 1 - (1 - s^r)^b for Jaccard similarity s. The
in-memory build removes every such pair, with datasketch's (b, r) balanced around the
threshold (0.8 and 128 permutations: 9 bands of 13, which find a pair at 0.8 only 2 times
in 5 and one at 0.9 93 times in 100: recall ~0.77 over pairs spread evenly on 0.8..0.95).
Here the bands are chosen for recall instead (`candidate_bands`: at least 0.99 at
`threshold - MARGIN`; 0.8: 17 bands of 5, 0.7: 24 of 4, 0.9: 15 of 8) and every candidate
is verified by the exact Jaccard similarity of the two documents' shingle-hash sets, which
`ShingleSignature` writes beside the signatures (`lm.data.build.near`): a pair is removed
when that reaches the threshold, and only then.

What still differs: in memory, a document is compared with the documents kept before it
(greedy, in order); here every verified pair is joined into clusters and the first
document of each cluster in corpus order is kept, so a chain A~B~C with A and C
dissimilar keeps A and C in memory but only A here.
"""

from __future__ import annotations

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.dedup import ExactDedupConfig, MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from lm.data import cleaning
from lm.data.build import near

MAX_TASKS = 65_534  # datatrove's exact-dedup priorities are 1..65535, one per task here
# LSH candidates: a pair MARGIN below the threshold is proposed at least CANDIDATE_RECALL of
# the time, so a pair at the threshold is missed well under 1% of the time.
MARGIN, CANDIDATE_RECALL = 0.05, 0.99


def document_bytes(doc: Document) -> bytes:
    return doc.text.encode("utf-8")  # xxhash hashes bytes


def first_task_first(doc: Document) -> int:
    """The exact-dedup priority of a document: higher for earlier tasks (earlier files)."""
    return MAX_TASKS + 1 - doc.metadata["task"]


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=document_bytes, document_priority=first_task_first,
                            hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def collision_probability(similarity, bands: int, rows: int):
    """The chance that two documents of Jaccard `similarity` (a float or an array) share at
    least one of `bands` bands of `rows` MinHash values: 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=float) ** rows) ** bands


def candidate_bands(threshold: float, num_perm: int, margin: float = MARGIN,
                    recall: float = CANDIDATE_RECALL) -> tuple[int, int]:
    """(bands, rows per band), bands * rows <= `num_perm`, that propose a pair of Jaccard
    `threshold - margin` (and so any pair at the threshold or above) with probability at
    least `recall`, and of those the one with the fewest candidates below the threshold
    (the least area under the S-curve on [0, threshold]: every one costs an exact Jaccard).
    Where none reaches `recall` (a threshold near `margin`, few permutations): one value a
    band, `num_perm` bands, the most recall LSH gives."""
    below, lowest = np.linspace(0.0, threshold, 513), max(threshold - margin, 0.0)
    best, fewest = (num_perm, 1), np.inf
    for rows in range(1, num_perm + 1):
        bands = next((b for b in range(1, num_perm // rows + 1)
                      if collision_probability(lowest, b, rows) >= recall), None)
        if bands is not None:
            spurious = np.trapezoid(collision_probability(below, bands, rows), below)
            if spurious < fewest:
                best, fewest = (bands, rows), spurious
    return best


def minhash_config(dedup: dict) -> MinhashConfig:
    """datatrove's MinHash settings for `config.data.dedup` (see the module docstring)."""
    bands, rows = candidate_bands(dedup["near_threshold"], dedup["num_perm"])
    # 32-bit: datasketch's default (affine32) MinHash values, which ShingleSignature stores.
    return MinhashConfig(n_grams=dedup["shingle_words"], num_buckets=bands, hashes_per_bucket=rows, seed=1,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


class _Whitespace(WordTokenizer):
    """Words split at whitespace; stands in for the NLTK tokenizer datatrove loads for English,
    which `ShingleSignature` never calls."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class ShingleSignature(MinhashDedupSignature):
    """datatrove's signature stage over the in-memory build's own MinHash values, which also
    writes each document's shingle hashes for the exact Jaccard check (`near.writing_shingles`
    into `shingles_folder`).

    datatrove's `run` asks `get_shingles(text)` for each document's shingles, in order, and
    hands them to `get_signature`; here the first hashes the in-memory build's shingles
    (`cleaning.shingles`) as datasketch does (the first 4 bytes of SHA-1), records their
    sorted unique hashes and returns the document's datasketch MinHash values over them
    (equal to `cleaning.minhash`'s), and the second cuts their first `bands * rows` into
    the bands the buckets stage compares.
    """

    name = "lm MinHash signatures"

    def __init__(self, output_folder: str, config: MinhashConfig, num_perm: int, shingles_folder: str):
        super().__init__(output_folder, config=config, language=_Whitespace())
        self.num_perm, self.shingles_folder = num_perm, shingles_folder
        self._add_shingles = None  # the running task's `writing_shingles` recorder
        self._permutations = None  # datasketch's for seed 1

    def run(self, data, rank: int = 0, world_size: int = 1):
        with near.writing_shingles(self.shingles_folder, rank) as self._add_shingles:
            super().run(data, rank, world_size)  # not a generator: it writes the signature files
        self._add_shingles = None
        yield from ()

    def get_shingles(self, text: str) -> np.ndarray:
        import datasketch  # see cleaning.minhash
        from datasketch.hashfunc import sha1_hash32

        shingles = cleaning.shingles(text, self.config.n_grams)
        hashes = np.unique(np.fromiter(map(sha1_hash32, shingles), dtype=near.HASH, count=len(shingles)))
        self._add_shingles(hashes)
        if self._permutations is None:  # drawn once a task: drawing them is a third of a short document's time
            self._permutations = datasketch.MinHash(num_perm=self.num_perm, seed=1).permutations
        signature = datasketch.MinHash(num_perm=self.num_perm, seed=1, scheme="affine32",
                                       permutations=self._permutations, hashfunc=int)  # hashed above
        signature.update_batch(hashes.tolist())
        return signature.hashvalues

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        used = shingles[:self.config.num_buckets * self.config.hashes_per_bucket]
        return [band.tolist() for band in np.split(used, self.config.num_buckets)]

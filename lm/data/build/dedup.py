"""`config.data.dedup` as datatrove's exact and MinHash dedup stages, meaning what it means in memory.

Exact: datatrove's ExactDedupSignature / ExactFindDedups / ExactDedupFilter over each
document's whole text (64-bit xxhash). Of a set of copies datatrove keeps the one of
highest priority, then the lowest document index within a task; the priority here falls
with the task's rank, so the copy kept is the first in corpus order, as in memory.

Near: datatrove's MinhashDedupSignature / Buckets / Cluster / Filter. Both builds use
banded MinHash LSH: `b` bands of `r` hashes, and two documents are duplicates when all
`r` hashes of any one band agree, which happens with probability 1 - (1 - s^r)^b for
Jaccard similarity s. datasketch's `MinHashLSH(threshold, num_perm)` (the in-memory
build) picks the (b, r) with b * r <= num_perm that minimises the false positive and
false negative areas around `threshold` (e.g. 0.8 and 128 permutations: 9 bands of 13;
0.7: 14 of 9); `minhash_config` takes that same (b, r) as datatrove's (num_buckets,
hashes_per_bucket), so `near_threshold` draws the same S-curve in both builds. The
signatures are the in-memory build's own MinHash values (`cleaning.minhash`: its
shingles of `shingle_words` lower-cased whitespace words, its hash and permutations),
not datatrove's (punctuation-stripping word tokenizer, other permutations), so the
pairs that share a band are the same pairs in both builds.

What still differs: in memory, a document is compared with the documents kept before it
(greedy, in order); datatrove joins every matching pair into clusters and keeps one
document per cluster (usually the first in corpus order, by its union-by-size rule), so a
chain A~B~C with A and C dissimilar keeps A and C in memory but only one of them here.
"""

from __future__ import annotations

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.dedup import ExactDedupConfig, MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from lm.data import cleaning

MAX_TASKS = 65_534  # datatrove's exact-dedup priorities are 1..65535, one per task here


def document_bytes(doc: Document) -> bytes:
    return doc.text.encode("utf-8")  # xxhash hashes bytes


def first_task_first(doc: Document) -> int:
    """The exact-dedup priority of a document: higher for earlier tasks (earlier files)."""
    return MAX_TASKS + 1 - doc.metadata["task"]


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=document_bytes, document_priority=first_task_first,
                            hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH chooses for `threshold` and `num_perm`."""
    import datasketch  # pulls in scipy: imported when a build starts, not with lm.data

    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def minhash_config(dedup: dict) -> MinhashConfig:
    """datatrove's MinHash settings for `config.data.dedup` (see the module docstring)."""
    bands, rows = lsh_bands(dedup["near_threshold"], dedup["num_perm"])
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
    """datatrove's signature stage over the in-memory build's own MinHash values.

    datatrove's `run` asks `get_shingles(text)` for a document's shingles and hands them
    to `get_signature`; here the first returns the document's datasketch MinHash values
    (`cleaning.minhash`: the in-memory build's shingles, hash and permutations) and the
    second cuts their first `bands * rows` into the bands datasketch's LSH compares, so
    two documents share a datatrove bucket exactly when they share an LSH band in memory.
    """

    name = "lm MinHash signatures"

    def __init__(self, output_folder: str, config: MinhashConfig, num_perm: int):
        super().__init__(output_folder, config=config, language=_Whitespace())
        self.num_perm = num_perm

    def get_shingles(self, text: str) -> np.ndarray:
        return cleaning.minhash(text, self.config.n_grams, self.num_perm).hashvalues

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        used = shingles[:self.config.num_buckets * self.config.hashes_per_bucket]
        return [band.tolist() for band in np.split(used, self.config.num_buckets)]

"""Documents -> the documents worth training on: quality rules (in the spirit of Gopher's),
exact and near deduplication, and the report of what each removed.

`clean(documents, rules, dedup)` keeps documents in order and returns them with a
`Report` that counts what came in, what each rule dropped, the duplicates removed and
what went out. A rule with value 0 is off. Near duplicates are found with MinHash LSH
(`datasketch`) over word n-gram shingles: a document whose estimated Jaccard similarity
to an earlier kept one reaches the threshold is dropped, so the first copy survives.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

import ml_collections

if TYPE_CHECKING:
    import datasketch

T = TypeVar("T")

# Gopher's thresholds (Rae et al. 2021, appendix A) for web text; off by default here
# because literary text (verse, plays) legitimately breaks several of them.
GOPHER_RULES = dict(min_words=50, max_words=100_000, max_non_alpha_fraction=0.2,
                    max_duplicate_line_fraction=0.3, max_top_bigram_fraction=0.2,
                    max_duplicate_ngram_fraction=0.15)


@dataclasses.dataclass
class Tally:
    documents: int = 0
    chars: int = 0

    def add(self, text: str) -> None:
        self.documents += 1
        self.chars += len(text)


@dataclasses.dataclass
class Report:
    """What cleaning did, in documents and characters."""

    read: Tally = dataclasses.field(default_factory=Tally)
    dropped: dict[str, Tally] = dataclasses.field(default_factory=dict)  # rule -> tally
    exact_duplicates: Tally = dataclasses.field(default_factory=Tally)
    near_duplicates: Tally = dataclasses.field(default_factory=Tally)
    kept: Tally = dataclasses.field(default_factory=Tally)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def words(text: str) -> list[str]:
    return text.split()


def non_alpha_fraction(text: str) -> float:
    """Non-alphabetic characters over non-whitespace characters."""
    chars = non_alpha = 0
    for char, count in collections.Counter(text).items():  # a document has ~100 distinct characters
        if not char.isspace():
            chars += count
            non_alpha += 0 if char.isalpha() else count
    return non_alpha / max(chars, 1)


def duplicate_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return (len(lines) - len(set(lines))) / max(len(lines), 1)


def top_bigram_fraction(text: str) -> float:
    """Characters in the most frequent word bigram's occurrences over all word characters."""
    ws = words(text)
    if len(ws) < 2:
        return 0.0
    counts = collections.Counter(zip(ws, ws[1:]))
    (first, second), count = counts.most_common(1)[0]
    return count * (len(first) + len(second)) / sum(map(len, ws))


def duplicate_ngram_fraction(text: str, n: int) -> float:
    """Fraction of word characters inside word n-grams that occur more than once."""
    ws = words(text)
    if len(ws) < n:
        return 0.0
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    counts = collections.Counter(grams)
    covered = [False] * len(ws)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(ws, covered) if c) / sum(map(len, ws))


def quality_rules(rules: ml_collections.ConfigDict) -> list[tuple[str, Callable[[str], bool]]]:
    """(name, fails) for each enabled rule, in the order they are checked."""
    checks = [
        ("min_chars", lambda t, v: len(t) < v),
        ("max_chars", lambda t, v: len(t) > v),
        ("min_words", lambda t, v: len(words(t)) < v),
        ("max_words", lambda t, v: len(words(t)) > v),
        ("max_non_alpha_fraction", lambda t, v: non_alpha_fraction(t) > v),
        ("max_duplicate_line_fraction", lambda t, v: duplicate_line_fraction(t) > v),
        ("max_top_bigram_fraction", lambda t, v: top_bigram_fraction(t) > v),
        ("max_duplicate_ngram_fraction",
         lambda t, v: duplicate_ngram_fraction(t, rules.duplicate_ngram_size) > v),
    ]
    return [(name, lambda t, check=check, value=rules[name]: check(t, value))  # bound now, not at call time
            for name, check in checks if rules[name]]


def shingles(text: str, size: int) -> set[bytes]:
    ws = words(text.lower())
    if len(ws) <= size:
        return {" ".join(ws).encode()}
    return {" ".join(ws[i:i + size]).encode() for i in range(len(ws) - size + 1)}


def minhash(text: str, size: int, num_perm: int) -> datasketch.MinHash:
    import datasketch  # imported when a corpus is built: it pulls in scipy, slow to load for every run

    m = datasketch.MinHash(num_perm=num_perm, seed=1, scheme="affine32", permutations=_permutations(num_perm))
    m.update_batch(list(shingles(text, size)))
    return m


@functools.cache
def _permutations(num_perm: int) -> tuple:
    """datasketch's permutations for `seed=1` (its default scheme, affine32): drawn once, not
    once per document (a third of the time MinHash took on short documents)."""
    import datasketch

    return datasketch.MinHash(num_perm=num_perm, seed=1).permutations


def clean(items: Iterable[T], rules: ml_collections.ConfigDict, dedup: ml_collections.ConfigDict,
          report: Report, text: Callable[[T], str] = lambda doc: doc.text) -> Iterator[T]:
    """The items (documents) whose `text` passes every rule and is not a duplicate of an earlier one."""
    import datasketch  # see minhash

    checks = quality_rules(rules)
    seen: set[bytes] = set()
    lsh = (datasketch.MinHashLSH(threshold=dedup.near_threshold, num_perm=dedup.num_perm)
           if dedup.near_threshold else None)
    for item in items:
        body = text(item)
        report.read.add(body)
        failed = next((name for name, fails in checks if fails(body)), None)
        if failed:
            report.dropped.setdefault(failed, Tally()).add(body)
            continue
        if dedup.exact:
            digest = hashlib.sha256(body.encode()).digest()
            if digest in seen:
                report.exact_duplicates.add(body)
                continue
            seen.add(digest)
        if lsh is not None:
            signature = minhash(body, dedup.shingle_words, dedup.num_perm)
            if lsh.query(signature):
                report.near_duplicates.add(body)
                continue
            lsh.insert(str(report.read.documents), signature)
        report.kept.add(body)
        yield item

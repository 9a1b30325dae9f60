"""A seeded synthetic corpus with known answers, for measuring a corpus build.

`generate(out_dir, size_bytes, seed)` writes JSONL shards (one `{"id", "text"}` object a
line, the documents `lm.data.documents` reads) of about `size_bytes`, made of the
embedded tiny Shakespeare's lines recombined at random (speaker labels dropped, so a
document reads as verse, not as a cast list), and plants:
- exact duplicates: later verbatim copies (one or two) of a clean document;
- near duplicates: a later copy of a clean document with words at random places
  replaced, so that its Jaccard similarity to the original over
  `lm.data.cleaning.shingles` (word n-grams, lower-cased) is a target drawn from
  `Mix.jaccard` (0.5 to 0.95), met within `TOLERANCE`;
- for each enabled quality rule (`lm.data.cleaning.quality_rules`), documents it drops:
  the first rule they break, in the order `cleaning.clean` checks them, is that rule.
Every other document passes every rule, and clean documents are not similar to each
other: two random draws of 20 to 120 lines from ~25,000 distinct lines share a line
rarely, and a shared line is a few shingles of hundreds (Jaccard ~0.01).

The answers go to `ground_truth.json` beside the shards (which ids are copies of which,
each near duplicate's original, target and true Jaccard, the rule each bad document
trips); `score` compares the documents a build kept with them. The same seed and sizes
write the same bytes. The directory is written whole or not at all
(`lm.files.atomic.write_directory`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import ml_collections

from lm.data import cleaning, corpora, documents
from lm.files import atomic

GROUND_TRUTH = "ground_truth.json"
VERSION = 1  # of what `generate` writes for a seed: a change makes a new corpus, never a reused one
TOLERANCE = 0.015  # a near duplicate's true Jaccard is within this of its target
# Gopher's values, and bounds on length: max_words is 4,000 (Gopher: 100,000) so the
# planted over-long documents are ~25 KB, not ~600 KB; clean documents are 0.8 to 5 KB.
RULES = {**cleaning.GOPHER_RULES, "min_chars": 200, "max_chars": 30_000, "max_words": 4_000,
         "duplicate_ngram_size": 5}


@dataclasses.dataclass(frozen=True)
class Mix:
    """What is planted, as fractions of the documents drawn."""

    exact: float = 0.03  # clean documents copied verbatim later (one or two copies each)
    near: float = 0.04  # clean documents copied later with words replaced
    bad: float = 0.003  # documents dropped by each enabled rule
    jaccard: tuple[float, float] = (0.5, 0.95)  # near duplicates' targets, uniform
    max_gap: int = 2000  # documents from an original to its copy, at most (copies cross shards)


@functools.lru_cache(maxsize=1)
def _lines() -> tuple[str, ...]:
    """The distinct lines of tiny Shakespeare with single spaces, speaker labels ("ROMEO:") left out."""
    text = documents.read_text(corpora.path("tinyshakespeare"))
    lines = {" ".join(line.split()) for line in text.split("\n")}
    return tuple(sorted(line for line in lines if line and not (line.endswith(":") and len(line.split()) <= 3)))


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    return tuple(sorted({w for line in _lines() for w in line.split()}))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def first_failure(text: str, checks: list[tuple[str, Callable[[str], bool]]]) -> str | None:
    """The first rule of `checks` (`cleaning.quality_rules`) that `text` breaks, or None."""
    return next((name for name, fails in checks if fails(text)), None)


def clean_document(rng: random.Random, checks) -> str:
    """20 to 120 distinct random lines that pass every rule of `checks`."""
    while True:
        text = "\n".join(rng.sample(_lines(), rng.randint(20, 120)))
        if first_failure(text, checks) is None:
            return text


def _grow(rng: random.Random, stop: Callable[[int, int], bool]) -> list[str]:
    """Random lines until `stop(chars, words)` of the lines so far."""
    lines, chars, words = [], 0, 0
    while not stop(chars, words):
        line = rng.choice(_lines())
        lines.append(line)
        chars, words = chars + len(line) + 1, words + len(line.split())
    return lines


def _insert(rng: random.Random, line: str, phrase: str) -> str:
    words = line.split()
    at = rng.randint(0, len(words))
    return " ".join(words[:at] + [phrase] + words[at:])


def _short(rng, rules):  # min_chars: a line or two
    lines = _grow(rng, lambda chars, _: chars >= rules["min_chars"] // 2)
    return "\n".join(lines)[:rules["min_chars"] - 1].strip()


def _long(rng, rules):  # max_chars
    return "\n".join(_grow(rng, lambda chars, _: chars > rules["max_chars"] + 100))


def _few_words(rng, rules):  # min_words: enough characters, too few words
    lines = _grow(rng, lambda _, words: words >= rules["min_words"])
    return "\n".join(lines[:-1])


def _many_words(rng, rules):  # max_words
    return "\n".join(_grow(rng, lambda _, words: words > rules["max_words"] + 10))


def _figures(rng, rules):  # max_non_alpha_fraction: a ledger, verse with amounts
    amounts = lambda: " ".join(f"{rng.randint(1, 99_999):,}.{rng.randint(0, 99):02d}" for _ in range(4))
    return "\n".join(f"{line} {amounts()}" for line in rng.sample(_lines(), rng.randint(20, 60)))


def _repeated_lines(rng, rules):  # max_duplicate_line_fraction: a footer after every few lines
    body, footer = rng.sample(_lines(), rng.randint(15, 30)), rng.sample(_lines(), 3)
    lines = []
    for i, line in enumerate(body):
        lines += [line] + (footer if i % 2 else [])
    return "\n".join(lines)


def _spam_bigram(rng, rules):  # max_top_bigram_fraction: one word pair in every line
    long_words = [w for w in _vocabulary() if len(w) >= 7 and w.isalpha()]
    bigram = f"{rng.choice(long_words)} {rng.choice(long_words)}"
    return "\n".join(_insert(rng, line, bigram) for line in rng.sample(_lines(), rng.randint(30, 60)))


def _repeated_phrases(rng, rules):  # max_duplicate_ngram_fraction: phrases recur inside lines
    lines = rng.sample(_lines(), rng.randint(40, 60))
    long_lines = [line for line in _lines() if len(line.split()) >= 8]
    for _ in range(5):
        phrase = " ".join(rng.choice(long_lines).split()[:8])
        for at in rng.sample(range(len(lines)), 3):
            lines[at] = _insert(rng, lines[at], phrase)
    return "\n".join(lines)


BAD = {"min_chars": _short, "max_chars": _long, "min_words": _few_words, "max_words": _many_words,
       "max_non_alpha_fraction": _figures, "max_duplicate_line_fraction": _repeated_lines,
       "max_top_bigram_fraction": _spam_bigram, "max_duplicate_ngram_fraction": _repeated_phrases}


def bad_document(rng: random.Random, rule: str, rules: dict, checks) -> str:
    """A document whose first broken rule of `checks` is `rule` (at the values in `rules`).
    Raises ValueError where the values make that impossible for the drafts here."""
    for _ in range(100):
        text = BAD[rule](rng, rules)
        if first_failure(text, checks) == rule:
            return text
    raise ValueError(f"no document breaks {rule}={rules[rule]} first among the rules {rules}; "
                     "use values nearer lm.data.synthetic.RULES")


def near_duplicate(rng: random.Random, text: str, target: float, size: int) -> tuple[str, float] | None:
    """(copy, Jaccard) of `text` with words at random places replaced, the Jaccard
    similarity of the copy's shingles (`cleaning.shingles(., size)`) to the original's as
    near `target` as one more or one fewer replacement allows; None if that misses it
    by more than TOLERANCE (a short document moves in large steps)."""
    lines = [line.split(" ") for line in text.split("\n")]
    places = [(i, j) for i, line in enumerate(lines) for j in range(len(line))]
    rng.shuffle(places)
    words = [rng.choice(_vocabulary()) for _ in places]  # drawn first: edit k is the same whatever the count
    original = cleaning.shingles(text, size)

    def edited(count: int) -> tuple[str, float]:
        copy = [list(line) for line in lines]
        for (i, j), word in zip(places[:count], words[:count]):
            copy[i][j] = word
        body = "\n".join(" ".join(line) for line in copy)
        return body, jaccard(original, cleaning.shingles(body, size))

    low, high = 0, len(places)  # similarity falls (weakly) with each replacement: bisect for the target
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if edited(middle)[1] >= target else (low, middle)
    best = min((edited(low), edited(high)), key=lambda pair: abs(pair[1] - target))
    return best if abs(best[1] - target) <= TOLERANCE and best[1] < 1.0 else None


class _Shards:
    """Writes JSONL lines into at most `count` shards `part-NNNNN.jsonl` of about
    `shard_bytes` each (the last takes what is left)."""

    def __init__(self, directory: str, shard_bytes: float, count: int):
        self.directory, self.shard_bytes, self.count = directory, shard_bytes, count
        self.names: list[str] = []
        self.bytes, self.documents, self._file = 0, 0, None

    def write(self, doc_id: str, text: str) -> None:
        if self._file is None or (self.bytes >= self.shard_bytes * len(self.names) and len(self.names) < self.count):
            self.close()
            self.names.append(f"part-{len(self.names):05d}.jsonl")
            self._file = open(os.path.join(self.directory, self.names[-1]), "w", encoding="utf-8", newline="\n")
        line = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n"
        self._file.write(line)
        self.bytes += len(line.encode("utf-8"))
        self.documents += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def generate(out_dir: str, size_bytes: int, seed: int = 0, shards: int = 1, rules: dict | None = None,
             shingle_words: int = 5, mix: Mix = Mix()) -> dict:
    """Writes about `size_bytes` of JSONL documents in `shards` files of about equal size
    (fewer if a tiny corpus fills them early), and `GROUND_TRUTH`, into `out_dir`, replacing
    what is there once the new one is whole. Returns the ground truth: `files` (names in
    `out_dir`), `documents`, `bytes`, `rules` (the quality rules planted for: `RULES`
    unless given), `shingle_words`, `exact_duplicates` (copy id -> original id),
    `near_duplicates` (copy id -> {"of": original id, "target", "jaccard"}) and `dropped_by`
    (id -> the rule that drops it). Raises ValueError for rule values no draft here can break."""
    rules = dict(RULES if rules is None else rules)
    truth = {"version": VERSION, "seed": seed, "size_bytes": size_bytes, "shards": shards,
             "shingle_words": shingle_words, "rules": rules, "mix": dataclasses.asdict(mix),
             "exact_duplicates": {}, "near_duplicates": {}, "dropped_by": {}}

    def fill(staging: str) -> None:
        out = _Shards(staging, size_bytes / shards, shards)
        try:
            for doc_id, text in _stream(random.Random(seed), rules, shingle_words, mix, truth,
                                        lambda: out.bytes >= size_bytes):
                out.write(doc_id, text)
        finally:
            out.close()
        truth.update(files=out.names, documents=out.documents, bytes=out.bytes)
        atomic.write_json(os.path.join(staging, GROUND_TRUTH), truth, indent=1)

    atomic.write_directory(out_dir, fill)
    return load(out_dir)  # as JSON has it (lists for tuples), as later runs read it


def _stream(rng: random.Random, rules: dict, size: int, mix: Mix, truth: dict,
            full: Callable[[], bool]) -> Iterator[tuple[str, str]]:
    """(id, text) of each document in corpus order, recording what is planted in `truth`;
    fresh documents until `full()`, then the copies still due."""
    checks = cleaning.quality_rules(ml_collections.ConfigDict(rules))
    kinds = [name for name, _ in checks]
    pending: list = []  # heap of (due position, tie-break, kind, original id, text, facts)
    n = 0
    while pending or not full():
        doc_id = f"d{n:09d}"
        if pending and (pending[0][0] <= n or full()):
            _, _, kind, original, text, facts = heapq.heappop(pending)
            if kind == "exact":
                truth["exact_duplicates"][doc_id] = original
            else:
                truth["near_duplicates"][doc_id] = {"of": original, **facts}
        elif rng.random() < mix.bad * len(kinds):
            rule = kinds[len(truth["dropped_by"]) % len(kinds)]  # in turn: a few cover every rule
            text = bad_document(rng, rule, rules, checks)
            truth["dropped_by"][doc_id] = rule
        else:
            text = clean_document(rng, checks)
            for k, (kind, body, facts) in enumerate(_copies(rng, text, size, mix, checks)):
                heapq.heappush(pending, (n + rng.randint(1, mix.max_gap), 2 * n + k, kind, doc_id, body, facts))
        yield doc_id, text
        n += 1


def _copies(rng: random.Random, text: str, size: int, mix: Mix, checks) -> list[tuple[str, str, dict]]:
    """(kind, text, facts) of the copies of a fresh clean document to plant later: none,
    one or two exact copies, or one near duplicate."""
    u = rng.random()
    if u < mix.exact:
        return [("exact", text, {})] * rng.randint(1, 2)
    if u < mix.exact + mix.near:
        target = rng.uniform(*mix.jaccard)
        made = near_duplicate(rng, text, target, size)
        if made and mix.jaccard[0] <= made[1] <= mix.jaccard[1] and first_failure(made[0], checks) is None:
            return [("near", made[0], {"target": round(target, 6), "jaccard": round(made[1], 6)})]
    return []


def load(out_dir: str) -> dict:
    """The ground truth of the corpus in `out_dir` (FileNotFoundError if it is not whole)."""
    with open(os.path.join(out_dir, GROUND_TRUTH), encoding="utf-8") as f:
        return json.load(f)


def files(out_dir: str, truth: dict) -> list[str]:
    """The corpus's shards, in corpus order."""
    return [os.path.join(os.path.abspath(out_dir), name) for name in truth["files"]]


def read(out_dir: str, truth: dict) -> Iterator[tuple[str, str]]:
    """(id, text) of every document in corpus order."""
    for path in files(out_dir, truth):
        for _, record in documents.read_jsonl(path):
            yield record["id"], record["text"]


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def score(truth: dict, corpus: Iterable[tuple[str, str]], kept: Iterable[str], threshold: float) -> dict:
    """How the documents a build kept (`kept`: their texts, any order) match the ground
    truth of the corpus (`corpus`: (id, text) of every document, as `read` gives them).

    Returns: `kept` (documents); `bad_kept` (rule -> its planted documents kept: 0 where the
    rule works); `copies_kept` (planted exact copies kept beyond one a text: 0 where exact
    dedup works); near dedup at `threshold`: `above` (planted pairs with true Jaccard >=
    threshold), `recall` (of those, the fraction with exactly one of the two kept),
    `below` (pairs under it), `false_positives` (documents removed that no pair at or
    above the threshold explains: of a pair below it, any other clean document, or both
    of a pair above it), `bands` ("0.80" -> [pairs with one removed, pairs] in [0.80,
    0.85)); `kept_ids` (ids kept outside near pairs; identical texts count as their first
    id): two builds with the same rules and exact dedup keep the same. Raises ValueError
    for a kept text that is no document of the corpus (a build that normalised text).
    """
    first_of: dict[bytes, str] = {}
    for doc_id, text in corpus:
        first_of.setdefault(_digest(text), doc_id)
    counts: Counter = Counter()
    for text in kept:
        doc_id = first_of.get(_digest(text))
        if doc_id is None:
            raise ValueError(f"a kept document is not in the corpus (it starts {text[:60]!r}): score a build "
                             "with config.data.normalize='none'")
        counts[doc_id] += 1
    pairs = truth["near_duplicates"]
    in_pairs = set(pairs) | {pair["of"] for pair in pairs.values()}
    bad = truth["dropped_by"]
    clean_lost = len(set(first_of.values()) - bad.keys() - in_pairs - counts.keys())
    near = _near_scores(pairs, counts, threshold)
    lost = near.pop("lost")
    return {"kept": sum(counts.values()), "bad_kept": dict(Counter(bad[i] for i in counts if i in bad)),
            "copies_kept": sum(counts[o] - 1 for o in set(truth["exact_duplicates"].values()) if counts[o] > 1),
            **near, "false_positives": lost + clean_lost,
            "kept_ids": frozenset(counts.keys() - in_pairs)}


def _near_scores(pairs: dict, counts: Counter, threshold: float) -> dict:
    above = below = recalled = lost = 0
    bands: dict[str, list[int]] = {}
    for copy, pair in pairs.items():
        kept_copy, kept_original = counts[copy] > 0, counts[pair["of"]] > 0
        band = bands.setdefault(f"{min(int(pair['jaccard'] * 20), 19) / 20:.2f}", [0, 0])
        band[0] += not (kept_copy and kept_original)
        band[1] += 1
        if pair["jaccard"] >= threshold:
            above += 1
            recalled += kept_copy != kept_original
            lost += not (kept_copy or kept_original)
        else:
            below += 1
            lost += not (kept_copy and kept_original)
    return {"above": above, "recall": recalled / above if above else float("nan"), "below": below,
            "bands": dict(sorted(bands.items())), "lost": lost}

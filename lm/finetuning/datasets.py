"""A task's rows: from JSONL files, or built from the embedded corpus.

`shakespeare_speakers`: who speaks this speech? Each speech of `task.speakers` in tiny
Shakespeare (the text between a "NAME:" line and the next blank line) is one example.

`shakespeare_word_order`: is this line as Shakespeare wrote it, or are its words
shuffled? (Acceptability, like CoLA or BLiMP: a model that has learned the language
should tell.) Each verse or prose line of 5 or more words is one example; a seeded half
of them have their words permuted. Lines are lower-cased and stripped of punctuation,
so only the order of the words tells the classes apart.

Examples go to train / validation / test by a hash of their position (70/15/15), so
the split never changes between runs or machines.
"""

from __future__ import annotations

import hashlib
import random
import string

import ml_collections

from lm.config import choices
from lm.data import corpora, documents
from lm.errors import UsageError
from lm.finetuning.tasks import read_jsonl

SPLITS = ("train", "validation", "test")
BUILDERS = choices.TASK_BUILDERS


def rows(task: ml_collections.ConfigDict) -> dict[str, list[dict]]:
    """{"train", "validation"[, "test"]} -> rows of the task."""
    if task.builder:
        if task.builder not in BUILDERS:
            raise UsageError(f"task.builder={task.builder!r} is not one of {BUILDERS}. Fix: pick one, or set "
                              "task.train_file and task.validation_file instead.")
        if task.builder == "shakespeare_word_order":
            return shakespeare_word_order(task.max_examples)
        return shakespeare_speakers(tuple(task.speakers))
    if not task.train_file or not task.validation_file:
        raise UsageError("the task has no data. Fix: set task.train_file and task.validation_file (JSONL), or "
                          "task.builder.")
    out = {"train": read_jsonl(task.train_file), "validation": read_jsonl(task.validation_file)}
    if task.test_file:
        out["test"] = read_jsonl(task.test_file)
    return out


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of a play text in tiny Shakespeare's layout."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lines[0][:-1], "\n".join(lines[1:])))
    return out


def split_of(index: int) -> str:
    bucket = int(hashlib.sha256(str(index).encode()).hexdigest(), 16) % 100
    return "train" if bucket < 70 else "validation" if bucket < 85 else "test"


def _corpus_text() -> str:
    return documents.read_text(corpora.path("tinyshakespeare"))


def shakespeare_word_order(max_examples: int = 0, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    lines = [line for _, speech in speeches(_corpus_text()) for line in speech.split("\n") if len(line.split()) >= 5]
    if max_examples:
        lines = rng.sample(lines, min(max_examples, len(lines)))
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for i, line in enumerate(lines):
        original = [w.strip(string.punctuation).lower() for w in line.split()]
        words, label = list(original), "original"
        if rng.random() < 0.5:
            while words == original:
                rng.shuffle(words)
            label = "shuffled"
        out[split_of(i)].append({"text": " ".join(w for w in words if w), "label": label})
    return out


def shakespeare_speakers(speakers: tuple[str, ...]) -> dict[str, list[dict]]:
    all_speeches = speeches(_corpus_text())
    known = {name for name, _ in all_speeches}
    unknown = [s for s in speakers if s not in known]
    if len(speakers) < 2 or unknown:
        raise UsageError(f"task.speakers={speakers} needs 2 or more speakers of the corpus (unknown: {unknown}). "
                          "Fix: use names like 'ROMEO', 'MENENIUS', 'PETRUCHIO', 'DUKE VINCENTIO'.")
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for i, (name, speech) in enumerate(all_speeches):
        if name in speakers:
            out[split_of(i)].append({"text": speech, "label": name})
    return out

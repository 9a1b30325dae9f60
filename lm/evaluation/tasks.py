"""Evaluation files read and checked before any model loads: each problem one `TaskError`
naming the flag or file, the row and the field, and the format to fix it to.

Formats (JSONL: one JSON object per line):
- multiple choice (`--multiple_choice`, `--fewshot_file`): {"context", "choices", "answer"}
- generation (`--generation`): {"prompt", "references"} (one reference or a list)
- predictions (`--predictions`): {"label", "prediction"[, a protected column]}
- WEAT (`--weat`, one JSON object): word lists "X", "Y", "A", "B"
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from lm.data import documents
from lm.errors import UsageError
from lm.files import paths


class TaskError(UsageError):
    """An evaluation file or row that does not have the format its evaluation reads."""


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _present(value: Any) -> bool:
    return True


# kind -> (the fields each row needs: name, test, what it must be), an example row.
FORMATS: dict[str, tuple[tuple[tuple[str, Callable[[Any], bool], str], ...], str]] = {
    "multiple-choice": ((("context", _text, "text"), ("choices", _texts, "a non-empty list of texts"),
                         ("answer", _index, "a 0-based index into choices")),
                        '{"context": ..., "choices": [...], "answer": index}'),
    "generation": ((("prompt", _text, "text"), ("references", lambda v: _text(v) or _texts(v),
                                                "a text or a non-empty list of texts")),
                   '{"prompt": "...", "references": ["...", ...]}'),
    "predictions": ((("label", _present, ""), ("prediction", _present, "")),
                    '{"label": ..., "prediction": ...[, "<protected column>": ...]}'),
}
WORD_SETS = '{"X": ["rose", ...], "Y": ["wasp", ...], "A": ["love", ...], "B": ["hate", ...]}'


def read_rows(path: str, flag: str, kind: str) -> list[dict]:
    """The rows of the JSONL file `path` (given as `flag`), each checked as a `kind` row
    (a key of FORMATS). Raises TaskError (or CorpusError for a file that is not JSONL)."""
    example = FORMATS[kind][1]
    if not os.path.exists(path):
        raise TaskError(f"{flag}={path} does not exist. Fix: give a JSONL file of {kind} rows, one per line, "
                        f"e.g. {example}.")
    rows = []
    for where, row in documents.read_jsonl(path, example):
        if not isinstance(row, dict):
            raise TaskError(f"{where} is not a JSON object. Fix: one {kind} row per line, e.g. {example}.")
        rows.append(row)
    check_rows(rows, kind, f" of {path}")
    return rows


def check_rows(rows: Sequence[dict], kind: str, source: str = "") -> None:
    """Raises TaskError naming the first row (and `source`, e.g. " of tasks/mc.jsonl")
    that lacks a field of `kind`'s format or holds a value of the wrong type; a
    multiple-choice answer must index its choices."""
    fields, example = FORMATS[kind]
    for i, row in enumerate(rows):
        missing = sorted(name for name, _, _ in fields if name not in row)
        if missing:
            raise TaskError(f"{kind} row {i}{source} lacks {missing}. Fix: each row is {example}.")
        for name, test, what in fields:
            if not test(row[name]):
                raise TaskError(f"{kind} row {i}{source} has {name}={json.dumps(row[name])[:60]}, not {what}. "
                                f"Fix: each row is {example}.")
        if kind == "multiple-choice" and not 0 <= row["answer"] < len(row["choices"]):
            raise TaskError(f"multiple-choice row {i}{source} has answer {row['answer']} but {len(row['choices'])} "
                            "choices. Fix: answer is a 0-based index into choices.")


def read_word_sets(path: str, flag: str = "--weat") -> dict[str, list[str]]:
    """WEAT's word lists X, Y, A, B from the JSON file `path`. Raises TaskError or PathError."""
    if not os.path.exists(path):
        raise TaskError(f"{flag}={path} does not exist. Fix: a JSON file with word lists X, Y, A, B, "
                        f"e.g. {WORD_SETS}.")
    sets = paths.loads(documents.read_text(path), path, f"a JSON object of word lists, e.g. {WORD_SETS}.")
    if not isinstance(sets, dict) or not all(_texts(sets.get(name)) for name in "XYAB"):
        bad = "XYAB" if not isinstance(sets, dict) else [name for name in "XYAB" if not _texts(sets.get(name))]
        raise TaskError(f"{path}: the word set(s) {', '.join(bad)} are missing or not lists of words. "
                        f"Fix: give X, Y, A and B, e.g. {WORD_SETS}.")
    return {name: sets[name] for name in "XYAB"}

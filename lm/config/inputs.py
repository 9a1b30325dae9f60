"""What `data.files` patterns and `data.where` filters mean, below the errors of either side.

Config validation (`lm.config.validation`, raising `ConfigError` at config time) and the
corpus readers (`lm.data.sources`, raising `CorpusError` while building) share these, so
a pattern or filter means the same in both places:

- `matches(pattern)`: the corpus inputs one path, directory or glob names.
- `parse_where(text)`: a metadata filter such as `language == "en" and score >= 3` as
  conditions, parsed with Python's parser and a whitelist of its nodes (never evaluated).
"""

from __future__ import annotations

import ast
import glob
import json
import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from lm.config.choices import CORPUS_SUFFIXES

# A Hugging Face `datasets` folder written by `Dataset.save_to_disk` holds this file
# (listing its Arrow shards); a `DatasetDict`'s folder holds one such folder per split.
HF_STATE = "state.json"
HF_SPLITS = "dataset_dict.json"

_OPERATORS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
WHERE_EXAMPLE = "'language == \"en\" and score >= 3'"


class Condition(NamedTuple):
    """One comparison of a filter: `column op value` (op one of == != < <= > >=)."""

    column: str
    op: str
    value: str | int | float | bool


def is_hf_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `datasets.Dataset.save_to_disk`."""
    return os.path.isfile(os.path.join(path, HF_STATE))


def hf_splits(path: str) -> list[str]:
    """The split names of a `datasets.DatasetDict.save_to_disk` folder ([] for any other path)."""
    try:
        with open(os.path.join(path, HF_SPLITS), encoding="utf-8") as f:
            return list(json.load(f).get("splits", []))
    except (OSError, ValueError, AttributeError):
        return []


def matches(pattern: str) -> list[str]:
    """The corpus inputs `pattern` names, sorted: a file; a `save_to_disk` folder; every file
    ending in a `CORPUS_SUFFIXES` suffix and every `save_to_disk` folder under a directory
    (recursively, following links, each real folder once: a link loop ends); or what a glob
    (`**` recurses) matches of those. `~` is expanded and the paths are absolute; an input
    reached by several paths (links) is named once. Raises ValueError (the caller's error
    type wraps it) for a `DatasetDict` folder, whose splits must be named one by one, and
    OSError for a directory that cannot be listed."""
    expanded = os.path.abspath(os.path.expanduser(pattern))
    if os.path.isdir(expanded) and not is_hf_dataset(expanded):
        _refuse_splits(expanded)
        candidates = _walk(expanded)
    else:
        candidates = glob.glob(expanded, recursive=True)
    found: dict[str, str] = {}
    for path in sorted(candidates):
        _refuse_splits(path)
        inside_hf = is_hf_dataset(os.path.dirname(path))  # a save_to_disk folder's own files
        if (os.path.isfile(path) and path.endswith(CORPUS_SUFFIXES) and not inside_hf) or is_hf_dataset(path):
            found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def unique(paths: Iterable[str], into: dict[str, str]) -> None:
    """Adds `paths` to `into` (real path -> the path first named), so an input named twice,
    or through a link, is read once, at its first place."""
    for path in paths:
        into.setdefault(os.path.realpath(path), path)


def _walk(top: str) -> Iterator[str]:
    """The paths under `top` as `glob(top/**/*)` finds them (no hidden names), but entering
    each real directory once. Raises OSError for a directory that cannot be listed."""
    def unlistable(error: OSError) -> None:
        raise error

    visited = set()
    for root, dirs, names in os.walk(top, followlinks=True, onerror=unlistable):
        if os.path.realpath(root) in visited:
            dirs[:] = []
            continue
        visited.add(os.path.realpath(root))
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        yield from (os.path.join(root, name) for name in dirs + names if not name.startswith("."))


def _refuse_splits(path: str) -> None:
    if splits := hf_splits(path):
        raise ValueError(f"{path} is a datasets.DatasetDict folder with splits {', '.join(splits)}; name the "
                         f"split to read, e.g. {os.path.join(path, splits[0])}")


def parse_where(text: str) -> tuple[Condition, ...]:
    """The conditions of a filter `text` (all must hold): comparisons `column op literal`
    joined by `and`, a literal a quoted string, a number, True or False; "" has none.
    Raises ValueError saying what is wrong, with an example."""
    if not text.strip():
        return ()
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"is not a filter ({e.msg}); write comparisons joined by `and`, e.g. "
                         f"{WHERE_EXAMPLE}") from None
    parts = tree.values if isinstance(tree, ast.BoolOp) and isinstance(tree.op, ast.And) else [tree]
    return tuple(_condition(part) for part in parts)


def _condition(node: ast.expr) -> Condition:
    shape = "each condition must be `column op literal` with op one of == != < <= > >= and a quoted " \
            f"string, number, True or False, joined by `and` (no `or`, `not`, calls or arithmetic), e.g. " \
            f"{WHERE_EXAMPLE}"
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _OPERATORS
            and isinstance(node.left, ast.Name)):
        raise ValueError(f"has {ast.unparse(node)!r}: {shape}")
    literal, sign = node.comparators[0], 1
    if isinstance(literal, ast.UnaryOp) and isinstance(literal.op, ast.USub):  # -3 parses as -(3)
        literal, sign = literal.operand, -1
    value = literal.value if isinstance(literal, ast.Constant) else None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number or (sign == 1 and isinstance(value, (str, bool)))):
        raise ValueError(f"has {ast.unparse(node)!r}: {shape}")
    op = _OPERATORS[type(node.ops[0])]
    if isinstance(value, bool) and op not in ("==", "!="):
        raise ValueError(f"has {ast.unparse(node)!r}: compare a True/False column with == or !=")
    return Condition(node.left.id, op, sign * value if number else value)

"""Paths a command is given, checked before its work: outputs that can be written and
JSON files that can be read, each problem one `PathError` naming the flag or file and the fix.

An output file is written whole by `lm.files.atomic` (a temporary beside it, renamed into
place), so its directory must exist and the path must not be a directory. An output
directory is made on demand, so it may be missing, but neither it nor any parent may be a
file. Checked up front, a wrong path fails in a second rather than after the scoring,
fitting or training whose result it was to hold; nothing on disk is touched.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lm.errors import UsageError


class PathError(UsageError):
    """An input or output path that cannot work; the message names it and the fix."""


def check_output_file(path: str, flag: str) -> None:
    """Raises PathError unless the file `path` (given as `flag`, e.g. "--output") can be
    written: its directory exists and is a writable directory, and `path` is a regular
    file or absent (not a directory, a device or a broken link)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise PathError(f"{flag}={path} is a directory; {flag} names the file to write. Fix: give a file path, "
                        f"e.g. {flag}={os.path.join(path, 'results.json')}.")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise PathError(f"{flag}={path} exists and is not a regular file. Fix: give the path of a new or "
                        "ordinary file.")
    if not os.path.isdir(directory):
        what = "does not exist" if not os.path.lexists(directory) else "is not a directory"
        raise PathError(f"{flag}={path}: its directory {directory} {what}. Fix: create the directory first "
                        f"(mkdir -p {directory}), or write somewhere else.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PathError(f"{flag}={path}: the directory {directory} is not writable. Fix: write somewhere else.")


def check_new_file(path: str, flag: str) -> None:
    """Raises PathError unless `path` (given as `flag`) names a file that does not exist yet
    (a command that never replaces a file) in a directory that exists or can be made."""
    if os.path.isdir(path):
        raise PathError(f"{flag}={path} is a directory. Fix: give a file path in it, e.g. "
                        f"{flag}={os.path.join(path, 'out')}.")
    if os.path.lexists(path):
        raise PathError(f"{flag}={path} exists, and this command never replaces a file. Fix: choose a new path, "
                        "or delete the old file first.")
    problem = directory_problem(os.path.dirname(os.path.abspath(path)))  # made on demand
    if problem:
        raise PathError(f"{flag}={path}: {problem}. Fix: choose a path in a writable directory.")


def check_output_dir(path: str, flag: str) -> None:
    """Raises PathError unless the directory `path` (given as `flag`) exists or can be made:
    it is not a file, and its nearest existing parent is a writable directory."""
    problem = directory_problem(path)
    if problem:
        raise PathError(f"{flag}={path}: {problem}. Fix: give a directory path that runs through writable "
                        "directories only (it is created when missing).")


def directory_problem(path: str) -> str | None:
    """Why the directory `path` cannot be used or created, as a sentence naming the file in
    the way (`path` is a file, or lies under one) or the unwritable folder; None if it can.
    Checked before expensive work, so a writer fails on the path before it loads or trains."""
    path = os.path.abspath(path.rstrip("/") or "/")
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a directory"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{path} lies under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f", where {path} would be made,"
        return f"{existing}{where} is not writable"
    return None


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def loads(text: str, where: str, fix: str, error: type[UsageError] = PathError) -> Any:
    """`json.loads(text)`; `error` naming `where` (a file, or file:line), the syntax error
    with its line and column, and `fix` when the text is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not JSON ({e.msg}: line {e.lineno} column {e.colno}). Fix: {fix}") from None


def read_json(path: str, fix: str, error: type[UsageError] = PathError, kind: type | None = None) -> Any:
    """The JSON value in the file `path` (UTF-8, a byte-order mark allowed), which must be a
    `kind` (e.g. dict; None: any value). Raises `error` naming `path`, what is wrong and
    `fix` when the file is missing, a directory, unreadable, not UTF-8 JSON, or another kind."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except IsADirectoryError:
        raise error(f"{path} is a directory, not a JSON file. Fix: {fix}") from None
    except UnicodeDecodeError as e:
        raise error(f"cannot read {path} (not UTF-8 at byte {e.start}: a binary or damaged file). Fix: {fix}") from None
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror}). Fix: {fix}") from None
    value = loads(text, path, fix, error)
    if kind is not None and not isinstance(value, kind):
        raise error(f"{path} holds a JSON {_JSON_TYPES.get(type(value), 'null')}, not the "
                    f"{_JSON_TYPES.get(kind, kind.__name__)} lm expects. Fix: {fix}")
    return value

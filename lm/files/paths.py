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


def check_output_dir(path: str, flag: str) -> None:
    """Raises PathError unless the directory `path` (given as `flag`) exists or can be made:
    it is not a file, and its nearest existing parent is a writable directory."""
    absolute = os.path.abspath(path)
    if os.path.lexists(absolute) and not os.path.isdir(absolute):
        raise PathError(f"{flag}={path} is a file, not a directory. Fix: give a directory (it is created when "
                        "missing), or move the file away.")
    ancestor = absolute
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise PathError(f"{flag}={path}: {ancestor} is a file, so no directory can be made under it. Fix: give "
                        "a directory path that runs through directories only.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PathError(f"{flag}={path}: {ancestor} is not writable. Fix: write somewhere else.")


def loads(text: str, where: str, fix: str) -> Any:
    """`json.loads(text)`; PathError naming `where` (a file, or file:line), the syntax
    error with its line and column, and `fix` when the text is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PathError(f"{where} is not JSON ({e.msg}: line {e.lineno} column {e.colno}). Fix: {fix}") from None


def read_json(path: str, fix: str) -> Any:
    """The JSON value in the file `path` (UTF-8, a byte-order mark allowed); PathError
    naming the path and `fix` when it is missing, unreadable or not JSON."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"not UTF-8 at byte {e.start}"
        raise PathError(f"cannot read {path} ({reason}). Fix: {fix}") from None
    return loads(text, path, fix)

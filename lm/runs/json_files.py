"""Reading the JSON files that describe runs, exports and checkpoints (config.json,
tokenizer.json, export.json, a Hugging Face checkpoint's config files): a missing,
unreadable or malformed file is one UsageError naming the file and the fix, never a
JSONDecodeError traceback."""

from __future__ import annotations

import json
from typing import Any

from lm.errors import UsageError

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def read_json(path: str, fix: str, error: type[UsageError] = UsageError, kind: type | None = dict) -> Any:
    """The JSON value in the file `path`, which must be a `kind` (default an object; None:
    any value). Raises `error` naming `path`, what is wrong with it, and `fix`, if the file
    is missing, is a directory, cannot be read, is not UTF-8 JSON, or holds another kind."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise error(f"{path} does not exist. Fix: {fix}") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory, not a JSON file. Fix: {fix}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text, so not JSON (a binary or damaged file). Fix: {fix}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; a truncated or "
                    f"hand-edited file?). Fix: {fix}") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror}). Fix: {fix}") from None
    if kind is not None and not isinstance(value, kind):
        raise error(f"{path} holds a JSON {_JSON_TYPES.get(type(value), 'null')}, not the "
                    f"{_JSON_TYPES.get(kind, kind.__name__)} lm expects. Fix: {fix}")
    return value

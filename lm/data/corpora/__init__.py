"""Corpora shipped with `lm` (each folder holds the text and a provenance README)."""

import pathlib

_HERE = pathlib.Path(__file__).parent


def path(name: str) -> str:
    """Absolute path of the embedded corpus `name` (e.g. "tinyshakespeare")."""
    return str(_HERE / name / "input.txt")

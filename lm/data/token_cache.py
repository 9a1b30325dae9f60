"""A built dataset's token cache: each split's files, and reading them.

`<data_dir>/tokens/<dataset>/<tokenizer id>/` holds, per split, `<split>.tokens.npy`
(int32: the documents' ids joined by `<eos>`), `<split>.docs.npy` (int64
[num_documents, 2]: each document's start and length in the stream) and `<split>.json`
(`{"bytes": UTF-8 bytes of the split's text}`, for bits per byte). The json is written
last (`lm.data.build.tokens`), so a split is cached once all three exist.
"""

from __future__ import annotations

import json
import os

import numpy as np

NAMES = ("tokens.npy", "docs.npy", "json")


def paths(cache_dir: str, split: str) -> dict[str, str]:
    """The split's cache files: "tokens.npy", "docs.npy", "json" -> path."""
    return {name: os.path.join(cache_dir, f"{split}.{name}") for name in NAMES}


def is_cached(cache_dir: str, split: str) -> bool:
    return all(os.path.exists(path) for path in paths(cache_dir, split).values())


def load(cache_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(stream, memory-mapped; documents; UTF-8 bytes) of a cached split."""
    files = paths(cache_dir, split)
    with open(files["json"], encoding="utf-8") as f:
        num_bytes = json.load(f)["bytes"]
    return np.load(files["tokens.npy"], mmap_mode="r"), np.load(files["docs.npy"]), num_bytes

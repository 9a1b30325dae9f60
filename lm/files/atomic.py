"""Write-then-rename: a file or directory that appears whole or not at all.

A crash, a full disk or a preemption mid-write leaves the old file (or nothing) at the
path and a stray temporary beside it, never a half-written file that a later reader or a
resumed run would trust. `os.replace` is atomic on POSIX filesystems; the temporary's
name carries the process id, so processes writing the same path never share one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any


def _temporary(path: str) -> str:
    return f"{os.path.abspath(path)}.tmp-{os.getpid()}"


@contextlib.contextmanager
def replacing(path: str, mode: str = "w") -> Iterator[IO]:
    """A file opened for writing (`mode` "w" for UTF-8 text or "wb") whose content replaces
    `path` when the block ends without an exception; on an exception `path` is untouched."""
    temporary = _temporary(path)
    try:
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path: str, text: str) -> None:
    with replacing(path) as f:
        f.write(text)


def write_bytes(path: str, data: bytes) -> None:
    with replacing(path, "wb") as f:
        f.write(data)


def write_json(path: str, value: Any, **dump_options) -> None:
    """`json.dump(value, f, **dump_options)` into `path`, whole or not at all."""
    with replacing(path) as f:
        json.dump(value, f, **dump_options)


def write_directory(path: str, fill: Callable[[str], None]) -> None:
    """Makes the directory `path` from what `fill(staging)` writes into a staging directory
    beside it. An existing `path` is replaced only once the new one is whole (it is moved
    aside, the staging directory renamed into place, then the old one deleted)."""
    path = os.path.abspath(path.rstrip("/"))
    staging, old = f"{path}.partial-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        fill(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)

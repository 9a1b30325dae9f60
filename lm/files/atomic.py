"""Write-then-rename: a file or directory that appears whole or not at all.

A crash, a full disk or a preemption mid-write leaves the old file (or nothing) at the
path and a stray temporary beside it, never a half-written file that a later reader or a
resumed run would trust. `os.replace` is atomic on POSIX filesystems; the temporary's
name carries the host and process id, so processes writing the same path never share one,
and a temporary left by a killed writer is removed when this host next writes that path
(only if its process no longer runs: a live writer's temporary is never touched).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from typing import IO, Any

TEMPORARY, STAGING, MOVED_ASIDE = ".tmp", ".partial", ".old"  # suffixes of what a writer puts beside a path


def _beside(path: str, suffix: str) -> str:
    """`path` + `suffix` + "-<host>-<pid>": this process's temporary name for `path`."""
    return f"{os.path.abspath(path)}{suffix}-{socket.gethostname()}-{os.getpid()}"


def _temporary(path: str) -> str:
    remove_stale(path)
    return _beside(path, TEMPORARY)


def remove_stale(path: str) -> None:
    """Removes the temporaries and staging directories beside `path` that a writer on this
    host left when it was killed (its process no longer runs). A directory moved aside is
    removed only while `path` exists: if a writer died between its two renames, the moved
    copy is the only whole one, and it stays."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        for suffix in (TEMPORARY, STAGING, MOVED_ASIDE):
            stamp = entry[len(name) + len(suffix) + 1:] if entry.startswith(f"{name}{suffix}-") else None
            if stamp is None or not _is_dead_writer_here(stamp):
                continue
            if suffix != MOVED_ASIDE or os.path.exists(path):
                _remove(os.path.join(parent, entry))


def _is_dead_writer_here(stamp: str) -> bool:
    """Whether "<host>-<pid>" names this host and a process that no longer runs."""
    host, _, pid = stamp.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs under another user
        return False
    return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


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


def write_directory(path: str, fill: Callable[[str], None], replace: bool = True) -> None:
    """Makes the directory `path` from what `fill(staging)` writes into a staging directory
    beside it. With `replace`, an existing `path` is replaced only once the new one is whole
    (it is moved aside, the staging directory renamed into place, then the old one deleted).
    Without it `path` must be new (or an empty directory): the rename refuses a non-empty
    one, so of two writers racing to create `path` one wins and the other gets
    FileExistsError, its staging directory removed."""
    path = os.path.abspath(path.rstrip("/"))
    staging, old = _beside(path, STAGING), _beside(path, MOVED_ASIDE)
    remove_stale(path)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        fill(staging)
        if not replace:
            _rename_onto_new(staging, path)
            return
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def _rename_onto_new(staging: str, path: str) -> None:
    """Renames the directory `staging` to `path`, which may be absent or an empty directory
    (rename(2) replaces an empty directory atomically and fails on a non-empty one)."""
    try:
        os.rename(staging, path)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(e.errno, f"{path} exists and is not an empty directory", path) from None
        raise


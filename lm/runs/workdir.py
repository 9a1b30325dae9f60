"""What a workdir is, and one run per workdir.

`check_for_training` refuses a --workdir that training would damage (a file, an export, a
fine-tuning workdir, a directory that holds something else) before anything is written.
A run holds an exclusive lock for its lifetime: `flock` on `<workdir>/.lock`, so the
kernel drops it when the process dies, even by kill -9: a crashed run never leaves a
stale lock behind. The file records who holds it, for the error the second run prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from typing import Any

from lm.errors import UsageError
from lm.files import paths
from lm.files.paths import read_json


class WorkdirError(UsageError):
    """A workdir that cannot be used (another run holds it); the message says the fix."""


LOCK_NAME = ".lock"
EXPORT_INFO = "export.json"  # marks an export (lm.export, lm.convert import)
FINETUNE_FILES = ("finetune_results.json", "best")  # mark a fine-tuning workdir (lm.finetune)
# What lm.main writes into a workdir; a directory holding only these is a run (perhaps one
# that stopped before its first checkpoint, or before config.json).
RUN_SECTIONS = ("data", "model", "train", "optim")  # sections every run's config.json has


def config_kind(saved: Any) -> str | None:
    """None if `saved` (a parsed config.json) is an lm run's config, else what it is."""
    if isinstance(saved, dict) and all(isinstance(saved.get(name), dict) for name in RUN_SECTIONS):
        return None
    if isinstance(saved, dict) and "finetune" in saved:
        return "a fine-tuning config (lm.finetune's)"
    if isinstance(saved, dict) and "model_type" in saved:
        return f"a Hugging Face model's config (model_type {saved['model_type']!r})"
    return f"not an lm run's config (it lacks the sections {', '.join(RUN_SECTIONS)})"


def finetuning_files(path: str) -> list[str]:
    """The files that mark the directory `path` as a fine-tuning workdir (none: it is not one)."""
    return [name for name in FINETUNE_FILES if os.path.exists(os.path.join(path, name))]


def foreign_content(path: str) -> str | None:
    """What the existing directory `path` is when it is not an lm pretraining run ("an lm
    export (it has export.json)", ...); None for a run, an empty directory, or a run that
    stopped before its first checkpoint. Raises WorkdirError if its config.json is damaged."""
    entries = set(os.listdir(path))
    if EXPORT_INFO in entries:
        return f"an lm export (it has {EXPORT_INFO})"
    if finetuning_files(path):
        return f"a fine-tuning workdir (it has {' and '.join(finetuning_files(path))})"
    if "config.json" in entries:
        saved = read_json(os.path.join(path, "config.json"), error=WorkdirError, kind=None,
                          fix="if this is your lm run, delete the damaged config.json (lm.main writes it again "
                              "from --config); otherwise pass a new --workdir.")
        what = config_kind(saved)
        return None if what is None else f"not an lm run: its config.json is {what}"
    return None  # other files (a sweep's sweep.log, a launcher's logs, notes) may live beside a run


def check_for_training(path: str) -> None:
    """Raises WorkdirError, before anything is written, if lm.main may not train in `path`:
    a file or a path under one, an unwritable place, or a directory that is not an lm run
    (an export, a fine-tuning workdir, another program's files or config.json), or a run
    whose tokenizer.json is damaged. A missing or empty directory and a run pass."""
    problem = paths.directory_problem(path)
    if problem:
        raise WorkdirError(f"{problem}. Fix: pass a new directory as --workdir, or an lm run's workdir to "
                           "resume it.")
    if not os.path.isdir(path):
        return
    what = foreign_content(path)
    if what:
        raise WorkdirError(f"--workdir={path} is {what}; a run would write its config.json, tokenizer.json and "
                           "checkpoints over or among those files. Fix: pass a new directory as --workdir (or an "
                           "lm run's workdir to resume it).")
    tokenizer = os.path.join(path, "tokenizer.json")
    if os.path.exists(tokenizer) and "kind" not in read_json(
            tokenizer, error=WorkdirError, fix="delete it if the run has no checkpoint yet (lm.main fits it "
                                                "again), or restore the run's own tokenizer.json.", kind=dict):
        raise WorkdirError(f"{tokenizer} is not an lm tokenizer (it has no 'kind'; a Hugging Face tokenizer.json?). "
                           "Fix: pass a new directory as --workdir.")


class WorkdirLock:
    """Hold with `acquire()`; released on `release()` or when the process exits."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._file = None

    def acquire(self) -> WorkdirLock:
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkdirError(
                f"the workdir {os.path.dirname(self.path)} is in use by a running run ({holder}). Fix: wait for "
                "it to finish or stop it, or pass a different --workdir.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

"""One run per workdir: an exclusive lock held for the run's lifetime.

The lock is `flock` on `<workdir>/.lock`, so the kernel drops it when the process dies,
even by kill -9: a crashed run never leaves a stale lock behind. The file records who
holds it, for the error the second run prints.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from lm.errors import UsageError


class WorkdirError(UsageError):
    """A workdir that cannot be used (another run holds it); the message says the fix."""


LOCK_NAME = ".lock"


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

"""Run outputs a person or a tool reads: metrics (JSONL + TensorBoard) and progress.

Only process 0 writes files; every process may print progress.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import tqdm


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch where torch is installed but not
    yet imported: tensorboardX imports torch only to accept its tensors, which costs every
    command 1.5 s of start-up (measured on a 2-core machine), and lm logs Python floats."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends `{"step": s, "<split>/<name>": value, ...}` lines to metrics.jsonl and
    the same scalars to TensorBoard event files under `tensorboard/`."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            path = os.path.join(workdir, "metrics.jsonl")
            cut_torn_line(path)
            self._jsonl = open(path, "a", encoding="utf-8")
            self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{split}/{k}": float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step":
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def cut_torn_line(path: str) -> None:
    """Drops a last line without its newline, which a run killed mid-write (kill -9) can
    leave: appended to, it would glue the next record onto it and lose both."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return
        start = max(0, size - (1 << 16))  # a record is far shorter than 64 KiB
        f.seek(start)
        tail = f.read()
        if tail.endswith(b"\n"):
            return
        newline = tail.rfind(b"\n")
        if newline >= 0 or start == 0:
            f.truncate(start + newline + 1)  # newline -1 at start 0: the only line is torn


class Progress:
    """A progress bar on a terminal; elsewhere (CI, log files) a plain line at most
    every `line_seconds`, so logs stay readable."""

    def __init__(self, total: int, initial: int, enabled: bool = True, line_seconds: float = 10.0):
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled, self.total, self.line_seconds = enabled, total, line_seconds
        self._last_line = 0.0
        self._bar = tqdm.tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step",
                              disable=not self.interactive)

    def update(self, step: int, text: str) -> None:
        """Reports that `step` steps are done, with a short status `text`."""
        if self.interactive:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text, refresh=False)
        elif self.enabled and (time.monotonic() - self._last_line >= self.line_seconds or step == self.total):
            self._last_line = time.monotonic()
            print(f"step {step}/{self.total} {text}", flush=True)

    def message(self, text: str) -> None:
        if self.interactive:
            self._bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        self._bar.close()

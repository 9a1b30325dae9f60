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
from tensorboardX import SummaryWriter


class MetricWriter:
    """Appends `{"step": s, "<split>/<name>": value, ...}` lines to metrics.jsonl and
    the same scalars to TensorBoard event files under `tensorboard/`."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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

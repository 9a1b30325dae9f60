"""Why and how a run stops early: a preemption or Ctrl-C (`StopSignals`), or a divergence
(`check_finite`); each raises `RunStopped` with the exit code a launcher acts on."""

from __future__ import annotations

import signal
import threading

import jax
import ml_collections

from lm.errors import DIVERGED


class RunStopped(Exception):
    """The run stopped on purpose; `exit_code` tells a launcher what to do (see lm.errors)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGTERM (preemption) or SIGINT asks the loop to checkpoint at the next step boundary
    and exit with `lm.errors.PREEMPTED`; a second SIGINT interrupts at once. With several
    processes, JAX's preemption sync point makes every process stop at the same step."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        # Several processes: JAX's preemption notifier owns SIGTERM; a Python handler would replace it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def stop_requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                from jax.experimental import multihost_utils
                if multihost_utils.reached_preemption_sync_point(step):
                    self.received = self.received or "a preemption notice"
                    return True
            except RuntimeError:  # no preemption service in this runtime
                pass
            return False
        return self.received is not None


def check_finite(config: ml_collections.ConfigDict, step: int, nonfinite_steps: int) -> None:
    """Stops the run once more steps were non-finite than `train.max_nonfinite_steps` allows."""
    allowed = config.train.max_nonfinite_steps
    if nonfinite_steps > allowed:
        raise RunStopped(
            f"training diverged: {nonfinite_steps} step(s) up to step {step} had a NaN or Inf loss or gradient "
            f"(their updates were skipped; config.train.max_nonfinite_steps={allowed} allows {allowed}). The "
            "checkpoints on disk hold only finite states. Fix: lower config.optim.lr, lengthen "
            "config.optim.warmup_steps or tighten config.optim.grad_clip, then resume; or allow more skipped "
            "steps with config.train.max_nonfinite_steps.", DIVERGED)

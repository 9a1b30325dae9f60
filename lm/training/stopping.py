"""Why and how a run stops early: a preemption or Ctrl-C (`StopSignals`), or a divergence
(`check_finite`); each raises `RunStopped` with the exit code a launcher acts on."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import ml_collections

from lm.errors import DIVERGED, PREEMPTED


class RunStopped(Exception):
    """The run stopped on purpose; `exit_code` tells a launcher what to do (see lm.errors)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _StopNow(BaseException):
    """Raised by the signal handler inside `interruptible()`. A BaseException (as
    KeyboardInterrupt is), so that no `except Exception` on its way takes it for a failure."""


class StopSignals:
    """SIGTERM (preemption) or SIGINT stops the run with `lm.errors.PREEMPTED`, so that a
    launcher requeues it (launch/slurm.sbatch) and the rerun resumes.

    Before the first step the run has trained nothing since the checkpoint it starts from,
    so it stops saving nothing: at once inside `interruptible()` (the corpus build, which
    may take hours), else at the next of the start-up's stages (`stop_before_training`:
    after the restore and after the eval step's compile). Python code is never cut short
    elsewhere: an exception raised by the handler inside JAX (mid-compile) can crash the
    process as it exits. A second SIGINT interrupts at once (KeyboardInterrupt). From the
    first step on, a signal asks the loop to checkpoint at the next step boundary
    (`stop_requested`). With several processes, JAX's preemption notifier owns SIGTERM and
    its sync point makes every process stop at the same step."""

    active: StopSignals | None = None  # the one installed, for `interruptible`

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}
        self._outer: StopSignals | None = None
        self._interruptible = False

    def __enter__(self) -> StopSignals:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
            self._outer, StopSignals.active = StopSignals.active, self
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            StopSignals.active = self._outer
        if isinstance(error, _StopNow):
            raise self._stopped_in_start_up() from None

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        if self._interruptible:
            self._interruptible = False  # a second signal may not cut short the clean-up on the way out
            raise _StopNow()
        again = "; a second Ctrl-C stops at once" if signum == signal.SIGINT else ""
        os.write(2, f"lm: {self.received} received: stopping at the next safe point (after the start-up stage "
                    f"or step under way){again}\n".encode())

    def _stopped_in_start_up(self) -> RunStopped:
        return RunStopped(f"stopped by {self.received} during start-up, before the first step: nothing had trained "
                          "since the run's newest checkpoint (if any), so nothing was saved. Rerun the same command "
                          "to resume.", PREEMPTED)

    def stop_before_training(self) -> None:
        """Raises RunStopped if a signal came during start-up (one process; several stop at
        the first step's sync point)."""
        if self.received is not None:
            raise self._stopped_in_start_up()

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


@contextlib.contextmanager
def interruptible():
    """A start-up stage that a stop signal ends at once (see StopSignals): one of Python
    and host code only, that leaves nothing half written when an exception interrupts it.
    An error that a library made of the handler's exception (SentencePiece turns one
    raised in its input iterator into a RuntimeError, which lm reports as a corpus error)
    is the stop too. A no-op off the main thread, where signals are not handled."""
    signals = StopSignals.active
    if signals is None or signals._interruptible or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signals.received:
        raise _StopNow()
    signals._interruptible = True
    try:
        yield
    except BaseException:
        if signals.received:
            raise _StopNow() from None
        raise
    finally:
        signals._interruptible = False


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

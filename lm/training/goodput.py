"""A run's goodput: its wall time split into named parts that add up to it, and the
training steps' average tokens/s and MFU. Goodput as in Google's ML Goodput: productive
time (the training steps) over wall time; the other parts are its badput, by cause.

One monotonic clock (`time.perf_counter`). A `Timeline` is always in exactly one part;
`switch` and `part` move it to another, so the parts are contiguous intervals that add
up to the wall time by construction, and time the caller charged to no named part is the
catch-all, "other". With asynchronous dispatch the device's work shows on the host only
where the host waits for it, so the loop charges a step's dispatch, its one-step-late
metrics fetch and the wait for queued steps before an evaluation or a save to the
training steps (lm.training.loop says where each part starts and ends).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator

STARTUP = "startup"  # process start to the first step: imports, config, corpus, tokenizer, model init or restore
COMPILATION = "compilation"  # the train and eval steps' first calls: tracing, lowering, XLA's compile
TRAINING = "training_steps"  # the steps' dispatch and the host's waits for their results (productive time)
DATA_WAIT = "data_wait"  # the host getting the next batch onto the devices
EVALUATION = "evaluation"  # validation passes and the end-of-run sample
CHECKPOINTING = "checkpointing"  # saves, and waiting for asynchronous saves to finish
OTHER = "other"  # what no named part holds: logging set-up, end-of-run prints, the loop's own bookkeeping
PARTS = (STARTUP, COMPILATION, TRAINING, DATA_WAIT, EVALUATION, CHECKPOINTING, OTHER)
LABELS = {STARTUP: "start-up", COMPILATION: "compilation", TRAINING: "training steps", DATA_WAIT: "data waits",
          EVALUATION: "evaluation", CHECKPOINTING: "checkpointing", OTHER: "other"}


def process_start(clock: Callable[[], float] = time.perf_counter) -> float | None:
    """When this process started, on `clock`'s scale, from the kernel's record
    (/proc/self/stat field 22: clock ticks since boot, read against CLOCK_BOOTTIME), so the
    interpreter's start and every import count. None where there is no /proc (macOS)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            after_name = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces; it ends at the last ")"
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    return clock() - max(age, 0.0)


def _known(part: str) -> str:
    if part not in PARTS:
        raise ValueError(f"{part!r} is not a goodput part; the parts are {', '.join(PARTS)}")
    return part


class Timeline:
    """Wall time since `start` (default: now) as contiguous intervals, each charged to one
    of `PARTS`; the timeline begins in `part`."""

    def __init__(self, start: float | None = None, part: str = OTHER, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.start = clock() if start is None else start
        self._mark, self._current = self.start, _known(part)
        self._seconds = dict.fromkeys(PARTS, 0.0)

    def switch(self, part: str) -> str:
        """Charges the time since the last switch to the current part and makes `part`
        current. Returns the part it left."""
        now = self._clock()
        self._seconds[self._current] += now - self._mark
        previous, self._mark, self._current = self._current, now, _known(part)
        return previous

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Charges the block's time to `name`, then returns to the part it interrupted."""
        previous = self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)

    def seconds(self) -> dict[str, float]:
        """Seconds per part of `PARTS` from the start to now; they add up to `elapsed()`."""
        self.switch(self._current)
        return dict(self._seconds)

    def elapsed(self) -> float:
        """Wall seconds from the start to the last switch (`seconds()` ends there too)."""
        return self._mark - self.start

    def total(self, *parts: str) -> float:
        """Seconds in `parts` together from the start to now: a clock that runs only in them."""
        seconds = self.seconds()
        return sum(seconds[_known(p)] for p in parts)


@dataclasses.dataclass(frozen=True)
class Throughput:
    """What turns steps per second into tokens/s, per device, and model FLOPs utilisation."""

    tokens_per_step: int
    flops_per_token: float  # lm.model.counting.train_flops_per_token
    devices: int
    peak_flops_per_device: float  # 0: unknown, no MFU

    def metrics(self, steps: int, seconds: float) -> dict[str, float]:
        """tokens_per_second (and per device), tflops_per_second and, with a known peak, mfu."""
        tokens_per_second = steps * self.tokens_per_step / seconds
        out = {"tokens_per_second": tokens_per_second,
               "tokens_per_second_per_device": tokens_per_second / self.devices,
               "tflops_per_second": tokens_per_second * self.flops_per_token / 1e12}
        if self.peak_flops_per_device:
            out["mfu"] = tokens_per_second * self.flops_per_token / (self.peak_flops_per_device * self.devices)
        return out


@dataclasses.dataclass(frozen=True)
class Goodput:
    """A run's wall time by part, and what its training steps achieved."""

    wall_seconds: float
    seconds: dict[str, float]  # per part of PARTS; they add up to wall_seconds
    steps: int  # training steps this process ran (a resumed run's earlier steps are not its)
    throughput: Throughput
    peak_source: str = ""  # where throughput's peak comes from (lm.training.peak), "" if unknown

    @classmethod
    def of(cls, timeline: Timeline, steps: int, throughput: Throughput, peak_source: str = "") -> Goodput:
        """The goodput of the run `timeline` has timed, from its start to now."""
        seconds = timeline.seconds()
        return cls(timeline.elapsed(), seconds, steps, throughput, peak_source)

    @property
    def goodput(self) -> float:
        """The training steps' share of the wall time."""
        return self.seconds[TRAINING] / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens(self) -> int:
        return self.steps * self.throughput.tokens_per_step

    def averages(self) -> dict[str, float]:
        """`Throughput.metrics` over all this process's steps and training-step time: so
        tokens_per_second = tokens / seconds[TRAINING]. Empty if no step ran."""
        if not self.steps or self.seconds[TRAINING] <= 0:
            return {}
        return self.throughput.metrics(self.steps, self.seconds[TRAINING])

    def to_json(self) -> dict:
        peak = {"peak_flops_per_device": self.throughput.peak_flops_per_device,
                "peak_source": self.peak_source} if self.peak_source else {}
        return {"wall_seconds": self.wall_seconds, "goodput": self.goodput, "seconds": dict(self.seconds),
                "steps": self.steps, "tokens": self.tokens, **self.averages(), **peak}

    def table(self) -> str:
        """A few readable lines: the goodput, each part's seconds and share, and the steps' rates."""
        wall = self.wall_seconds or 1.0
        lines = [f"goodput: {self.goodput:.1%} of {self.wall_seconds:,.1f} s in training steps"]
        width = max(len(label) for label in LABELS.values())
        lines += [f"  {LABELS[p]:<{width}} {self.seconds[p]:9,.1f} s {self.seconds[p] / wall:6.1%}" for p in PARTS]
        rates = self.averages()
        if rates:
            line = (f"  training steps: {self.steps:,} steps, {self.tokens:,} tokens, "
                    f"{rates['tokens_per_second']:,.0f} tokens/s ({rates['tokens_per_second_per_device']:,.0f}/device)")
            lines.append(line)
            if "mfu" in rates:
                lines.append(f"  MFU {rates['mfu']:.1%} of {_flops(self.throughput.peak_flops_per_device)} per "
                             f"device ({self.peak_source})")
        return "\n".join(lines)


def over_attempts(records: list[dict]) -> dict:
    """The goodput of a run made of several processes (attempts: one stopped by a
    preemption, the one that resumed it, ...), from each one's record in goodput.jsonl:
    their training-step seconds over the span from the first's start to the last's end,
    so the time between attempts (down time, a restart) counts against it.

    Each record has "started_at" and "ended_at" (Unix seconds), "wall_seconds" and
    "seconds" (by part). Raises ValueError for no records.
    """
    if not records:
        raise ValueError("no attempts recorded")
    span = max(r["ended_at"] for r in records) - min(r["started_at"] for r in records)
    training = sum(r["seconds"][TRAINING] for r in records)
    running = sum(r["wall_seconds"] for r in records)
    return {"attempts": len(records), "span_seconds": span, "training_seconds": training,
            "down_seconds": max(span - running, 0.0), "goodput": training / span if span > 0 else 0.0}


def _flops(per_second: float) -> str:
    for scale, unit in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s")):
        if per_second >= scale:
            return f"{per_second / scale:,.1f} {unit}"
    return f"{per_second / 1e6:,.1f} MFLOP/s"

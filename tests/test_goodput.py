"""A run's goodput: the accounting (parts that add up, the catch-all, tokens/s), the
measured CPU peak, the eval step compiled once, and lm.main's summary end to end."""

import json
import os
import time

import pytest
from helpers import REPO, cli_flags, run_cli, tiny_config

from lm.training import goodput, peak
from lm.training.goodput import COMPILATION, DATA_WAIT, EVALUATION, OTHER, PARTS, STARTUP, TRAINING

CONFIG = f"--config={os.path.join(REPO, 'configs', 'shakespeare_char.py')}"
IMPORTED = time.perf_counter()  # this process did this after it started


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_the_parts_add_up_to_the_wall_time_and_what_no_part_holds_is_other():
    clock = FakeClock()
    timeline = goodput.Timeline(start=97.0, part=STARTUP, clock=clock)  # the process started 3 s ago
    clock.advance(2.0)
    timeline.switch(OTHER)
    clock.advance(0.25)  # between parts: the catch-all
    with timeline.part(COMPILATION):
        clock.advance(4.0)
    for _ in range(3):
        with timeline.part(DATA_WAIT):
            clock.advance(0.5)
        with timeline.part(TRAINING):
            clock.advance(10.0)
            with timeline.part(EVALUATION):  # a nested part takes its time from the one it interrupts
                clock.advance(1.0)
            clock.advance(1.0)
        clock.advance(0.125)
    seconds = timeline.seconds()
    assert seconds == {STARTUP: 5.0, COMPILATION: 4.0, TRAINING: 33.0, DATA_WAIT: 1.5, EVALUATION: 3.0,
                       "checkpointing": 0.0, OTHER: 0.25 + 3 * 0.125}
    assert timeline.elapsed() == clock.now - 97.0 == sum(seconds.values())
    assert timeline.total(TRAINING, DATA_WAIT) == 34.5
    with pytest.raises(ValueError, match="'training' is not a goodput part"):
        timeline.switch("training")


def test_tokens_per_second_is_tokens_over_training_step_time_and_mfu_is_against_the_peak():
    clock = FakeClock()
    timeline = goodput.Timeline(part=STARTUP, clock=clock)
    clock.advance(2.0)
    with timeline.part(TRAINING):
        clock.advance(8.0)
    throughput = goodput.Throughput(tokens_per_step=1024, flops_per_token=3e6, devices=4, peak_flops_per_device=1e11)
    summary = goodput.Goodput.of(timeline, steps=50, throughput=throughput, peak_source=peak.MEASURED_CPU)
    record = summary.to_json()
    assert record["tokens"] == 50 * 1024
    assert record["tokens_per_second"] == 50 * 1024 / 8.0
    assert record["mfu"] == pytest.approx(50 * 1024 / 8.0 * 3e6 / 4e11)
    assert record["goodput"] == 0.8 and record["wall_seconds"] == 10.0
    table = summary.table()
    assert table.startswith("goodput: 80.0% of 10.0 s in training steps")
    assert "start-up" in table and "a measured CPU matmul peak" in table and "6,400 tokens/s" in table
    no_steps = goodput.Goodput.of(goodput.Timeline(clock=clock), steps=0, throughput=throughput)
    assert "tokens_per_second" not in no_steps.to_json() and "tokens/s" not in no_steps.table()


def test_the_process_start_comes_before_anything_the_process_did():
    started = goodput.process_start()
    assert started is not None  # Linux: /proc/self/stat
    assert started < IMPORTED < time.perf_counter()


def test_the_cpu_peak_is_measured_once_and_then_read_from_the_cache(tmp_path):
    began = time.perf_counter()
    measured = peak.cached_cpu_peak(str(tmp_path))
    assert time.perf_counter() - began < 5  # "about 0.3 s", with room for a loaded CI machine
    assert 1e8 < measured < 1e13  # FLOP/s per device: a CPU core's, neither idle nor a GPU's
    (tmp_path / peak.CACHE_NAME).write_text(json.dumps(
        {key: 1234.0 for key in json.loads((tmp_path / peak.CACHE_NAME).read_text())}))
    assert peak.cached_cpu_peak(str(tmp_path)) == 1234.0  # read back, not measured again
    assert peak.peak_flops_per_device(5e12) == (5e12, peak.CONFIGURED)
    assert peak.peak_flops_per_device(cache_dir=str(tmp_path)) == (1234.0, peak.MEASURED_CPU)


def test_the_eval_step_compiled_before_training_is_the_one_evaluation_calls(tmp_path):
    from lm.training.setup import setup_run

    run = setup_run(tiny_config(), str(tmp_path / "run"))
    try:
        params = run.trainer.init().params
        run.first_eval_step(params)
        run.eval_metrics(params)
        assert run.trainer._eval._cache_size() == 1
    finally:
        run.close()


def _check(record: dict, steps: int, tokens_per_step: int) -> None:
    seconds = record["seconds"]
    assert set(seconds) == set(PARTS)
    assert sum(seconds.values()) == pytest.approx(record["wall_seconds"], rel=0.02)
    assert seconds[OTHER] < 0.02 * record["wall_seconds"]
    assert record["steps"] == steps and record["tokens"] == steps * tokens_per_step
    assert record["tokens_per_second"] == pytest.approx(record["tokens"] / seconds[TRAINING], rel=1e-9)
    assert record["goodput"] == pytest.approx(seconds[TRAINING] / record["wall_seconds"], rel=1e-9)
    assert 0 < record["mfu"] < 1 and record["peak_source"] == peak.MEASURED_CPU
    assert all(seconds[part] > 0 for part in (STARTUP, COMPILATION, TRAINING, EVALUATION, "checkpointing"))


@pytest.mark.slow
def test_lm_main_reports_its_goodput_and_a_resumed_run_counts_only_its_own(tmp_path):
    tokens_per_step = 8 * 16  # tiny config: batch 8, seq_len 16
    began = time.perf_counter()
    first = run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(train__steps=4))
    outside = time.perf_counter() - began
    record = json.loads((tmp_path / "final_metrics.json").read_text())["goodput"]
    _check(record, steps=4, tokens_per_step=tokens_per_step)
    # Counted from the process's start (imports included) to the run's end: inside the
    # subprocess's life, and most of it (the interpreter's exit after the run is not counted).
    assert 0.6 * outside < record["wall_seconds"] < outside
    table = first.stdout[first.stdout.index("goodput: "):]
    assert f"of {record['wall_seconds']:,.1f} s in training steps" in table.splitlines()[0]
    assert all(label in table for label in goodput.LABELS.values())

    run_cli("lm.main", CONFIG, f"--workdir={tmp_path}", *cli_flags(train__steps=6))
    resumed = json.loads((tmp_path / "final_metrics.json").read_text())
    _check(resumed["goodput"], steps=2, tokens_per_step=tokens_per_step)
    assert resumed["train_tokens"] == 6 * tokens_per_step  # the run's, where goodput counts this process's


def test_over_attempts_the_time_between_a_stopped_attempt_and_its_resumption_counts_against_the_run():
    seconds = lambda training: {goodput.TRAINING: training}
    stopped = {"started_at": 100.0, "ended_at": 130.0, "wall_seconds": 30.0, "seconds": seconds(24.0)}
    resumed = {"started_at": 170.0, "ended_at": 200.0, "wall_seconds": 30.0, "seconds": seconds(24.0)}
    over = goodput.over_attempts([stopped, resumed])
    assert over == {"attempts": 2, "span_seconds": 100.0, "training_seconds": 48.0, "down_seconds": 40.0,
                    "goodput": 0.48}
    with pytest.raises(ValueError):
        goodput.over_attempts([])

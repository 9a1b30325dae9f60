"""The training loop (the one place that knows every module): steps, metrics and
throughput logs, evaluation and checkpoint cadence, early stops, and the end of a run
(a sample, the final validation loss, and the scaling summary and the run's goodput in
final_metrics.json)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from lm.data import batches
from lm.errors import PREEMPTED
from lm.files import atomic
from lm.inference import decode
from lm.model import mup, pipeline
from lm.model.counting import param_counts, train_flops_per_token
from lm.parallel import sharding
from lm.runs import version
from lm.training import goodput, memory, optim
from lm.training.logs import Progress
from lm.training.peak import peak_flops_per_device
from lm.training.setup import Run, restore_or_init, setup_run
from lm.training.step import Metrics, TrainState
from lm.training.stopping import RunStopped, StopSignals, check_finite


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, started: float | None = None
                       ) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint), evaluates,
    checkpoints and samples. Returns the final validation metrics. However it ends, the
    checkpoint manager is closed (its saves finish, its threads stop) and the lock released.

    The run's goodput (lm.training.goodput), printed at the end and kept in
    final_metrics.json, counts from `started` on `time.perf_counter`'s clock (lm.main
    passes the process's start) or, by default, from this call."""
    timeline = goodput.Timeline(started, part=goodput.STARTUP)
    with StopSignals() as signals:
        run = setup_run(config, workdir)
        try:
            return _train(run, timeline, signals)
        finally:
            run.close()


def _train(run: Run, timeline: goodput.Timeline, signals: StopSignals) -> dict[str, float]:
    """Start-up (until the eval step's compile), the steps, and the end of the run."""
    config, c = run.config, run.config.train
    data_iterator = batches.iterate(batches.train_data(config, run.corpus), config.data.num_threads,
                                    config.data.prefetch)
    state = jax.block_until_ready(restore_or_init(run, data_iterator))  # init's or restore's compute is start-up's
    signals.stop_before_training()
    start = int(state.step)
    progress = Progress(c.steps, start, enabled=run.is_main)
    _describe_run(run, progress, start)
    peak, peak_source = peak_flops_per_device(c.peak_flops_per_device)
    throughput = goodput.Throughput(c.batch_size * config.data.seq_len,
                                    train_flops_per_token(run.trainer.model_cfg, config.data.seq_len),
                                    jax.device_count(), peak)
    timeline.switch(goodput.OTHER)
    _compile_eval(run, eval_params(run, state), timeline)
    if signals.received:
        progress.close()  # the stop's message on a line of its own, not after the bar
    signals.stop_before_training()
    try:
        with _finishing_saves(run):
            state = _steps(run, state, data_iterator, progress, throughput, timeline, signals)
            final = _save_and_evaluate(run, state, data_iterator, progress, timeline, signals)
    except RunStopped:  # a preempted attempt's goodput still counts toward the run's
        stopped_at = run.checkpointer.latest_step() or start
        _record_goodput(run, goodput.Goodput.of(timeline, max(stopped_at - start, 0), throughput, peak_source),
                        "stopped", start)
        raise
    progress.close()
    _finish(run, state, final, timeline)
    summary = goodput.Goodput.of(timeline, int(state.step) - start, throughput, peak_source)
    attempts = _record_goodput(run, summary, "finished", start)
    if run.is_main:
        _write_final_metrics(run, state, final, summary, attempts)
    run.writer.close()
    return final


def _steps(run: Run, state: TrainState, data_iterator, progress: Progress, throughput: goodput.Throughput,
           timeline: goodput.Timeline, signals: StopSignals) -> TrainState:
    """The training steps from `state` to `train.steps`, with their logs, evaluations and
    saves, each charged to its part of `timeline`."""
    t, c = run.trainer, run.config.train
    start = int(state.step)
    # Logged tokens/s runs on a clock that stops while compiling, evaluating and saving.
    clock = lambda: timeline.total(goodput.TRAINING, goodput.DATA_WAIT, goodput.OTHER)
    pending: tuple[int, Metrics] | None = None
    last_log = (start, clock())
    for step in range(start, c.steps):
        with timeline.part(goodput.DATA_WAIT):
            batch = batches.to_global(next(data_iterator), t.batch_sharding)
        with timeline.part(goodput.COMPILATION if step == start else goodput.TRAINING):
            state, metrics = t.step(state, batch)  # the first call traces and compiles, then queues the step
        done = step + 1
        with timeline.part(goodput.TRAINING):
            if step == start:
                jax.block_until_ready(state)  # the first step's compute, apart from its compile
            if pending is not None:  # fetch the previous step's metrics: the host never waits on this one
                last_log = _log_train(run, progress, *pending, last_log, throughput, clock)
                pending = None
        if done % c.log_every == 0 or done == c.steps:
            pending = (done, metrics)
        if signals.stop_requested(done):
            if pending is not None:  # its metrics are written before the run stops, not lost with the process
                with timeline.part(goodput.TRAINING):
                    _log_train(run, progress, *pending, last_log, throughput, clock)
            with timeline.part(goodput.CHECKPOINTING):
                _stop_for_preemption(run, progress, state, data_iterator, signals.received)
        evaluating = c.eval_every and done % c.eval_every == 0 and done != c.steps
        saving = _checkpoint_due(c, done) and done != c.steps
        if evaluating or saving:
            with timeline.part(goodput.TRAINING):
                # Steps are dispatched ahead; without this wait the queued steps' compute would
                # land in evaluation's or checkpointing's time.
                jax.block_until_ready(state)
            if evaluating:
                with timeline.part(goodput.EVALUATION):
                    _log_eval(run, progress, done, eval_params(run, state))
            if saving:
                with timeline.part(goodput.CHECKPOINTING):
                    _save(run, state, data_iterator)
    if pending is not None:
        with timeline.part(goodput.TRAINING):
            _log_train(run, progress, *pending, last_log, throughput, clock)
    return state


def _save_and_evaluate(run: Run, state: TrainState, data_iterator, progress: Progress, timeline: goodput.Timeline,
                       signals: StopSignals) -> dict[str, float]:
    """After the last step: its checkpoint (first, so that a stop during the evaluation
    loses no step), then the final validation metrics. A stop signal received by the time
    the checkpoint is saved stops the run there (a rerun evaluates it); one received
    during the evaluation lets the run finish (what is left, a sample, is short)."""
    with timeline.part(goodput.CHECKPOINTING):
        if run.checkpointer.latest_step() != run.config.train.steps:
            _save(run, state, data_iterator)
        if signals.received:
            _stop_for_preemption(run, progress, state, data_iterator, signals.received)
    with timeline.part(goodput.EVALUATION):
        final = _log_eval(run, progress, run.config.train.steps, eval_params(run, state))
    with timeline.part(goodput.CHECKPOINTING):
        run.checkpointer.wait()
    return final


def _compile_eval(run: Run, params: Any, timeline: goodput.Timeline) -> None:
    """Compiles the eval step before the first evaluation, so its compile is measured apart:
    one call on the first validation batch (`Run.first_eval_step`), whose result is dropped."""
    with timeline.part(goodput.COMPILATION):
        totals = run.first_eval_step(params)
    with timeline.part(goodput.EVALUATION):
        jax.block_until_ready(totals)


def _record_goodput(run: Run, summary: goodput.Goodput, ended: str, first_step: int) -> dict:
    """Prints this attempt's goodput and appends it to the workdir's goodput.jsonl (one
    line an attempt: finished, or stopped by a preemption); returns the goodput over all
    the run's attempts so far (goodput.over_attempts)."""
    if not run.is_main:
        return {}
    print(summary.table(), flush=True)
    path = os.path.join(run.workdir, "goodput.jsonl")
    now = time.time()
    record = {"ended": ended, "first_step": first_step, "started_at": now - summary.wall_seconds, "ended_at": now,
              **summary.to_json()}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return goodput.over_attempts(records)


@contextlib.contextmanager
def _finishing_saves(run: Run):
    """If the loop stops early, saves already under way (of finite states) still complete."""
    try:
        yield
    except RunStopped:
        run.checkpointer.wait()
        raise


def _stop_for_preemption(run: Run, progress: Progress, state: TrainState, data_iterator, why: str) -> None:
    step = int(state.step)
    if run.checkpointer.latest_step() != step:
        _save(run, state, data_iterator)
    run.checkpointer.wait()
    progress.close()
    raise RunStopped(f"stopped by {why} at step {step}; the checkpoint of step {step} is saved. Rerun the same "
                     "command to resume from it.", PREEMPTED)


def _describe_run(run: Run, progress: Progress, start: int) -> None:
    counts = param_counts(run.trainer.abstract_state().params)
    mesh = sharding.describe(run.trainer.mesh.shape)
    progress.message(
        f"lm {version.describe(version.code_version())}: {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding), {describe_training(run.config)}; "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh {mesh}; "
        f"vocab {run.corpus.tokenizer.vocab_size} ({run.corpus.tokenizer.kind}); "
        f"{len(run.corpus.tokens['train']):,} train / {len(run.corpus.tokens['validation']):,} validation tokens "
        f"in {len(run.corpus.documents['train']):,} / {len(run.corpus.documents['validation']):,} documents, "
        f"{run.config.data.packing} rows")
    progress.message(f"memory per device (estimate): {memory.describe(run.memory)}")
    schedule = pipeline.describe_model(run.trainer.model_cfg)
    if schedule:
        progress.message(schedule)
    if start:
        progress.message(f"branching from the checkpoint at step {start} in {run.branch}" if run.branch else
                         f"resuming from the checkpoint at step {start} in {run.workdir}")


def describe_training(config: ml_collections.ConfigDict) -> str:
    """The start-up line's clause naming the optimizer, schedule, peak rate and, under µP,
    the base width and width multiplier m, e.g. "optimizer muon (wsd, lr 0.02), µP (base
    width 128, m 4)": a log says which recipe ran without its config.json."""
    o, m = config.optim, config.model
    text = f"optimizer {o.name} ({o.schedule}, lr {o.lr:g})"
    if mup.is_mup(m):
        text += f", µP (base width {m.mup_base_width}, m {mup.width_multiplier(m):g})"
    return text


def _log_train(run: Run, progress: Progress, step: int, metrics: Metrics, last_log: tuple[int, float],
               throughput: goodput.Throughput, clock: Callable[[], float]) -> tuple[int, float]:
    """Writes step `step`'s metrics with the tokens/s since `last_log` = (step, `clock()`)."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    check_finite(run.config, step, int(values["nonfinite_steps"]))
    now = clock()
    last_step, last_time = last_log
    if step > last_step:
        values.update(throughput.metrics(step - last_step, now - last_time))
    run.writer.write(step, "train", values)
    status = f"loss {values['loss']:.4f}"
    if "tokens_per_second" in values:
        status += (f" | {values['tokens_per_second']:,.0f} tok/s "
                   f"({values['tokens_per_second_per_device']:,.0f}/device)")
    if "mfu" in values:
        status += f" | MFU {values['mfu']:.1%}"
    progress.update(step, status)
    return step, now


def eval_params(run: Run, state: TrainState) -> Any:
    """The parameters evaluation and samples use (`optim.eval_params`: schedule-free's average)."""
    return optim.eval_params(run.config.optim, state.opt_state, state.params)


def _log_eval(run: Run, progress: Progress, step: int, params: Any) -> dict[str, float]:
    metrics = run.eval_metrics(params)
    run.writer.write(step, "validation", metrics)
    progress.message(f"step {step}: validation loss {metrics['loss']:.4f}, "
                     f"perplexity {metrics['perplexity']:.2f}, {metrics['bits_per_byte']:.4f} bits/byte")
    return metrics


def _checkpoint_due(c: ml_collections.ConfigDict, step: int) -> bool:
    """A frequent (kept while among the newest) or a permanent checkpoint (`keep_steps`) falls on `step`."""
    return step in c.keep_steps or any(every and step % every == 0
                                       for every in (c.checkpoint_every, c.permanent_checkpoint_every))


def _save(run: Run, state: TrainState, data_iterator) -> None:
    step = int(state.step)
    check_finite(run.config, step, int(state.nonfinite_steps))  # never checkpoint past a divergence
    meta = {"step": step, "version": version.code_version(), "config": json.loads(run.config.to_json_best_effort()),
            "corpus": run.corpus_record}
    run.checkpointer.save(step, state, data_iterator, meta)


def _scale(run: Run, step: int) -> dict[str, float]:
    """What a scaling-law fit needs of a finished run: N (total and non-embedding), D, C."""
    counts = param_counts(run.trainer.abstract_state().params)
    tokens = step * run.config.train.batch_size * run.config.data.seq_len
    return {"step": step, "parameters": counts["total"], "non_embedding_parameters": counts["non_embedding"],
            "train_tokens": tokens,
            "train_flops": tokens * train_flops_per_token(run.trainer.model_cfg, run.config.data.seq_len)}


def _finish(run: Run, state: TrainState, final: dict[str, float], timeline: goodput.Timeline) -> None:
    """Prints a sample (an evaluation, in the goodput) and the final validation loss, and stores the sample."""
    s = run.config.sample
    # Encoders and T5 models do not continue text; max_new_tokens 0 asks for no sample.
    samples = run.trainer.model_cfg.family == "decoder" and s.max_new_tokens > 0
    if samples:
        with timeline.part(goodput.EVALUATION):
            text = decode.sample_text(run.trainer.model, eval_params(run, state), run.corpus.tokenizer, s.prompt,
                                      max_new_tokens=s.max_new_tokens, max_len=run.config.data.seq_len,
                                      temperature=s.temperature, top_k=s.top_k, seed=run.config.seed)
    if run.is_main and samples:
        with open(os.path.join(run.workdir, "samples.txt"), "a", encoding="utf-8") as f:
            f.write(f"--- step {int(state.step)}, prompt {s.prompt!r}\n{s.prompt}{text}\n")
        print(f"\n--- sample (step {int(state.step)}) ---\n{s.prompt}{text}\n---", flush=True)
    if run.is_main:
        print(f"final validation loss {final['loss']:.4f} "
              f"(perplexity {final['perplexity']:.2f}, {final['bits_per_byte']:.4f} bits/byte)", flush=True)


def _write_final_metrics(run: Run, state: TrainState, final: dict[str, float], summary: goodput.Goodput,
                        attempts: dict) -> None:
    atomic.write_json(os.path.join(run.workdir, "final_metrics.json"),
                      {**_scale(run, int(state.step)), **{f"validation/{k}": v for k, v in final.items()},
                       "goodput": summary.to_json(), "goodput_over_attempts": attempts}, indent=2)

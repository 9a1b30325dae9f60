"""The training loop (the one place that knows every module): steps, metrics and
throughput logs, evaluation and checkpoint cadence, early stops, and the end of a run
(a sample, the final validation loss and the scaling summary in final_metrics.json)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections

from lm.data import batches
from lm.errors import PREEMPTED
from lm.files import atomic
from lm.inference import decode
from lm.model.counting import param_counts, peak_flops, train_flops_per_token
from lm.runs import version
from lm.training import memory
from lm.training.logs import Progress
from lm.training.setup import Run, restore_or_init, setup_run
from lm.training.step import Metrics, TrainState
from lm.training.stopping import RunStopped, StopSignals, check_finite


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint), evaluates,
    checkpoints and samples. Returns the final validation metrics. However it ends, the
    checkpoint manager is closed (its saves finish, its threads stop) and the lock released."""
    run = setup_run(config, workdir)
    try:
        return _train(run)
    finally:
        run.close()


def _train(run: Run) -> dict[str, float]:
    config = run.config
    t, c = run.trainer, config.train
    train_data = batches.train_data(config, run.corpus)
    data_iterator = batches.iterate(train_data, config.data.num_threads, config.data.prefetch)
    state = restore_or_init(run, data_iterator)
    start = int(state.step)
    progress = Progress(c.steps, start, enabled=run.is_main)
    _describe_run(run, progress, start)

    tokens_per_step = c.batch_size * config.data.seq_len
    flops_per_token = train_flops_per_token(t.model_cfg, config.data.seq_len)
    throughput = Throughput(tokens_per_step, flops_per_token, jax.device_count(),
                            peak_flops(jax.devices()[0].device_kind, c.peak_flops_per_device))
    pending: tuple[int, Metrics] | None = None
    last_log = (start, time.perf_counter())
    with StopSignals() as signals, _finishing_saves(run):
        for step in range(start, c.steps):
            batch = batches.to_global(next(data_iterator), t.batch_sharding)
            state, metrics = t.step(state, batch)
            done = step + 1
            if pending is not None:  # fetch the previous step's metrics: the host never waits on this one
                last_log = _log_train(run, progress, *pending, last_log, throughput)
                pending = None
            if done % c.log_every == 0 or done == c.steps:
                pending = (done, metrics)
            if signals.stop_requested(done):
                _stop_for_preemption(run, progress, state, data_iterator, signals.received)
            evaluating = c.eval_every and done % c.eval_every == 0 and done != c.steps
            saving = _checkpoint_due(c, done) and done != c.steps
            if evaluating or saving:
                # Steps are dispatched ahead; without this wait the queued steps' compute would
                # land in the paused time, which tokens/s leaves out, and overstate it.
                jax.block_until_ready(state)
                paused = time.perf_counter()
                if evaluating:
                    _log_eval(run, progress, done, state.params)
                if saving:
                    _save(run, state, data_iterator)
                last_log = (last_log[0], last_log[1] + time.perf_counter() - paused)  # tokens/s excludes these
    if pending is not None:
        _log_train(run, progress, *pending, last_log, throughput)
    final = _log_eval(run, progress, c.steps, state.params)
    if run.checkpointer.latest_step() != c.steps:
        _save(run, state, data_iterator)
    run.checkpointer.wait()
    progress.close()
    _finish(run, state, final)
    return final


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
    mesh = " x ".join(f"{a}={s}" for a, s in run.trainer.mesh.shape.items())
    progress.message(
        f"lm {version.describe(version.code_version())}: {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding); "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh {mesh}; "
        f"vocab {run.corpus.tokenizer.vocab_size} ({run.corpus.tokenizer.kind}); "
        f"{len(run.corpus.tokens['train']):,} train / {len(run.corpus.tokens['validation']):,} validation tokens "
        f"in {len(run.corpus.documents['train']):,} / {len(run.corpus.documents['validation']):,} documents, "
        f"{run.config.data.packing} rows")
    progress.message(f"memory per device (estimate): {memory.describe(run.memory)}")
    if start:
        progress.message(f"resuming from the checkpoint at step {start} in {run.workdir}")


@dataclasses.dataclass(frozen=True)
class Throughput:
    """What turns steps per second into tokens/s, per device, and model FLOPs utilisation."""

    tokens_per_step: int
    flops_per_token: float
    devices: int
    peak_flops_per_device: float  # 0: unknown, no MFU

    def metrics(self, steps: int, seconds: float) -> dict[str, float]:
        tokens_per_second = steps * self.tokens_per_step / seconds
        out = {"tokens_per_second": tokens_per_second,
               "tokens_per_second_per_device": tokens_per_second / self.devices,
               "tflops_per_second": tokens_per_second * self.flops_per_token / 1e12}
        if self.peak_flops_per_device:
            out["mfu"] = tokens_per_second * self.flops_per_token / (self.peak_flops_per_device * self.devices)
        return out


def _log_train(run: Run, progress: Progress, step: int, metrics: Metrics, last_log: tuple[int, float],
               throughput: Throughput) -> tuple[int, float]:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    check_finite(run.config, step, int(values["nonfinite_steps"]))
    now = time.perf_counter()
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


def _log_eval(run: Run, progress: Progress, step: int, params: Any) -> dict[str, float]:
    metrics = run.eval_metrics(params)
    run.writer.write(step, "validation", metrics)
    progress.message(f"step {step}: validation loss {metrics['loss']:.4f}, "
                     f"perplexity {metrics['perplexity']:.2f}, {metrics['bits_per_byte']:.4f} bits/byte")
    return metrics


def _checkpoint_due(c: ml_collections.ConfigDict, step: int) -> bool:
    """A frequent (kept while among the newest) or a permanent checkpoint falls on `step`."""
    return any(every and step % every == 0 for every in (c.checkpoint_every, c.permanent_checkpoint_every))


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


def _finish(run: Run, state: TrainState, final: dict[str, float]) -> None:
    """Prints a sample and the final validation loss, and stores the sample."""
    s = run.config.sample
    samples = run.trainer.model_cfg.family == "decoder"  # encoders and T5 models do not continue text
    if samples:
        text = decode.sample_text(run.trainer.model, state.params, run.corpus.tokenizer, s.prompt,
                                  max_new_tokens=s.max_new_tokens, max_len=run.config.data.seq_len,
                                  temperature=s.temperature, top_k=s.top_k, seed=run.config.seed)
    if run.is_main and samples:
        with open(os.path.join(run.workdir, "samples.txt"), "a", encoding="utf-8") as f:
            f.write(f"--- step {int(state.step)}, prompt {s.prompt!r}\n{s.prompt}{text}\n")
        print(f"\n--- sample (step {int(state.step)}) ---\n{s.prompt}{text}\n---", flush=True)
    if run.is_main:
        print(f"final validation loss {final['loss']:.4f} "
              f"(perplexity {final['perplexity']:.2f}, {final['bits_per_byte']:.4f} bits/byte)", flush=True)
        atomic.write_json(os.path.join(run.workdir, "final_metrics.json"),
                          {**_scale(run, int(state.step)), **{f"validation/{k}": v for k, v in final.items()}},
                          indent=2)
    run.writer.close()

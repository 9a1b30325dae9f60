"""Train state, the pure train and eval steps, the `Trainer` that compiles them over a
mesh, and the training loop (the one place that knows every module)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from lm import config as config_lib
from lm import objectives
from lm.data import batches, documents
from lm.data.corpus import Corpus, prepare
from lm.errors import DIVERGED, PREEMPTED, UsageError
from lm.inference import decode
from lm.model import ModelConfig, build
from lm.model.counting import abstract_params, param_counts, peak_flops, train_flops_per_token
from lm.objectives.distillation import distillation_kl_sum
from lm.parallel import sharding
from lm.runs import artifacts as runs
from lm.runs import checkpoint, version
from lm.runs.workdir import WorkdirLock
from lm.training import memory, optim
from lm.training.logs import MetricWriter, Progress

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data; step t draws its noise from fold_in(rng, t)
    nonfinite_steps: jax.Array  # int32: steps whose loss or gradients were NaN/Inf (their updates were skipped)


class RunStopped(Exception):
    """The run stopped on purpose; `exit_code` tells a launcher what to do (see lm.errors)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train_step(state: TrainState, batch: Batch, teacher_params: Any = None, *, model: nn.Module,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               make_example: objectives.MakeExample, z_loss: float = 0.0, microbatches: int = 1,
               teacher: nn.Module | None = None, distill_temperature: float = 2.0,
               distill_alpha: float = 0.0) -> tuple[TrainState, Metrics]:
    """One optimizer update on a global batch; a pure function of (state, batch).

    With a `teacher` model (and its `teacher_params`), the loss is distillation's:
    (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student) at temperature T;
    the reported loss stays the cross-entropy, comparable with any other run's.

    With `microbatches` > 1 the batch's gradients are accumulated over that many slices
    in a `lax.scan`, so activations are held for one slice at a time; the update is the
    full batch's (the objective's noise is drawn once, for the whole batch).
    """
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    objective_rng, dropout_rng = jax.random.split(step_rng)
    example = make_example(batch, objective_rng)

    def loss_sum_fn(params, example, dropout_rng):
        logits_BLV = apply(model, params, example, deterministic=False, rngs={"dropout": dropout_rng})
        ce_sum = objectives.weighted_cross_entropy(logits_BLV, example.targets_BL, example.weights_BL)[0]
        loss_sum = ce_sum
        if teacher is not None:
            teacher_logits_BLV = jax.lax.stop_gradient(apply(teacher, teacher_params, example))
            kl_sum = distillation_kl_sum(logits_BLV, teacher_logits_BLV, example.weights_BL, distill_temperature)
            loss_sum = (1.0 - distill_alpha) * ce_sum + distill_alpha * kl_sum
        if z_loss:
            loss_sum = loss_sum + z_loss * objectives.z_loss_sum(logits_BLV, example.weights_BL)
        return loss_sum, ce_sum

    # Differentiate the loss *sum* and divide afterwards: the token count's all-reduce then
    # joins the gradients' at the end of the step instead of syncing devices mid-forward.
    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)
    if microbatches == 1:
        (_, ce_sum), grads_sum = grad_fn(state.params, example, dropout_rng)
    else:
        ce_sum, grads_sum = _accumulate(grad_fn, state.params, example, dropout_rng, microbatches)
    scale = 1.0 / jnp.maximum(jnp.sum(example.weights_BL), 1.0)
    loss, grads = ce_sum * scale, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads_sum)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    # A NaN/Inf loss or gradient skips the update: the state stays finite, whatever the host decides.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1,
                              params=keep_finite(optax.apply_updates(state.params, updates), state.params),
                              opt_state=keep_finite(opt_state, state.opt_state),
                              nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                       "nonfinite_steps": new_state.nonfinite_steps}


def microbatch_slices(x_B: jax.Array, microbatches: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...], slice m holding rows m, m + M, m + 2M, ...

    Strided rather than contiguous: each device's rows of the batch split evenly across
    the slices, so no slice has to move between devices.
    """
    rows = x_B.shape[0]
    return x_B.reshape(rows // microbatches, microbatches, *x_B.shape[1:]).swapaxes(0, 1)


def _accumulate(grad_fn, params: Any, example: objectives.Example, dropout_rng: jax.Array,
                microbatches: int) -> tuple[jax.Array, Any]:
    """(loss sum, gradient sum) over the microbatches of `example`, one at a time."""
    slices = jax.tree.map(lambda x: microbatch_slices(x, microbatches), example)

    def add_one(carry, inputs):
        ce_total, grads_total = carry
        index, micro = inputs
        (_, ce_sum), grads_sum = grad_fn(params, micro, jax.random.fold_in(dropout_rng, index))
        return (ce_total + ce_sum, jax.tree.map(jnp.add, grads_total, grads_sum)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (ce_sum, grads_sum), _ = jax.lax.scan(add_one, zeros, (jnp.arange(microbatches), slices))
    return ce_sum, grads_sum


def apply(model: nn.Module, params: Any, example: objectives.Example, **kwargs) -> jax.Array:
    """The model's logits for an example's inputs (with its packing and prefix, if any)."""
    if example.decoder_inputs_BL is not None:  # encoder-decoder: encoder inputs, decoder inputs
        return model.apply({"params": params}, example.inputs_BL, example.decoder_inputs_BL,
                           input_segment_ids_BS=example.segment_ids_BL, **kwargs)
    return model.apply({"params": params}, example.inputs_BL, example.positions_BL, example.segment_ids_BL,
                       prefix_BL=example.prefix_BL, **kwargs)


EvalTotals = tuple[jax.Array, jax.Array]  # (sum of token losses, number of scored tokens)

EVAL_RNG_SEED = 0  # evaluation's objective noise (e.g. prefix split points) is the same every time


def eval_step(params: Any, batch: Batch, totals: EvalTotals, *, model: nn.Module,
              make_example: objectives.MakeExample) -> EvalTotals:
    """Adds one batch's token losses and token count to the running `totals`.

    Carrying the totals through the step chains consecutive eval steps by data
    dependency, so the device runs them in order, with no eager ops between them.
    """
    example = make_example(batch, jax.random.key(EVAL_RNG_SEED))
    logits_BLV = apply(model, params, example)
    loss_sum, weight_sum = objectives.weighted_cross_entropy(logits_BLV, example.targets_BL, example.weights_BL)
    return totals[0] + loss_sum, totals[1] + weight_sum


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The model, optimizer and steps of one run, compiled over `mesh`.

    Parameters and optimizer state are created already sharded (`init` is jitted with
    the state's shardings as outputs); the step donates the old state.
    """

    model: nn.Module
    model_cfg: ModelConfig
    mesh: Mesh
    rules: tuple
    state_shardings: TrainState
    batch_sharding: NamedSharding
    _init: Callable[[], TrainState]
    _step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    _eval: Callable[[Any, Batch, EvalTotals], EvalTotals]
    teacher_params: Any = None  # distillation's teacher, replicated over the mesh

    def init(self) -> TrainState:
        return self._init()

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._step(state, batch, self.teacher_params)

    def eval_step(self, params: Any, batch: Batch, totals: EvalTotals) -> EvalTotals:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._eval(params, batch, totals)

    def compile_step(self, batch_size: int, seq_len: int) -> Any:
        """Lowers and compiles the train step for abstract inputs (no state is allocated)."""
        batch = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=self.batch_sharding)}
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._step.lower(self.abstract_state(), batch, self.teacher_params).compile()

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the target a checkpoint restores onto."""
        return checkpoint.abstract_like(jax.eval_shape(self._init), self.state_shardings)


def make_trainer(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh, pad_id: int,
                 tokenizer_vocab_size: int = 0, teacher: Any = None) -> Trainer:
    """The compiled steps of `config` on `mesh`. Objectives' extra ids ([MASK], sentinels)
    follow the tokenizer's `tokenizer_vocab_size` ids (default: the model's vocabulary
    minus `config.objective.extra_ids`). `teacher` (an lm.runs.artifacts.Loaded) turns on
    distillation with `config.distill`'s temperature and alpha."""
    model = build(model_cfg)
    schedule = optim.schedule(config.optim, config.train.steps)
    optimizer = optim.make(config.optim, config.train.steps)
    rules = sharding.rules_from_config(config)
    replicated = sharding.replicated(mesh)

    boxed = abstract_params(model, config.data.seq_len)
    sharding.check_divisibility(boxed, mesh, rules)
    param_shardings = sharding.tree_shardings(mesh, rules, boxed)
    abstract_opt_state = jax.eval_shape(optimizer.init, nn.meta.unbox(boxed))
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, param_shardings,
                                          transform_non_params=lambda _: replicated)
    state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                                 rng=replicated, nonfinite_steps=replicated)
    batch_sharding = sharding.logical_sharding(mesh, rules, ("batch", "length"))

    def init_state() -> TrainState:
        init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
        dummy = jnp.zeros((1, config.data.seq_len), jnp.int32)
        inputs = (dummy, dummy) if model_cfg.family == "encoder_decoder" else (dummy,)
        params = nn.meta.unbox(model.init(init_rng, *inputs)["params"])
        return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(train_rng), nonfinite_steps=jnp.int32(0))

    tokenizer_vocab = tokenizer_vocab_size or model_cfg.vocab_size - config.objective.extra_ids
    make_example = objectives.for_config(config.objective, config.model.family, pad_id, tokenizer_vocab)
    step_fn = functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule,
                                make_example=make_example, z_loss=config.objective.z_loss,
                                microbatches=config.train.microbatches,
                                teacher=teacher.model if teacher else None,
                                distill_temperature=config.distill.temperature, distill_alpha=config.distill.alpha)
    eval_fn = functools.partial(eval_step, model=model, make_example=make_example)
    return Trainer(
        model=model, model_cfg=model_cfg, mesh=mesh, rules=rules, state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        _init=jax.jit(init_state, out_shardings=state_shardings),
        _step=jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                      out_shardings=(state_shardings, replicated), donate_argnums=0),
        _eval=jax.jit(eval_fn, in_shardings=(param_shardings, batch_sharding, replicated),
                      out_shardings=replicated, donate_argnums=2),
        teacher_params=_place(teacher.params, replicated) if teacher else None)


def _place(tree: Any, target: jax.sharding.Sharding) -> Any:
    """Arrays go to `target`; shapes (an ahead-of-time compile's teacher) carry it."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target)
                        if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, target), tree)


def evaluate(trainer: Trainer, params: Any, dataset) -> float:
    """Mean token loss over every batch of `dataset` (summed on device, fetched once)."""
    totals = tuple(jax.device_put(np.zeros((), np.float32), sharding.replicated(trainer.mesh)) for _ in range(2))
    for local_batch in dataset:
        totals = trainer.eval_step(params, batches.to_global(local_batch, trainer.batch_sharding), totals)
    loss_sum, weight_sum = jax.device_get(totals)
    return float(loss_sum) / max(float(weight_sum), 1.0)


@dataclasses.dataclass
class Run:
    """What the loop needs besides the trainer: data, outputs and the workdir."""

    config: ml_collections.ConfigDict
    workdir: str
    corpus: Corpus
    trainer: Trainer
    writer: MetricWriter
    checkpointer: checkpoint.Checkpointer
    is_main: bool
    memory: dict[str, int]  # estimated bytes per device (lm.training.memory.estimate)
    lock: WorkdirLock | None  # held by process 0 while the run lives
    corpus_record: dict[str, list]  # corpus_fingerprints(config), saved with each checkpoint

    def close(self) -> None:
        """Ends the run's hold on the workdir: saves under way finish, orbax's threads stop."""
        self.checkpointer.close()
        if self.lock is not None:
            self.lock.release()

    def eval_metrics(self, params: Any) -> dict[str, float]:
        loss = evaluate(self.trainer, params, batches.validation_data(self.config, self.corpus))
        return objectives.loss_metrics(loss, self.corpus.bytes_per_token["validation"])


def setup_run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Run:
    """Validates the config against the devices and the workdir's checkpoints, prepares
    data and compiles nothing yet. Raises UsageError before anything is built or written
    if the checkpoints were trained with fields that may not change (`check_resumable`)."""
    mesh = sharding.make_mesh(config, devices)
    sharding.check_batch_sizes(config, mesh)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir).acquire() if is_main else None  # before anything is written
    directory = os.path.join(workdir, "checkpoints")
    corpus_record = corpus_fingerprints(config)
    reader = checkpoint.Checkpointer(directory, read_only=True)
    try:
        check_resumable(config, reader, corpus_record, workdir)
    finally:
        reader.close()
    corpus = prepare_corpus(config, workdir)
    model_cfg = ModelConfig.for_run(config, corpus.tokenizer.vocab_size)
    vocab_size = objectives.model_vocab_size(config.objective, corpus.tokenizer.vocab_size)
    if model_cfg.vocab_size < vocab_size:
        raise UsageError(
            f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{corpus.tokenizer.vocab_size} ids plus config.objective.extra_ids={config.objective.extra_ids}. "
            f"Fix: set it to 0 to use {vocab_size}.")
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
    trainer = make_trainer(config, model_cfg, mesh, corpus.tokenizer.pad_id, corpus.tokenizer.vocab_size,
                           teacher=load_teacher(config, corpus.tokenizer))
    estimate = check_memory(trainer, config)
    # Last: orbax's manager starts background threads (temporary-directory clean-up) that
    # print tracebacks if the process exits on one of the errors above while they run.
    checkpointer = checkpoint.Checkpointer(directory, config.train.keep_checkpoints,
                                           config.train.permanent_checkpoint_every)
    return Run(config, workdir, corpus, trainer, MetricWriter(workdir, enabled=is_main), checkpointer, is_main,
               estimate, lock, corpus_record)


def corpus_fingerprints(config: ml_collections.ConfigDict) -> dict[str, list]:
    """What identifies the training corpus, saved with each checkpoint: for `data.files`
    (key "files") or each of `data.sources`, [content fingerprint of its files, mixture
    weight]. By text content, so a corpus moved to another path, or saved with other line
    endings, a byte-order mark or gzip, is still the same corpus."""
    d = config.data
    groups = {name: (src.files, float(src.weight)) for name, src in d.sources.items()} if d.sources else {
        "files": (d.files, 1.0)}
    try:
        return {name: [documents.text_fingerprint(config_lib.resolve_files(files)), weight]
                for name, (files, weight) in groups.items()}
    except documents.CorpusError as e:  # a file that is not text: the same one line as building it
        raise UsageError(str(e)) from None


def check_resumable(config: ml_collections.ConfigDict, checkpointer: checkpoint.Checkpointer,
                    corpus_record: dict[str, list], workdir: str) -> None:
    """Raises UsageError naming, with old and new values, every field that differs from
    the newest checkpoint's config and may not change on resume (lm.config.RESUME says
    which and why); the corpus is compared by `corpus_fingerprints` where the checkpoint
    recorded them, else by its config fields. No checkpoint: nothing to check."""
    saved = _newest_metadata(checkpointer)
    if saved is None or "config" not in saved:
        return
    recorded = "corpus" in saved
    conflicts = config_lib.resume_conflicts(saved["config"], json.loads(config.to_json_best_effort()),
                                            ignore=("data.files", "data.sources") if recorded else ())
    if recorded and saved["corpus"] != corpus_record:
        conflicts.append(f"the corpus (config.data.files or data.sources: [content fingerprint, weight]) was "
                         f"{saved['corpus']}, now {corpus_record} (the training data)")
    if conflicts:
        raise UsageError(
            f"{workdir} holds checkpoints (newest: step {saved['step']}) of a run whose config differs in fields "
            f"that cannot change on resume: {'; '.join(conflicts)}. Fix: rerun with the checkpoint's values "
            f"(the run's config is {os.path.join(workdir, 'config.json')}), or pass a new --workdir for a new run.")


def _newest_metadata(checkpointer: checkpoint.Checkpointer) -> dict | None:
    """The metadata of the newest checkpoint whose metadata reads (a damaged one is skipped
    here as in `restore_or_init`)."""
    for step in sorted(checkpointer.all_steps(), reverse=True):
        try:
            return checkpointer.metadata(step)
        except Exception:  # orbax raises many types for missing or truncated files
            continue
    return None


def load_teacher(config: ml_collections.ConfigDict, tokenizer) -> Any:
    """Distillation's teacher (lm.runs.artifacts.Loaded), or None; it must share the tokenizer."""
    if not config.distill.teacher:
        return None
    teacher = runs.load(config.distill.teacher)
    check_teacher(config, teacher.model_cfg)
    if teacher.tokenizer.to_json() != tokenizer.to_json():
        raise UsageError(f"config.distill.teacher={config.distill.teacher!r} has another tokenizer than this "
                          "run's, so their next-token distributions do not line up. Fix: use a teacher trained "
                          "with the same corpus and data.tokenizer settings.")
    return teacher


def check_teacher(config: ml_collections.ConfigDict, teacher_cfg: ModelConfig) -> None:
    """A teacher must be a causal decoder that reads this run's whole rows."""
    where = f"config.distill.teacher={config.distill.teacher!r}"
    if teacher_cfg.family != "decoder":
        raise UsageError(f"{where} holds a {teacher_cfg.family!r} model. Fix: distil from a causal decoder.")
    if teacher_cfg.max_len < config.data.seq_len:
        raise UsageError(f"{where} reads at most {teacher_cfg.max_len} tokens; this run's rows have "
                          f"data.seq_len={config.data.seq_len}. Fix: lower data.seq_len to at most "
                          f"{teacher_cfg.max_len}.")


def prepare_corpus(config: ml_collections.ConfigDict, workdir: str) -> Corpus:
    """The tokenized corpus. With several processes, process 0 builds the dataset and
    tokenizer first and the others then read them, so processes sharing a filesystem
    never build the same files at once (hosts with their own disks each build theirs)."""
    path = os.path.join(workdir, "tokenizer.json")
    if jax.process_count() == 1:
        return prepare(config, path)
    from jax.experimental import multihost_utils

    corpus = prepare(config, path) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("lm: corpus prepared by process 0")
    return corpus or prepare(config, path)


def check_memory(trainer: Trainer, config: ml_collections.ConfigDict) -> dict[str, int]:
    """The per-device memory estimate; an error before anything is allocated if it cannot fit."""
    estimate = memory.estimate(trainer.abstract_state(), trainer.model_cfg, config, dict(trainer.mesh.shape))
    limit = memory.device_limit(jax.local_devices()[0])
    if limit and estimate["total"] > limit:
        raise UsageError(
            f"the run needs about {memory.human(estimate['total'])} per device "
            f"({memory.describe(estimate)}) but a device has {memory.human(limit)}. Fix: shard parameters "
            "and optimizer state wider (config.mesh.shape.fsdp), rematerialise (config.model.remat='full'), "
            "or hold fewer rows at once (config.train.microbatches).")
    return estimate


def restore_or_init(run: Run, data_iterator) -> TrainState:
    """The newest checkpoint in the workdir that restores (moving `data_iterator` with it),
    or a fresh state. A damaged checkpoint is skipped with a warning for the one before;
    one whose stored arrays do not fit this config's state (a mismatch that
    `check_resumable` could not name) raises UsageError listing them, without a restore."""
    steps = sorted(run.checkpointer.all_steps(), reverse=True)
    abstract = run.trainer.abstract_state()
    first_error = None
    for step in steps:
        try:
            mismatches = run.checkpointer.state_mismatches(step, abstract)
            if not mismatches:
                state, _ = run.checkpointer.restore(step, abstract, data_iterator)
                return state
        except Exception as e:  # orbax raises many types for missing or truncated files
            first_error = first_error or (step, e)
            logging.warning("lm: the checkpoint at step %d in %s does not restore (%s: %s); trying an older one.",
                            step, run.workdir, type(e).__name__, str(e).splitlines()[0][:300])
            continue
        raise UsageError(
            f"the checkpoint at step {step} in {run.workdir} holds a train state that this config's does not "
            f"match: {'; '.join(mismatches)}. Fix: rerun with the config that wrote it ({run.workdir}/config.json "
            "before this run), or pass a new --workdir for a new run.")
    if first_error is None:
        return run.trainer.init()
    step, e = first_error
    raise UsageError(
        f"no checkpoint in {run.workdir} restores; the newest, step {step}, fails with {type(e).__name__}: "
        f"{str(e).splitlines()[0][:300]}. Fix: use a new --workdir, or the config that wrote the checkpoints.")


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


def _stop_for_preemption(run: Run, progress: Progress, state: TrainState, data_iterator, why: str) -> None:
    step = int(state.step)
    if run.checkpointer.latest_step() != step:
        _save(run, state, data_iterator)
    run.checkpointer.wait()
    progress.close()
    raise RunStopped(f"stopped by {why} at step {step}; the checkpoint of step {step} is saved. Rerun the same "
                     "command to resume from it.", PREEMPTED)


def _check_finite(config: ml_collections.ConfigDict, step: int, nonfinite_steps: int) -> None:
    """Stops the run once more steps were non-finite than `train.max_nonfinite_steps` allows."""
    allowed = config.train.max_nonfinite_steps
    if nonfinite_steps > allowed:
        raise RunStopped(
            f"training diverged: {nonfinite_steps} step(s) up to step {step} had a NaN or Inf loss or gradient "
            f"(their updates were skipped; config.train.max_nonfinite_steps={allowed} allows {allowed}). The "
            "checkpoints on disk hold only finite states. Fix: lower config.optim.lr, lengthen "
            "config.optim.warmup_steps or tighten config.optim.grad_clip, then resume; or allow more skipped "
            "steps with config.train.max_nonfinite_steps.", DIVERGED)


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
    _check_finite(run.config, step, int(values["nonfinite_steps"]))
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
    _check_finite(run.config, step, int(state.nonfinite_steps))  # never checkpoint past a divergence
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
        with open(os.path.join(run.workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
            json.dump({**_scale(run, int(state.step)), **{f"validation/{k}": v for k, v in final.items()}}, f,
                      indent=2)
    run.writer.close()

"""A run before its first step: the workdir's lock and resume checks, the corpus, the
distillation teacher, the memory check, config.json, the compiled `Trainer`, and the
state to start from (the newest checkpoint that restores, a branch's checkpoint of
another run (`train.branch_from`), or a fresh one)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from lm import config as config_lib
from lm import objectives
from lm.data import batches, documents
from lm.data.corpus import Corpus, prepare
from lm.errors import UsageError
from lm.files import atomic
from lm.model import ModelConfig
from lm.parallel import sharding
from lm.runs import artifacts, checkpoint
from lm.runs.workdir import LOCK_NAME, WorkdirLock, check_for_training
from lm.training import memory, optim
from lm.training.logs import MetricWriter
from lm.training.step import EvalTotals, TrainState
from lm.training.stopping import interruptible
from lm.training.trainer import Trainer, evaluate, make_trainer


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
    branch: str | None = None  # a branch's first start: the checkpoints directory it starts from

    def close(self) -> None:
        """Ends the run's hold on the workdir: saves under way finish, orbax's threads stop."""
        self.checkpointer.close()
        if self.lock is not None:
            self.lock.release()

    def eval_metrics(self, params: Any) -> dict[str, float]:
        loss = evaluate(self.trainer, params, batches.validation_data(self.config, self.corpus))
        return objectives.loss_metrics(loss, self.corpus.bytes_per_token["validation"])

    def first_eval_step(self, params: Any) -> EvalTotals:
        """One eval step on the first validation batch, with arguments of the types
        `trainer.evaluate` passes (so its calls reuse this compile); the totals, unawaited.
        What the first call costs the host is the eval step's compile."""
        validation = batches.validation_data(self.config, self.corpus)
        totals = tuple(jax.device_put(np.zeros((), np.float32), sharding.replicated(self.trainer.mesh))
                       for _ in range(2))
        if not len(validation):
            return totals
        return self.trainer.eval_step(params, batches.to_global(validation[0], self.trainer.batch_sharding), totals)


def setup_run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Run:
    """Validates the workdir (`workdir.check_for_training`), the config against the devices
    and the workdir's checkpoints, prepares data and compiles nothing yet. Raises
    UsageError before anything is written if the workdir is not a run's, or if the
    checkpoints were trained with fields that may not change (`check_resumable`); a new
    workdir that fails a later check (a mesh that cannot split the vocabulary, a run that
    cannot fit in memory) is removed again, and a resumed run's config.json is rewritten
    only once every check has passed."""
    check_for_training(workdir)
    mesh = sharding.make_mesh(config, devices)
    sharding.check_batch_sizes(config, mesh)
    is_main = jax.process_index() == 0
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir).acquire() if is_main else None  # before anything is written
    fresh = is_main and set(os.listdir(workdir)) == {LOCK_NAME}  # all else in it is this run's, under the lock
    try:
        return _prepare_run(config, workdir, mesh, lock)
    except BaseException as e:  # a refused config, or a stop signal during the corpus build
        if lock is not None:
            lock.release()
        if fresh and isinstance(e, UsageError):
            _remove_new_workdir(workdir, created)
        raise


def _prepare_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                 lock: WorkdirLock | None) -> Run:
    is_main = lock is not None
    directory = os.path.join(workdir, "checkpoints")
    corpus_record = corpus_fingerprints(config)
    reader = checkpoint.Checkpointer(directory, read_only=True)
    try:
        check_resumable(config, reader, corpus_record, workdir)
        branch = None if reader.all_steps() else check_branch(config, corpus_record)
    finally:
        reader.close()
    if branch and is_main:  # the parent's ids: a tokenizer fitted again could differ (SentencePiece)
        _copy_tokenizer(os.path.dirname(branch), workdir)
    with interruptible():  # the corpus build may take hours; a preemption ends it at once
        corpus = prepare_corpus(config, workdir)
    model_cfg = ModelConfig.for_run(config, corpus.tokenizer.vocab_size)
    vocab_size = objectives.model_vocab_size(config.objective, corpus.tokenizer.vocab_size)
    if model_cfg.vocab_size < vocab_size:
        raise UsageError(
            f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{corpus.tokenizer.vocab_size} ids plus config.objective.extra_ids={config.objective.extra_ids}. "
            f"Fix: set it to 0 to use {vocab_size}.")
    trainer = make_trainer(config, model_cfg, mesh, corpus.tokenizer.pad_id, corpus.tokenizer.vocab_size,
                           teacher=load_teacher(config, corpus.tokenizer))
    estimate = check_memory(trainer, config)
    for doubt in optim.doubts(config, trainer.abstract_state().params):
        logging.warning("lm: %s", doubt)
    check_state_fits(trainer.abstract_state(), branch or directory, config.train.branch_step if branch else None)
    if is_main:  # only now: a config that fails a check above never replaces the run's own
        atomic.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    # Last: a check above that refuses the run then leaves the checkpoints as they are.
    checkpointer = checkpoint.Checkpointer(directory, config.train.keep_checkpoints,
                                           config.train.permanent_checkpoint_every,
                                           keep_steps=config.train.keep_steps)
    return Run(config, workdir, corpus, trainer, MetricWriter(workdir, enabled=is_main), checkpointer, is_main,
               estimate, lock, corpus_record, branch)


def _remove_new_workdir(workdir: str, created: bool) -> None:
    """Removes what a run that failed its checks wrote into a workdir that held nothing
    else (the tokenizer, the lock), and the directory itself if the run made it."""
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(workdir)


def corpus_fingerprints(config: ml_collections.ConfigDict) -> dict[str, list]:
    """What identifies the training corpus, saved with each checkpoint: for `data.files`
    (key "files") or each of `data.sources`, [content fingerprint of its files, mixture
    weight] and, for a source with its own text_column or where, those. By text content, so
    a corpus moved to another path, or saved with other line endings, a byte-order mark or
    gzip, is still the same corpus."""
    d = config.data
    groups = {name: (src.files, float(src.weight), {k: src[k] for k in ("text_column", "where") if k in src})
              for name, src in d.sources.items()} if d.sources else {"files": (d.files, 1.0, {})}
    try:
        return {name: [documents.text_fingerprint(config_lib.resolve_files(files)), weight, *([own] if own else [])]
                for name, (files, weight, own) in groups.items()}
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
    if conflicts := _conflicts(config, saved, corpus_record):
        raise UsageError(
            f"{workdir} holds checkpoints (newest: step {saved['step']}) of a run whose config differs in fields "
            f"that cannot change on resume: {'; '.join(conflicts)}. Fix: rerun with the checkpoint's values "
            f"(the run's config is {os.path.join(workdir, 'config.json')}), or pass a new --workdir for a new run.")
    if saved["step"] > config.train.steps:
        raise UsageError(
            f"{workdir} holds a checkpoint at step {saved['step']}, past config.train.steps={config.train.steps}: "
            f"resuming would report the step-{saved['step']} model as step {config.train.steps}. Fix: set "
            f"--config.train.steps >= {saved['step']} (equal: the run is finished), or pass a new --workdir.")
    _warn_if_the_rate_jumps(config, saved)


def _warn_if_the_rate_jumps(config: ml_collections.ConfigDict, saved: dict) -> None:
    """Logs a warning when the rate of the first resumed update differs from the one the
    checkpoint's own run would have used there: a longer `train.steps` (or new schedule
    fields) recomputes the schedule over the new length, so a decayed or cooled-down run
    jumps back up, which a resume should not do silently."""
    step, old = saved["step"], ml_collections.ConfigDict(saved["config"])
    try:
        before = float(optim.schedule(old.optim, old.train.steps)(step))
    except (AttributeError, KeyError, TypeError, ValueError):  # an older lm's config, without today's fields
        return
    after = float(optim.schedule(config.optim, config.train.steps)(step))
    if not np.isclose(before, after, rtol=1e-5, atol=0.0):
        wsd = (" To continue a WSD run from its stable phase, branch from a checkpoint before its cooldown "
               "(train.branch_from)." if old.optim.schedule == "wsd" else "")
        logging.warning("lm: resuming at step %d at a learning rate of %.4g, where the checkpoint's run (train.steps "
                        "%d) was at %.4g: the schedule is recomputed over train.steps=%d.%s",
                        step, after, old.train.steps, before, config.train.steps, wsd)


def _conflicts(config: ml_collections.ConfigDict, saved: dict, corpus_record: dict[str, list]) -> list[str]:
    """The fields of `config` that may not differ from a checkpoint's `saved` metadata's
    (lm.config.RESUME), the corpus compared by fingerprint where the checkpoint recorded it."""
    recorded = "corpus" in saved
    conflicts = config_lib.resume_conflicts(saved["config"], json.loads(config.to_json_best_effort()),
                                            ignore=("data.files", "data.sources") if recorded else ())
    if recorded and saved["corpus"] != corpus_record:
        conflicts.append(f"the corpus (config.data.files or data.sources: [content fingerprint, weight]) was "
                         f"{saved['corpus']}, now {corpus_record} (the training data)")
    return conflicts


def check_branch(config: ml_collections.ConfigDict, corpus_record: dict[str, list]) -> str | None:
    """The checkpoints directory a branch starts from (`train.branch_from`, at
    `train.branch_step`), or None for no branch. Raises UsageError when `train.branch_from`
    does not exist or has no checkpoints/, when that run keeps no checkpoint at the step
    (listing the steps it has), or when this config differs from the one that wrote it in
    a field a resumed run may not change (lm.config.RESUME): the branch must continue that
    run's model, data order and optimizer state."""
    t = config.train
    if not t.branch_from:
        return None
    parent = os.path.abspath(os.path.expanduser(t.branch_from))
    directory = os.path.join(parent, "checkpoints")
    if not os.path.isdir(directory):  # a mistyped path, or not a workdir at all: say which before the steps
        problem = "is not a run's workdir: it has no checkpoints/" if os.path.exists(parent) else "does not exist"
        raise UsageError(f"config.train.branch_from={t.branch_from!r} {problem}. Fix: give the workdir (--workdir) "
                         "of the run to branch from, whose checkpoints/ holds config.train.branch_step.")
    reader = checkpoint.Checkpointer(directory, read_only=True)
    try:
        steps = reader.all_steps()
        if t.branch_step not in steps:
            raise UsageError(
                f"config.train.branch_from={t.branch_from!r} has no checkpoint at config.train.branch_step="
                f"{t.branch_step} (its checkpoints: {', '.join(map(str, steps)) or 'none'}). Fix: branch from a "
                f"step that run keeps, or train it with {t.branch_step} in its config.train.keep_steps.")
        conflicts = _conflicts(config, reader.metadata(t.branch_step), corpus_record)
    finally:
        reader.close()
    if conflicts:
        raise UsageError(f"this branch of {t.branch_from} differs from that run in fields a branch cannot change: "
                         f"{'; '.join(conflicts)}. Fix: branch with that run's values "
                         f"({os.path.join(t.branch_from, 'config.json')}); change only the schedule and steps.")
    return directory


def _copy_tokenizer(parent: str, workdir: str) -> None:
    source, target = os.path.join(parent, "tokenizer.json"), os.path.join(workdir, "tokenizer.json")
    if os.path.exists(source) and not os.path.exists(target):
        with open(source, encoding="utf-8") as f:
            atomic.write_text(target, f.read())


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
    teacher = artifacts.load(config.distill.teacher, eval_params=optim.eval_params_reader)
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
        raise memory.DoesNotFitError(memory.does_not_fit(
            estimate["total"], limit, memory.describe(estimate), config, dict(trainer.mesh.shape), trainer.model_cfg,
            estimate["total"] - estimate["activations"]))
    return estimate


def restore_or_init(run: Run, data_iterator) -> TrainState:
    """The newest checkpoint in the workdir that restores (moving `data_iterator` with it),
    or a fresh state. A damaged checkpoint is skipped with a warning for the one before;
    one whose stored arrays do not fit this config's state (a mismatch that
    `check_resumable` could not name) raises UsageError listing them, without a restore."""
    steps = sorted(run.checkpointer.all_steps(), reverse=True)
    abstract = run.trainer.abstract_state()
    if not steps and run.branch:
        return _restore_branch(run, abstract, data_iterator)
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
        raise mismatch_error(step, run.checkpointer.directory, mismatches, branching=False)
    if first_error is None:
        return run.trainer.init()
    step, e = first_error
    raise UsageError(
        f"no checkpoint in {run.workdir} restores; the newest, step {step}, fails with {type(e).__name__}: "
        f"{str(e).splitlines()[0][:300]}. Fix: use a new --workdir, or the config that wrote the checkpoints.")


def _restore_branch(run: Run, abstract: TrainState, data_iterator) -> TrainState:
    """The state at `train.branch_step` of the run a branch starts from, with its data position."""
    reader, step = checkpoint.Checkpointer(run.branch, read_only=True), run.config.train.branch_step
    try:
        if mismatches := reader.state_mismatches(step, abstract):
            raise mismatch_error(step, run.branch, mismatches, branching=True)
        state, _ = reader.restore(step, abstract, data_iterator)
        return state
    finally:
        reader.close()


def check_state_fits(abstract: TrainState, directory: str, branch_step: int | None) -> None:
    """Raises `mismatch_error` when the checkpoint a run starts from stores arrays that
    `abstract` does not fit: the newest in the checkpoints `directory`, or a new branch's
    parent's at `branch_step`. Checked before config.json is rewritten (a resume) or the
    workdir kept (a new branch). A checkpoint whose metadata does not read is left to
    `restore_or_init`, which skips damaged ones."""
    reader = checkpoint.Checkpointer(directory, read_only=True)
    try:
        step = reader.latest_step() if branch_step is None else branch_step
        if step is None:
            return
        try:
            mismatches = reader.state_mismatches(step, abstract)
        except Exception:  # orbax raises many types for missing or truncated files
            return
    finally:
        reader.close()
    if mismatches:
        raise mismatch_error(step, directory, mismatches, branching=branch_step is not None)


def mismatch_error(step: int, directory: str, mismatches: list[str], branching: bool) -> UsageError:
    """The error for a checkpoint (at `step` in the checkpoints `directory`) whose arrays do
    not fit this config's train state, listing `mismatches`."""
    run_dir = os.path.dirname(os.path.abspath(directory))
    fix = ("branch with the config that wrote it, changing only the schedule and steps" if branching else
           f"rerun with the config that wrote it ({run_dir}/config.json), or pass a new --workdir for a new run")
    return UsageError(f"the checkpoint at step {step} in {directory} holds a train state that this config's does "
                      f"not match: {'; '.join(mismatches)}. Fix: {fix}.")

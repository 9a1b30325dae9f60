"""The fine-tuning loop: load a pretrained run, attach a head (and adapters), train what
the method trains, evaluate on validation, stop early, keep the best, test it.

Fine-tuning sets are small, so a split is held in memory as arrays and the loop runs on
one device (the local CPU, one GPU or one TPU core).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lm.config import validate_finetune
from lm.errors import UsageError
from lm.evaluation import metrics as metric_fns
from lm.files import atomic
from lm.finetuning import datasets, lora, optim, tasks
from lm.finetuning.workdir import check_workdir
from lm.model import ModelConfig, build
from lm.model.counting import param_counts
from lm.runs import artifacts, version
from lm.training import optim as training_optim
from lm.training.step import apply_gradients

RESULTS = "finetune_results.json"


@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    base: artifacts.Loaded
    model_cfg: Any
    label_names: list[str]
    splits: dict[str, tasks.Split]
    params: dict
    mask: dict


def setup(config: ml_collections.ConfigDict) -> Setup:
    """Everything a run needs, checked before any training."""
    ft, task = config.finetune, config.task
    validate_finetune(config)
    base = artifacts.load(config.init_from, eval_params=training_optim.eval_params_reader)
    if base.model_cfg.family != "decoder":
        raise UsageError(f"init_from holds a {base.model_cfg.family!r} model; fine-tuning takes a decoder. "
                          "Fix: point it at a decoder run.")
    seq_len = task.seq_len or base.config.data.seq_len
    check_seq_len(seq_len, base.model_cfg)
    rows = datasets.rows(task)
    names = tasks.label_names(task.kind, rows["train"], tuple(task.labels))
    model_cfg = dataclasses.replace(base.model_cfg, dropout=ft.dropout, max_len=max(seq_len, base.model_cfg.max_len))
    rng = jax.random.key(config.seed)
    params: dict = {"backbone": base.params}
    if task.kind != "sft":
        params["head"] = tasks.init_head(jax.random.fold_in(rng, 1), model_cfg.d_model, len(names))
    if ft.method == "lora":
        model_cfg = lora.with_lora(model_cfg, ft.lora.rank, ft.lora.alpha, ft.lora.targets)
        params["lora"] = lora.init_adapters(model_cfg, jax.random.fold_in(rng, 2), seq_len)
    splits = {name: tasks.encode(task.kind, split_rows, base.tokenizer, seq_len, names)
              for name, split_rows in rows.items()}
    mask = optim.trainable_mask(params, ft.method, ft.freeze)
    return Setup(config, base, model_cfg, names, splits, params, mask)


def check_seq_len(seq_len: int, model_cfg: ModelConfig) -> None:
    """Raises UsageError if `seq_len` (task.seq_len) exceeds the pretrained context: learned
    positions end there, and rotary ones beyond it were never trained (and attention's
    memory grows with the square of the length: 100k tokens asked 33 TB)."""
    if seq_len <= model_cfg.max_len:
        return
    what = (f"the model's {model_cfg.max_len} learned positions" if model_cfg.positions == "learned" else
            f"the {model_cfg.max_len}-token context the model was pretrained on (rotary positions beyond it "
            "are untrained)")
    raise UsageError(f"task.seq_len={seq_len} exceeds {what}. Fix: set it to at most {model_cfg.max_len}, "
                     "or 0 for the pretrained context.")


def make_steps(s: Setup):
    """(optimizer, train_step, eval_step), the steps jitted; both take the trainable and
    frozen halves. The update is pretraining's (`lm.training.step.apply_gradients`: a
    NaN/Inf loss or gradient skips it)."""
    model, kind, pooling = build(s.model_cfg), s.config.task.kind, s.config.task.pooling

    def loss_fn(trainable, frozen, batch, dropout_rng, deterministic):
        p = optim.combine(trainable, frozen)
        variables = {"params": p["backbone"], **({"lora": p["lora"]} if "lora" in p else {})}
        forward = lambda tokens, hidden: model.apply(variables, tokens, deterministic=deterministic,
                                                     return_hidden=hidden, rngs={"dropout": dropout_rng})
        return tasks.loss_and_stats(kind, pooling, forward, p.get("head"), batch)

    optimizer = optim.make(optim.partition(s.params, s.mask)[0], s.model_cfg.num_layers, s.config.finetune)

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(trainable, opt_state, frozen, batch, dropout_rng):
        # The task's mean loss is differentiated directly: pretraining's step differentiates a
        # sum and scales after, which rounds differently, so only the update is shared.
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, dropout_rng, False)
        update = apply_gradients(trainable, opt_state, grads, loss, optimizer)
        return update.params, update.opt_state, loss

    @jax.jit
    def eval_step(trainable, frozen, batch):
        return loss_fn(trainable, frozen, batch, jax.random.key(0), True)[1]

    return optimizer, train_step, eval_step


def evaluate(eval_step, trainable, frozen, split: tasks.Split, batch_size: int, kind: str) -> dict[str, Any]:
    """Loss and accuracy over a whole split (and, for classification, per-example predictions)."""
    totals = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    predictions = []
    for start in range(0, len(split), batch_size):
        index = np.arange(start, start + batch_size)
        valid = index < len(split)
        batch = split.batch(np.minimum(index, len(split) - 1))
        batch["valid"] = valid.astype(np.float32)
        stats = jax.device_get(eval_step(trainable, frozen, batch))
        for key in totals:
            totals[key] += float(stats[key])
        if kind == "classification":
            predictions.extend(stats["predictions"][valid, 0].tolist())
    count = max(totals["count"], 1)
    result = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}
    if kind == "classification":
        result.update(metric_fns.classification(split.labels.tolist(), predictions))
        result["predictions"] = predictions
    return result


def train_batches(num_examples: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Indices of each training batch: seeded shuffles of the split, one epoch after another
    (a split smaller than a batch is sampled with replacement)."""
    rng = np.random.default_rng(seed)
    while True:
        if num_examples < batch_size:
            yield rng.integers(0, num_examples, batch_size)
            continue
        permutation = rng.permutation(num_examples)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield permutation[start:start + batch_size]


@dataclasses.dataclass
class EarlyStopping:
    """Tracks the best validation score: accuracy (higher is better) or, for SFT, loss."""

    metric: str
    patience: int
    best: dict | None = None
    best_step: int = 0
    evals_since_best: int = 0

    def improved(self, scores: dict, step: int) -> bool:
        new, old = scores[self.metric], self.best[self.metric] if self.best else None
        if old is None or (new > old if self.metric == "accuracy" else new < old):
            self.best, self.best_step, self.evals_since_best = scores, step, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.evals_since_best >= self.patience


def train_loop(s: Setup, steps: tuple, trainable: dict, frozen: dict, workdir: str,
               log) -> tuple[dict, EarlyStopping]:
    """Runs the train steps with periodic validation; saves each new best to `workdir/best`."""
    ft, kind = s.config.finetune, s.config.task.kind
    optimizer, train_step, eval_step = steps
    opt_state = optimizer.init(trainable)
    stopping = EarlyStopping("accuracy" if kind != "sft" else "loss", ft.patience)
    batches = train_batches(len(s.splits["train"]), ft.batch_size, s.config.seed)
    for step in range(1, ft.steps + 1):
        rng = jax.random.fold_in(jax.random.key(s.config.seed), step)
        trainable, opt_state, loss = train_step(trainable, opt_state, frozen, s.splits["train"].batch(next(batches)),
                                                rng)
        if step % ft.eval_every and step != ft.steps:
            continue
        val = evaluate(eval_step, trainable, frozen, s.splits["validation"], ft.batch_size, kind)
        improved = stopping.improved(val, step)
        log(f"step {step}: train loss {float(loss):.4f}, validation loss {val['loss']:.4f}, "
            f"{stopping.metric} {val[stopping.metric]:.4f}{' (best)' if improved else ''}")
        if improved:
            save_best(workdir, trainable, {"step": step, "validation": _scalars(val)})
        elif stopping.should_stop:
            log(f"early stop at step {step}: no better validation {stopping.metric} in {ft.patience} evaluations")
            break
    return trainable, stopping


def finetune(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict[str, Any]:
    """Trains, keeps the best validation checkpoint in `workdir/best`, and returns (and
    writes to `workdir/finetune_results.json`) the test metrics of that checkpoint."""
    start_time = time.time()
    check_workdir(workdir, json.loads(config.to_json_best_effort()))
    s = setup(config)
    ft, kind = config.finetune, config.task.kind
    os.makedirs(workdir, exist_ok=True)
    atomic.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    trainable, frozen = optim.partition(s.params, s.mask)
    trainable = jax.tree.map(jnp.array, trainable)  # own copies: the train step donates them
    counts = {"trainable": param_counts(trainable)["total"], "total": param_counts(s.params)["total"]}
    log(f"fine-tuning {kind} ({ft.method}): {counts['trainable']:,} of {counts['total']:,} parameters train; "
        f"{len(s.splits['train'])} train / {len(s.splits['validation'])} validation examples")
    steps = make_steps(s)
    trainable, stopping = train_loop(s, steps, trainable, frozen, workdir, log)
    trainable = restore_best(workdir, trainable)
    eval_step = steps[2]
    test = evaluate(eval_step, trainable, frozen, s.splits["test"], ft.batch_size, kind) if "test" in s.splits else {}
    results = {"method": ft.method, "kind": kind, "best_step": stopping.best_step, "labels": s.label_names,
               "trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
               "validation": _scalars(stopping.best), "test": _scalars(test), "seconds": time.time() - start_time,
               "version": version.code_version()}
    if kind != "sft":
        scored = s.splits.get("test", s.splits["validation"])
        results["majority_baseline"] = majority_baseline(s.splits["train"], scored)
    atomic.write_json(os.path.join(workdir, RESULTS), results, indent=2)
    if ft.export_merged:
        export_merged(s, trainable, frozen, os.path.join(workdir, "merged"))
    return results


def _scalars(metrics: dict | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}


def majority_baseline(train: tasks.Split, test: tasks.Split) -> float:
    """Accuracy of always predicting the training split's most frequent class (tags: on
    the scored first tokens)."""
    train_labels, test_labels = train.labels[train.labels != tasks.IGNORE], test.labels[test.labels != tasks.IGNORE]
    return float(np.mean(test_labels == np.bincount(train_labels).argmax()))


def save_best(workdir: str, trainable: dict, info: dict) -> None:
    """Replaces `workdir/best` with `trainable` (in `best/trainable`) and `info` (in
    `best/best.json`); the old best stays on disk until the new one is whole."""

    def fill(staging: str) -> None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, "trainable"), trainable)
        checkpointer.wait_until_finished()
        with open(os.path.join(staging, "best.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)

    atomic.write_directory(os.path.join(workdir, "best"), fill)


def restore_best(workdir: str, like: dict) -> dict:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(workdir, "best", "trainable")), target)


def export_merged(s: Setup, trainable: dict, frozen: dict, output: str) -> None:
    """The fine-tuned backbone (adapters merged into their kernels) as an `lm` export, which
    lm.sample, lm.evaluate and lm.convert read like any other."""
    p = optim.combine(trainable, frozen)
    backbone = lora.merge(p["backbone"], p["lora"], s.model_cfg) if "lora" in p else p["backbone"]
    backbone = jax.tree.map(np.asarray, backbone)
    config = s.base.config
    info = {"step": 0, "dtype": "float32", "parameters": param_counts(backbone)["total"],
            "source": os.path.abspath(s.config.init_from), "finetuned": s.config.finetune.method,
            "exported_by": version.code_version()}
    shutil.rmtree(output, ignore_errors=True)  # this run's own previous merge
    artifacts.write_export(output, backbone, config, s.base.tokenizer, info)

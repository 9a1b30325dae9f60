"""The `Trainer`: a run's model, optimizer and pure steps (lm.training.step) compiled over a
mesh, with the parameter, optimizer-state and batch shardings; and evaluation with it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from lm import objectives
from lm.model import ModelConfig, build, mup
from lm.model.counting import abstract_params
from lm.parallel import sharding
from lm.training import optim
from lm.training.step import Batch, EvalTotals, Metrics, TrainState, eval_step, train_step


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
        return sharding.abstract_like(jax.eval_shape(self._init), self.state_shardings)


def make_trainer(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh, pad_id: int,
                 tokenizer_vocab_size: int = 0, teacher: Any = None) -> Trainer:
    """The compiled steps of `config` on `mesh`. Objectives' extra ids ([MASK], sentinels)
    follow the tokenizer's `tokenizer_vocab_size` ids (default: the model's vocabulary
    minus `config.objective.extra_ids`). `teacher` (an lm.runs.artifacts.Loaded) turns on
    distillation with `config.distill`'s temperature and alpha."""
    model_cfg = pipelined(model_cfg, config, mesh)
    model = build(model_cfg)
    schedule = optim.schedule(config.optim, config.train.steps)
    optimizer = optim.make(config.optim, config.train.steps, mup.lr_multipliers(model_cfg, config.optim.name))
    rules = sharding.rules_from_config(config)
    replicated = sharding.replicated(mesh)

    boxed = abstract_params(model, config.data.seq_len)
    sharding.check_divisibility(boxed, mesh, rules)
    param_shardings = sharding.tree_shardings(mesh, rules, boxed)
    abstract_opt_state = jax.eval_shape(optimizer.init, nn.meta.unbox(boxed))
    # A state array shaped like its parameter is sharded like it. Parameter groups and Muon
    # partition the parameters: a group's state keeps MaskedNode (no array) where another
    # group's are; Adafactor's factored moments are smaller arrays, replicated.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    place = lambda x, param, s: x if masked(x) else s if x.shape == param.shape else replicated
    opt_shardings = optax.tree_map_params(optimizer, place, abstract_opt_state, nn.meta.unbox(boxed), param_shardings,
                                          transform_non_params=lambda _: replicated, is_leaf=masked)
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
                                microbatches=1 if model_cfg.pipeline_stages > 1 else config.train.microbatches,
                                teacher=teacher.model if teacher else None,
                                distill_temperature=config.distill.temperature, distill_alpha=config.distill.alpha)
    eval_fn = functools.partial(eval_step, model=model, make_example=make_example)
    return Trainer(
        model=model, model_cfg=model_cfg, mesh=mesh, rules=sharding.step_rules(config, mesh),
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        _init=jax.jit(init_state, out_shardings=state_shardings),
        _step=jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                      out_shardings=(state_shardings, replicated), donate_argnums=0),
        _eval=jax.jit(eval_fn, in_shardings=(param_shardings, batch_sharding, replicated),
                      out_shardings=replicated, donate_argnums=2),
        teacher_params=_place(teacher.params, replicated) if teacher else None)


def pipelined(model_cfg: ModelConfig, config: ml_collections.ConfigDict, mesh: Mesh) -> ModelConfig:
    """`model_cfg` running its layers as a pipeline over the mesh's `stage` axis (when it has
    more than one stage), with the config's repeats and microbatches (lm.model.pipeline).
    The train step then leaves microbatching to the pipeline."""
    stages = sharding.pipeline_stages(mesh)
    if stages == 1:
        return model_cfg
    return dataclasses.replace(model_cfg, pipeline_stages=stages, pipeline_repeats=config.mesh.pipeline_repeats,
                               pipeline_microbatches=config.train.microbatches)


def _place(tree: Any, target: jax.sharding.Sharding) -> Any:
    """Arrays go to `target`; shapes (an ahead-of-time compile's teacher) carry it."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target)
                        if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, target), tree)


# Evaluation steps dispatched ahead of the device at most. Unbounded, a long validation split
# on several XLA:CPU devices (a CPU run's mesh) queued a hundred steps whose collectives then
# deadlocked in XLA's in-process rendezvous (a 40 s timeout, then abort: data=2, eval batch
# 16, about 110 batches); on accelerators a few steps ahead already keep the device busy.
EVAL_STEPS_IN_FLIGHT = 8


def evaluate(trainer: Trainer, params: Any, dataset) -> float:
    """Mean token loss over every batch of `dataset` (summed on device, fetched once)."""
    from lm.data import batches  # late: lm.data brings Grain and TFDS, which the step itself never needs

    totals = tuple(jax.device_put(np.zeros((), np.float32), sharding.replicated(trainer.mesh)) for _ in range(2))
    for index, local_batch in enumerate(dataset, start=1):
        totals = trainer.eval_step(params, batches.to_global(local_batch, trainer.batch_sharding), totals)
        if index % EVAL_STEPS_IN_FLIGHT == 0:
            jax.block_until_ready(totals)
    loss_sum, weight_sum = jax.device_get(totals)
    return float(loss_sum) / max(float(weight_sum), 1.0)

"""The train state and the pure steps: one optimizer update of a global batch (with
microbatching and distillation), the update from gradients that fine-tuning shares, the
model's forward pass on an objective's example, and the evaluation step."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm import objectives
from lm.model.pipeline import microbatch_slices
from lm.objectives.distillation import distillation_kl_sum

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data; step t draws its noise from fold_in(rng, t)
    nonfinite_steps: jax.Array  # int32: steps whose loss or gradients were NaN/Inf (their updates were skipped)


class Update(NamedTuple):
    """What `apply_gradients` returns."""

    params: Any
    opt_state: Any
    grad_norm: jax.Array  # float32 scalar: the global L2 norm of the gradients (before clipping)
    finite: jax.Array  # bool scalar: False when the loss or the gradients held a NaN/Inf (no update applied)


def apply_gradients(params: Any, opt_state: Any, grads: Any, loss: jax.Array,
                    optimizer: optax.GradientTransformation) -> Update:
    """One optimizer update of `params` from their gradients `grads` (a tree like `params`).

    A NaN/Inf `loss` or gradient skips the update: parameters and optimizer state stay as
    they were, finite whatever the host decides, and `finite` says so.
    """
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return Update(params=keep_finite(optax.apply_updates(params, updates), params),
                  opt_state=keep_finite(new_opt_state, opt_state), grad_norm=grad_norm, finite=finite)


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
    example = laid_out(make_example(batch, objective_rng))

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
    update = apply_gradients(state.params, state.opt_state, grads, loss, optimizer)
    new_state = state.replace(step=state.step + 1, params=update.params, opt_state=update.opt_state,
                              nonfinite_steps=state.nonfinite_steps + (~update.finite).astype(jnp.int32))
    return new_state, {"loss": loss, "grad_norm": update.grad_norm, "lr": schedule(state.step),
                       "nonfinite_steps": new_state.nonfinite_steps}


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


def laid_out(example: objectives.Example) -> objectives.Example:
    """`example` with its targets and weights on the logits' batch layout. Where the step's
    rules split the batch further than the input arrives (over pipeline stages:
    lm.parallel.sharding.step_rules), the loss's gather of each target logit, and its
    scatter-add in the backward pass, then stay on each stage's own rows."""
    on_rows = lambda x_BL: nn.with_logical_constraint(x_BL, ("batch", "length"))
    return example._replace(targets_BL=on_rows(example.targets_BL), weights_BL=on_rows(example.weights_BL))


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
    example = laid_out(make_example(batch, jax.random.key(EVAL_RNG_SEED)))
    logits_BLV = apply(model, params, example)
    loss_sum, weight_sum = objectives.weighted_cross_entropy(logits_BLV, example.targets_BL, example.weights_BL)
    return totals[0] + loss_sum, totals[1] + weight_sum

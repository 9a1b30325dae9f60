"""Pipeline parallelism: the decoder's layers split into stages over the `stage` mesh axis,
microbatches flowing through them in a GPipe or a circular (interleaved) schedule.

Plain JAX under `jax.jit`, after MaxText's circular pipeline (and GSPMD's, Xu et al. 2021,
section 3.3): one loop iteration runs every stage at once, as a `vmap` over a leading
stage axis whose arrays are sharded over the `stage` mesh axis; between iterations each
stage's output shifts to the next stage (`jax.lax.ppermute`), and the last stage's goes
back to every stage (a masked `psum`) for the first to take in the next repeat or for the
head after the loop. The backward pass is the loop's autodiff: all microbatches forward, then all
backward (GPipe's order).

Schedule. S stages, R repeats (virtual stages per device), M microbatches (a multiple of
S: outside the pipeline each stage takes an equal share of the rows), L
layers in chunks of L / (S R). Chunk c = r S + s runs on stage s in repeat r, so a
microbatch passes stages 0..S-1 R times; it reaches stage s of repeat r at iteration
t = r M + m + s. The loop runs M R + S - 1 iterations, each stage idle for S - 1 of them:
a bubble fraction of (S - 1) / (M R + S - 1) (R = 1 is GPipe). The last stage's output
of repeat r waits in the microbatch buffer until stage 0 takes it for repeat r + 1,
M - S + 1 iterations later (hence M >= S).

Layout. Parameters keep the layout-free stacked axis [L, ...] of `scan_layers` in layer
order, sharded over `stage` by the `layers -> stage` rule: stage s holds layers
s L/S .. (s+1) L/S - 1, and a checkpoint restores onto any stage count. The pipeline
views the axis as [R, S, L/(S R)] (chunk r S + s at [r, s]); with R = 1 that view is
free, with R > 1 each step first moves (R - 1)/R of the layer weights between stages
to their chunk's stage (and their gradients back).

Shape letters (lm.model.transformer's legend, plus): M microbatches, S stages, R
repeats; b = B / M rows of one microbatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.errors import UsageError

Array = jax.Array
STAGE_AXIS = "stage"  # the mesh axis stages are spread over
_STAGES = "(config.mesh.shape.stage x config.mesh.dcn_shape.stage)"  # the fields that set the stage count


class PipelineError(UsageError):
    """A pipeline the model, the batch or the mesh cannot run; the message names the field and the fix."""


def iterations(stages: int, microbatches: int, repeats: int = 1) -> int:
    """The schedule's loop trip count: M R + S - 1."""
    return microbatches * repeats + stages - 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The share of stage-iterations spent idle, (S - 1) / (M R + S - 1) (GPipe, Huang et
    al. 2019, section 2.2 with R = 1; the circular schedule divides the idle time by R)."""
    return (stages - 1) / iterations(stages, microbatches, repeats)


def describe(stages: int, microbatches: int, repeats: int = 1) -> str:
    """The training log's line: the schedule, its loop trip count and its bubble fraction."""
    schedule = "GPipe" if repeats == 1 else f"circular, {repeats} repeats"
    return (f"pipeline: {stages} stages ({schedule}), {microbatches} microbatches: "
            f"{iterations(stages, microbatches, repeats)} iterations a step, bubble fraction "
            f"{bubble_fraction(stages, microbatches, repeats):.4f} = (S - 1) / (M R + S - 1)")


def describe_model(cfg) -> str | None:
    """`describe` for a pipelined ModelConfig (its pipeline_* fields); None without stages."""
    if cfg.pipeline_stages == 1:
        return None
    return describe(cfg.pipeline_stages, cfg.pipeline_microbatches, cfg.pipeline_repeats)


def check(num_layers: int, stages: int, repeats: int, microbatches: int, scan_layers: bool, family: str) -> None:
    """Raises PipelineError, naming the config field and the fix, for a pipeline of
    `stages` x `repeats` that this model or batch split cannot run."""
    if repeats < 1:
        raise PipelineError(f"config.mesh.pipeline_repeats={repeats} must be at least 1. Fix: 1 (GPipe) or the "
                            "number of virtual stages per device of a circular schedule.")
    if stages == 1:
        if repeats > 1:
            raise PipelineError(f"config.mesh.pipeline_repeats={repeats} needs a pipeline, but config.mesh.shape."
                                "stage=1. Fix: set mesh.shape.stage (or dcn_shape.stage) above 1, or "
                                "pipeline_repeats=1.")
        return
    if family == "encoder_decoder":
        raise PipelineError(f"{stages} pipeline stages {_STAGES}: the encoder_decoder family has no pipeline (its "
                            "decoder's every layer reads the encoder's output). Fix: mesh.shape.stage=1 and "
                            "dcn_shape.stage=1, with fsdp or tensor axes to split the model.")
    if not scan_layers:
        raise PipelineError(f"{stages} pipeline stages {_STAGES} need config.model.scan_layers=True: stages hold "
                            "slices of the stacked layer axis. Fix: set model.scan_layers=True.")
    if num_layers % (stages * repeats):
        raise PipelineError(
            f"config.model.num_layers={num_layers} does not split into {stages} stages {_STAGES} x {repeats} repeats "
            f"(config.mesh.pipeline_repeats): {stages * repeats} chunks of equal depth. "
            f"Fix: a layer count that is a multiple of {stages * repeats}, or fewer stages or repeats.")
    if microbatches < stages:
        raise PipelineError(
            f"config.train.microbatches={microbatches} is fewer than the {stages} pipeline stages {_STAGES}: "
            f"some stages would never work. Fix: train.microbatches >= {stages}, a multiple of {stages} (the bubble "
            "fraction is (S - 1) / (M R + S - 1): more microbatches, a smaller bubble).")
    if microbatches % stages:
        raise PipelineError(
            f"config.train.microbatches={microbatches} is not a multiple of the {stages} pipeline stages {_STAGES}: "
            "outside the pipeline each stage takes an equal share of the microbatches' rows (the embedding, the "
            f"head and the loss). Fix: train.microbatches={microbatches + stages - microbatches % stages} or "
            f"{microbatches - microbatches % stages}.")


def microbatch_slices(x_B: Array, microbatches: int) -> Array:
    """[B, ...] -> [M, B/M, ...], slice m holding rows m, m + M, m + 2M, ...

    Strided rather than contiguous: each device's rows of the batch split evenly across
    the slices, so no slice has to move between devices.
    """
    rows = x_B.shape[0]
    return x_B.reshape(rows // microbatches, microbatches, *x_B.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x_M: Array) -> Array:
    """The inverse of `microbatch_slices`: [M, B/M, ...] -> [B, ...]."""
    return x_M.swapaxes(0, 1).reshape(-1, *x_M.shape[2:])


ACTIVATION_AXES = ("batch", "length", "act_embed")  # the logical axes of a microbatch's x_bLD


def _on_stages(x_S: Array, names: tuple[str, ...] = ()) -> Array:
    """`x_S` [S, ...] with its stage axis on the `stage` mesh axis and the others on the
    mesh axes the current rules give `names` (left to the compiler without names); outside
    a mesh with a `stage` axis, `x_S` as it is."""
    if not _under_stage_mesh():
        return x_S
    rest = tuple(nn.logical_to_mesh_axes(names)) if names else (P.UNCONSTRAINED,) * (x_S.ndim - 1)
    return jax.lax.with_sharding_constraint(x_S, P(STAGE_AXIS, *rest))


def _under_stage_mesh() -> bool:
    """Whether the context's mesh has a `stage` axis."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and STAGE_AXIS in mesh.axis_names


def _shift_to_next_stage(x_S: Array) -> Array:
    """[S, ...] -> [S, ...] with entry s holding x[s - 1] (and entry 0 x[S - 1]): under a
    mesh, one collective permute over `stage` (`jax.lax.ppermute` in a `jax.shard_map`
    manual over that axis alone). Left to the partitioner, the slice-and-concatenate
    becomes all-to-alls, which deadlock XLA:CPU's in-process collectives in a loop."""
    if not _under_stage_mesh():
        return jnp.roll(x_S, 1, axis=0)
    stages = x_S.shape[0]
    send = lambda x: jax.lax.ppermute(x, STAGE_AXIS, [(s, (s + 1) % stages) for s in range(stages)])
    return jax.shard_map(send, in_specs=P(STAGE_AXIS), out_specs=P(STAGE_AXIS), axis_names={STAGE_AXIS})(x_S)


def _last_stage(x_S: Array) -> Array:
    """x[S - 1], on every stage: under a mesh, the last stage's entry summed over `stage`
    with the others' zeros (one all-reduce of one entry)."""
    if not _under_stage_mesh():
        return x_S[-1]
    stages = x_S.shape[0]

    def broadcast(x):
        mine = jnp.where(jax.lax.axis_index(STAGE_AXIS) == stages - 1, x[0], jnp.zeros_like(x[0]))
        return jax.lax.psum(mine, STAGE_AXIS)

    return jax.shard_map(broadcast, in_specs=P(STAGE_AXIS), out_specs=P(), axis_names={STAGE_AXIS})(x_S)


def stage_chunks(layers_L: Any, stages: int, repeats: int) -> Any:
    """Stacked layer variables [L, ...] -> [S, R, L/(S R), ...]: entry [s, r] is chunk
    r S + s, the layers stage s runs in repeat r."""
    def split(v):
        chunk = v.shape[0] // (stages * repeats)
        return _on_stages(v.reshape(repeats, stages, chunk, *v.shape[1:]).swapaxes(0, 1))
    return jax.tree.map(split, layers_L)


LayerFn = Callable[[Any, Array, tuple, Array | None], Array]


def run(layer_fn: LayerFn, layers_L: Any, x_BLD: Array, context_BL: tuple, *, stages: int, repeats: int,
        microbatches: int, rng: Array | None = None) -> Array:
    """The layers applied to `x_BLD` [B, L, D] in order, by the pipeline schedule.

    `layer_fn(variables, x_bLD, context_bL, rng)` applies one layer (its `variables`: one
    slice of `layers_L`'s stacked [L, ...] leaves) to one microbatch; `context_BL` holds
    per-row [B, L] arrays or None (positions, segment ids, prefix), split like `x_BLD`.
    `rng` (dropout; None when deterministic) is folded with the microbatch and the layer.
    Returns [B, L, D], equal to applying the L layers in turn to the whole batch.
    """
    S, R, M = stages, repeats, microbatches
    chunks_SR = stage_chunks(layers_L, S, R)
    depth = jax.tree.leaves(layers_L)[0].shape[0] // (S * R)
    x_MbLD = microbatch_slices(x_BLD, M)
    context_MbL = tuple(None if c is None else microbatch_slices(c, M) for c in context_BL)

    def stage(chunks_R, repeat, x_bLD, context_bL, first_layer, micro):
        """One stage's work in one iteration: its chunk of the current repeat, layer by layer."""
        chunk = jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, repeat, keepdims=False), chunks_R)

        def one_layer(x, inputs):
            variables, i = inputs
            key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, micro), first_layer + i)
            return layer_fn(variables, x, context_bL, key), None

        return jax.lax.scan(one_layer, x_bLD, (chunk, jnp.arange(depth)))[0]

    def iteration(carry, t):
        outputs_SbLD, buffer_MbLD = carry
        s_S = jnp.arange(S)
        k_S = t - s_S  # the (repeat, microbatch) step each stage is at: k = r M + m
        micro_S, repeat_S = k_S % M, jnp.clip(k_S // M, 0, R - 1)
        first_bLD = jax.lax.dynamic_index_in_dim(buffer_MbLD, t % M, keepdims=False)
        from_previous_SbLD = _shift_to_next_stage(outputs_SbLD)  # stage s reads s - 1's output
        inputs_SbLD = _on_stages(jnp.where((s_S == 0)[:, None, None, None], first_bLD[None], from_previous_SbLD),
                                 ACTIVATION_AXES)
        context_SbL = tuple(None if c is None else jnp.take(c, micro_S, axis=0) for c in context_MbL)
        outputs_SbLD = jax.vmap(stage, spmd_axis_name=STAGE_AXIS)(
            chunks_SR, repeat_S, inputs_SbLD, context_SbL, (repeat_S * S + s_S) * depth, micro_S)
        outputs_SbLD = _on_stages(outputs_SbLD, ACTIVATION_AXES)
        done = t - (S - 1)  # the step the last stage finished: its output goes back to the buffer
        slot = done % M
        finished = (done >= 0) & (done < M * R)
        kept = jax.lax.dynamic_index_in_dim(buffer_MbLD, slot, keepdims=False)
        buffer_MbLD = jax.lax.dynamic_update_index_in_dim(
            buffer_MbLD, jnp.where(finished, _last_stage(outputs_SbLD), kept), slot, axis=0)
        return (outputs_SbLD, buffer_MbLD), None

    with replicated_over_stages():  # `stage` is the vmap's inside
        start = (_on_stages(jnp.zeros((S, *x_MbLD.shape[1:]), x_MbLD.dtype), ACTIVATION_AXES),
                 x_MbLD)
        (_, buffer_MbLD), _ = jax.lax.scan(iteration, start, jnp.arange(iterations(S, M, R)))
    return merge_microbatches(buffer_MbLD)


def replicated_over_stages():
    """A context in which the logical axis rules leave the `stage` mesh axis out
    (`without_stages`): the pipeline's inside."""
    return nn.logical_axis_rules(without_stages(nn.get_logical_axis_rules()))


def without_stages(rules: tuple) -> tuple:
    """The logical axis rules with the `stage` mesh axis taken out of every rule: inside the
    pipeline the stage axis is the vmap's (a rule splitting the batch over the stages
    outside it, lm.parallel.sharding.step_rules, must not apply there)."""
    drop = lambda axes: (tuple(a for a in axes if a != STAGE_AXIS) or None) if isinstance(axes, tuple) else (
        None if axes == STAGE_AXIS else axes)
    return tuple((name, drop(axes)) for name, axes in rules)

"""Device mesh and shardings, from the config's mesh shape and logical axis rules.

Every parameter and activation carries logical axis names; `config.sharding.rules`
maps them onto the mesh axes `data, fsdp, tensor`. Data parallel, FSDP and tensor
parallel are different rule tables and mesh shapes, never different code paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm.config import MESH_AXES
from lm.errors import UsageError
from lm.model import pipeline


class MeshError(UsageError):
    """A mesh that does not fit the devices or the model; the message names the axis and the fix."""

Rules = Sequence[tuple[str, Any]]


def mesh_shape(shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a -1 axis and checks the product equals the device count."""
    sizes = {axis: shape.get(axis, 1) for axis in MESH_AXES}  # a config from before stages has none
    fixed = math.prod(s for s in sizes.values() if s != -1)
    described = describe(sizes)
    if -1 in sizes.values():
        if num_devices % fixed:
            raise MeshError(
                f"config.mesh.shape ({described}) cannot fill {num_devices} devices: the fixed axes "
                f"multiply to {fixed}, which does not divide {num_devices}. Fix: choose axis sizes "
                f"whose product divides {num_devices}.")
        sizes = {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
    elif fixed != num_devices:
        raise MeshError(
            f"config.mesh.shape ({described}) needs {fixed} devices, but {num_devices} are available. "
            f"Fix: make the sizes multiply to {num_devices}, or set one axis to -1.")
    return tuple(sizes.values())


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of `config.mesh.shape` over `devices` (default: all devices, all processes).

    With `config.mesh.dcn_shape` > 1 somewhere, the run spans slices (TPU multislice) or
    nodes: `mesh.shape` is then the mesh within one slice or node (ICI, NVLink) and each
    mesh axis is `dcn_shape[axis] x shape[axis]`, the slower network on the outside.
    """
    devices = list(devices) if devices is not None else jax.devices()
    # Auto axes: GSPMD propagates shardings from the logical constraints, so no op has
    # to name its output sharding (Explicit axes would demand that of every matmul).
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    dcn = tuple(dict(config.mesh.dcn_shape).get(axis, 1) for axis in MESH_AXES)
    granules = math.prod(dcn)
    if granules == 1:
        shape = mesh_shape(dict(config.mesh.shape), len(devices))
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if len(devices) % granules:
        raise MeshError(
            f"config.mesh.dcn_shape ({describe(dict(zip(MESH_AXES, dcn)))}) makes {granules} slices or nodes, "
            f"which does not divide the {len(devices)} devices. Fix: make its sizes multiply to the number of "
            "slices (TPU multislice) or nodes.")
    # TPU multislice: slices are the granules. GPUs and CPUs report one slice: nodes (processes) are.
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    by_process = slices < granules
    processes = len({d.process_index for d in devices})
    if by_process and processes != granules:
        raise MeshError(
            f"config.mesh.dcn_shape ({describe(dict(zip(MESH_AXES, dcn)))}) spreads the mesh over {granules} "
            f"slices or nodes, but these {len(devices)} devices form {slices} slice(s) in {processes} process(es). "
            "Fix: keep dcn_shape at 1 on one slice or node, or run one process a node on that many nodes (for "
            f"an ahead-of-time check: --topology=<TPU slice> --num_slices={granules}).")
    ici = mesh_shape(dict(config.mesh.shape), len(devices) // granules)
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def rules_from_config(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The rule table as hashable tuples (a config read back from JSON holds lists)."""
    as_axes = lambda axes: tuple(axes) if isinstance(axes, (list, tuple)) else axes
    return tuple((str(name), as_axes(axes)) for name, axes in config.sharding.rules)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split (the product of its mesh axes)."""
    return math.prod(mesh.shape[a] for a in _axes_of("batch", rules))


def pipeline_stages(mesh: Mesh) -> int:
    """Pipeline stages: the `stage` axis's size (slices x devices within one)."""
    return dict(mesh.shape).get(pipeline.STAGE_AXIS, 1)


def step_rules(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """The rules the train and eval steps run under. In a pipeline, the batch is split over
    `stage` too outside the pipeline: each stage computes the embedding, the head and the
    loss for its share of the rows, not all of them (the pipeline itself sees every row:
    lm.model.pipeline drops `stage` from the rules inside). `check_batch_sizes` makes sure
    the rows divide (microbatches are a multiple of the stages)."""
    rules = rules_from_config(config)
    if pipeline_stages(mesh) == 1:
        return rules
    batch = (pipeline.STAGE_AXIS, *_axes_of("batch", rules))
    return tuple((name, batch if name == "batch" else axes) for name, axes in rules)


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Raises MeshError (or a PipelineError) when the batch sizes, microbatches or pipeline
    do not fit the mesh."""
    stages = pipeline_stages(mesh)
    pipeline.check(config.model.num_layers, stages, config.mesh.pipeline_repeats, config.train.microbatches,
                   config.model.scan_layers, config.model.family)
    rules = rules_from_config(config)
    check_row_length(config, mesh, rules)
    if stages > 1 and pipeline.STAGE_AXIS not in _axes_of("layers", rules):
        logging.warning("lm: config.sharding.rules does not map 'layers' to 'stage': every one of the %d pipeline "
                        "stages holds every layer's weights. Fix: the rule ('layers', 'stage').", stages)
    shards = batch_shards(mesh, rules)
    for field in ("train.batch_size", "eval.batch_size"):
        section, name = field.split(".")
        value = config[section][name]
        if value % shards:
            raise MeshError(
                f"config.{field}={value} is not divisible by the {shards} batch shards of the mesh "
                f"({describe(mesh.shape)}). Fix: use a multiple of {shards}, or change config.mesh.shape.")
    micro = config.train.microbatches
    if config.train.batch_size % (micro * shards):
        raise MeshError(
            f"config.train.batch_size={config.train.batch_size} does not split into "
            f"config.train.microbatches={micro} slices of a multiple of the {shards} batch shards "
            f"({describe(mesh.shape)}). Fix: use a batch size that is a multiple of {micro * shards}, "
            "or fewer microbatches.")
    if stages > 1 and config.eval.batch_size % (micro * shards):  # evaluation runs through the pipeline too
        raise MeshError(
            f"config.eval.batch_size={config.eval.batch_size} is not a multiple of config.train.microbatches="
            f"{micro} x the {shards} batch shards ({describe(mesh.shape)}) = {micro * shards}: evaluation runs through "
            f"the pipeline's microbatches too. Fix: an eval batch size that is a multiple of {micro * shards}.")


def _axes_of(logical: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes the rules map a logical axis to."""
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    return spec if isinstance(spec, tuple) else (spec,) if spec else ()


def check_row_length(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules) -> None:
    """A batch arrives as rows of data.seq_len + 1 tokens (inputs and their shifted targets)
    placed by the rules' ("batch", "length") layout: a rule splitting `length` over mesh
    axes must divide that length, else MeshError naming the rule and the fix."""
    axes = _axes_of("length", rules)
    ways = math.prod(mesh.shape[a] for a in axes)
    row = config.data.seq_len + 1
    if row % ways:
        raise MeshError(
            f"config.sharding.rules map 'length' to {axes} ({ways} devices), which does not divide the batch's "
            f"rows of data.seq_len + 1 = {row} tokens (inputs and their shifted targets). Fix: the rule "
            "('length', None) (activations inside the model follow the act_* rules), or a data.seq_len + 1 that "
            f"is a multiple of {ways}.")


FIXES = {  # logical axis -> the config field that sets its size
    "heads": "config.model.num_heads", "kv_heads": "config.model.num_kv_heads", "embed": "config.model.d_model",
    "mlp": "config.model.d_ff", "vocab": "config.model.vocab_size (the tokenizer's ids plus padding)",
    "layers": "config.model.num_layers",
}


def check_divisibility(boxed_params: Any, mesh: Mesh, rules: Rules) -> None:
    """Every sharded parameter dimension must split evenly over its mesh axes."""
    leaves = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in leaves:
        if not isinstance(leaf, nn.Partitioned):
            continue
        for dim, (name, axes) in enumerate(zip(leaf.names, nn.logical_to_mesh_axes(leaf.names, rules))):
            axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            ways = math.prod(mesh.shape[a] for a in axes)
            size = leaf.value.shape[dim]
            if size % ways:
                where = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise MeshError(
                    f"parameter {jax.tree_util.keystr(path)} has {size} along {name!r}, which the sharding rules "
                    f"split over {where} ({ways} devices); {ways} does not divide {size}. Fix: make "
                    f"{FIXES.get(name, 'that dimension')} a multiple of {ways}, or change config.mesh.shape.")


def describe(sizes: Mapping[str, int]) -> str:
    """`data=2 x fsdp=4 x tensor=1`; the stage axis only when it pipelines (not 1)."""
    return " x ".join(f"{axis}={size}" for axis, size in sizes.items()
                      if axis != pipeline.STAGE_AXIS or size != 1)




def logical_sharding(mesh: Mesh, rules: Rules, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))


def tree_shardings(mesh: Mesh, rules: Rules, boxed_tree: Any) -> Any:
    """NamedShardings for a tree whose leaves are `nn.Partitioned` boxes (or abstract ones)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings`: the
    target a checkpoint restores onto, or an ahead-of-time compile's inputs."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

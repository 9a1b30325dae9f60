"""Ahead-of-time compile check: compile the train step for a mesh of any size and print
its per-device memory, without allocating parameters, optimizer state or data.

    python -m lm.main --config=configs/gpt2_small.py --compile_only --topology=cpu:64

On a laptop `--topology=cpu:N` stands in N fake CPU devices for the pod's N chips, so
the mesh, the sharding rules and the batch split are checked as the pod would see them
(the memory figures are XLA's CPU ones: same shapes and shardings, CPU's layouts). On the
accelerator itself, `--compile_only` without `--topology` compiles for the real devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import tempfile
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from lm.data import corpus
from lm.model import ModelConfig, build, pipeline
from lm.model.counting import abstract_params, param_counts, peak_flops, train_flops_per_token
from lm.parallel import sharding, topologies
from lm.runs import artifacts
from lm.training import memory
from lm.training.setup import check_teacher
from lm.training.trainer import make_trainer


@dataclasses.dataclass(frozen=True)
class Target:
    """What `--topology` asks to compile for: N fake CPU devices, TPU slices, or (neither)
    this machine's own devices."""

    cpu_devices: int = 0  # cpu:N
    slices: topologies.Slices | None = None  # v5p-128 and --num_slices

    @property
    def host_cpu_devices(self) -> int:
        """The CPU devices to start this process with (a TPU target compiles from one)."""
        return 1 if self.slices else self.cpu_devices


def target(topology: str | None, compile_only: bool, num_slices: int = 1) -> Target:
    """The devices `--topology` (and `--num_slices`) name.

    Raises ValueError (or TopologyError) for a topology without --compile_only, a name that
    is neither cpu:N nor a Cloud TPU slice, or --num_slices without a TPU slice.
    """
    if num_slices < 1:
        raise ValueError(f"--num_slices={num_slices} must be at least 1. Fix: give the number of TPU slices.")
    if not topology:
        if num_slices != 1:
            raise ValueError(f"--num_slices={num_slices} needs a TPU slice to multiply. Fix: add --compile_only "
                             "and a slice, e.g. --topology=v5p-128.")
        return Target()
    if not compile_only:
        raise ValueError(f"--topology={topology} only applies to an ahead-of-time check. Fix: add --compile_only.")
    kind, _, count = topology.strip().partition(":")
    if kind != "cpu" and re.fullmatch(r"v\d+[a-z]*-\d+", topology.strip(), re.IGNORECASE):
        return Target(slices=topologies.parse(topology, num_slices))  # an unknown generation is its own message
    if kind == "cpu" and count.isdigit() and int(count) < 1:
        raise ValueError(f"--topology={topology}: N must be at least 1. Fix: e.g. --topology=cpu:8.")
    if kind != "cpu" or not count.isdigit():
        raise ValueError(f"--topology={topology!r} is not a topology this check can compile for. Fix: give a "
                         "Cloud TPU slice (e.g. v5p-128, v5e-16) or cpu:N for N fake CPU devices; on a TPU or "
                         "GPU machine, drop --topology to compile for its real devices.")
    if num_slices != 1:
        raise ValueError(f"--num_slices={num_slices} multiplies TPU slices, not cpu:{count}. Fix: check a "
                         f"multi-slice layout with a TPU slice name (e.g. --topology=v5e-16 "
                         f"--num_slices={num_slices} --config.mesh.dcn_shape.data={num_slices}).")
    return Target(cpu_devices=int(count))


def _tokenizer_vocab_size(config: ml_collections.ConfigDict) -> int:
    """The tokenizer's vocabulary: the config's model vocabulary less the objective's extra ids,
    else the corpus tokenizer's."""
    if config.model.vocab_size:
        return config.model.vocab_size - config.objective.extra_ids
    with tempfile.TemporaryDirectory() as tmp:
        return corpus.prepare(config, os.path.join(tmp, "tokenizer.json")).tokenizer.vocab_size


def abstract_teacher(config: ml_collections.ConfigDict, tokenizer_vocab: int,
                     platform: str | None = None) -> artifacts.Loaded | None:
    """Distillation's teacher as the step needs it, from its config.json alone: its model
    and parameter shapes (the check reads no weights, which may live only on the pod)."""
    if not config.distill.teacher:
        return None
    teacher_config = artifacts.load_config(config.distill.teacher)
    model_cfg = ModelConfig.for_run(teacher_config, tokenizer_vocab, platform, strict=False)  # its kernel here
    check_teacher(config, model_cfg)
    model = build(model_cfg)
    params = nn.meta.unbox(abstract_params(model, config.data.seq_len))
    return artifacts.Loaded(teacher_config, model_cfg, model, params, tokenizer=None, step=-1)


def compile_and_report(config: ml_collections.ConfigDict, slices: topologies.Slices | None = None) -> dict:
    """Compiles the train step for all devices, or for TPU `slices` with the TPU compiler
    (no TPU needed), and prints what one device needs: memory against its memory, FLOPs
    per step beside lm's count, and the step time and MFU those FLOPs bound.

    Returns XLA's per-device bytes (arguments, outputs, aliased, temporaries, total) and
    the FLOP figures. Raises memory.DoesNotFitError when the step does not fit a device's
    memory (a TPU chip's HBM, or a GPU's), after the report; MeshError or TopologyError
    for a mesh or slice that cannot be built.
    """
    mesh = _mesh(config, slices)
    sharding.check_batch_sizes(config, mesh)
    tokenizer_vocab = _tokenizer_vocab_size(config)
    platform = "tpu" if slices else None  # the attention kernel is the target's, not this machine's
    model_cfg = ModelConfig.for_run(config, tokenizer_vocab, platform)
    trainer = make_trainer(config, model_cfg, mesh, pad_id=0, tokenizer_vocab_size=tokenizer_vocab,
                           teacher=abstract_teacher(config, tokenizer_vocab, platform))
    abstract, model_cfg = trainer.abstract_state(), trainer.model_cfg  # the model as trained: pipelined or not
    _print_header(config, model_cfg, mesh, slices, param_counts(abstract.params)["total"])
    estimate = memory.estimate(abstract, model_cfg, config, dict(mesh.shape))
    limit = slices.chip.hbm_bytes if slices else memory.device_limit(jax.devices()[0])
    fit = functools.partial(memory.does_not_fit, limit=limit, config=config, mesh_shape=dict(mesh.shape),
                            cfg=model_cfg, state_bytes=estimate["total"] - estimate["activations"])
    compiled = _compile(trainer, config, slices, estimate, fit if limit else None)
    analysis = compiled.memory_analysis()
    xla = {"arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
           "aliased": analysis.alias_size_in_bytes, "temporaries": analysis.temp_size_in_bytes}
    xla["total"] = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
    print(f"per device, estimated: {memory.describe(estimate)}")
    print(f"per device, compiled ({'TPU compiler' if slices else 'XLA'}): {memory.describe(xla)}")
    flops = flop_counts(compiled, model_cfg, config, mesh.size)
    peak = slices.chip.peak_flops if slices else peak_flops(mesh.devices.flat[0].device_kind,
                                                           config.train.peak_flops_per_device)
    for line in describe_flops(flops, model_cfg, config, mesh.size, peak):
        print(line)
    if limit:
        chip = f"a TPU {slices.chip.generation} chip's {memory.human(limit)} of HBM" if slices else \
            f"the device's {memory.human(limit)}"
        fits = xla["total"] <= limit
        print(f"memory: the step {'fits' if fits else 'does NOT fit'} in {chip} "
              f"({memory.human(xla['total'])} needed, {100 * xla['total'] / limit:.0f}%)", flush=True)
        if not fits:
            raise memory.DoesNotFitError(fit(xla["total"], breakdown=memory.describe(xla)))
    return {**xla, **flops}


def _print_header(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: jax.sharding.Mesh,
                  slices: topologies.Slices | None, parameters: int) -> None:
    """The first line of the report: the model, the devices, the mesh and the attention
    kernel that serves (and the one chosen, where it falls back)."""
    layout = sharding.describe(mesh.shape)
    where = slices.describe() if slices else f"{mesh.size} {jax.devices()[0].platform} devices"
    served = memory.attention_kernel(model_cfg, config)
    fallback = f" ({model_cfg.attention} falls back to it here)" if served != model_cfg.attention else ""
    print(f"compiling the train step: {parameters:,} parameters for {where}, mesh {layout}, {served} attention"
          f"{fallback}", flush=True)
    schedule = pipeline.describe_model(model_cfg)
    if schedule:
        print(schedule, flush=True)


def _compile(trainer: Any, config: ml_collections.ConfigDict, slices: topologies.Slices | None,
             estimate: dict[str, int], does_not_fit: Any) -> Any:
    """The compiled train step. The TPU compiler refuses a program its HBM cannot hold:
    that is a DoesNotFitError (with `does_not_fit`'s message) after the estimate."""
    try:
        with _no_cache_writes() if slices else contextlib.nullcontext():
            return trainer.compile_step(config.train.batch_size, config.data.seq_len)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) or does_not_fit is None:
            raise
        print(f"per device, estimated: {memory.describe(estimate)}")
        said = str(e).splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")
        print(f"memory: the step does NOT fit: the compiler says: {said}", flush=True)
        raise memory.DoesNotFitError(does_not_fit(_bytes_said(said) or estimate["total"],
                                                  breakdown=f"the compiler: {said}")) from None


@contextlib.contextmanager
def _no_cache_writes():
    """Keeps compiled programs out of the persistent compilation cache: a compile-only TPU
    program cannot be read back (there is no TPU client to load it), so every later read
    would warn and recompile."""
    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    jax.config.update(name, float("inf"))
    try:
        yield
    finally:
        jax.config.update(name, before)


def _bytes_said(message: str) -> int:
    """The bytes in a compiler's out-of-memory message ("... required ... (32.34G) exceeds ..."), or 0."""
    match = re.search(r"\((\d+(?:\.\d+)?)([KMGT])\)", message)
    return int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024) if match else 0


def _mesh(config: ml_collections.ConfigDict, slices: topologies.Slices | None) -> jax.sharding.Mesh:
    """The run's mesh over this machine's devices, or over compile-only TPU devices."""
    if slices is None:
        return sharding.make_mesh(config)
    granules = math.prod(dict(config.mesh.dcn_shape).values())
    if granules != slices.num_slices:
        fix = (f"make config.mesh.dcn_shape's sizes multiply to {slices.num_slices}: "
               f"--config.mesh.dcn_shape.data={slices.num_slices} (data parallel across the slices over DCN) or "
               f"--config.mesh.dcn_shape.stage={slices.num_slices} (pipeline stages across them), the other axes at 1"
               if slices.num_slices > 1 else
               f"--num_slices={granules} to compile for {granules} slices, or dcn_shape sizes of 1 for one")
        raise topologies.TopologyError(
            f"--num_slices={slices.num_slices} but config.mesh.dcn_shape ({dict(config.mesh.dcn_shape)}) spreads "
            f"the mesh over {granules} slice(s). Fix: {fix}.")
    return sharding.make_mesh(config, topologies.compile_devices(slices))


def flop_counts(compiled: Any, model_cfg: ModelConfig, config: ml_collections.ConfigDict,
                devices: int) -> dict[str, float]:
    """FLOPs of one train step: the compiled program's (XLA's cost analysis, per device
    times devices) and lm's (`train_flops_per_token` times the step's tokens)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per program
    tokens = config.train.batch_size * config.data.seq_len
    return {"flops_per_step_compiled": float((cost or {}).get("flops", 0.0)) * devices,
            "flops_per_step_lm": train_flops_per_token(model_cfg, config.data.seq_len) * tokens}


def flop_differences(model_cfg: ModelConfig, config: ml_collections.ConfigDict) -> list[str]:
    """Why the compiled program's FLOPs differ from lm's count, for this config."""
    reasons = []
    if model_cfg.remat != "none":
        reasons.append(f"remat={model_cfg.remat!r} recomputes forward matmuls in the backward pass (XLA counts them)")
    kernel = memory.attention_kernel(model_cfg, config)
    if model_cfg.family != "encoder" and kernel == "xla":
        reasons.append("XLA counts causal attention's score matmuls in full, lm at half")
    stages, repeats = model_cfg.pipeline_stages, model_cfg.pipeline_repeats
    if stages > 1:
        depth, trips = model_cfg.num_layers // (stages * repeats), pipeline.iterations(
            stages, config.train.microbatches, repeats)
        reasons.append(f"XLA counts the pipeline loop's body (every stage, {depth} scanned layers each) once, "
                       f"not {trips} times, bubble included")
    elif model_cfg.scan_layers:
        reasons.append(f"XLA counts the scanned layers' loop body once, not {model_cfg.num_layers} times")
    if config.train.microbatches > 1 and stages == 1:
        reasons.append(f"XLA counts the microbatch loop's body once, not {config.train.microbatches} times")
    if kernel != "xla":
        reasons.append(f"XLA's cost analysis cannot see inside the {kernel} attention kernel")
    reasons.append("XLA also counts element-wise work (norms, softmax, the optimizer), lm only matmuls")
    return reasons


def describe_flops(flops: dict[str, float], model_cfg: ModelConfig, config: ml_collections.ConfigDict,
                   devices: int, peak: float) -> list[str]:
    """The FLOP lines of the report: both counts and why they differ, then (with a known
    peak) the step time the larger count needs at the peak and the MFU that bounds."""
    compiled, counted = flops["flops_per_step_compiled"], flops["flops_per_step_lm"]
    lines = [f"FLOPs per step: compiled program {compiled:.4g} (per device x {devices}), lm's count {counted:.4g} "
             f"(ratio {compiled / counted:.3f})" if counted else f"FLOPs per step: compiled {compiled:.4g}"]
    lines += [f"  differs because: {reason}" for reason in flop_differences(model_cfg, config)]
    if peak:
        # Full remat runs each layer's forward twice: 8 of lm's 6 FLOPs a parameter and token.
        executed = counted * (8 / 6 if model_cfg.remat == "full" else 1.0)
        seconds = max(compiled, executed) / devices / peak
        tokens = config.train.batch_size * config.data.seq_len
        lines.append(f"step time at least {1e3 * seconds:.1f} ms at {peak / 1e12:.0f} TFLOP/s a device "
                     f"(bf16 peak): at most {tokens / seconds:,.0f} tokens/s and "
                     f"{100 * counted / (seconds * devices * peak):.0f}% MFU (memory traffic and "
                     "communication only add to it)")
    return lines

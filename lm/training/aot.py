"""Ahead-of-time compile check: compile the train step for a mesh of any size and print
its per-device memory, without allocating parameters, optimizer state or data.

    python -m lm.main --config=configs/gpt2_small.py --compile_only --topology=cpu:64

On a laptop `--topology=cpu:N` stands in N fake CPU devices for the pod's N chips, so
the mesh, the sharding rules and the batch split are checked as the pod would see them
(the memory figures are XLA's CPU ones: same shapes and shardings, CPU's layouts). On the
accelerator itself, `--compile_only` without `--topology` compiles for the real devices.
"""

from __future__ import annotations

import os
import re
import tempfile

import flax.linen as nn
import jax
import ml_collections

from lm.data import corpus
from lm.model import ModelConfig, build
from lm.model.counting import abstract_params, param_counts
from lm.parallel import sharding, topologies
from lm.runs import artifacts
from lm.training import memory
from lm.training.setup import check_teacher
from lm.training.trainer import make_trainer


def topology_devices(topology: str | None, compile_only: bool) -> int:
    """The fake CPU device count `--topology` asks for (0: the machine's own devices)."""
    if not topology:
        return 0
    if not compile_only:
        raise ValueError(f"--topology={topology} only applies to an ahead-of-time check. Fix: add --compile_only.")
    kind, _, count = topology.partition(":")
    if kind != "cpu" and re.fullmatch(r"v\d+[a-z]*-\d+", topology):
        slices = topologies.parse(topology)  # an unknown generation or size is its own message
        raise topologies.TopologyError(
            f"--topology={topology} ({slices.describe()}): compiling with the TPU compiler is not in lm yet. Fix: "
            f"check the mesh on {slices.chips} fake CPU devices with --topology=cpu:{slices.chips} (XLA:CPU's "
            "memory figures, not the chip's).")
    if kind != "cpu" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--topology={topology!r} is not a topology this check can fake. Fix: use cpu:N for "
                         "N fake CPU devices (e.g. cpu:64 for a 64-chip slice); on a TPU or GPU machine, "
                         "drop --topology to compile for its real devices.")
    return int(count)


def _tokenizer_vocab_size(config: ml_collections.ConfigDict) -> int:
    """The tokenizer's vocabulary: the config's model vocabulary less the objective's extra ids,
    else the corpus tokenizer's."""
    if config.model.vocab_size:
        return config.model.vocab_size - config.objective.extra_ids
    with tempfile.TemporaryDirectory() as tmp:
        return corpus.prepare(config, os.path.join(tmp, "tokenizer.json")).tokenizer.vocab_size


def abstract_teacher(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> artifacts.Loaded | None:
    """Distillation's teacher as the step needs it, from its config.json alone: its model
    and parameter shapes (the check reads no weights, which may live only on the pod)."""
    if not config.distill.teacher:
        return None
    teacher_config = artifacts.load_config(config.distill.teacher)
    model_cfg = ModelConfig.for_run(teacher_config, tokenizer_vocab)
    check_teacher(config, model_cfg)
    model = build(model_cfg)
    params = nn.meta.unbox(abstract_params(model, config.data.seq_len))
    return artifacts.Loaded(teacher_config, model_cfg, model, params, tokenizer=None, step=-1)


def compile_and_report(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Compiles the train step for all devices and prints the memory each one needs."""
    mesh = sharding.make_mesh(config)
    sharding.check_batch_sizes(config, mesh)
    tokenizer_vocab = _tokenizer_vocab_size(config)
    model_cfg = ModelConfig.for_run(config, tokenizer_vocab)
    trainer = make_trainer(config, model_cfg, mesh, pad_id=0, tokenizer_vocab_size=tokenizer_vocab,
                           teacher=abstract_teacher(config, tokenizer_vocab))
    abstract = trainer.abstract_state()
    counts = param_counts(abstract.params)
    layout = " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    print(f"compiling the train step: {counts['total']:,} parameters on {mesh.size} "
          f"{jax.devices()[0].platform} devices, mesh {layout}", flush=True)
    estimate = memory.estimate(abstract, model_cfg, config, dict(mesh.shape))
    compiled = trainer.compile_step(config.train.batch_size, config.data.seq_len)
    analysis = compiled.memory_analysis()
    xla = {"arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
           "aliased": analysis.alias_size_in_bytes, "temporaries": analysis.temp_size_in_bytes}
    xla["total"] = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
    print(f"per device, estimated: {memory.describe(estimate)}")
    print(f"per device, compiled (XLA): {memory.describe(xla)}")
    limit = memory.device_limit(jax.devices()[0])
    if limit:
        verdict = "fits" if xla["total"] <= limit else "does NOT fit"
        print(f"device memory {memory.human(limit)}: the step {verdict}")
    return xla

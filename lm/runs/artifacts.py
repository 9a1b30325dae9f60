"""What a run leaves behind, read back: its config, tokenizer and parameters, from a
training workdir (the latest or a given checkpoint) or from a params-only export.

An export (`python -m lm.export`) is a directory with `params/` (an orbax checkpoint of
the parameters alone, optionally in bfloat16), `config.json`, `tokenizer.json` and
`export.json` (step, dtype, parameter count, the code that trained and exported it).
It is what inference and fine-tuning load: a tenth of the train state's optimizer
moments are gone, and it restores on any device without the run's mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from lm.config import schema
from lm.data import tokenizers
from lm.data.tokenizers import Tokenizer
from lm.errors import UsageError
from lm.files import atomic
from lm.model import ModelConfig, build
from lm.model.counting import abstract_params, param_counts
from lm.runs import checkpoint, version


class RunError(UsageError):
    """A path that is not a run or an export, a checkpoint step it lacks, or an export that would overwrite."""

EXPORT_INFO = "export.json"
EXPORT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class Loaded:
    """A model ready to run on one device."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    step: int


def is_export(path: str) -> bool:
    return os.path.exists(os.path.join(path, EXPORT_INFO))


def load_config(path: str) -> ml_collections.ConfigDict:
    """The resolved config saved in a workdir or export; fields newer than the run keep
    their defaults."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise RunError(f"{config_path} does not exist. Fix: point at a workdir written by lm.main or a "
                          "directory written by lm.export.")
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    config = schema.get_config()
    _merge(config, saved)
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
    with config.unlocked():
        for key, value in saved.items():
            if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
                _merge(config[key], value)
            else:
                config[key] = value


def load(path: str, step: int | None = None) -> Loaded:
    """The model and parameters of a workdir (checkpoint `step`, default the latest) or
    of an export, on the first local device, whatever mesh trained them. The returned
    config is the run's own, as saved (its mesh included)."""
    config = load_config(path)
    tokenizer = tokenizers.load(os.path.join(path, "tokenizer.json"))
    model_cfg = ModelConfig.for_run(config, tokenizer.vocab_size)
    device = jax.local_devices()[0]
    if is_export(path):
        params, step = _load_export_params(path, model_cfg, config.data.seq_len, device)
    else:
        params, step = _load_checkpoint_params(path, model_cfg, config.data.seq_len, step, device)
    return Loaded(config, model_cfg, build(model_cfg), params, tokenizer, step)


def abstract_params_on(model_cfg: ModelConfig, seq_len: int, device: jax.Device, dtype: str | None = None) -> Any:
    """The parameters' ShapeDtypeStructs (in `dtype`, default the model's own) placed on
    `device`: the target a checkpoint or export restores onto. Shapes only: no optimizer,
    objective or compiled step is built (a restore needs none)."""
    placed = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=placed),
                        nn.meta.unbox(abstract_params(build(model_cfg), seq_len)))


def _load_checkpoint_params(workdir: str, model_cfg: ModelConfig, seq_len: int, step: int | None,
                            device: jax.Device) -> tuple[Any, int]:
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise RunError(f"no checkpoint in {workdir}/checkpoints yet. Fix: train first, or wait for a save.")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise RunError(f"no checkpoint of step {step} in {workdir}/checkpoints. "
                              f"Fix: use one of {sorted(steps)}.")
        return checkpointer.restore_params(step, abstract_params_on(model_cfg, seq_len, device)), step
    finally:
        checkpointer.close()


def _load_export_params(path: str, model_cfg: ModelConfig, seq_len: int, device: jax.Device) -> tuple[Any, int]:
    with open(os.path.join(path, EXPORT_INFO), encoding="utf-8") as f:
        info = json.load(f)
    target = abstract_params_on(model_cfg, seq_len, device, info["dtype"])
    return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")), target), info["step"]


def check_new_directory(output: str) -> None:
    if os.path.exists(output) and os.listdir(output):
        raise RunError(f"{output} exists and is not empty; exporting never overwrites. Fix: choose a new "
                          "--output, or delete the old export first.")


def publish_directory(output: str, fill: Callable[[str], None]) -> None:
    """Creates the new directory `output` (refusing a non-empty one) whole or not at all:
    `fill` writes into a staging directory beside it, which is then renamed into place."""
    check_new_directory(output)
    atomic.write_directory(output, fill)


def write_export(output: str, params: Any, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 info: dict) -> None:
    """Writes an export directory (see the module docstring); it appears whole or not at all."""

    def fill(staging: str) -> None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, "params"), params)
        checkpointer.wait_until_finished()
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
        tokenizers.save(tokenizer, os.path.join(staging, "tokenizer.json"))
        with open(os.path.join(staging, EXPORT_INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)

    publish_directory(output, fill)


def export(workdir: str, output: str, step: int | None = None, dtype: str = "float32") -> dict:
    """Writes the parameters of `workdir`'s checkpoint `step` (default the latest) in
    `dtype` to the new directory `output`, with what loading needs. Returns export.json's
    content. The directory appears whole or not at all."""
    if dtype not in EXPORT_DTYPES:
        raise RunError(f"--dtype={dtype!r} is not supported. Fix: use one of {EXPORT_DTYPES}.")
    check_new_directory(output)
    loaded = load(workdir, step)
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), loaded.params)
    meta = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).metadata(loaded.step)
    info = {"step": loaded.step, "dtype": dtype, "parameters": param_counts(params)["total"],
            "source": os.path.abspath(workdir), "trained_by": meta.get("version"),
            "exported_by": version.code_version()}
    write_export(output, params, loaded.config, loaded.tokenizer, info)
    return info

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
from absl import logging

from lm.config import choices, schema
from lm.data import tokenizers
from lm.data.tokenizers import Tokenizer
from lm.errors import UsageError
from lm.files import atomic, paths
from lm.files.paths import read_json
from lm.model import ModelConfig, build
from lm.model.counting import abstract_params, param_counts
from lm.runs import checkpoint, version, workdir

# What a workdir's reader passes to `load` (lm.training.optim.eval_params_reader): given a
# run's config and its parameters' abstract values, None when a checkpoint's parameters are
# what to evaluate, else the optimizer state's abstract values to restore with them and the
# function of (opt_state, params) that gives the evaluation parameters (schedule-free's).
EvalParamsReader = Callable[[ml_collections.ConfigDict, Any], "tuple[Any, Callable[[Any, Any], Any]] | None"]


class RunError(UsageError):
    """A path that is not a run or an export, a checkpoint step it lacks or that is damaged,
    a damaged config.json or tokenizer.json, or an export that would overwrite."""


EXPORT_INFO = workdir.EXPORT_INFO
EXPORT_DTYPES = ("float32", "bfloat16")
_WHAT_LOADS = "point at a workdir written by lm.main or a directory written by lm.export"


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
    their defaults. Raises RunError if config.json is missing, damaged or not a run's."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise RunError(f"{config_path} does not exist. Fix: {_WHAT_LOADS}.")
    saved = read_json(config_path, error=RunError, kind=None, fix="restore the file the run wrote (a checkpoint's "
                      "metadata holds a copy of its config), or load another run or export.")
    what = workdir.config_kind(saved)
    if what is not None:
        raise RunError(f"{config_path} is {what}. Fix: {_WHAT_LOADS}.")
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


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer saved in a workdir or export; RunError if tokenizer.json is missing or
    does not describe an lm tokenizer."""
    tokenizer_path = os.path.join(path, "tokenizer.json")
    fix = "restore the tokenizer.json the run wrote (ids must not change under a model), or load another run."
    spec = read_json(tokenizer_path, error=RunError, fix=fix, kind=dict)
    try:
        return tokenizers.from_json(spec)
    except Exception as e:  # a missing field, an unknown kind, or a model the tokenizer library refuses
        raise RunError(f"{tokenizer_path} does not describe an lm tokenizer ({_first_line(e)}). Fix: {fix}") from None


def load(path: str, step: int | None = None, eval_params: EvalParamsReader | None = None) -> Loaded:
    """The model and parameters of a workdir (checkpoint `step`, default the newest that
    restores) or of an export, on the first local device, whatever mesh trained them. The
    returned config is the run's own, as saved (its mesh included). A checkpoint's
    parameters are those `eval_params` (lm.training.optim.eval_params_reader) says to
    evaluate: schedule-free's average, not its raw iterate; an export holds them already.
    Raises RunError, naming the file and the fix, for a fine-tuning workdir, a damaged
    config.json, tokenizer.json or checkpoint, or parameters that config.json does not
    describe; ValueError for a schedule-free run's checkpoint without `eval_params`."""
    _check_not_finetuning(path)
    config = load_config(path)
    tokenizer = load_tokenizer(path)
    # strict=False: a run trained with a fused kernel (splash on a TPU) loads on any platform,
    # on that platform's own kernel (the kernels compute the same attention of the same parameters).
    model_cfg = ModelConfig.for_run(config, tokenizer.vocab_size, strict=False)
    device = jax.local_devices()[0]
    if is_export(path):
        params, step = _load_export_params(path, model_cfg, config.data.seq_len, device)
    else:
        reader = _reader(config, eval_params, lambda: abstract_params_on(model_cfg, config.data.seq_len, device))
        params, step = _load_checkpoint_params(path, model_cfg, config.data.seq_len, step, device, reader)
    return Loaded(config, model_cfg, build(model_cfg), params, tokenizer, step)


def _check_not_finetuning(path: str) -> None:
    found = workdir.finetuning_files(path)
    if not found or is_export(path):
        return
    merged = os.path.join(path, "merged")
    fix = (f"load {merged}, the fine-tuned model merged into an export" if is_export(merged) else
           "fine-tune with finetune.export_merged=True, which writes the tuned model as an export in "
           f"{merged}, and load that; or load the model it started from (its config's init_from)")
    raise RunError(f"{path} is a fine-tuning workdir (it has {' and '.join(found)}): it holds the tuned "
                   f"parameters alone, not a model to load. Fix: {fix}.")


def abstract_params_on(model_cfg: ModelConfig, seq_len: int, device: jax.Device, dtype: str | None = None) -> Any:
    """The parameters' ShapeDtypeStructs (in `dtype`, default the model's own) placed on
    `device`: the target a checkpoint or export restores onto. Shapes only: no optimizer,
    objective or compiled step is built (a restore needs none)."""
    placed = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=placed),
                        nn.meta.unbox(abstract_params(build(model_cfg), seq_len)))


def _reader(config: ml_collections.ConfigDict, eval_params: EvalParamsReader | None, target: Callable[[], Any]
            ) -> tuple[Any, Callable[[Any, Any], Any]] | None:
    """`eval_params`'s answer for this run, its abstract optimizer state placed as the
    parameters' abstract values `target()` are."""
    if eval_params is None:
        if config.optim.name in choices.AVERAGED_OPTIMIZERS:
            raise ValueError(f"a {config.optim.name} checkpoint holds the raw iterate, not the parameters to "
                             "evaluate: pass eval_params=lm.training.optim.eval_params_reader to load")
        return None
    params = target()
    reader = eval_params(config, params)
    if reader is None:
        return None
    placed = jax.tree.leaves(params)[0].sharding
    abstract_opt_state, average = reader
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), abstract_opt_state), average


def _load_checkpoint_params(path: str, model_cfg: ModelConfig, seq_len: int, step: int | None,
                            device: jax.Device, reader: tuple[Any, Callable[[Any, Any], Any]] | None = None
                            ) -> tuple[Any, int]:
    """The parameters of checkpoint `step`, or of the newest one that restores: a damaged
    newest checkpoint is skipped with a warning, as lm.main does when it resumes."""
    checkpointer = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), read_only=True)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise RunError(f"no checkpoint in {path}/checkpoints yet. Fix: train first, or wait for a save.")
        if step is not None and step not in steps:
            raise RunError(f"no checkpoint of step {step} in {path}/checkpoints. "
                           f"Fix: use one of {sorted(steps)}.")
        target = abstract_params_on(model_cfg, seq_len, device)
        failures = []
        for candidate in [step] if step is not None else sorted(steps, reverse=True):
            try:
                return _restore_checked(checkpointer, candidate, target, path, reader), candidate
            except RunError:
                raise
            except Exception as e:  # orbax raises many types for missing or truncated files
                failures.append(f"step {candidate}: {_first_line(e)}")
                if step is None:
                    logging.warning("lm: the checkpoint at step %d in %s does not restore (%s); trying an older "
                                    "one.", candidate, path, _first_line(e))
        raise _damaged(path, step, steps, failures)
    finally:
        checkpointer.close()


def _damaged(path: str, step: int | None, steps: list[int], failures: list[str]) -> RunError:
    """The error for checkpoint `step` (None: every one) failing to restore."""
    if step is None:
        return RunError(f"no checkpoint in {path}/checkpoints restores ({'; '.join(failures)}). Fix: train again, "
                        "or restore the checkpoints from a copy.")
    others = sorted(set(steps) - {step})
    fix = f"pick another with --step (one of {others})." if others else "train again, or restore it from a copy."
    return RunError(f"the checkpoint at step {step} in {path}/checkpoints does not restore "
                    f"({failures[0].split(': ', 1)[1]}). Fix: {fix}")


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _restore_checked(checkpointer: checkpoint.Checkpointer, step: int, target: Any, path: str,
                     reader: tuple[Any, Callable[[Any, Any], Any]] | None = None) -> Any:
    """Restores step `step`'s parameters onto `target`, first checking their stored shapes
    against config.json's model (a mismatch is a RunError listing the differences, not a
    failed restore); with `reader` (abstract optimizer state, average), the optimizer
    state too, and returns average(opt_state, params)."""
    mismatches = checkpointer.params_mismatches(step, target)
    if mismatches:
        raise RunError(f"the checkpoint at step {step} in {path} holds parameters that {path}/config.json does "
                       f"not describe: {'; '.join(mismatches)}. Fix: restore the config.json the run wrote "
                       "(lm.finetune or an edit may have replaced it).")
    if reader is None:
        return checkpointer.restore_params(step, target)
    abstract_opt_state, average = reader
    params, opt_state = checkpointer.restore_params_and_opt_state(step, target, abstract_opt_state)
    return average(opt_state, params)


def _load_export_params(path: str, model_cfg: ModelConfig, seq_len: int, device: jax.Device) -> tuple[Any, int]:
    info = read_json(os.path.join(path, EXPORT_INFO), error=RunError, fix="export the run again.", kind=dict)
    if info.get("dtype") not in EXPORT_DTYPES or not isinstance(info.get("step"), int):
        raise RunError(f"{path}/{EXPORT_INFO} lacks a dtype in {EXPORT_DTYPES} or an integer step. Fix: export the "
                       "run again.")
    target = abstract_params_on(model_cfg, seq_len, device, info["dtype"])
    params_dir = os.path.abspath(os.path.join(path, "params"))
    try:
        mismatches = checkpoint.tree_mismatches(checkpoint.stored_shapes(params_dir),
                                                checkpoint.shapes_by_path(target), where="the export",
                                                wanter="config.json", wanted_tree="parameters")
    except Exception as e:  # orbax raises many types for missing or truncated files
        raise RunError(f"{params_dir} is damaged ({_first_line(e)}). Fix: export the run again.") from None
    if mismatches:
        raise RunError(f"{path}/config.json does not describe the parameters in {params_dir}: "
                       f"{'; '.join(mismatches)}. Fix: restore the config.json the export was written with.")
    try:
        return ocp.StandardCheckpointer().restore(params_dir, target), info["step"]
    except Exception as e:  # a truncated or missing array file
        raise RunError(f"{params_dir} does not restore ({_first_line(e)}). Fix: export the run again.") from None


def check_new_directory(output: str) -> None:
    """Raises RunError unless `output` can be made a new directory: it must not be a file,
    lie under a file or in an unwritable folder, or be a directory with anything in it.
    The one check of every command that writes a new directory (lm.export, lm.convert)."""
    problem = paths.directory_problem(output)
    if problem:
        raise RunError(f"{problem}. Fix: choose a new directory as --output.")
    if os.path.exists(output) and os.listdir(output):
        raise RunError(f"{output} exists and is not empty; exporting never overwrites. Fix: choose a new "
                       "--output, or delete the old export first.")


def publish_directory(output: str, fill: Callable[[str], None]) -> None:
    """Creates the new directory `output` (refusing a non-empty one) whole or not at all:
    `fill` writes into a staging directory beside it, which is then renamed into place. If
    another process made `output` meanwhile, its directory stays and RunError is raised."""
    check_new_directory(output)
    try:
        atomic.write_directory(output, fill, replace=False)
    except FileExistsError:
        raise RunError(f"{output} was written by another process while this one wrote; exporting never "
                       "overwrites, so that one stays. Fix: choose a new --output.") from None


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


def export(workdir: str, output: str, step: int | None = None, dtype: str = "float32",
           eval_params: EvalParamsReader | None = None) -> dict:
    """Writes the parameters of `workdir`'s checkpoint `step` (default the latest) in
    `dtype` to the new directory `output`, with what loading needs: the evaluation
    parameters (`load`'s `eval_params`). Returns export.json's content. The directory
    appears whole or not at all."""
    if dtype not in EXPORT_DTYPES:
        raise RunError(f"--dtype={dtype!r} is not supported. Fix: use one of {EXPORT_DTYPES}.")
    check_new_directory(output)
    loaded = load(workdir, step, eval_params)
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), loaded.params)
    meta = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).metadata(loaded.step)
    info = {"step": loaded.step, "dtype": dtype, "parameters": param_counts(params)["total"],
            "source": os.path.abspath(workdir), "trained_by": meta.get("version"),
            "exported_by": version.code_version()}
    write_export(output, params, loaded.config, loaded.tokenizer, info)
    return info

"""Sample text from a trained run.

    python -m lm.sample --workdir=/tmp/shakespeare_char --prompt="ROMEO:" \
        --max_new_tokens=200 --temperature=0.8 --top_k=200

Loads the run's config, tokenizer and latest checkpoint from the workdir and prints
`--num_samples` continuations of the prompt. Runs on one device of any machine.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, flags

from lm import checkpoint, decode, objectives, runtime, sharding
from lm.configs import base
from lm.data import tokenizers
from lm.cli import exit_with_error, quiet_logging, reject_positional
from lm.model import ModelConfig
from lm.train import make_trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 200, "Sample among the k most likely tokens; 0 keeps all.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "How many samples to print.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (sample i uses seed + i).")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        exit_with_error(f"{path} does not exist. Fix: point --workdir at a directory written by lm.main.")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    config = base.get_config()  # fields newer than the run keep their defaults
    _merge(config, saved)
    if config.model.family != "decoder":
        exit_with_error(f"{workdir} holds a {config.model.family!r} model; sampling continues text with a "
                        "decoder. Fix: point --workdir at a run with model.family='decoder'.")
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
    with config.unlocked():
        for key, value in saved.items():
            if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
                _merge(config[key], value)
            else:
                config[key] = value


def load_params(config: ml_collections.ConfigDict, workdir: str):
    """(model, params, tokenizer, step) from the workdir's latest checkpoint, on one device."""
    tokenizer = tokenizers.load(os.path.join(workdir, "tokenizer.json"))
    model_cfg = ModelConfig.from_config(
        config.model, objectives.model_vocab_size(config.objective, tokenizer.vocab_size), config.data.seq_len)
    with config.unlocked():
        config.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    trainer = make_trainer(config, model_cfg, sharding.make_mesh(config, jax.devices()[:1]), tokenizer.pad_id)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    step = checkpointer.latest_step()
    if step is None:
        exit_with_error(f"no checkpoint in {workdir}/checkpoints yet. Fix: train first, or wait for a save.")
    state = checkpointer.restore_state(step, trainer.abstract_state())
    return trainer.model, state.params, tokenizer, step


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    if not _WORKDIR.value:
        exit_with_error("--workdir is required. Fix: --workdir=<a directory written by lm.main>.")
    runtime.enable_compilation_cache()
    config = load_run_config(_WORKDIR.value)
    model, params, tokenizer, step = load_params(config, _WORKDIR.value)
    for i in range(_NUM_SAMPLES.value):
        text = decode.sample_text(model, params, tokenizer, _PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                                  max_len=config.data.seq_len, temperature=_TEMPERATURE.value,
                                  top_k=_TOP_K.value, seed=_SEED.value + i)
        print(f"--- sample {i + 1} (checkpoint step {step}) ---\n{_PROMPT.value}{text}", flush=True)


if __name__ == "__main__":
    app.run(main)

"""Reading a run back (lm.runs.artifacts): a checkpoint written on a many-device mesh loads on one
device with the parameters alone, and neither loading nor exporting changes the run's
config: an export's config.json records the mesh the run trained on."""

import json
import os

import jax
import numpy as np
from helpers import tiny_config
from test_train import STREAM

from lm.data import batches, rows, tokenizers
from lm.model import ModelConfig
from lm.parallel import sharding
from lm.runs import artifacts, checkpoint
from lm.training.trainer import make_trainer

FSDP_X_TENSOR = dict(stage=1, data=1, fsdp=4, tensor=2)


def write_run(workdir: str, step: int) -> dict:
    """A workdir as lm.main leaves it (config.json, tokenizer.json, a checkpoint at `step`)
    of a run on an fsdp=4 x tensor=2 mesh of the 8 test devices; returns its parameters."""
    config = tiny_config(train__batch_size=16, model__num_heads=4)
    config.mesh.shape.update(FSDP_X_TENSOR)
    # 41 characters and 3 special ids: a vocabulary of 44 splits over tensor=2
    tokenizer = tokenizers.CharTokenizer.train(["".join(chr(c) for c in range(ord("a"), ord("a") + 41))])
    model_cfg = ModelConfig.for_run(config, tokenizer.vocab_size)
    trainer = make_trainer(config, model_cfg, sharding.make_mesh(config, jax.devices()), tokenizer.pad_id)
    state = trainer.init()
    saver = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
    data = batches.per_process(rows.train_rows(STREAM % 40 + 3, 16, seed=0), 16)
    saver.save(step, state, batches.iterate(data, 0, 0), {"step": step, "version": {"lm": "test"}})
    saver.close()
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    tokenizers.save(tokenizer, os.path.join(workdir, "tokenizer.json"))
    return jax.device_get(state.params)


def assert_same_params(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(actual), expected)


def test_a_sharded_run_loads_on_one_device_and_its_export_keeps_the_runs_mesh(tmp_path):
    workdir, output = str(tmp_path / "run"), str(tmp_path / "export")
    params = write_run(workdir, step=3)

    loaded = artifacts.load(workdir)
    assert loaded.step == 3
    assert dict(loaded.config.mesh.shape) == FSDP_X_TENSOR  # the run's config, as saved
    assert {leaf.sharding.device_set == {jax.local_devices()[0]} for leaf in jax.tree.leaves(loaded.params)} == {True}
    assert_same_params(loaded.params, params)

    info = artifacts.export(workdir, output)
    with open(os.path.join(output, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["mesh"]["shape"] == FSDP_X_TENSOR
    assert info["step"] == 3
    exported = artifacts.load(output)
    assert dict(exported.config.mesh.shape) == FSDP_X_TENSOR
    assert_same_params(exported.params, params)

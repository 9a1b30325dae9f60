"""How long a checkpoint save blocks the training loop: asynchronous against synchronous.

    .venv/bin/python bench/checkpoint.py --config=configs/gpt2_small.py

Builds the config's full train state (parameters and AdamW moments; gpt2_small's 124M
parameters are 1.5 GB in float32) on one device and saves it with lm.runs.checkpoint's
Checkpointer, the one training uses, --repeats times each way:
- synchronous: `save` returns once the checkpoint is on disk; the loop waits all along;
- asynchronous: `save` returns once the arrays are copied to host memory; the write
  goes on in the background while training continues (then waited for, untimed).
Prints the median blocked seconds of each and their ratio; the target is under 0.10.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm.config import parse_flags, validated_config  # noqa: E402
from lm.data import batches, rows  # noqa: E402
from lm.errors import reject_positional  # noqa: E402
from lm.model import ModelConfig  # noqa: E402
from lm.model.counting import param_counts  # noqa: E402
from lm.parallel import (
    runtime,  # noqa: E402
    sharding,  # noqa: E402
)
from lm.runs import checkpoint  # noqa: E402
from lm.training import memory  # noqa: E402
from lm.training.trainer import make_trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose train state to save.", lock_config=False)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (no corpus is read); 0: config.model.vocab_size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves timed each way.")
_DIRECTORY = flags.DEFINE_string("directory", None, "Where to write (on the disk under test); default a temp dir.")


def blocked_seconds(directory: str, state, asynchronous: bool, repeats: int) -> list[float]:
    """Seconds each `save` call holds the caller, over `repeats` saves of `state`."""
    saver = checkpoint.Checkpointer(directory, keep=1, asynchronous=asynchronous)
    data_iterator = batches.iterate(batches.per_process(rows.train_rows(np.zeros(4096, np.int32), 8, 0), 1), 0, 0)
    seconds = []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        saver.save(step, state, data_iterator, {"step": step})
        seconds.append(time.perf_counter() - start)
        saver.wait()  # the next save starts clean; a real run saves every few hundred steps
    saver.close()
    return seconds


def main(argv):
    reject_positional(argv)
    logging.set_verbosity(logging.ERROR)  # orbax counts the untimed waits between saves as "waiting"
    config = validated_config(_CONFIG.value, "configs/gpt2_small.py")
    runtime.setup(config, compilation_cache=False)
    with config.unlocked():
        config.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    vocab = _VOCAB.value or config.model.vocab_size or 256
    trainer = make_trainer(config, ModelConfig.from_config(config.model, vocab, config.data.seq_len),
                           sharding.make_mesh(config, jax.devices()[:1]), pad_id=0)
    state = jax.block_until_ready(trainer.init())
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"state: {param_counts(state.params)['total']:,} parameters, {memory.human(state_bytes)} with optimizer "
          f"state, on {jax.devices()[0].platform}", flush=True)
    root = tempfile.mkdtemp(prefix="lm_bench_checkpoint_", dir=_DIRECTORY.value)
    try:
        medians = {}
        for asynchronous in (False, True):
            name = "async" if asynchronous else "sync"
            seconds = blocked_seconds(os.path.join(root, name), state, asynchronous, _REPEATS.value)
            medians[name] = statistics.median(seconds)
            print(f"{name}_blocked_seconds: {medians[name]:.3f} (each: {', '.join(f'{s:.3f}' for s in seconds)})",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"async_over_sync: {medians['async'] / medians['sync']:.3f} (target < 0.10)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

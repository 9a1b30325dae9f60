"""One process of a 2-process `jax.distributed` run on localhost (see test_multihost.py).

Builds the packed SentencePiece training batch of a step on its own rows, assembles the
global array with `make_array_from_process_local_data`, and saves both.
"""

import sys

import jax
import numpy as np


def main(coordinator: str, process_id: int, out: str, step: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id,
                               local_device_ids=[0])
    from helpers import tiny_config
    from jax.experimental import multihost_utils

    from lm.data import batches
    from lm.data.corpus import prepare
    from lm.parallel import sharding

    config = tiny_config(data__unit="paragraph", data__split="hash", data__tokenizer="sentencepiece",
                         data__packing="pack", data__seq_len=32, train__batch_size=8)
    corpus = prepare(config, f"{out}.tokenizer.json")
    mesh = sharding.make_mesh(config)
    local = batches.train_data(config, corpus)[step]
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    global_batch = batches.to_global(local, batch_sharding)
    gathered = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in global_batch.items()}
    np.savez(out, **{f"local_{k}": v for k, v in local.items()}, **{f"global_{k}": v for k, v in gathered.items()},
             devices=np.array(jax.device_count()), process_count=np.array(jax.process_count()))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))

"""Pipeline parallelism: time per train step against the number of microbatches M at a
fixed number of stages S, beside the same model without a pipeline (informational).

    .venv/bin/python bench/pipeline_microbatches.py --stages=4 --microbatches=4,8,16

On fake CPU devices (--devices, default 8: stage=S x data=devices/S), a decoder of
--layers scanned layers trains --steps steps on random tokens at each M with the same
global batch; each row prints M, the schedule's iterations (M R + S - 1), its bubble
fraction (S - 1) / (M R + S - 1), the median step time and tokens/s. The last row is
the same batch on data=devices with no pipeline (its microbatches accumulate gradients).
On a CPU, stages are cores working in turn: the figures show the schedule's overhead and
its bubble shrinking with M, not the speed-up stages give on real links.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from lm.errors import UsageError, quiet_logging, reject_positional  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("stages", 4, "Pipeline stages S.", lower_bound=2)
flags.DEFINE_integer("repeats", 1, "Virtual stages per device R (1: GPipe).", lower_bound=1)
flags.DEFINE_list("microbatches", ["4", "8", "16"], "Microbatch counts M to time (each >= --stages).")
flags.DEFINE_integer("devices", 8, "Fake CPU devices (a multiple of --stages).", lower_bound=2)
flags.DEFINE_integer("layers", 8, "Decoder layers (a multiple of stages x repeats).", lower_bound=1)
flags.DEFINE_integer("d_model", 128, "Model width.", lower_bound=8)
flags.DEFINE_integer("batch_size", 64, "Global rows a step (a multiple of every M x data shards).", lower_bound=1)
flags.DEFINE_integer("seq_len", 128, "Tokens a row.", lower_bound=8)
flags.DEFINE_integer("steps", 5, "Timed steps after the compiling one.", lower_bound=1)
VOCAB = 256


def make(stages: int, microbatches: int):
    """A trainer for (stages, microbatches) on the fake devices, and a batch for it."""
    import numpy as np

    from lm.configs import shakespeare_char
    from lm.data import batches
    from lm.model import ModelConfig
    from lm.parallel import sharding
    from lm.training.trainer import make_trainer

    config = shakespeare_char.get_config()
    config.model.update(num_layers=FLAGS.layers, d_model=FLAGS.d_model, num_heads=4, scan_layers=True, dropout=0.0)
    config.data.seq_len = FLAGS.seq_len
    config.train.update(batch_size=FLAGS.batch_size, microbatches=microbatches)
    config.eval.batch_size = FLAGS.batch_size
    config.mesh.shape.update(dict(stage=stages, data=FLAGS.devices // stages, fsdp=1, tensor=1))
    config.mesh.pipeline_repeats = FLAGS.repeats if stages > 1 else 1
    mesh = sharding.make_mesh(config)
    sharding.check_batch_sizes(config, mesh)
    trainer = make_trainer(config, ModelConfig.from_config(config.model, VOCAB, FLAGS.seq_len), mesh, pad_id=0)
    tokens = np.random.default_rng(0).integers(3, VOCAB, (FLAGS.batch_size, FLAGS.seq_len + 1), dtype=np.int32)
    return trainer, batches.to_global({"tokens": tokens}, trainer.batch_sharding)


def time_steps(stages: int, microbatches: int) -> float:
    """The median seconds of a step (after one compiling step)."""
    import jax

    trainer, batch = make(stages, microbatches)
    state = trainer.init()
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv):
    reject_positional(argv)
    quiet_logging()
    try:
        run()
    except UsageError as e:  # flags whose mesh or pipeline cannot work: lm's own message, no traceback
        sys.exit(f"bench/pipeline_microbatches.py: {e}".replace("config.mesh.shape.stage x config.mesh.dcn_shape"
                                                                 ".stage", "--stages"))


def run() -> None:
    """Prints the table (see the module docstring)."""
    import jax

    from lm.model import pipeline

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    counts = [int(m) for m in FLAGS.microbatches]
    S, R = FLAGS.stages, FLAGS.repeats
    tokens = FLAGS.batch_size * FLAGS.seq_len
    print(f"{FLAGS.layers} layers, d_model {FLAGS.d_model}, {FLAGS.batch_size} rows x {FLAGS.seq_len} tokens a step, "
          f"{FLAGS.devices} CPU devices; stage={S} x data={FLAGS.devices // S}, {R} repeat(s)")
    print("| microbatches M | iterations M R + S - 1 | bubble fraction | ms / step | tokens / s |")
    print("|---:|---:|---:|---:|---:|")
    for m in counts:
        seconds = time_steps(S, m)
        print(f"| {m} | {pipeline.iterations(S, m, R)} | {pipeline.bubble_fraction(S, m, R):.3f} | "
              f"{1000 * seconds:.1f} | {tokens / seconds:,.0f} |", flush=True)
    seconds = time_steps(1, 1)
    print(f"| no pipeline (data={FLAGS.devices}) | - | 0 | {1000 * seconds:.1f} | {tokens / seconds:,.0f} |")


if __name__ == "__main__":
    app.run(main)

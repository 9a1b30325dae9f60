"""Training throughput of a config, measured the way the training loop runs.

    .venv/bin/python bench/train_throughput.py --config=configs/shakespeare_char.py

Trains `--steps` steps after `--warmup` steps on the real data pipeline (Grain batches,
host-to-device transfer, metrics fetched one step late as in `lm.training.loop`) and prints
ms/step (median of the per-step times), tokens/s, compile seconds, peak RSS and MFU:
model FLOPs/s (6·N·tokens/s plus causal attention, `lm.model.counting`) over a float32
matmul peak this script measures on the same devices. It also prints the roofline: the
tokens/s of a step whose every model FLOP ran at that peak and nothing else took time:
an upper bound for this model on these devices, to compare targets against.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags  # noqa: E402

from lm.config import parse_flags, validated_config  # noqa: E402
from lm.data import batches  # noqa: E402
from lm.data.corpus import prepare  # noqa: E402
from lm.errors import quiet_logging, reject_positional  # noqa: E402
from lm.model import ModelConfig  # noqa: E402
from lm.model.counting import param_counts, train_flops_per_token  # noqa: E402
from lm.parallel import (
    runtime,  # noqa: E402
    sharding,  # noqa: E402
)
from lm.training.trainer import make_trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe to measure.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed steps after compilation.")
_PROFILE = flags.DEFINE_string("profile", "", "If set, a directory for a Perfetto trace of 10 steps; "
                                "the script then prints the ops that take the most time.")
_CACHE = flags.DEFINE_bool("compilation_cache", False, "Use the persistent compilation cache "
                           "(off by default, so compile seconds are real).")


def matmul_peak_flops(mesh, size: int = 1024, repeats: int = 20) -> float:
    """float32 FLOP/s of large matmuls running on every device of the mesh at once: the
    fastest of `repeats` (a peak, so a burst of load from other tenants does not lower it)."""
    devices = mesh.devices.size
    spec = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    a = jax.device_put(jnp.ones((devices, size, size), jnp.float32), spec)
    matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=spec)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * devices * size ** 3 / min(times)


def timed_steps(trainer, state, data_iterator, warmup: int, steps: int):
    """(first step seconds, per-step seconds): step i's time ends when its loss is on the host."""
    batch = batches.to_global(next(data_iterator), trainer.batch_sharding)
    start = time.perf_counter()
    state, metrics = trainer.step(state, batch)
    float(metrics["loss"])
    first = time.perf_counter() - start
    done_times, pending = [], None
    for _ in range(warmup + steps):
        batch = batches.to_global(next(data_iterator), trainer.batch_sharding)
        state, metrics = trainer.step(state, batch)
        if pending is not None:
            float(pending["loss"])  # the previous step: the host keeps one step queued
            done_times.append(time.perf_counter())
        pending = metrics
    float(pending["loss"])
    done_times.append(time.perf_counter())
    per_step = np.diff(done_times)[warmup - 1:]
    return first, per_step


def profile_steps(trainer, state, data_iterator, directory: str, steps: int = 10, top: int = 25) -> None:
    """Traces `steps` steps and prints where device time goes, op by op and by kind."""
    import collections
    import glob
    import gzip
    import json
    import re

    for _ in range(3):  # warm: the trace should hold steady-state steps only
        state, metrics = trainer.step(state, batches.to_global(next(data_iterator), trainer.batch_sharding))
    float(metrics["loss"])
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = trainer.step(state, batches.to_global(next(data_iterator), trainer.batch_sharding))
        float(metrics["loss"])
    trace = json.load(gzip.open(sorted(glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True))[-1]))
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_op, by_kind = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        thread = names.get((e.get("pid"), e.get("tid")), "")
        if e.get("ph") != "X" or not thread.startswith("tf_XLA") or e["name"].startswith(("ThunkExecutor", "end:")):
            continue
        by_op[e["name"]] += e["dur"] / steps / 1e3
        by_kind[re.sub(r"[._]\d+$", "", e["name"])] += e["dur"] / steps / 1e3
    print(f"device busy time per step (ms, summed over threads): {sum(by_op.values()):.1f}")
    print("by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in by_kind.most_common(12)))
    for name, ms in by_op.most_common(top):
        print(f"  {ms:6.2f} ms  {name}")
    print(f"trace: {directory} (open the .trace.json.gz in https://ui.perfetto.dev)")


def main(argv):
    reject_positional(argv)
    quiet_logging()
    config = validated_config(_CONFIG.value, "configs/shakespeare_char.py")
    runtime.setup(config, compilation_cache=_CACHE.value)
    mesh = sharding.make_mesh(config)
    sharding.check_batch_sizes(config, mesh)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = prepare(config, os.path.join(tmp, "tokenizer.json"))
    model_cfg = ModelConfig.for_run(config, corpus.tokenizer.vocab_size)
    trainer = make_trainer(config, model_cfg, mesh, corpus.tokenizer.pad_id, corpus.tokenizer.vocab_size)
    data = batches.train_data(config, corpus)
    data_iterator = batches.iterate(data, config.data.num_threads, config.data.prefetch)

    if _PROFILE.value:
        profile_steps(trainer, trainer.init(), data_iterator, _PROFILE.value)
        return
    # The peak is taken on both sides of the timed steps: this VM's speed drifts, and a
    # peak read in a slow moment would overstate MFU (it has printed MFU 1.3).
    peak_before = matmul_peak_flops(mesh)
    first, per_step = timed_steps(trainer, trainer.init(), data_iterator, _WARMUP.value, _STEPS.value)
    peak = max(peak_before, matmul_peak_flops(mesh))
    step_s = float(np.median(per_step))
    tokens_per_step = config.train.batch_size * config.data.seq_len
    tokens_per_s = tokens_per_step / step_s
    flops_per_token = train_flops_per_token(model_cfg, config.data.seq_len)
    counts = param_counts(trainer.abstract_state().params)
    mesh_text = " x ".join(f"{a}={s}" for a, s in mesh.shape.items())
    print(f"config: {config.model.num_layers} layers, d_model {config.model.d_model}, "
          f"{counts['total']:,} parameters, batch {config.train.batch_size} x {config.data.seq_len} tokens")
    print(f"devices: {jax.device_count()} {jax.devices()[0].platform} ({runtime.available_cores()} cores), "
          f"mesh {mesh_text}")
    print(f"ms_per_step: {1e3 * step_s:.1f} (median of {len(per_step)}; p10 "
          f"{1e3 * np.percentile(per_step, 10):.1f}, p90 {1e3 * np.percentile(per_step, 90):.1f})")
    print(f"tokens_per_second: {tokens_per_s:,.0f}")
    print(f"compile_seconds: {first - step_s:.1f}")
    print(f"peak_rss_mib: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print(f"model_tflops_per_second: {tokens_per_s * flops_per_token / 1e12:.4f} "
          f"({flops_per_token / 1e6:.2f} MFLOP per token)")
    print(f"matmul_peak_tflops_per_second: {peak / 1e12:.4f} (float32, measured on these devices)")
    print(f"mfu: {tokens_per_s * flops_per_token / peak:.3f}")
    print(f"roofline_tokens_per_second: {peak / flops_per_token:,.0f} (every model FLOP at the "
          f"matmul peak, nothing else; an upper bound on these devices)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

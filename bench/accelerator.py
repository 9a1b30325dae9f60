"""Train-step throughput, MFU and peak device memory on whatever devices are present.

    python bench/accelerator.py --config=configs/gpt2_small.py --preset=gpt2-small \
        --seq_len=1024 --batch_size=32 --dtype=bfloat16 --attention=xla --steps=10

Builds the model and the train step as a run does (`lm.training.trainer.make_trainer`:
the same optimizer, objective, shardings and donation), over every device present, and
feeds it synthetic tokens made on the devices: no corpus, no tokenizer, no Grain or TFDS
(its imports are the model's and the step's alone, so it runs on a GPU machine that has
only JAX, Flax, Optax, Orbax and a wheel of ml-collections). It compiles the step once
ahead of time, runs `--warmup` untimed steps, then `--steps` timed ones, one step queued
as in the training loop, and prints one row of a Markdown table:

    device kind x count, jax version, model, parameters, context, batch, attention kernel,
    tokens/s, ms per step (median), MFU, the peak the MFU is against, peak device memory.

MFU is model FLOPs (`lm.model.counting.train_flops_per_token`: 6·N plus causal attention
at half; rematerialised recompute is not counted, as in MaxText) per second over the
devices' peak: the vendor's dense bf16 datasheet figure (`lm.model.counting.peak_flops`)
on a known accelerator, else a matmul peak this script measures in the step's compute
dtype on the same devices (CPU, or an accelerator not in the table), which the row names.
Peak memory is the runtime's `peak_bytes_in_use` where the device reports it (GPU, TPU),
else the compiled step's XLA total (arguments + outputs - aliased + temporaries), labelled.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm.config import ATTENTIONS, parse_flags, validated_config  # noqa: E402
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional  # noqa: E402
from lm.model import ModelConfig, presets  # noqa: E402
from lm.model.counting import param_counts, peak_flops, train_flops_per_token  # noqa: E402
from lm.parallel import runtime, sharding  # noqa: E402
from lm.training.memory import human  # noqa: E402
from lm.training.trainer import make_trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose model and step to measure.",
                                          lock_config=False)
_PRESET = flags.DEFINE_string("preset", "", f"A model preset ({', '.join(presets.PRESETS)}); "
                              "empty: the config's model.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Context (tokens per row); 0: the config's data.seq_len.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Rows per step over all devices; 0: the config's.")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype (bfloat16, float32); empty: the config's.")
_ATTENTION = flags.DEFINE_enum("attention", "auto", ATTENTIONS, "config.model.attention: the attention kernel.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Model vocabulary; 0: the preset's, else the config's, "
                              "else 256 (no tokenizer is read).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")

HEADER = ("| device | jax | model | params | context | batch | attention | tokens/s | ms/step | MFU "
          "| MFU against | peak memory |")


def bench_config(config):
    """`config` with the flags' model, shape, dtype and attention applied, validated."""
    vocab = 0
    if _PRESET.value:
        if _PRESET.value not in presets.PRESETS:
            exit_with_error(f"--preset={_PRESET.value} is not a preset. Fix: use one of {', '.join(presets.PRESETS)}.")
        vocab, _ = presets.apply(config.model, _PRESET.value)
        for name in flags.FLAGS:  # --config.model.X overrides the preset (e.g. fewer layers on a CPU)
            if name.startswith("config.model.") and flags.FLAGS[name].present:
                *path, field = name.split(".")[2:]
                node = config.model
                for key in path:
                    node = node[key]
                node[field] = flags.FLAGS[name].value
    config.model.vocab_size = _VOCAB.value or vocab or config.model.vocab_size or 256
    config.data.seq_len = _SEQ_LEN.value or config.data.seq_len
    config.train.batch_size = config.eval.batch_size = _BATCH.value or config.train.batch_size
    config.model.dtype = _DTYPE.value or config.model.dtype
    config.model.attention = _ATTENTION.value
    return validated_config(config, "configs/gpt2_small.py")


def attention_kernel(choice: str, model_cfg: ModelConfig, platform: str) -> str:
    """The kernel that serves `choice` on `platform` for this model's synthetic rows (causal,
    unpacked): lm.model.attention's resolution, and its fallback to XLA where it takes one."""
    try:
        from lm.model import attention
    except ImportError:  # before lm.model.attention: every choice runs jax.nn.dot_product_attention's XLA path
        return "xla" if choice in ("auto", "xla") else f"xla ({choice}: no kernel in lm yet)"
    kernel = attention.resolve(choice, platform)
    used, _ = attention.plan(kernel, model_cfg.family != "encoder", False, False, model_cfg.max_len, model_cfg.dtype,
                             model_cfg.head_dim)
    return kernel if used == kernel else f"{used} ({kernel} falls back)"


def matmul_peak(mesh, dtype: jnp.dtype, repeats: int = 10) -> float:
    """FLOP/s of square matmuls in `dtype` on every device of the mesh at once: the fastest
    of `repeats`, so a burst of load from other tenants does not lower it."""
    size = 1024 if mesh.devices.flat[0].platform == "cpu" else 8192
    spec = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    a = jax.device_put(jnp.ones((mesh.devices.size, size, size), dtype), spec)
    matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=spec)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * mesh.devices.size * size ** 3 / min(times)


def timed_steps(step, state, batch, warmup: int, steps: int) -> tuple[np.ndarray, float]:
    """(seconds of each timed step, the last loss): step i's time ends when its loss is on the
    host, with one step queued behind it as in lm.training.loop."""
    for _ in range(warmup):
        state, metrics = step(state, batch)
    if warmup:
        float(metrics["loss"])
    done, pending = [time.perf_counter()], None
    for _ in range(steps):
        state, metrics = step(state, batch)
        if pending is not None:
            float(pending["loss"])
            done.append(time.perf_counter())
        pending = metrics
    loss = float(pending["loss"])
    done.append(time.perf_counter())
    return np.diff(done), loss


def peak_memory(compiled) -> str:
    """The devices' peak bytes in use where the runtime reports them, else XLA's total for the step."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    if all("peak_bytes_in_use" in s for s in stats):
        return f"{human(max(s['peak_bytes_in_use'] for s in stats))} (device peak)"
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return f"{human(total)} (XLA's step total)"


def measure(config) -> dict:
    """Compiles and times the train step of `config`; returns the row's fields."""
    mesh = sharding.make_mesh(config)
    sharding.check_batch_sizes(config, mesh)
    tokenizer_vocab = config.model.vocab_size - config.objective.extra_ids
    model_cfg = ModelConfig.for_run(config, tokenizer_vocab)
    trainer = make_trainer(config, model_cfg, mesh, pad_id=0, tokenizer_vocab_size=tokenizer_vocab)
    batch_size, seq_len = config.train.batch_size, config.data.seq_len
    start = time.perf_counter()
    compiled = trainer.compile_step(batch_size, seq_len)
    compile_s = time.perf_counter() - start
    # Synthetic rows made on the devices, already sharded; id 0 (the pad id) never appears.
    tokens = jax.jit(lambda key: jax.random.randint(key, (batch_size, seq_len + 1), 1, tokenizer_vocab, jnp.int32),
                     out_shardings=trainer.batch_sharding)(jax.random.key(0))
    step = lambda state, batch: compiled(state, batch, trainer.teacher_params)
    per_step, loss = timed_steps(step, trainer.init(), {"tokens": tokens}, _WARMUP.value, _STEPS.value)
    device = jax.devices()[0]
    per_device = peak_flops(device.device_kind) if device.platform != "cpu" else 0.0
    against = f"{per_device * mesh.size / 1e12:,.0f} TFLOP/s (datasheet, bf16 dense)"
    if not per_device:
        per_device = matmul_peak(mesh, model_cfg.compute_dtype) / mesh.size
        against = f"{per_device * mesh.size / 1e12:.3f} TFLOP/s (measured {model_cfg.dtype} matmul)"
    step_s = float(np.median(per_step))
    tokens_per_s = batch_size * seq_len / step_s
    mfu = tokens_per_s * train_flops_per_token(model_cfg, seq_len) / (per_device * mesh.size)
    return dict(device=f"{device.device_kind} x {mesh.size}", jax=jax.__version__,
                model=f"{_PRESET.value or 'config'}: {model_cfg.num_layers} layers, d_model {model_cfg.d_model}",
                params=param_counts(trainer.abstract_state().params)["total"], context=seq_len, batch=batch_size,
                attention=attention_kernel(config.model.attention, model_cfg, device.platform),
                tokens_per_s=tokens_per_s, step_ms=1e3 * step_s, mfu=mfu, against=against, memory=peak_memory(compiled),
                compile_s=compile_s, loss=loss, timed=len(per_step), dtype=model_cfg.dtype)


def table_row(r: dict) -> str:
    n = r["params"]
    params = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
    return (f"| {r['device']} | {r['jax']} | {r['model']} ({r['dtype']}) | {params} | {r['context']} | {r['batch']} "
            f"| {r['attention']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['mfu']:.1%} | {r['against']} "
            f"| {r['memory']} |")


def main(argv):
    reject_positional(argv)
    quiet_logging()
    config = bench_config(_CONFIG.value)
    runtime.setup(config, compilation_cache=False)
    try:
        row = measure(config)
    except UsageError as e:
        exit_with_error(str(e))
    print(f"compiled the train step in {row['compile_s']:.1f} s; timed {row['timed']} steps after "
          f"{_WARMUP.value} warm-up; last loss {row['loss']:.3f}", flush=True)
    if not np.isfinite(row["loss"]):
        exit_with_error(f"the loss is {row['loss']}: the step diverged on synthetic tokens")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    print(table_row(row), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""The model's numerics on the devices present: the fused attention kernel against XLA's,
and a tiny train step that learns.

    python bench/numerics.py                 # the platform's fused kernel (CPU: splash, interpreted)
    python bench/numerics.py --kernel=cudnn  # name one

1. Attention (`lm.model.attention.dot_product_attention`): the fused kernel (cuDNN on a
   GPU, splash on a TPU; on a CPU splash in Pallas interpret mode) against the XLA path
   on the same random inputs, forward and gradients (dq, dk, dv), with grouped-query heads,
   for a causal mask and for packed documents (segment ids). A case the kernel does not
   serve (cuDNN and packed rows) says so: the attention module then runs XLA itself.
   The reference is XLA in float32 on the same inputs; tolerances, relative to its largest
   value: 1e-5 for a float32 kernel, 2e-2 for bfloat16 (cuDNN's flash kernels take
   bfloat16 only; bfloat16 keeps 8 bits of mantissa).
2. Training (`lm.training.trainer.make_trainer` on synthetic tokens, no corpus): a 2-layer
   decoder with the fused kernel, 12 steps on one fixed batch: every loss finite and the
   last below the first (the model memorises the batch); its first loss equals the XLA
   kernel's on the same parameters and batch within the dtype's tolerance.

Prints one line a check and a closing count; exits 1 if any check failed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from lm.config import schema  # noqa: E402
from lm.errors import quiet_logging, reject_positional  # noqa: E402
from lm.model import ModelConfig, presets  # noqa: E402
from lm.parallel import runtime, sharding  # noqa: E402
from lm.training.trainer import make_trainer  # noqa: E402

_KERNEL = flags.DEFINE_string("kernel", "", "The fused kernel to check (splash, cudnn); empty: the "
                              "platform's (splash in interpret mode on a CPU).")
_STEPS = flags.DEFINE_integer("train_steps", 12, "Steps of the tiny train check.")

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
FUSED = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "cpu": "splash"}  # cpu: splash, interpreted


def fused_kernel() -> tuple[str, str]:
    """(kernel, dtype) to check: cuDNN's flash kernels run bfloat16, the others float32."""
    kernel = _KERNEL.value or FUSED.get(jax.default_backend(), "")
    return kernel, "bfloat16" if kernel == "cudnn" else "float32"


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def attention_checks(kernel: str, dtype: str) -> list[tuple[str, str, float | None, float]]:
    """(name, outcome, error, tolerance) of the fused kernel against XLA, forward and gradients."""
    try:
        from lm.model import attention
    except ImportError:
        return [("attention", "skipped: lm.model.attention is not in this checkout yet", None, 0.0)]
    batch, length, heads, kv_heads, head_dim = 2, 512, 4, 2, 64
    kq, kk, kv, kg, ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(kq, (batch, length, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), dtype) for key in (kk, kv))
    cotangent = jax.random.normal(kg, (batch, length, heads, head_dim), dtype)
    segments = jnp.cumsum(jax.random.bernoulli(ks, 4 / length, (batch, length)), axis=1).astype(jnp.int32) + 1
    results = []
    for mask, segment_ids in (("causal", None), ("packed", segments)):
        used, reason = attention.plan(kernel, True, segment_ids is not None, False, length, dtype, head_dim)
        if reason:
            results.append((f"attention {kernel} {mask}", f"skipped: served by {used}: {reason}", None, 0.0))
            continue

        def run(name, q, k, v, cotangent, segment_ids=segment_ids):
            f = lambda q, k, v: attention.dot_product_attention(q, k, v, kernel=name, causal=True,
                                                                segment_ids_BL=segment_ids)
            out, vjp = jax.vjp(f, q, k, v)
            return (out, *vjp(cotangent))

        run = jax.jit(run, static_argnums=0)
        fused = run(kernel, q, k, v, cotangent)
        # The reference: XLA in float32 on the same (rounded) inputs, so a bfloat16 kernel is
        # judged by its distance from the exact result, as XLA's own bfloat16 path would be.
        xla = run("xla", *(x.astype(jnp.float32) for x in (q, k, v, cotangent)))
        for part, got, want in zip(("forward", "dq", "dk", "dv"), fused, xla):
            error = relative_error(got, want)
            outcome = "ok" if error <= TOLERANCE[dtype] else "FAILED"
            results.append((f"attention {kernel} {mask} {part} ({dtype}, L={length}, GQA {heads}/{kv_heads})",
                            outcome, error, TOLERANCE[dtype]))
    return results


def tiny_config(dtype: str):
    config = schema.get_config()
    presets.apply(config.model, "tiny")
    config.model.update(vocab_size=256, d_model=64, num_heads=2, dtype=dtype)  # head_dim 32: cuDNN takes it
    config.data.seq_len, config.train.batch_size, config.eval.batch_size = 128, 8, 8
    config.optim.update(lr=3e-3, warmup_steps=0)
    config.mesh.shape.update(dict(data=1, fsdp=1, tensor=1))
    return config


def train_checks(kernel: str, dtype: str) -> list[tuple[str, str, float | None, float]]:
    """A tiny decoder trained on one batch with `kernel`: finite, learning, and equal to XLA at step 1."""
    config = tiny_config(dtype)
    mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
    model_cfg = ModelConfig.for_run(config, 256)
    tokens = jax.random.randint(jax.random.key(1), (8, 129), 1, 256, jnp.int32)
    losses = {}
    for name in dict.fromkeys((kernel, "xla")):
        trainer = make_trainer(config, dataclasses.replace(model_cfg, attention=name), mesh, pad_id=0)
        state, batch = trainer.init(), {"tokens": jax.device_put(tokens, trainer.batch_sharding)}
        losses[name] = []
        for _ in range(_STEPS.value if name == kernel else 1):
            state, metrics = trainer.step(state, batch)
            losses[name].append(float(metrics["loss"]))
    run = losses[kernel]
    learns = all(np.isfinite(run)) and run[-1] < run[0]
    error = abs(run[0] - losses["xla"][0]) / abs(losses["xla"][0])
    return [(f"train {kernel} ({dtype}): loss {run[0]:.3f} -> {run[-1]:.3f} in {len(run)} steps",
             "ok" if learns else "FAILED", None, 0.0),
            (f"train {kernel} ({dtype}): first loss against xla's", "ok" if error <= TOLERANCE[dtype] else "FAILED",
             error, TOLERANCE[dtype])]


def main(argv):
    reject_positional(argv)
    quiet_logging()
    runtime.setup(tiny_config("float32"), compilation_cache=False)
    kernel, dtype = fused_kernel()
    print(f"numerics on {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}: {kernel or 'no fused kernel'} against xla", flush=True)
    checks = attention_checks(kernel, dtype) if kernel else [("attention", "skipped: no fused kernel here", None, 0)]
    if importlib.util.find_spec("lm.model.attention") is None:  # the model has no kernel choice yet: XLA
        kernel, dtype = "", "float32"
    checks += train_checks(kernel or "xla", dtype)
    for name, outcome, error, tolerance in checks:
        figure = f" (relative error {error:.1e}, tolerance {tolerance:.0e})" if error is not None else ""
        print(f"  {outcome.split(':')[0]:7s} {name}{figure}{outcome[len(outcome.split(':')[0]):]}", flush=True)
    failed = sum(outcome == "FAILED" for _, outcome, _, _ in checks)
    skipped = sum(outcome.startswith("skipped") for _, outcome, _, _ in checks)
    print(f"numerics: {len(checks) - failed - skipped} checks ok, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main)

"""Attention kernels (lm.model.attention): splash attention (in Pallas interpret mode on
CPU) computes XLA's attention, forward and gradients; the kernel choice resolves per
platform; and a train step compiled for a TPU with splash needs no [B, H, L, L] scores."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from lm.inference import decode
from lm.inference.sampling import Sampling
from lm.model import ModelConfig, attention, build
from lm.model.attention import AttentionError


def qkv(batch, length, heads, kv_heads, head_dim=32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), jnp.float32)
                 for h in (heads, kv_heads, kv_heads))


def packed_ids(batch, length, seed=0):
    """Documents of random lengths, the last one cut by the row's end, and a padded tail (id 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        ids = np.repeat(np.arange(1, length + 1), rng.integers(1, length // 3, size=length))[:length]
        ids[length - rng.integers(1, length // 8):] = 0
        rows.append(ids)
    return jnp.asarray(np.stack(rows), jnp.int32)


def value_and_grads(kernel, q, k, v, **masks):
    """The output and (dq, dk, dv) of a fixed random projection of it."""
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    f = lambda q, k, v: attention.dot_product_attention(q, k, v, kernel=kernel, causal=True, **masks)
    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    return (out, *vjp(cotangent))


@pytest.mark.parametrize("length", [128, 1024])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_splash_attention_equals_xla_forward_and_gradients(length, packed):
    q, k, v = qkv(batch=2 if length < 1024 else 1, length=length, heads=4, kv_heads=2)  # grouped-query
    masks = {"segment_ids_BL": packed_ids(q.shape[0], length)} if packed else {}
    assert attention.plan("splash", True, packed, False, length) == ("splash", None)
    expected = value_and_grads("xla", q, k, v, **masks)
    for name, got, want in zip(("out", "dq", "dk", "dv"), value_and_grads("splash", q, k, v, **masks), expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)


def test_prefix_lm_rows_give_the_xla_result_on_splash():
    q, k, v = qkv(batch=2, length=128, heads=2, kv_heads=1)
    masks = {"prefix_BL": jnp.arange(128)[None, :] < jnp.array([[40], [90]]), "segment_ids_BL": packed_ids(2, 128)}
    assert attention.plan("splash", True, True, True, 128)[0] == "xla"
    for got, want in zip(value_and_grads("splash", q, k, v, **masks), value_and_grads("xla", q, k, v, **masks)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv_heads_sharded", "kv_heads_repeated"])
def test_splash_attention_under_a_mesh_shards_rows_and_heads_and_equals_xla(kv_heads):
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("act_heads", "tensor"), ("length", None), ("head_dim", None))
    q, k, v = qkv(batch=2, length=128, heads=4, kv_heads=kv_heads)
    masks = {"segment_ids_BL": packed_ids(2, 128)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = value_and_grads("splash", q, k, v, **masks)
        hlo = jax.jit(lambda q, k, v: attention.dot_product_attention(
            q, k, v, kernel="splash", causal=True, **masks)).lower(q, k, v).as_text()
    assert "shard_map" in hlo or "manual" in hlo.lower()
    for name, g, want in zip(("out", "dq", "dk", "dv"), got, value_and_grads("xla", q, k, v, **masks)):
        np.testing.assert_allclose(g, want, atol=1e-5, rtol=1e-5, err_msg=name)


def test_a_splash_model_decodes_from_the_kv_cache_as_its_forward_pass_computes():
    cfg = ModelConfig(vocab_size=50, max_len=128, num_layers=1, num_heads=4, num_kv_heads=2, d_model=32, head_dim=8,
                      d_ff=64, positions="rope", attention="splash")
    model = build(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 128), jnp.int32))["params"])
    params = jax.tree.map(lambda p: p * 4 if p.ndim >= 2 else p, params)
    prompts = [np.array([5, 9, 3, 7, 11, 2, 8]), np.array([4, 4])]
    tokens_BP, valid_BP, positions_BP = decode.left_pad(prompts, pad_id=0)
    new_BT, logits_BTV = decode.generate_cached(model, params, tokens_BP, valid_BP, positions_BP, jax.random.key(0),
                                                max_new_tokens=3, sampling=Sampling(temperature=0.0))
    padded_BL = np.zeros((2, 128), np.int32)  # the splash kernel's smallest block
    for row, prompt in enumerate(prompts):
        padded_BL[row, :len(prompt) + 3] = np.concatenate([prompt, np.asarray(new_BT[row])])
    full_BLV = jax.jit(model.apply)({"params": params}, jnp.asarray(padded_BL))
    xla_BLV = jax.jit(build(ModelConfig(**{**cfg.__dict__, "attention": "xla"})).apply)(
        {"params": params}, jnp.asarray(padded_BL))
    np.testing.assert_allclose(full_BLV, xla_BLV, atol=1e-5, rtol=0)
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(logits_BTV[row], full_BLV[row, len(prompt) - 1:len(prompt) + 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("choice, platform, kernel", [
    ("auto", "tpu", "splash"), ("auto", "gpu", "cudnn"), ("auto", "cuda", "cudnn"), ("auto", "cpu", "xla"),
    ("auto", "rocm", "xla"), ("xla", "tpu", "xla"), ("splash", "tpu", "splash"), ("cudnn", "gpu", "cudnn"),
])
def test_auto_takes_the_platforms_fused_kernel(choice, platform, kernel):
    assert attention.resolve(choice, platform) == kernel


@pytest.mark.parametrize("choice, platform, message", [
    ("splash", "gpu", r"model.attention='splash' needs a TPU, but this run's platform is 'gpu'\. "
                      r"Fix: set model.attention='auto' \(here: 'cudnn'\) or 'xla'"),
    ("cudnn", "tpu", r"'cudnn' needs an NVIDIA GPU \(cuDNN\), but this run's platform is 'tpu'.*"
                     r"'auto' \(here: 'splash'\)"),
    ("splash", "cpu", r"platform is 'cpu'\. Fix: set model.attention='auto' \(here: 'xla'\) or 'xla'"),
    ("cudnn", "cpu", r"platform is 'cpu'"),
    ("flash", "tpu", r"'flash' is not an attention kernel"),
])
def test_a_kernel_the_platform_lacks_is_one_clear_error(choice, platform, message):
    with pytest.raises(AttentionError, match=message):
        attention.resolve(choice, platform)


def test_a_saved_run_loads_anywhere_and_a_run_checks_its_kernel_before_training():
    config = tiny_config(model__attention="splash")
    assert ModelConfig.for_run(config, 64, platform="tpu").attention == "splash"
    assert ModelConfig.for_run(config, 64, platform="cpu", strict=False).attention == "xla"
    assert ModelConfig.for_run(config, 64, platform="gpu", strict=False).attention == "cudnn"
    with pytest.raises(AttentionError, match="needs a TPU"):
        ModelConfig.for_run(config, 64, platform="cpu")
    with pytest.raises(AttentionError, match="not a resolved kernel"):
        ModelConfig(vocab_size=8, max_len=8, num_layers=1, num_heads=1, d_model=8, head_dim=8, d_ff=8, attention="auto")


@pytest.mark.parametrize("kernel, masks, length, dtype, expected", [
    ("splash", dict(has_segments=True), 2048, "bfloat16", ("splash", None)),
    ("splash", dict(has_prefix=True), 2048, "bfloat16", ("xla", "prefix-LM rows")),
    ("splash", dict(has_prefix=True, causal=False), 2048, "bfloat16", ("splash", None)),  # an encoder has no prefix
    ("splash", {}, 1000, "bfloat16", ("xla", "do not divide the length 1000")),
    ("cudnn", {}, 1000, "bfloat16", ("cudnn", None)),
    ("cudnn", dict(causal=False), 1000, "float16", ("cudnn", None)),
    ("cudnn", dict(has_segments=True), 2048, "bfloat16", ("xla", "causal and padding masks only")),
    ("cudnn", dict(has_prefix=True), 2048, "bfloat16", ("xla", "causal and padding masks only")),
    ("cudnn", {}, 2048, "float32", ("xla", "bfloat16 or float16, not float32")),
    ("xla", dict(has_segments=True, has_prefix=True), 100, "float32", ("xla", None)),
])
def test_each_kernel_serves_the_masks_it_can_and_says_why_it_falls_back(kernel, masks, length, dtype, expected):
    facts = {"causal": True, "has_segments": False, "has_prefix": False, **masks}
    used, reason = attention.plan(kernel, facts["causal"], facts["has_segments"], facts["has_prefix"], length, dtype)
    assert used == expected[0]
    assert (reason is None) if expected[1] is None else (expected[1] in reason)


@pytest.mark.optimized  # the memory a user's TPU compile needs
def test_splash_needs_no_scores_in_hbm_for_a_train_step_compiled_for_a_tpu():
    """Per-chip temporaries of a 1-layer decoder's train step at context 8192 in bfloat16 on
    4 TPU v5e chips (one row each): XLA holds the [B, H, L, L] scores, splash does not."""
    from jax.experimental import topologies

    from lm.parallel import sharding
    from lm.training.trainer import make_trainer

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    length, heads = 8192, 2
    temporaries = {}
    for kernel in ("xla", "splash"):
        config = tiny_config(model__num_layers=1, model__num_heads=heads, model__num_kv_heads=1, model__d_model=128,
                             model__head_dim=128, model__d_ff=256, model__dtype="bfloat16", model__positions="rope",
                             model__attention=kernel, data__seq_len=length, train__batch_size=4)
        trainer = make_trainer(config, ModelConfig.for_run(config, 64, platform="tpu"),
                               sharding.make_mesh(config, devices=devices), pad_id=0)
        temporaries[kernel] = trainer.compile_step(4, length).memory_analysis().temp_size_in_bytes
    scores = 1 * heads * length * length * 2  # one row, every head, bfloat16, per chip
    print(f"per-chip temporaries at context {length}: xla {temporaries['xla'] / 2**20:.1f} MiB, "
          f"splash {temporaries['splash'] / 2**20:.1f} MiB; one layer's scores {scores / 2**20:.0f} MiB")
    assert temporaries["xla"] - temporaries["splash"] >= scores

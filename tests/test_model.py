"""The decoder: causal, correct against a NumPy reference, and fully annotated for sharding."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model import ModelConfig, build
from lm.model.counting import abstract_params, param_counts, train_flops_per_token
from lm.model.layers import ACTIVATIONS, matmul


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=37, max_len=16, num_layers=2, num_heads=2, d_model=16, head_dim=8, d_ff=64)
    return ModelConfig(**{**base, **kw})


def init(cfg: ModelConfig, seed: int = 0):
    model = build(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, cfg.max_len), jnp.int32))["params"])
    return model, params


VARIANTS = [
    dict(),
    dict(positions="rope", norm="rmsnorm", activation="swiglu"),
    dict(activation="gelu_tanh", use_bias=True, tie_embeddings=False),
    dict(num_kv_heads=1, scan_layers=True, remat="full"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_token_t_does_not_change_logits_before_t(variant):
    cfg = small(**variant)
    model, params = init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.max_len), 3, cfg.vocab_size)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1 - 3) % (cfg.vocab_size - 3) + 3)
    before, after = model.apply({"params": params}, tokens), model.apply({"params": params}, changed)
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert np.abs(before[:, t:] - after[:, t:]).max() > 1e-4  # the change is visible from t on


def test_every_parameter_has_logical_axes_matching_its_rank():
    families = [dict(family="encoder"), dict(family="encoder_decoder", scan_layers=True, num_kv_heads=1)]
    for variant in VARIANTS + families:
        boxed = abstract_params(build(small(**variant)), 16)
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
        assert all(len(x.names) == x.value.ndim for x in leaves)


def test_custom_matmul_gradients_equal_autodiff():
    x = jax.random.normal(jax.random.key(0), (3, 5, 7))
    w = jax.random.normal(jax.random.key(1), (7, 4))
    g = jax.random.normal(jax.random.key(2), (3, 5, 4))
    ours = jax.vjp(matmul, x, w)[1](g)
    reference = jax.vjp(lambda a, b: a @ b, x, w)[1](g)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_fenced_activation_gradient_equals_autodiff(name):
    x = jnp.linspace(-4, 4, 101)
    exact = {"gelu": lambda v: jax.nn.gelu(v, approximate=False), "gelu_tanh": jax.nn.gelu}[name]
    np.testing.assert_allclose(jax.grad(lambda v: ACTIVATIONS[name](v).sum())(x),
                               jax.grad(lambda v: exact(v).sum())(x), rtol=1e-6, atol=1e-6)


def numpy_reference(params, tokens: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A plain NumPy GPT (learned or rotary positions, LayerNorm without bias, exact GELU, tied)."""
    p = jax.tree.map(np.asarray, params)
    erf = np.vectorize(math.erf)

    def layer_norm(x, scale):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * scale

    def rotate(x_bhlk):  # RoFormer: pairs (i, i + K/2) turn by position * theta^(-2i/K)
        half = x_bhlk.shape[-1] // 2
        angle = np.arange(length)[:, None] * cfg.rope_theta ** (-np.arange(half) / half)
        x1, x2 = x_bhlk[..., :half], x_bhlk[..., half:]
        return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                               x2 * np.cos(angle) + x1 * np.sin(angle)], -1)

    length = tokens.shape[1]
    x = p["embed"]["embedding"][tokens]
    if cfg.positions == "learned":
        x = x + p["pos_embed"][:length]
    mask = np.tril(np.ones((length, length), bool))
    for i in range(cfg.num_layers):
        layer = p[f"layer_{i}"]
        h = layer_norm(x, layer["attn_norm"]["scale"])
        qkv = np.einsum("bld,dthk->tbhlk", h, layer["attn"]["qkv"]["kernel"])
        q, k = (rotate(qkv[0]), rotate(qkv[1])) if cfg.positions == "rope" else (qkv[0], qkv[1])
        scores = np.einsum("bhlk,bhmk->bhlm", q, k) / np.sqrt(cfg.head_dim)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attended = np.einsum("bhlm,bhmk->blhk", probs, qkv[2])
        x = x + np.einsum("blhk,hkd->bld", attended, layer["attn"]["out"]["kernel"])
        h = layer_norm(x, layer["mlp_norm"]["scale"]) @ layer["mlp"]["wi"]["kernel"]
        x = x + (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ layer["mlp"]["wo"]["kernel"]
    x = layer_norm(x, p["final_norm"]["scale"])
    return x @ p["embed"]["embedding"].T


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_logits_match_a_numpy_reference(positions):
    cfg = small(positions=positions)
    model, params = init(cfg, seed=3)
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 12), 0, cfg.vocab_size))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, numpy_reference(params, tokens, cfg), rtol=2e-4, atol=2e-5)


def test_shakespeare_model_has_nanogpt_parameter_count():
    cfg = ModelConfig(vocab_size=68, max_len=64, num_layers=4, num_heads=4, d_model=128, head_dim=32, d_ff=512)
    counts = param_counts(abstract_params(build(cfg), 64))
    # nanoGPT reports 0.80M; its vocabulary has 65 ids, ours adds <pad>, <eos>, <unk>.
    assert counts["total"] == 4 * 12 * 128 ** 2 + 4 * 2 * 128 + 128 + 68 * 128 + 64 * 128
    assert counts["non_embedding"] == counts["total"] - 68 * 128 - 64 * 128
    assert 0.795e6 < counts["total"] < 0.81e6


def test_train_flops_are_six_n_plus_causal_attention():
    cfg = ModelConfig(vocab_size=68, max_len=64, num_layers=4, num_heads=4, d_model=128, head_dim=32, d_ff=512)
    matmul_params = 4 * 12 * 128 ** 2 + 68 * 128
    assert train_flops_per_token(cfg, 64) == 6 * matmul_params + 12 * 4 * 64 * 128 / 2


def test_gpt2_small_at_context_1024_costs_six_n_plus_half_the_attention_scores_per_token():
    from lm.model import presets

    counts = presets.describe("gpt2-small")
    layers, d_model, d_ff, vocab, context = 12, 768, 3072, 50257, 1024
    n_matmul = layers * (4 * d_model ** 2 + 2 * d_model * d_ff) + vocab * d_model  # the tied logits matmul too
    attention = 12 * layers * context * d_model / 2  # QK^T and AV, forward and backward; causal: half
    assert counts["train_flops_per_token"] == 6 * n_matmul + attention
    assert abs(n_matmul / counts["total"] - 1) < 0.01  # 6N with N all parameters but biases, norms, positions
    assert counts["train_flops_per_token"] == pytest.approx(6 * counts["total"] + attention, rel=0.01)


def test_dropout_is_active_in_training_and_off_in_evaluation():
    cfg = small(dropout=0.3)
    model, params = init(cfg)
    tokens = jnp.ones((2, cfg.max_len), jnp.int32) * 5
    train = lambda seed: model.apply({"params": params}, tokens, deterministic=False,
                                     rngs={"dropout": jax.random.key(seed)})
    assert not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(train(0), train(0))  # the noise is a function of the key
    np.testing.assert_array_equal(model.apply({"params": params}, tokens), model.apply({"params": params}, tokens))


def test_bfloat16_compute_keeps_float32_params_and_logits_close_to_float32():
    model32, params = init(small())
    model16 = build(small(dtype="bfloat16"))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 37)
    logits16 = model16.apply({"params": params}, tokens)
    assert logits16.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    np.testing.assert_allclose(logits16, model32.apply({"params": params}, tokens), atol=5e-2)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_a_packed_row_gives_each_document_the_logits_it_gets_alone(positions):
    cfg = small(positions=positions)
    model, params = init(cfg, seed=5)
    doc_a, doc_b = [4, 9, 12, 7, 30], [22, 5, 17]
    row = jnp.asarray([doc_a + doc_b + [0] * (cfg.max_len - 8)], jnp.int32)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 3 + [0] * (cfg.max_len - 8)], jnp.int32)
    row_positions = jnp.asarray([list(range(5)) + list(range(3)) + [0] * (cfg.max_len - 8)], jnp.int32)
    packed = model.apply({"params": params}, row, row_positions, segment_ids)
    alone_a = model.apply({"params": params}, jnp.asarray([doc_a], jnp.int32))
    alone_b = model.apply({"params": params}, jnp.asarray([doc_b], jnp.int32))
    np.testing.assert_allclose(packed[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:8], alone_b[0], rtol=1e-5, atol=1e-5)


def stack_layers(loop_params, num_layers):
    """The loop model's per-layer parameters stacked as the scanned model stores them."""
    layers = [loop_params[f"layer_{i}"] for i in range(num_layers)]
    scanned = {k: v for k, v in loop_params.items() if not k.startswith("layer_")}
    scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return scanned


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_scanned_and_rematerialised_layers_compute_the_same_function_and_gradients(remat):
    cfg = small(num_layers=3, positions="rope")
    loop_model, params = init(cfg, seed=2)
    scan_model = build(dataclasses.replace(cfg, scan_layers=True, remat=remat))
    scanned_params = stack_layers(params, 3)
    abstract = nn.meta.unbox(jax.eval_shape(scan_model.init, jax.random.key(0),
                                            jnp.zeros((1, cfg.max_len), jnp.int32))["params"])
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, scanned_params)
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.max_len), 0, cfg.vocab_size)
    loss = lambda model, p: model.apply({"params": p}, tokens).mean()
    scan_loss, scan_grads = jax.jit(jax.value_and_grad(lambda p: loss(scan_model, p)))(scanned_params)
    loop_loss, loop_grads = jax.jit(jax.value_and_grad(lambda p: loss(loop_model, p)))(params)
    np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-5)
    loop_grads = stack_layers(loop_grads, 3)
    for a, b in zip(jax.tree.leaves(scan_grads), jax.tree.leaves(loop_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_grouped_query_attention_shares_key_value_heads_and_stays_causal():
    cfg = small(num_heads=4, num_kv_heads=2, head_dim=4)
    model, params = init(cfg)
    assert params["layer_0"]["attn"]["kv"]["kernel"].shape == (16, 2, 2, 4)  # embed, k/v, kv_heads, head_dim
    assert params["layer_0"]["attn"]["q"]["kernel"].shape == (16, 4, 4)
    tokens = jnp.arange(cfg.max_len)[None] % cfg.vocab_size
    before, after = model.apply({"params": params}, tokens), model.apply({"params": params}, tokens.at[0, 9].set(3))
    np.testing.assert_allclose(before[0, :9], after[0, :9], atol=1e-6)


@pytest.mark.parametrize("preset", ["gpt2-small", "bert-base", "t5-base", "llama-1b", "llama3-8b"])
def test_preset_parameter_counts_match_the_published_ones_within_2_percent(preset):
    from lm.model import presets
    counts = presets.describe(preset)  # jax.eval_shape: no parameter is allocated
    assert abs(counts["total"] / presets.PUBLISHED_PARAMETERS[preset] - 1) < 0.02, counts
    assert counts["non_embedding"] < counts["total"]


def test_llama3_8b_has_exactly_the_published_8030261248_parameters():
    """Meta's model card: 8.03B. Untied 128,256 x 4,096 embedding and head, 32 layers of
    GQA attention (32 query heads, 8 key/value heads of 128) and a 14,336-wide SwiGLU."""
    from lm.model import presets
    assert presets.describe("llama3-8b")["total"] == 8_030_261_248


def test_the_encoder_is_bidirectional_and_the_encoder_decoder_decoder_is_causal_and_reads_the_inputs():
    enc_cfg = small(family="encoder")
    encoder, enc_params = init(enc_cfg)
    tokens = jnp.arange(16)[None] % enc_cfg.vocab_size
    changed = tokens.at[0, 9].set(3)
    before, after = encoder.apply({"params": enc_params}, tokens), encoder.apply({"params": enc_params}, changed)
    assert not np.allclose(before[0, 0], after[0, 0])  # token 0 sees token 9

    cfg = small(family="encoder_decoder", positions="rope")
    model = build(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens, tokens)["params"])
    run = lambda inputs, decoder_inputs: model.apply({"params": params}, inputs, decoder_inputs)
    base = run(tokens, tokens)
    later_target = run(tokens, changed)
    np.testing.assert_allclose(base[0, :9], later_target[0, :9], atol=1e-6)  # the decoder is causal
    other_input = run(changed, tokens)
    assert not np.allclose(base[0, 0], other_input[0, 0])  # every target position reads the whole input

"""Decoder-only transformer (GPT / LLaMA style), pre-norm, in flax.linen.

`Decoder.apply({'params': p}, tokens_BL, positions_BL, segment_ids_BL)` is a pure
function returning float32 logits [batch, length, vocab]. With `segment_ids` (packed
rows; 0 marks padding) attention is block-diagonal causal: a token attends only to
earlier tokens of its own document. With `prefix_BL` (prefix LM) the tokens of the
prefix also attend to later prefix tokens. Activations carry logical-axis sharding
constraints at block boundaries; under a mesh and `nn.logical_axis_rules` they place
the computation, outside one they are no-ops.

Shape legend. An array's name ends in one letter per axis (`x_BLD` is [batch, length,
d_model]); each letter means the same wherever it appears in lm:

    B  batch rows (in serving, a "slot" is one such row: lm.inference.slots)
    L  length: a row's tokens (the queries, in attention)
    S  source length: the positions attention reads keys and values from (the encoder's
       output in cross-attention; the KV cache's `max_len` positions while decoding)
    P  a prompt's tokens          T  tokens decoded after it
    W  beams (beam search's width)
    D  model width (d_model)      F  MLP width (d_ff)
    H  query heads                G  key/value heads (grouped-query attention)
    Q  query heads per key/value head (H / G)
    K  head dimension (head_dim)  K2  half of it (rotary's pairs)
    V  vocabulary                 A  alternatives listed per position (top log-probabilities)
    C  classes (a fine-tuning head's outputs)
    I, R, O  a Dense layer's flattened inputs, LoRA rank and outputs (lm.model.layers)
    N  a flat count of items (positions, tokens, examples) where no letter above fits
    1, 2, 3  an axis of that size (2 or 3: fused halves, or query/key/value)

A cache "position" is one of the S entries of the KV cache along a row; "slot" is never
used for it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.model import attention, pipeline
from lm.model.config import ModelConfig
from lm.model.layers import ACTIVATIONS, Dense, Embed, norm, remat_policy

Array = jax.Array


def rotary_angles(positions_BL: Array, head_dim: int, max_len: int, theta: float) -> tuple[Array, Array]:
    """(sin, cos) of RoPE angles, [batch, length, head_dim // 2], gathered from a constant table.

    A gather from a NumPy-built table, not `jnp.sin` of the positions: XLA would fuse the
    sine into every consumer and re-evaluate it per element (on CPU it cost 7 ms a step).
    """
    half = head_dim // 2
    angles_LK2 = np.arange(max_len, dtype=np.float64)[:, None] * theta ** (-np.arange(half) / half)
    sin_BLK2 = jnp.take(jnp.asarray(np.sin(angles_LK2), jnp.float32), positions_BL, axis=0)
    cos_BLK2 = jnp.take(jnp.asarray(np.cos(angles_LK2), jnp.float32), positions_BL, axis=0)
    return sin_BLK2, cos_BLK2


def rotary(x_BLHK: Array, sin_BLK2: Array, cos_BLK2: Array) -> Array:
    """Rotary position embedding (RoFormer), rotating the two halves of each head."""
    sin_BL1K2, cos_BL1K2 = sin_BLK2[:, :, None], cos_BLK2[:, :, None]
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BL1K2 - x2 * sin_BL1K2, x2 * cos_BL1K2 + x1 * sin_BL1K2], -1)
    return rotated.astype(x_BLHK.dtype)


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention; `cross=True` reads keys and values from `memory`.

    Self-attention over whole rows runs on `cfg.attention`'s kernel (lm.model.attention)
    with the row's `segment_ids` and `prefix`; cross-attention takes the dense
    `mask_B1LS` on XLA; decoding reads the KV cache (`attend_cache`) on every kernel."""

    cfg: ModelConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x_BLD: Array, memory_BSD: Array | None, positions_BL: Array | None,
                 mask_B1LS: Array | None, causal: bool, deterministic: bool, decode: bool = False,
                 valid_BL: Array | None = None, segment_ids_BL: Array | None = None,
                 prefix_BL: Array | None = None) -> Array:
        """With `decode`, keys and values are appended to a KV cache (the "cache"
        collection) and the queries attend to every valid cache position up to their own."""
        c = self.cfg
        dense = lambda x, features, axes, name: Dense(features, axes, init_std=c.hidden_init_std,
                                                      use_bias=c.use_bias, dtype=c.compute_dtype, lora=c.lora,
                                                      name=name)(x)
        if c.kv_heads == c.num_heads and not self.cross:  # one fused matmul for q, k and v
            qkv_BL3HK = dense(x_BLD, (3, c.num_heads, c.head_dim), ("embed", "fused", "heads", "head_dim"), "qkv")
            q_BLHK, k_BSGK, v_BSGK = (qkv_BL3HK[:, :, i] for i in range(3))
        else:  # separate queries; grouped-query attention shares each key/value head among a group
            q_BLHK = dense(x_BLD, (c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "q")
            k_BSGK = v_BSGK = None  # decoding after the first step: cross keys/values are cached
            if memory_BSD is not None or not self.cross:
                kv_BS2GK = dense(memory_BSD if self.cross else x_BLD, (2, c.kv_heads, c.head_dim),
                                 ("embed", "fused", "kv_heads", "head_dim"), "kv")
                k_BSGK, v_BSGK = kv_BS2GK[:, :, 0], kv_BS2GK[:, :, 1]
            if decode and self.cross:
                k_BSGK, v_BSGK, mask_B1LS = self._cross_cache(k_BSGK, v_BSGK, mask_B1LS, x_BLD.shape[1])
        if c.positions == "rope" and not self.cross:
            sin_BLK2, cos_BLK2 = rotary_angles(positions_BL, c.head_dim, c.max_len, c.rope_theta)
            q_BLHK = rotary(q_BLHK, sin_BLK2, cos_BLK2)
            k_BSGK = rotary(k_BSGK, sin_BLK2, cos_BLK2)
        if c.parametrization == "mup":  # scores q.k / K on every path below, which all divide by sqrt(K)
            q_BLHK = q_BLHK * jnp.asarray(c.query_scale, q_BLHK.dtype)
        q_BLHK = nn.with_logical_constraint(q_BLHK, ("batch", "length", "act_heads", "head_dim"))
        if decode and not self.cross:
            out_BLHK = attend_cache(q_BLHK, *self._extend_cache(k_BSGK, v_BSGK, valid_BL))
        elif self.cross:
            out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask_B1LS, is_causal=causal)
        else:
            out_BLHK = attention.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, kernel=c.attention, causal=causal,
                                                       segment_ids_BL=segment_ids_BL, prefix_BL=prefix_BL)
        out_BLD = Dense((c.d_model,), ("heads", "head_dim", "embed"), in_dims=2,
                        init_std=c.residual_init_std, use_bias=c.use_bias, dtype=c.compute_dtype,
                        lora=c.lora, name="out")(out_BLHK)
        return nn.Dropout(c.dropout)(out_BLD, deterministic=deterministic)

    def _cross_cache(self, k_BSGK: Array | None, v_BSGK: Array | None, mask_B1LS: Array | None,
                     length: int) -> tuple[Array, Array, Array]:
        """Cross-attention while decoding: the first call (with the encoder's output) caches
        its keys, values and padding mask; later calls (memory None) read them back."""
        if k_BSGK is not None:
            batch, source = k_BSGK.shape[:2]
            valid_BS = jnp.ones((batch, source), bool) if mask_B1LS is None else mask_B1LS[:, 0, 0, :]
            for name, value in (("cross_k", k_BSGK), ("cross_v", v_BSGK), ("cross_valid", valid_BS)):
                self.variable("cache", name, lambda v=value: v).value = value
        k_BSGK, v_BSGK, valid_BS = (self.get_variable("cache", name) for name in ("cross_k", "cross_v", "cross_valid"))
        mask_B1LS = jnp.broadcast_to(valid_BS[:, None, None, :], (valid_BS.shape[0], 1, length, valid_BS.shape[1]))
        return k_BSGK, v_BSGK, mask_B1LS

    def _extend_cache(self, k_BLGK: Array, v_BLGK: Array, valid_BL: Array) -> tuple[Array, Array, Array]:
        """Writes the new keys/values at each row's cache index; returns the whole cache
        [B, G, max_len, K] twice and the mask [B, L, max_len] of what each query may see.

        Each row has its own index, so rows may stand at different lengths: continuous
        batching (lm.inference.slots) puts a new request into one row while the others go on. The
        cache is heads-major so a decoding step's attention reads it in place; with the
        [B, S, G, K] layout of training, every step would transpose (copy) all of it."""
        batch, length, groups, head_dim = k_BLGK.shape
        cache_len = self.cfg.max_len
        cached_k = self.variable("cache", "k", jnp.zeros, (batch, groups, cache_len, head_dim), k_BLGK.dtype)
        cached_v = self.variable("cache", "v", jnp.zeros, (batch, groups, cache_len, head_dim), v_BLGK.dtype)
        cached_valid = self.variable("cache", "valid", jnp.zeros, (batch, cache_len), bool)
        index = self.variable("cache", "index", jnp.zeros, (batch,), jnp.int32)
        start_B = index.value
        cached_k.value = _write(cached_k.value, jnp.swapaxes(k_BLGK, 1, 2), start_B, axis=2)
        cached_v.value = _write(cached_v.value, jnp.swapaxes(v_BLGK, 1, 2), start_B, axis=2)
        cached_valid.value = _write(cached_valid.value, valid_BL, start_B, axis=1)
        index.value = start_B + length
        query_position_BL = start_B[:, None] + jnp.arange(length)
        position_S = jnp.arange(cache_len)
        visible_BLS = position_S[None, None, :] <= query_position_BL[:, :, None]
        # A padding query sees itself, so its (unused) output stays finite: a NaN there would
        # reach later layers' cached values, and 0 * NaN is NaN even under a mask.
        itself_BLS = position_S[None, None, :] == query_position_BL[:, :, None]
        mask_BLS = (cached_valid.value[:, None, :] & visible_BLS) | itself_BLS
        return cached_k.value, cached_v.value, mask_BLS


def _write(cache: Array, new: Array, start_B: Array, axis: int) -> Array:
    """cache[b, ..., start[b]:start[b] + L, ...] = new[b] along `axis`, for each row b.
    One new token is a scatter of one position per row (in place in a donated cache); a
    row past the end of the cache (a free serving slot) is left as it is."""
    length = new.shape[axis]
    if length > 1:
        return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=axis - 1))(
            cache, new, start_B)
    rows_B = jnp.arange(cache.shape[0])
    index = (rows_B,) + (slice(None),) * (axis - 1) + (start_B,)
    return cache.at[index].set(jnp.take(new, 0, axis=axis).astype(cache.dtype), mode="drop")


def attend_cache(q_BLHK: Array, k_BGSK: Array, v_BGSK: Array, mask_BLS: Array) -> Array:
    """Attention of new queries over a heads-major KV cache; grouped-query heads (Q per
    group) share their group's keys and values. Softmax in float32."""
    batch, length, heads, head_dim = q_BLHK.shape
    groups = k_BGSK.shape[1]
    q_BLGQK = q_BLHK.reshape(batch, length, groups, heads // groups, head_dim)
    scores_BGQLS = jnp.einsum("blgqk,bgsk->bgqls", q_BLGQK, k_BGSK,
                              preferred_element_type=jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
    scores_BGQLS = jnp.where(mask_BLS[:, None, None], scores_BGQLS, jnp.finfo(jnp.float32).min)
    probs_BGQLS = jax.nn.softmax(scores_BGQLS, axis=-1).astype(v_BGSK.dtype)
    out_BLGQK = jnp.einsum("bgqls,bgsk->blgqk", probs_BGQLS, v_BGSK)
    return out_BLGQK.reshape(batch, length, heads, head_dim)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: Array, deterministic: bool) -> Array:
        c = self.cfg
        if c.activation == "swiglu":
            gate_up_BL2F = Dense((2, c.d_ff), ("embed", "fused", "mlp"), init_std=c.hidden_init_std,
                                 use_bias=c.use_bias, dtype=c.compute_dtype, lora=c.lora, name="wi")(x_BLD)
            h_BLF = jax.nn.silu(gate_up_BL2F[:, :, 0]) * gate_up_BL2F[:, :, 1]
        else:
            h_BLF = ACTIVATIONS[c.activation](Dense(
                (c.d_ff,), ("embed", "mlp"), init_std=c.hidden_init_std, use_bias=c.use_bias,
                dtype=c.compute_dtype, lora=c.lora, name="wi")(x_BLD))
        h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "act_mlp"))
        out_BLD = Dense((c.d_model,), ("mlp", "embed"), init_std=c.residual_init_std,
                        use_bias=c.use_bias, dtype=c.compute_dtype, lora=c.lora, name="wo")(h_BLF)
        return nn.Dropout(c.dropout)(out_BLD, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), [x + cross-attention(norm(x), memory)],
    then x + mlp(norm(x)). `causal=False` is an encoder block.

    Returns `(x, None)` so the same module serves a Python loop and `nn.scan`.
    """

    cfg: ModelConfig
    deterministic: bool = True
    causal: bool = True
    cross: bool = False
    decode: bool = False  # extend a KV cache (see Attention); `segment_ids` > 0 marks real tokens

    @nn.compact
    def __call__(self, x_BLD: Array, positions_BL: Array, segment_ids_BL: Array | None,
                 prefix_BL: Array | None, memory_BSD: Array | None = None,
                 memory_mask_B1LS: Array | None = None) -> tuple[Array, None]:
        c = self.cfg
        valid_BL = None
        if self.decode:
            valid_BL = jnp.ones(x_BLD.shape[:2], bool) if segment_ids_BL is None else segment_ids_BL > 0
        h_BLD = norm(c.norm, c.norm_eps, c.use_bias, c.compute_dtype, "attn_norm")(x_BLD)
        x_BLD = x_BLD + Attention(c, name="attn")(h_BLD, None, positions_BL, None, self.causal, self.deterministic,
                                                  self.decode, valid_BL, segment_ids_BL, prefix_BL)
        if self.cross:
            h_BLD = norm(c.norm, c.norm_eps, c.use_bias, c.compute_dtype, "cross_norm")(x_BLD)
            x_BLD = x_BLD + Attention(c, cross=True, name="cross_attn")(
                h_BLD, memory_BSD, None, memory_mask_B1LS, False, self.deterministic, self.decode)
        h_BLD = norm(c.norm, c.norm_eps, c.use_bias, c.compute_dtype, "mlp_norm")(x_BLD)
        x_BLD = x_BLD + MLP(c, name="mlp")(h_BLD, self.deterministic)
        return nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed")), None


def remat_block(cfg: ModelConfig) -> type:
    """`Block`, rematerialised per `cfg.remat` (activations recomputed in the backward pass)."""
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=remat_policy(cfg.remat, cfg.pipeline_stages > 1), prevent_cse=not cfg.scan_layers)


def run_blocks(cfg: ModelConfig, deterministic: bool, x_BLD: Array, *context: Array | None,
               causal: bool = True, cross: bool = False, num_layers: int = 0, name: str = "layer",
               decode: bool = False) -> Array:
    """Applies `num_layers` (default `cfg.num_layers`) blocks inside the calling module: one
    `nn.scan`ned block (parameters stacked on a leading `layers` axis, in `{name}s`;
    compile time flat in depth) or a Python loop (`{name}_0`, `{name}_1`, ...)."""
    block = remat_block(cfg)
    num_layers = num_layers or cfg.num_layers
    if cfg.scan_layers:
        scanned = nn.scan(block, variable_axes={"params": 0, "lora": 0, "cache": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast,) * len(context), length=num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        layers = scanned(cfg, deterministic, causal, cross, decode, name=f"{name}s")
        if cfg.pipeline_stages > 1 and not decode and not layers.is_initializing():
            return _pipelined(layers, block(cfg, deterministic, causal, cross, parent=None), x_BLD, context)
        return layers(x_BLD, *context)[0]
    for i in range(num_layers):
        x_BLD, _ = block(cfg, deterministic, causal, cross, decode, name=f"{name}_{i}")(x_BLD, *context)
    return x_BLD


def _pipelined(layers: nn.Module, block: nn.Module, x_BLD: Array, context: tuple) -> Array:
    """The scanned `layers`' stacked variables run by lm.model.pipeline's schedule, one
    `block` (unbound) applied per layer. Initialisation takes the scan (same parameters)."""
    c = block.cfg
    rng = None if block.deterministic else layers.make_rng("dropout")
    apply_layer = lambda variables, x_bLD, context_bL, key: block.apply(
        variables, x_bLD, *context_bL, rngs=None if key is None else {"dropout": key})[0]
    return pipeline.run(apply_layer, layers.variables, x_BLD, context, stages=c.pipeline_stages,
                        repeats=c.pipeline_repeats, microbatches=c.pipeline_microbatches, rng=rng)


class Decoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BL: Array, positions_BL: Array | None = None,
                 segment_ids_BL: Array | None = None, deterministic: bool = True,
                 prefix_BL: Array | None = None, return_hidden: bool = False, decode: bool = False) -> Array:
        """Logits [B, L, V] (float32), or with `return_hidden` the final-norm hidden
        states [B, L, D] that fine-tuning heads read. With `decode` (lm.inference.decode), the
        tokens extend the KV cache in the mutable "cache" collection; `positions` are then
        each row's own and `segment_ids` > 0 marks real (not padding) tokens."""
        c = self.cfg
        positions_BL = default_positions(tokens_BL) if positions_BL is None else positions_BL
        embed = Embed(c.vocab_size, c.d_model, c.init_std, c.compute_dtype, name="embed")
        x_BLD = embed_inputs(self, embed, tokens_BL, positions_BL, deterministic)
        x_BLD = run_blocks(c, deterministic, x_BLD, positions_BL, segment_ids_BL, prefix_BL, decode=decode)
        x_BLD = norm(c.norm, c.norm_eps, c.use_bias, c.compute_dtype, "final_norm")(x_BLD)
        if return_hidden:
            return x_BLD
        return output_logits(c, embed, x_BLD)


def default_positions(tokens_BL: Array) -> Array:
    return jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)


def embed_inputs(module: nn.Module, embed: Embed, tokens_BL: Array, positions_BL: Array,
                 deterministic: bool, table_name: str = "pos_embed") -> Array:
    """Token embeddings plus, for learned positions, `module`'s position table; then dropout."""
    c = module.cfg
    x_BLD = embed(tokens_BL)
    if c.positions == "learned":
        table_LD = module.param(table_name, nn.with_logical_partitioning(
            nn.initializers.normal(c.init_std), ("position", "embed")), (c.max_len, c.d_model))
        x_BLD = x_BLD + jnp.take(table_LD, positions_BL, axis=0).astype(c.compute_dtype)
    x_BLD = nn.Dropout(c.dropout)(x_BLD, deterministic=deterministic)
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed"))


def output_logits(c: ModelConfig, embed: Embed, x_BLD: Array) -> Array:
    """float32 logits: the tied embedding transposed, or a separate `unembed` matrix (µP:
    times the output multiplier 1/m, lm.model.mup)."""
    if c.tie_embeddings:
        logits_BLV = embed.attend(x_BLD)
    else:
        logits_BLV = Dense((c.vocab_size,), ("embed", "vocab"), init_std=c.init_std,
                           dtype=c.compute_dtype, lora=c.lora, name="unembed")(x_BLD)
    logits_BLV = logits_BLV.astype(jnp.float32)
    if c.parametrization == "mup":
        logits_BLV = logits_BLV * c.logit_scale
    return nn.with_logical_constraint(logits_BLV, ("batch", "length", "act_vocab"))

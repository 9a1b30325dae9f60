"""Looking inside a decoder: attention maps and nearest tokens in embedding space.

The model computes attention with `jax.nn.dot_product_attention`, which never
materialises the weights; `attention_maps` recomputes them from each layer's captured
attention input and the layer's own parameters (the same rotary and grouping).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import UsageError
from lm.model.transformer import default_positions, rotary, rotary_angles
from lm.runs.artifacts import Loaded


def _layer_params(loaded: Loaded, i: int) -> dict:
    params = loaded.params
    if "layers" in params:  # scanned: one stacked tree
        return jax.tree.map(lambda x: x[i], params["layers"])
    return params[f"layer_{i}"]


def attention_inputs(loaded: Loaded, tokens_BL: jax.Array) -> list[jax.Array]:
    """Each layer's normalised attention input [B, L, D] (captured intermediates)."""
    if loaded.model_cfg.scan_layers:
        raise UsageError("attention maps read per-layer intermediates, which a scanned model stacks away. "
                          "Fix: load it with model.scan_layers=False (lm.convert.unstack_layers gives the params).")
    _, state = loaded.model.apply({"params": loaded.params}, tokens_BL, mutable=["intermediates"],
                                  capture_intermediates=lambda module, name: module.name == "attn_norm")
    inter = state["intermediates"]
    return [inter[f"layer_{i}"]["attn_norm"]["__call__"][0] for i in range(loaded.model_cfg.num_layers)]


def queries_keys_values(loaded: Loaded, layer: dict, h_BLD: jax.Array, positions_BL: jax.Array):
    """q, k, v [B, L, H, K] of one layer (key/value heads repeated for grouped-query attention)."""
    c = loaded.model_cfg
    attn = layer["attn"]
    if "qkv" in attn:
        qkv = jnp.einsum("bld,dthk->blthk", h_BLD, attn["qkv"]["kernel"])
        if "bias" in attn["qkv"]:
            qkv = qkv + attn["qkv"]["bias"]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q = jnp.einsum("bld,dhk->blhk", h_BLD, attn["q"]["kernel"])
        kv = jnp.einsum("bld,dtgk->bltgk", h_BLD, attn["kv"]["kernel"])
        group = c.num_heads // c.kv_heads
        k, v = (jnp.repeat(kv[:, :, i], group, axis=2) for i in range(2))
    if c.positions == "rope":
        sin, cos = rotary_angles(positions_BL, c.head_dim, c.max_len, c.rope_theta)
        q, k = rotary(q, sin, cos), rotary(k, sin, cos)
    return q, k, v


def attention_maps(loaded: Loaded, tokens_BL: jax.Array) -> np.ndarray:
    """Attention weights [layers, B, heads, query, key] of a causal decoder; each row sums to 1."""
    positions_BL = default_positions(tokens_BL)
    maps = []
    for i, h_BLD in enumerate(attention_inputs(loaded, tokens_BL)):
        q, k, _ = queries_keys_values(loaded, _layer_params(loaded, i), h_BLD, positions_BL)
        scores_BHLL = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(loaded.model_cfg.head_dim)
        length = tokens_BL.shape[1]
        causal_LL = jnp.tril(jnp.ones((length, length), bool))
        maps.append(jax.nn.softmax(jnp.where(causal_LL, scores_BHLL, -jnp.inf), axis=-1))
    return np.asarray(jnp.stack(maps))


def nearest_tokens(loaded: Loaded, token_id: int, k: int = 10) -> list[tuple[int, float]]:
    """The k tokens whose input embeddings have the highest cosine similarity to `token_id`'s."""
    table_VD = np.asarray(nn.meta.unbox(loaded.params["embed"]["embedding"]), np.float32)
    unit_VD = table_VD / np.maximum(np.linalg.norm(table_VD, axis=-1, keepdims=True), 1e-12)
    similarity_V = unit_VD @ unit_VD[token_id]
    order = [int(i) for i in np.argsort(-similarity_V) if i != token_id][:k]
    return [(i, float(similarity_V[i])) for i in order]

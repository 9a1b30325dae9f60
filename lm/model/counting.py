"""Parameter and FLOP accounting without allocating a model.

FLOPs follow MaxText's accounting: a matmul with P parameters costs 2·P FLOPs per
token forward and 4·P backward (6·P in all); causal attention's two score matmuls
cost 2·2·L·H·K per token forward, counted at half for the causal mask.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.model.config import ModelConfig

EMBEDDING_PARAMS = ("embed", "pos_embed", "encoder_pos_embed", "decoder_pos_embed")  # lookup tables


def abstract_params(model: nn.Module, seq_len: int) -> Any:
    """The model's parameters as boxed ShapeDtypeStructs (logical axes attached)."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    inputs = (tokens, tokens) if model.cfg.family == "encoder_decoder" else (tokens,)
    return jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]


def param_counts(params: Any) -> dict[str, int]:
    """Total parameters, and non-embedding ones (Kaplan et al.: without the token and
    position tables). Works on arrays or abstract values."""
    params = nn.meta.unbox(params)
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    embedding = sum(size(params[name]) for name in EMBEDDING_PARAMS if name in params)
    total = size(params)
    return {"total": total, "non_embedding": total - embedding}


def train_flops_per_token(cfg: ModelConfig, seq_len: int, causal_in_full: bool = False) -> float:
    """Forward + backward FLOPs per trained token: 6·(matmul params) + attention scores.

    Causal self-attention counts half its score matmuls (the masked half is skipped by a
    fused kernel), or all of them with `causal_in_full` (as XLA's cost analysis counts
    them); an encoder's counts them all. An encoder-decoder's figure is per pair of
    (input, target) tokens of equal lengths.
    """
    attention_proj = 2 * cfg.d_model * (cfg.num_heads + cfg.kv_heads) * cfg.head_dim  # q, out + k, v
    mlp = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.d_ff
    scores = 12 * seq_len * cfg.num_heads * cfg.head_dim  # two score matmuls, forward and backward
    causal = scores if causal_in_full else scores / 2
    logits = cfg.d_model * cfg.vocab_size
    if cfg.family == "decoder":
        return 6.0 * (cfg.num_layers * (attention_proj + mlp) + logits) + cfg.num_layers * causal
    if cfg.family == "encoder":
        return 6.0 * (cfg.num_layers * (attention_proj + mlp) + logits) + cfg.num_layers * scores
    decoder_layers = cfg.num_decoder_layers or cfg.num_layers
    matmuls = cfg.num_layers * (attention_proj + mlp) + decoder_layers * (2 * attention_proj + mlp) + logits
    return 6.0 * matmuls + cfg.num_layers * scores + decoder_layers * (causal + scores)


# Dense bf16 peak FLOP/s per device (one chip, or one GPU), from the vendors' data sheets;
# matched by substring of `jax.Device.device_kind`. Used for MFU in the training log.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
}


def peak_flops(device_kind: str, configured: float = 0.0) -> float:
    """A device's peak FLOP/s: `configured` if set, else the table's, else 0 (unknown)."""
    if configured:
        return configured
    return next((flops for kind, flops in PEAK_FLOPS.items() if kind in device_kind), 0.0)

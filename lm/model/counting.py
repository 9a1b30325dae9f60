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

EMBEDDING_PARAMS = ("embed", "pos_embed")  # top-level names of the lookup tables


def abstract_params(model: nn.Module, seq_len: int) -> Any:
    """The model's parameters as boxed ShapeDtypeStructs (logical axes attached)."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def param_counts(params: Any) -> dict[str, int]:
    """Total parameters, and non-embedding ones (Kaplan et al.: without the token and
    position tables). Works on arrays or abstract values."""
    params = nn.meta.unbox(params)
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    embedding = sum(size(params[name]) for name in EMBEDDING_PARAMS if name in params)
    total = size(params)
    return {"total": total, "non_embedding": total - embedding}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6·(matmul params) + causal attention."""
    attention_proj = 4 * cfg.d_model * cfg.num_heads * cfg.head_dim  # q, k, v, output
    mlp = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.d_ff
    matmul_params = cfg.num_layers * (attention_proj + mlp) + cfg.d_model * cfg.vocab_size  # + logits
    attention_scores = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim  # 12·n·L·D, halved
    return 6.0 * matmul_params + attention_scores

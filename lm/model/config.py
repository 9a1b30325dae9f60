"""`ModelConfig`: the resolved, hashable model description a Flax module can hold."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from lm.config import d_ff as resolve_d_ff
from lm.config import head_dim as resolve_head_dim
from lm.model.layers import LoRA


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    max_len: int
    num_layers: int
    num_heads: int
    d_model: int
    head_dim: int
    d_ff: int
    positions: str = "learned"
    rope_theta: float = 10_000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    use_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "float32"
    init_std: float = 0.02
    num_kv_heads: int = 0  # grouped-query attention: key/value heads; 0 = num_heads
    scan_layers: bool = False  # one scanned layer (compile time flat in depth) or a Python loop
    remat: str = "none"  # activation rematerialisation policy of each layer (see layers.REMAT_POLICIES)
    family: str = "decoder"  # "decoder", "encoder" or "encoder_decoder"
    num_decoder_layers: int = 0  # encoder-decoder: decoder depth; 0 = num_layers
    lora: LoRA | None = None  # fine-tuning: low-rank adapters on the matching dense layers

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def residual_init_std(self) -> float:
        """GPT-2's scaling of the projections that write into the residual stream."""
        return self.init_std / (2 * self.num_layers) ** 0.5

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int, max_len: int) -> ModelConfig:
        """Resolves the config's zero defaults (head_dim, d_ff, vocab_size)."""
        return cls(
            vocab_size=model.vocab_size or vocab_size, max_len=max_len,
            num_layers=model.num_layers, num_heads=model.num_heads, d_model=model.d_model,
            head_dim=resolve_head_dim(model), d_ff=resolve_d_ff(model), positions=model.positions,
            rope_theta=model.rope_theta, norm=model.norm, norm_eps=model.norm_eps,
            activation=model.activation, use_bias=model.use_bias,
            tie_embeddings=model.tie_embeddings, dropout=model.dropout, dtype=model.dtype,
            init_std=model.init_std, num_kv_heads=model.num_kv_heads, scan_layers=model.scan_layers,
            remat=model.remat, family=model.family, num_decoder_layers=model.num_decoder_layers)

"""`ModelConfig`: the resolved, hashable model description a Flax module can hold."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from lm import objectives
from lm.config import d_ff as resolve_d_ff
from lm.config import head_dim as resolve_head_dim
from lm.model import attention as attention_kernels
from lm.model import mup
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
    attention: str = "xla"  # the attention kernel: "xla", "splash" (TPU) or "cudnn" (GPU), resolved from "auto"
    family: str = "decoder"  # "decoder", "encoder" or "encoder_decoder"
    num_decoder_layers: int = 0  # encoder-decoder: decoder depth; 0 = num_layers
    lora: LoRA | None = None  # fine-tuning: low-rank adapters on the matching dense layers
    parametrization: str = "standard"  # "standard" or "mup" (lm.model.mup)
    mup_base_width: int = 0  # µP: the d_model whose hyperparameters transfer; 0 = unset
    # Pipeline parallelism (lm.model.pipeline), set by the trainer from the mesh: stages
    # (mesh.shape.stage x dcn_shape.stage), virtual stages per device and microbatches.
    # Decoding and every command outside training run the layers in turn (1, 1, 1).
    pipeline_stages: int = 1
    pipeline_repeats: int = 1
    pipeline_microbatches: int = 1

    def __post_init__(self):
        if self.attention not in attention_kernels.KERNELS:
            raise attention_kernels.AttentionError(
                f"ModelConfig.attention={self.attention!r} is not a resolved kernel. Fix: build it with "
                "ModelConfig.for_run or from_config, or pass lm.model.attention.resolve(choice, platform).")
        if self.parametrization == "mup" and self.mup_base_width <= 0:
            raise ValueError(f"ModelConfig.parametrization='mup' needs mup_base_width > 0, not {self.mup_base_width}. "
                             "Fix: set model.mup_base_width to the width the hyperparameters were tuned at.")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def hidden_init_std(self) -> float:
        """The init std of hidden matrices (q, k, v, MLP in): init_std, µP's / sqrt(m)."""
        if self.parametrization != "mup":
            return self.init_std
        return self.init_std * mup.init_scale(self)

    @property
    def residual_init_std(self) -> float:
        """GPT-2's scaling of the projections that write into the residual stream (µP: also
        / sqrt(m); lm.model.mup)."""
        std = self.init_std / (2 * self.num_layers) ** 0.5
        return std if self.parametrization != "mup" else std * mup.init_scale(self)

    @property
    def query_scale(self) -> float:
        """µP's multiplier on the queries, 1/sqrt(head_dim): with the kernels' own
        1/sqrt(head_dim), scores are q.k / head_dim. 1.0 when standard (never applied)."""
        return 1.0 / self.head_dim ** 0.5 if self.parametrization == "mup" else 1.0

    @property
    def logit_scale(self) -> float:
        """µP's output multiplier 1/m on the logits; 1.0 when standard (never applied)."""
        return 1.0 / mup.width_multiplier(self)

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int, max_len: int,
                    platform: str | None = None, strict: bool = True) -> ModelConfig:
        """The fields of `model` (a config's `model` block) that `ModelConfig` has, by name, with
        its zero defaults resolved: `head_dim`, `d_ff` and `vocab_size` (0: the given one), and
        `attention` resolved to a kernel for `platform` (default: jax's default backend) by
        lm.model.attention.resolve: AttentionError for a fused kernel the platform lacks, or
        with `strict=False` (a saved run loaded elsewhere) that platform's "auto" kernel."""
        named = {f.name: model[f.name] for f in dataclasses.fields(cls) if f.name in model}
        kernel = attention_kernels.resolve(model.get("attention", "auto"), platform or jax.default_backend(), strict)
        return cls(**{**named, "vocab_size": model.vocab_size or vocab_size, "max_len": max_len,
                      "head_dim": resolve_head_dim(model), "d_ff": resolve_d_ff(model), "attention": kernel})

    @classmethod
    def for_run(cls, config: ml_collections.ConfigDict, tokenizer_vocab_size: int, platform: str | None = None,
                strict: bool = True) -> ModelConfig:
        """The model a run's config trains on `platform` (default: jax's default backend; an
        ahead-of-time compile for a TPU passes "tpu"): the tokenizer's ids plus the objective's
        extra ids (`objectives.model_vocab_size`), over rows of `config.data.seq_len` tokens,
        with `model.attention` resolved as in `from_config`."""
        vocab_size = objectives.model_vocab_size(config.objective, tokenizer_vocab_size)
        return cls.from_config(config.model, vocab_size, config.data.seq_len, platform, strict)

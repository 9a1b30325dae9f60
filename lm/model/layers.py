"""Transformer building blocks (flax.linen). Every parameter carries logical axis names."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def matmul(x_ND: Array, w_DF: Array) -> Array:
    """`x @ w` contracting x's last dimension, with a hand-written backward pass.

    JAX's transpose rule computes dW as `dot(g, x)` followed by a transpose, which
    XLA:CPU lowers to a physical transpose of the gradient (fused into the previous
    elementwise op, it ran 10x slower than that op alone). Writing dW = x^T g as one
    dot lets XLA read both operands in place: 81 -> 68 ms per step of the Shakespeare
    model on this project's 2-core CPU. Accelerators lower either form to the same GEMM.
    """
    return x_ND @ w_DF


def _matmul_fwd(x_ND: Array, w_DF: Array):
    return x_ND @ w_DF, (x_ND, w_DF)


def _matmul_bwd(residuals, g_NF: Array):
    x_ND, w_DF = residuals
    x_2d = x_ND.reshape(-1, x_ND.shape[-1])
    g_2d = g_NF.reshape(-1, g_NF.shape[-1])
    dw_DF = jax.lax.dot_general(x_2d, g_2d, (((0,), (0,)), ((), ())))
    dx_ND = jax.lax.dot_general(g_NF, w_DF, (((g_NF.ndim - 1,), (1,)), ((), ())))
    return dx_ND.astype(x_ND.dtype), dw_DF.astype(w_DF.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adapters (Hu et al., 2021) on the dense layers whose path matches `targets`.

    An adapted layer computes x W + (alpha / rank) (x A) B, with A [in, rank] and B
    [rank, out] in the "lora" variable collection (B starts at zero, so training starts
    from the pretrained function).
    """

    rank: int
    alpha: float
    targets: str  # a regex searched in the layer's path, e.g. "attn/(qkv|out)" or "mlp/w[io]"

    def adapts(self, path: Sequence[str]) -> bool:
        return re.search(self.targets, "/".join(path)) is not None


class Dense(nn.Module):
    """A dense layer contracting the last `in_dims` input dimensions.

    The kernel has shape `x.shape[-in_dims:] + features` and logical axes `axes`
    (input dimensions first), so a fused QKV kernel is [embed, fused, heads, head_dim].
    With `lora` matching its path it adds a low-rank adapter (see `LoRA`).
    """

    features: Sequence[int]
    axes: Sequence[str]
    in_dims: int = 1
    init_std: float = 0.02
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    lora: LoRA | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[-self.in_dims:]
        features = tuple(self.features)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.init_std), tuple(self.axes)), in_shape + features)
        batch_shape = x.shape[:-self.in_dims]
        x_NI = x.reshape(*batch_shape, math.prod(in_shape)).astype(self.dtype)
        y = matmul(x_NI, kernel.reshape(math.prod(in_shape), -1).astype(self.dtype))
        if self.lora is not None and self.lora.adapts(self.scope.path):
            y = y + self._adapter(x_NI, math.prod(features))
        y = y.reshape(*batch_shape, *features)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), tuple(self.axes[self.in_dims:])), features)
            y = y + bias.astype(self.dtype)
        return y

    def _adapter(self, x_NI: Array, out_features: int) -> Array:
        rank = self.lora.rank
        a_IR = self.variable("lora", "a", lambda: nn.initializers.normal(x_NI.shape[-1] ** -0.5)(
            self.make_rng("params"), (x_NI.shape[-1], rank), jnp.float32)).value
        b_RO = self.variable("lora", "b", lambda: jnp.zeros((rank, out_features), jnp.float32)).value
        return (x_NI @ a_IR.astype(self.dtype)) @ b_RO.astype(self.dtype) * (self.lora.alpha / rank)


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; `attend` reuses it as the output projection."""

    vocab_size: int
    d_model: int
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(self.init_std), ("vocab", "embed")), (self.vocab_size, self.d_model))

    def __call__(self, tokens_BL: Array) -> Array:
        return jnp.take(self.embedding, tokens_BL, axis=0).astype(self.dtype)

    def attend(self, x_BLD: Array) -> Array:
        return matmul(x_BLD.astype(self.dtype), self.embedding.T.astype(self.dtype))


def norm(kind: str, eps: float, use_bias: bool, dtype: jnp.dtype, name: str) -> nn.Module:
    """LayerNorm or RMSNorm; statistics are computed in float32 whatever `dtype` is."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, dtype=dtype, scale_init=scale_init, name=name)
    return nn.LayerNorm(epsilon=eps, use_bias=use_bias, dtype=dtype, scale_init=scale_init,
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                        name=name)


def _fence(gradient_x: Array) -> Array:
    """Keeps an activation's input gradient a separate, vectorised loop.

    Without the barrier XLA:CPU fuses the activation's derivative into the transpose
    feeding the next weight-gradient matmul, and evaluates it in transposed (strided)
    order (-6% step time on CPU with the barrier).
    """
    return jax.lax.optimization_barrier(gradient_x)


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """Exact GELU, x·Φ(x), with a hand-written derivative Φ(x) + x·φ(x).

    `erf` rather than `jax.nn.gelu`'s `erfc` form, and Φ(x) kept from the forward pass:
    on CPU, XLA's erfc (a piecewise approximation with an exp) was the costliest
    elementwise op of the step.
    """
    return x * _normal_cdf(x)


def _normal_cdf(x: Array) -> Array:
    return 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_fwd(x: Array):
    cdf = _normal_cdf(x)
    return x * cdf, (x, cdf)


def _gelu_bwd(residuals, g: Array):
    x, cdf = residuals
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return (_fence(g * (cdf + x * pdf)),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def gelu_tanh(x: Array) -> Array:
    """GELU's tanh approximation (GPT-2), with its input gradient fenced like `gelu`'s."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x: Array):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x: Array, g: Array):
    _, vjp = jax.vjp(lambda v: jax.nn.gelu(v, approximate=True), x)
    return (_fence(vjp(g)[0]),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": jax.nn.relu,  # T5's original MLP
    "swiglu": jax.nn.silu,  # the gate's nonlinearity; the MLP multiplies by the up projection
}


# Which activations a rematerialised layer keeps for the backward pass (the rest are
# recomputed): "full" keeps none, the dots policies keep matmul outputs.
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dots_with_only_a_stage_batch_dim_saveable(prim, *_, **params) -> bool:
    """`dots_with_no_batch_dims_saveable` for a layer run inside a pipeline's vmap over
    stages (lm.model.pipeline), where every matmul gains the stage axis as a batch
    dimension: saves the matmuls batched over that axis alone (the weight matmuls), not
    those with more (attention's scores, batched over rows and heads too)."""
    if prim is not jax.lax.dot_general_p:
        return False
    (_, _), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    return len(lhs_batch) <= 1 and len(rhs_batch) <= 1


def remat_policy(name: str, pipelined: bool) -> Callable | None:
    """The `jax.checkpoint` policy of `REMAT_POLICIES[name]`, for a layer run in a pipeline
    or not."""
    if pipelined and name == "dots_with_no_batch_dims_saveable":
        return dots_with_only_a_stage_batch_dim_saveable
    return REMAT_POLICIES[name]

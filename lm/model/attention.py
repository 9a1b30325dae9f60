"""Self-attention over whole rows (training, evaluation, scoring) on the kernel a run chose.

`model.attention` names it: "xla" (`jax.nn.dot_product_attention`'s XLA path, every
platform), "splash" (TPU: Pallas splash attention) or "cudnn" (NVIDIA GPU: cuDNN flash
attention); "auto" takes the platform's fused kernel. `resolve` turns the choice into a
kernel before a model is built, `plan` decides per call whether that kernel can serve
these masks, and `dot_product_attention` runs it. Decoding with the KV cache
(lm.model.transformer.attend_cache) is the same on every choice: one query row over the
cache is a matrix-vector product, which gains nothing from a flash kernel.

What each kernel masks, and where it falls back to XLA (once per reason, logged with
absl at WARNING):

- "xla": causal, packed documents and prefix-LM rows through an explicit bool
  [B, 1, L, L] mask (`attention_mask`); XLA materialises the [B, H, L, L] scores.
- "splash" (MaxText's TPU attention): a static causal (or full, for an encoder) mask
  and packed documents as `SegmentIds`, in blocks of 128-512 positions, so neither the
  scores nor a mask of L x L is ever in HBM. Falls back for prefix-LM rows (the prefix
  differs per row and splash's mask is one static pattern for every row; a dynamic
  splash mask would itself be an [H, L, L] array, so XLA's [B, 1, L, L] mask is no
  worse) and for a length that is not a multiple of 128 (its smallest block).
- "cudnn": causal or no mask (cuDNN's CAUSAL and NO_MASK mask types); falls back for
  packed documents and prefix-LM rows (jax.nn.dot_product_attention would pass their
  mask to cuDNN as a dense [B, 1, L, L] bias, and its segment offsets are not part of
  that API), for float32 (cuDNN's flash kernels take bfloat16 or float16) and for a
  head dimension that is not a multiple of 8 up to 256.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from lm.errors import UsageError

Array = jax.Array

KERNELS = ("xla", "splash", "cudnn")
FUSED = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}  # platform -> its fused kernel
_NEEDS = {"splash": "a TPU", "cudnn": "an NVIDIA GPU (cuDNN)"}
SPLASH_BLOCKS = (512, 256, 128)  # splash block sizes tried, largest first (MaxText uses 512)
CUDNN_DTYPES = ("bfloat16", "float16")


class AttentionError(UsageError):
    """An attention kernel the platform does not have, or a choice that is not a kernel."""


def resolve(choice: str, platform: str, strict: bool = True) -> str:
    """The kernel ("xla", "splash" or "cudnn") that `choice` (`model.attention`) means on
    `platform` (a jax backend name: "cpu", "gpu", "cuda", "rocm", "tpu").

    "auto" is the platform's fused kernel (splash on TPU, cuDNN on an NVIDIA GPU), else
    XLA. A fused kernel the platform lacks raises AttentionError naming the fix; with
    `strict=False` it becomes the platform's "auto" kernel instead, so a run saved on a
    TPU with "splash" loads for decoding or evaluation on a CPU or GPU.
    """
    platform = platform.lower()
    if choice == "auto":
        return FUSED.get(platform, "xla")
    if choice not in KERNELS:
        raise AttentionError(f"model.attention={choice!r} is not an attention kernel. "
                             f"Fix: use one of 'auto', {', '.join(map(repr, KERNELS))}.")
    if choice == "xla" or FUSED.get(platform) == choice:
        return choice
    if not strict:
        return FUSED.get(platform, "xla")
    auto = FUSED.get(platform, "xla")
    raise AttentionError(
        f"model.attention={choice!r} needs {_NEEDS[choice]}, but this run's platform is {platform!r}. "
        f"Fix: set model.attention='auto' (here: {auto!r}) or 'xla'.")


def plan(kernel: str, causal: bool, has_segments: bool, has_prefix: bool, length: int,
         dtype: str = "float32", head_dim: int = 64) -> tuple[str, str | None]:
    """(the kernel that serves this call, why it is not `kernel`, or None).

    Pure: from the call's static facts (masks present, row length, dtype, head
    dimension). A prefix only counts in causal attention (it opens the causal mask).
    """
    if kernel not in KERNELS:
        raise AttentionError(f"attention kernel {kernel!r} is not resolved. Fix: pass one of {KERNELS} "
                             "(lm.model.attention.resolve turns model.attention into one).")
    has_prefix = has_prefix and causal
    if kernel == "splash":
        if has_prefix:
            return "xla", ("splash attention takes one static mask for every row, and prefix-LM rows each "
                           "open their own prefix: they run on XLA with a [B, 1, L, L] mask")
        if length % SPLASH_BLOCKS[-1]:
            return "xla", (f"splash attention's blocks (multiples of {SPLASH_BLOCKS[-1]}) do not divide the "
                           f"length {length}: XLA attention serves it")
    if kernel == "cudnn":
        if has_segments or has_prefix:
            return "xla", ("cuDNN flash attention through jax.nn.dot_product_attention takes causal and "
                           "padding masks only; packed documents and prefix-LM rows run on XLA with a "
                           "[B, 1, L, L] mask")
        if jnp.dtype(dtype).name not in CUDNN_DTYPES:
            return "xla", (f"cuDNN flash attention takes bfloat16 or float16, not {jnp.dtype(dtype).name}: "
                           "XLA attention serves it (set model.dtype='bfloat16' for cuDNN)")
        if head_dim % 8 or head_dim > 256:
            return "xla", (f"cuDNN flash attention needs a head dimension that is a multiple of 8 up to 256, not "
                           f"{head_dim}")
    return kernel, None


@functools.cache
def log_once(reason: str) -> None:
    """Logs a fallback's reason the first time it happens in this process."""
    logging.warning("attention falls back to XLA: %s.", reason)


def attention_mask(segment_ids_BL: Array | None, prefix_BL: Array | None, length: int) -> Array | None:
    """bool[B, 1, L, L] of allowed (query, key) pairs beyond causality, or None.

    Packed rows: a token sees only its own document. Prefix LM: the causal mask is
    opened between prefix tokens, so the prefix attends in both directions.
    """
    mask_B1LL = None
    if segment_ids_BL is not None:
        mask_B1LL = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
    if prefix_BL is not None:
        causal_LL = jnp.tril(jnp.ones((length, length), bool))
        open_B1LL = causal_LL | (prefix_BL[:, None, :, None] & prefix_BL[:, None, None, :])
        mask_B1LL = open_B1LL if mask_B1LL is None else mask_B1LL & open_B1LL
    return mask_B1LL


def dot_product_attention(q_BLHK: Array, k_BLGK: Array, v_BLGK: Array, *, kernel: str, causal: bool,
                          segment_ids_BL: Array | None = None, prefix_BL: Array | None = None) -> Array:
    """Softmax(q k^T / sqrt(K)) v over a row's own positions, [B, L, H, K] in q's dtype.

    Grouped-query attention: query head h reads key/value head h // (H / G). `causal`:
    a query sees keys at or before it; `segment_ids_BL` (packed rows, int) limits it to
    its own document; `prefix_BL` (bool, causal only) opens the causal mask between
    prefix tokens. `kernel` is a resolved kernel (see `resolve`); `plan` may serve the
    call with XLA instead, logging why once.
    """
    prefix_BL = prefix_BL if causal else None
    used, reason = plan(kernel, causal, segment_ids_BL is not None, prefix_BL is not None, q_BLHK.shape[1],
                        q_BLHK.dtype, q_BLHK.shape[-1])
    if reason:
        log_once(reason)
    if used == "splash":
        return splash_attention(q_BLHK, k_BLGK, v_BLGK, causal, segment_ids_BL)
    if used == "cudnn":
        return jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, is_causal=causal, implementation="cudnn")
    mask_B1LL = attention_mask(segment_ids_BL, prefix_BL, q_BLHK.shape[1])
    return jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, mask=mask_B1LL,
                                        is_causal=causal and prefix_BL is None)


def splash_attention(q_BLHK: Array, k_BLGK: Array, v_BLGK: Array, causal: bool,
                     segment_ids_BL: Array | None) -> Array:
    """Splash attention, per device inside `jax.shard_map` under a mesh: rows split as
    the logical rules split "batch" and heads as they split "act_heads" (each device
    holds whole rows, so no L x L mask or score array exists anywhere). Key/value heads
    are repeated to the query heads where their count does not divide over the head
    shards. Off a TPU (a CPU test) the kernel runs in Pallas interpret mode."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = getattr(mesh.abstract_device, "platform", None) if not mesh.empty else None
    local = functools.partial(_splash_local, causal=causal,
                              interpret=(platform or jax.default_backend()) != "tpu")
    if mesh.empty:
        return local(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)
    batch, heads = _mesh_axes(mesh, q_BLHK.shape[0], q_BLHK.shape[2])
    if k_BLGK.shape[2] % _size(mesh, heads):  # e.g. 8 key/value heads over 16 tensor shards
        repeats = q_BLHK.shape[2] // k_BLGK.shape[2]
        k_BLGK, v_BLGK = (jnp.repeat(x, repeats, axis=2) for x in (k_BLGK, v_BLGK))
    spec_BLHK = P(batch, None, heads, None)
    spec_BL = None if segment_ids_BL is None else P(batch, None)
    sharded = jax.shard_map(local, in_specs=(spec_BLHK, spec_BLHK, spec_BLHK, spec_BL), out_specs=spec_BLHK,
                            check_vma=False)
    return sharded(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)


def _mesh_axes(mesh: jax.sharding.AbstractMesh, batch_size: int, num_heads: int) -> tuple:
    """The mesh axes of the batch and heads dimensions under the current logical rules
    (None for a dimension they would not divide: it is then whole on every device)."""
    spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", "head_dim"))
    batch, heads = spec[0], spec[2]
    return (batch if batch_size % _size(mesh, batch) == 0 else None,
            heads if num_heads % _size(mesh, heads) == 0 else None)


def _size(mesh: jax.sharding.AbstractMesh, axes: str | tuple | None) -> int:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _splash_local(q_BLHK: Array, k_BLGK: Array, v_BLGK: Array, segment_ids_BL: Array | None, *,
                  causal: bool, interpret: bool) -> Array:
    """Splash attention on one device's rows and heads: the kernel runs per row (vmap)
    on heads-major [H, L, K] queries, scaled by 1/sqrt(K) here (splash does not scale)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # the TPU kernels, loaded on use

    _, length, heads, head_dim = q_BLHK.shape
    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    mask_LL = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([mask_LL] * heads), head_shards=1, q_seq_shards=1, interpret=interpret,
        block_sizes=splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                      block_kv_dq=block))
    q_BHLK = jnp.swapaxes(q_BLHK * jnp.asarray(1 / math.sqrt(head_dim), q_BLHK.dtype), 1, 2)
    k_BGLK, v_BGLK = jnp.swapaxes(k_BLGK, 1, 2), jnp.swapaxes(v_BLGK, 1, 2)
    if segment_ids_BL is None:
        out_BHLK = jax.vmap(kernel)(q_BHLK, k_BGLK, v_BGLK)
    else:
        ids_BL = segment_ids_BL.astype(jnp.int32)
        out_BHLK = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(ids, ids)))(
            q_BHLK, k_BGLK, v_BGLK, ids_BL)
    return jnp.swapaxes(out_BHLK, 1, 2)

"""Int8 weight-only quantization: each matrix stored as int8 with one float32 scale per
output channel (per row for embedding tables), dequantized to float on load.

Matrices hold nearly all of a transformer's bytes, so int8 storage is close to 4x
smaller than float32; vectors (norm scales, biases) stay float32. Computation stays in
floating point: this saves memory and bandwidth, not FLOPs. `bench/quantize.py` reports
the perplexity it costs and the bytes it saves.

Its only user is bench/quantize.py (and the tests): no command of lm loads int8 weights;
serving and sampling run the float parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util

from lm.model import param_kinds

MATRICES = (param_kinds.Kind.KERNEL, param_kinds.Kind.TOKEN_EMBEDDING, param_kinds.Kind.POSITION_EMBEDDING)


def _reduce_axes(path: tuple[str, ...], x: np.ndarray) -> tuple[int, ...]:
    """The axes one scale covers: a table's row (one scale per token), a kernel's first
    input dimension (one scale per output channel), after any scanned `layers` axis (each
    layer its own scales)."""
    first = param_kinds.layer_axes(path)
    if param_kinds.kind(path) is not param_kinds.Kind.KERNEL:
        return tuple(range(first + 1, x.ndim))
    return (first,)


def quantize(params: Any) -> dict:
    """{path: {"int8", "scale"}} for matrices (kernels and embedding tables, by
    `lm.model.param_kinds`, not by rank: a scanned norm scale is 2-D) and {path: array}
    for the rest (flat, "/"-joined)."""
    out: dict[str, Any] = {}
    for path, x in traverse_util.flatten_dict(jax.tree.map(np.asarray, params)).items():
        key = "/".join(path)
        if param_kinds.kind(path) not in MATRICES:
            out[key] = x.astype(np.float32)
            continue
        x = x.astype(np.float32)
        scale = np.max(np.abs(x), axis=_reduce_axes(path, x), keepdims=True) / 127.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        out[key] = {"int8": np.clip(np.round(x / scale), -127, 127).astype(np.int8), "scale": scale}
    return out


def dequantize(quantized: dict, dtype: Any = np.float32) -> Any:
    """The nested float parameters back (int8 * scale)."""
    flat = {}
    for key, value in quantized.items():
        array = value["int8"].astype(np.float32) * value["scale"] if isinstance(value, dict) else value
        flat[tuple(key.split("/"))] = array.astype(dtype)
    return traverse_util.unflatten_dict(flat)


def nbytes(tree: Any) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))

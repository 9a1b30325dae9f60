"""Consumers of lm.model.param_kinds beyond weight decay (tests/test_optim.py): int8
quantization picks matrices by what a parameter is, and scales each scanned layer alone;
Muon's matrix axes of fused and stacked kernels."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lm.inference import quantize
from lm.model import ModelConfig, build, param_kinds, presets
from lm.model.counting import abstract_params


def test_int8_quantization_of_scanned_layers_keeps_norms_and_biases_float_and_scales_each_layer():
    cfg = ModelConfig(vocab_size=64, max_len=16, num_layers=2, num_heads=2, d_model=32, head_dim=16, d_ff=64,
                      use_bias=True, scan_layers=True)
    params = nn.meta.unbox(build(cfg).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    # Layer 1's MLP input kernel 100x larger than layer 0's: scales shared across layers would
    # round layer 0 to almost nothing.
    wi = params["layers"]["mlp"]["wi"]
    wi["kernel"] = wi["kernel"] * jnp.array([1.0, 100.0])[:, None, None]
    params["layers"]["attn_norm"]["scale"] = params["layers"]["attn_norm"]["scale"] + 1e-3 * jnp.arange(32)
    quantized = quantize.quantize(params)

    for key in ("layers/attn_norm/scale", "layers/attn_norm/bias", "layers/attn/qkv/bias", "final_norm/scale"):
        assert not isinstance(quantized[key], dict), key  # 2-D and 3-D, yet not matrices
        np.testing.assert_array_equal(quantized[key], traverse_util.flatten_dict(params, sep="/")[key])
    wi = quantized["layers/mlp/wi/kernel"]
    assert wi["int8"].shape == (2, 32, 64) and wi["scale"].shape == (2, 1, 64)  # per layer, per output
    assert quantized["layers/attn/qkv/kernel"]["scale"].shape == (2, 1, 3, 2, 16)
    restored = traverse_util.flatten_dict(quantize.dequantize(quantized), sep="/")
    kernel = np.asarray(params["layers"]["mlp"]["wi"]["kernel"])
    for layer in range(2):
        step = np.max(np.abs(kernel[layer]), axis=0) / 127
        assert np.all(np.abs(restored["layers/mlp/wi/kernel"][layer] - kernel[layer]) <= step / 2 + 1e-7)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("preset", ["tiny", "llama-1b", "bert-base", "t5-small", "llama3-8b"])
def test_matrix_axes_stack_layers_and_fused_parts_and_keep_a_kernels_input_and_output(preset, scan_layers):
    """Read against the logical axes the model gives each kernel: every `layers` and `fused`
    axis (qkv's 3, kv's 2, SwiGLU's gate and up) stacks separate matrices; the input axes are
    what the layer contracts its input over (the model dimension, or attention's heads x
    head_dim into `out`, or the MLP width into `wo`); the output axes are the rest."""
    cfg = dataclasses.replace(presets.model_config(preset), scan_layers=scan_layers, use_bias=True)
    boxed = abstract_params(build(cfg), 8)
    leaves = traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    heads = set()
    for path, box in leaves.items():
        if param_kinds.kind(path) is not param_kinds.Kind.KERNEL:
            continue
        if param_kinds.is_head(path):
            heads.add("/".join(path))
            continue
        names = box.names
        inputs, outputs = param_kinds.matrix_axes(path, len(names))
        stacked = set(range(len(names))) - set(inputs) - set(outputs)
        assert {names[a] for a in stacked} <= {"layers", "fused"}, path
        assert {a for a, n in enumerate(names) if n in ("layers", "fused")} == stacked, path
        assert tuple(names[a] for a in inputs) in {("embed",), ("heads", "head_dim"), ("mlp",)}, path
        assert outputs and list(outputs) == sorted(outputs) and min(outputs) > max(inputs), path
    assert heads == ({"unembed/kernel"} if not cfg.tie_embeddings else set())

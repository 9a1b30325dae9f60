"""What each parameter IS (kernel, embedding table, norm scale, bias, LoRA factor), from its path.

One classification for every consumer: AdamW's weight-decay mask (`lm.training.optim`,
`lm.finetuning.optim`), int8 quantization (`lm.inference.quantize`: matrices only), and whatever
else groups parameters (per-kind learning rates, pipeline stages). It reads a
parameter's path of names, never its rank: with `model.scan_layers` every parameter
gains a leading `layers` axis (`layer_axes` counts it), so a norm's scale is 2-D, and a
fused qkv bias is 3-D even unscanned; a rule on `ndim` decays them all.

Paths are tuples of keys from the tree's root, e.g. ("layers", "attn_norm", "scale") or,
in fine-tuning's tree {"backbone", "head", "lora"}, ("backbone", "layer_0", "attn", "qkv",
"kernel"). The rules, from the names `lm.model` gives its parameters:

| kind               | path ends in                          | decayed |
|--------------------|---------------------------------------|---------|
| KERNEL             | `kernel` (dense layers, `unembed`, a fine-tuning head) | yes |
| TOKEN_EMBEDDING    | `embedding` (the token table, tied or not)             | yes |
| POSITION_EMBEDDING | `pos_embed`, `encoder_pos_embed`, `decoder_pos_embed`  | yes |
| LORA               | `a` or `b` under a `lora` key (the adapters' collection) | yes |
| NORM_SCALE         | `*norm/scale` (LayerNorm, RMSNorm)                     | no  |
| NORM_BIAS          | `*norm/bias` (LayerNorm)                               | no  |
| BIAS               | `bias` of a dense layer or head, `mlm_bias`            | no  |

Learned position embeddings are decayed: a [position, embed] table is an embedding
table like the token one, and nanoGPT (GPT-2's recipe), Megatron-LM and Hugging Face's
Trainer all decay it. They are a kind of their own, so a parameter group that prefers
not to decay them (as some codebases do) can tell them apart. LoRA adapters (Hu et al.,
2021) are decayed: A [in, rank] and B [rank, out] are low-rank factors of a kernel's
update, and decay pulls W + (alpha/rank) A B back toward the pretrained W. The LoRA
paper's GPT-2 runs decay them (0.01), as PEFT under Hugging Face's Trainer does. Norm
scales, norm biases and biases are never decayed (BERT's optimizer, nanoGPT): decay
would pull a scale toward 0 rather than its identity value 1, and a bias adds no
capacity that needs regularising.

Optimizer parameter groups (`lm.training.param_groups`) also need what `kind` does not say:
whether a kernel is the output head (`is_head`: `unembed`, the untied vocabulary projection,
which Muon leaves to AdamW like the embedding) and, for a hidden kernel, which of its axes
are the matrix's input (reduction) and output axes (`matrix_axes`); every other axis (the
scanned `layers` axis, the `fused` axis of qkv, kv and SwiGLU's wi) stacks separate matrices.

An unknown name raises `UnknownParameterError`: a new layer cannot be decayed (or
spared) by accident; it must be named as above or given a rule here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax


class Kind(enum.StrEnum):
    """What a parameter is; `decayed` says whether AdamW's weight decay applies to it."""

    KERNEL = "kernel"
    TOKEN_EMBEDDING = "token_embedding"
    POSITION_EMBEDDING = "position_embedding"
    LORA = "lora"
    NORM_SCALE = "norm_scale"
    NORM_BIAS = "norm_bias"
    BIAS = "bias"

    @property
    def decayed(self) -> bool:
        return self in _DECAYED


_DECAYED = frozenset({Kind.KERNEL, Kind.TOKEN_EMBEDDING, Kind.POSITION_EMBEDDING, Kind.LORA})
POSITION_TABLES = ("pos_embed", "encoder_pos_embed", "decoder_pos_embed")  # lm.model.transformer.embed_inputs


class UnknownParameterError(ValueError):
    """A parameter whose name says nothing this module knows; the message names it and the fix."""


def kind(path: Sequence[str]) -> Kind:
    """The kind of the parameter at `path` (its keys from the tree's root; see the module
    docstring for the rules). Raises `UnknownParameterError` for a name it does not know."""
    path = tuple(str(key) for key in path)
    if not path:
        raise UnknownParameterError("an empty parameter path has no kind. Fix: pass the keys from the tree's root.")
    name, parent = path[-1], path[-2] if len(path) > 1 else ""
    if "lora" in path[:-1] and name in ("a", "b"):
        return Kind.LORA
    if name == "kernel":
        return Kind.KERNEL
    if name == "embedding":
        return Kind.TOKEN_EMBEDDING
    if name in POSITION_TABLES:
        return Kind.POSITION_EMBEDDING
    if parent.endswith("norm") and name in ("scale", "bias"):
        return Kind.NORM_SCALE if name == "scale" else Kind.NORM_BIAS
    if name in ("bias", "mlm_bias"):
        return Kind.BIAS
    raise UnknownParameterError(
        f"parameter {'/'.join(path)!r} is of no known kind, so whether weight decay applies to it is not "
        "known. Fix: name it as lm.model.param_kinds expects (a dense layer's 'kernel' and 'bias', an "
        "embedding's 'embedding', a norm module named '*norm' with 'scale'/'bias'), or add a rule there.")


SCANNED_LAYERS = ("layers", "encoder_layers", "decoder_layers")  # lm.model.transformer.run_blocks' nn.scan names


def layer_axes(path: Sequence[str]) -> int:
    """How many leading axes of the parameter at `path` stack layers: 1 under a scanned
    stack (`layers`, `encoder_layers`, `decoder_layers`, with `model.scan_layers`), else 0.
    A kernel's own axes (input dimensions first) follow them."""
    return int(any(str(key) in SCANNED_LAYERS for key in path))


def decayed(path: Sequence[str]) -> bool:
    """Whether AdamW's weight decay applies to the parameter at `path` (kernels, embedding
    tables and LoRA factors: yes; norm scales, norm biases and biases: no)."""
    return kind(path).decayed


def path_names(keypath: Sequence[Any]) -> tuple[str, ...]:
    """A `jax.tree_util` key path as plain names: ("layers", "attn_norm", "scale")."""
    names = []
    for key in keypath:
        for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def map_paths(fn: Callable[[tuple[str, ...]], Any], params: Any) -> Any:
    """`params` with each leaf replaced by fn(its path of names). Leaves may be arrays,
    abstract values or flax's boxed (logically partitioned) parameters; only their paths
    count. Empty subtrees (optax's MaskedNode) stay as they are."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return jax.tree_util.tree_map_with_path(lambda keypath, _: fn(path_names(keypath)), params, is_leaf=is_box)


def map_kinds(fn: Callable[[Kind], Any], params: Any) -> Any:
    """`params` with each leaf replaced by fn(its kind) (see `map_paths`)."""
    return map_paths(lambda path: fn(kind(path)), params)


def kinds(params: Any) -> Any:
    """The tree of `params` with each leaf's `Kind` (e.g. for optimizer parameter groups)."""
    return map_kinds(lambda k: k, params)


def decay_mask(params: Any) -> Any:
    """The tree of `params` with True where weight decay applies (optax's `mask`)."""
    return map_kinds(lambda k: k.decayed, params)


HEADS = ("unembed",)  # lm.model.transformer: the untied output projection [embed, vocab]
# Kernels whose first axis after the layers is the input and whose next axis stacks
# separate matrices side by side: qkv [embed, 3, heads, head_dim], kv [embed, 2, kv_heads,
# head_dim], SwiGLU's wi [embed, 2, mlp] (gate and up; GELU's wi is [embed, mlp]).
FUSED_KERNELS = ("qkv", "kv", "wi")
MULTI_INPUT_KERNELS = {"out": 2}  # attention's output [heads, head_dim, embed]: two input axes


def is_head(path: Sequence[str]) -> bool:
    """Whether the parameter at `path` is the output head's kernel (`unembed/kernel`)."""
    path = tuple(str(key) for key in path)
    return len(path) >= 2 and path[-1] == "kernel" and path[-2] in HEADS


def matrix_axes(path: Sequence[str], ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input axes, output axes) of the kernel at `path` with `ndim` axes: the matrix a
    layer multiplies by, flattened input x output. Axes in neither (the leading `layers`
    axis of a scanned stack, the fused axis of qkv/kv/SwiGLU wi) stack separate matrices.
    E.g. a scanned qkv [layers, embed, 3, heads, head_dim]: ((1,), (3, 4)). Raises
    ValueError for a parameter that is not a kernel."""
    if kind(path) is not Kind.KERNEL:
        raise ValueError(f"{'/'.join(map(str, path))} is a {kind(path).value}, not a kernel: it has no matrix axes")
    first, module = layer_axes(path), str(path[-2]) if len(path) > 1 else ""
    inputs = MULTI_INPUT_KERNELS.get(module, 1)
    fused = module in FUSED_KERNELS and ndim - first == 3 + (module != "wi")
    outputs_from = first + inputs + int(fused)
    return tuple(range(first, first + inputs)), tuple(range(outputs_from, ndim))

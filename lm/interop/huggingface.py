"""Hugging Face checkpoints <-> `lm` parameters, for GPT-2 and LLaMA-family models.

A Hugging Face checkpoint directory holds `config.json`, the weights as `safetensors`
(one `model.safetensors` or shards listed in `model.safetensors.index.json`) and
usually `tokenizer.json`. Each architecture is a table of `Rule`s: one `lm` parameter,
the Hugging Face tensors it is made of, and the two exact, inverse reshapes between
them, so import and export cannot drift apart. Nothing here needs PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from lm.errors import UsageError
from lm.model import mup

# Buffers some versions of `transformers` save that are not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Rule:
    """`lm` parameter `path` = `to_lm(*hf tensors)`; `to_hf(param)` gives the tensors back."""

    path: tuple[str, ...]
    hf_keys: tuple[str, ...]
    to_lm: Callable[..., np.ndarray]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def vector(path: tuple[str, ...], key: str, shape: tuple[int, ...]) -> Rule:
    """A bias, norm scale or table, reshaped (a fused bias [3D] is [3, heads, head_dim] in `lm`)."""
    return Rule(path, (key,), lambda w: w.reshape(shape), lambda p: (p.reshape(-1) if len(shape) > 1 else p,))


def table(path: tuple[str, ...], key: str) -> Rule:
    return Rule(path, (key,), lambda w: w, lambda p: (p,))


def linear(path: tuple[str, ...], keys: tuple[str, ...], shape: tuple[int, ...], in_dims: int = 1,
           transposed: bool = True) -> Rule:
    """A dense kernel of `lm` shape `shape` from 2-D weights.

    `transposed`: torch's `Linear` stores [out, in] (GPT-2's `Conv1D` stores [in, out]).
    Several `keys` are stacked on `lm`'s fused axis 1 (q, k, v -> qkv; gate, up -> wi).
    """
    part_shape = shape if len(keys) == 1 else shape[:1] + shape[2:]
    rows = math.prod(part_shape[:in_dims])

    def to_lm(*weights: np.ndarray) -> np.ndarray:
        parts = [(w.T if transposed else w).reshape(part_shape) for w in weights]
        return parts[0] if len(parts) == 1 else np.stack(parts, axis=1)

    def to_hf(param: np.ndarray) -> tuple[np.ndarray, ...]:
        parts = [param] if len(keys) == 1 else [param[:, i] for i in range(len(keys))]
        matrices = [part.reshape(rows, -1) for part in parts]
        return tuple(np.ascontiguousarray(m.T) if transposed else m for m in matrices)

    return Rule(path, keys, to_lm, to_hf)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one Hugging Face model type maps onto `lm`'s decoder."""

    name: str  # the `architectures` entry written on export
    model_type: str
    model_fields: Callable[[dict], dict]  # HF config -> config.model fields
    max_len: Callable[[dict], int]
    rules: Callable[[ml_collections.ConfigDict, int], list[Rule]]  # (config.model, vocab) -> rules
    hf_config: Callable[[ml_collections.ConfigDict, int, int], dict]  # (config.model, vocab, max_len) -> HF config
    fits: Callable[[ml_collections.ConfigDict], list[str]]  # config.model -> reasons it cannot be exported


def _dims(m: ml_collections.ConfigDict) -> tuple[int, int, int, int, int]:
    """(d_model, heads, kv heads, head_dim, d_ff) of a resolved config.model."""
    head_dim = m.head_dim or m.d_model // m.num_heads
    return m.d_model, m.num_heads, m.num_kv_heads or m.num_heads, head_dim, m.d_ff


# --- GPT-2 ---------------------------------------------------------------------------

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_fields(hf: dict) -> dict:
    _require(hf, not hf.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx=true")
    _require(hf, not hf.get("add_cross_attention"), "add_cross_attention=true")
    _require(hf, hf.get("scale_attn_weights", True), "scale_attn_weights=false")
    activation = hf.get("activation_function", "gelu_new")
    _require(hf, activation in _GPT2_ACTIVATIONS, f"activation_function={activation!r}")
    return dict(num_layers=hf["n_layer"], num_heads=hf["n_head"], d_model=hf["n_embd"],
                head_dim=hf["n_embd"] // hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                positions="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=_GPT2_ACTIVATIONS[activation], use_bias=True, tie_embeddings=True, num_kv_heads=0)


def _gpt2_rules(m: ml_collections.ConfigDict, vocab: int) -> list[Rule]:
    d, h, _, k, f = _dims(m)
    rules = [table(("embed", "embedding"), "transformer.wte.weight"),
             table(("pos_embed",), "transformer.wpe.weight"),
             vector(("final_norm", "scale"), "transformer.ln_f.weight", (d,)),
             vector(("final_norm", "bias"), "transformer.ln_f.bias", (d,))]
    for i in range(m.num_layers):
        hf, lm = f"transformer.h.{i}.", f"layer_{i}"
        rules += [
            vector((lm, "attn_norm", "scale"), hf + "ln_1.weight", (d,)),
            vector((lm, "attn_norm", "bias"), hf + "ln_1.bias", (d,)),
            linear((lm, "attn", "qkv", "kernel"), (hf + "attn.c_attn.weight",), (d, 3, h, k), transposed=False),
            vector((lm, "attn", "qkv", "bias"), hf + "attn.c_attn.bias", (3, h, k)),
            linear((lm, "attn", "out", "kernel"), (hf + "attn.c_proj.weight",), (h, k, d), 2, transposed=False),
            vector((lm, "attn", "out", "bias"), hf + "attn.c_proj.bias", (d,)),
            vector((lm, "mlp_norm", "scale"), hf + "ln_2.weight", (d,)),
            vector((lm, "mlp_norm", "bias"), hf + "ln_2.bias", (d,)),
            linear((lm, "mlp", "wi", "kernel"), (hf + "mlp.c_fc.weight",), (d, f), transposed=False),
            vector((lm, "mlp", "wi", "bias"), hf + "mlp.c_fc.bias", (f,)),
            linear((lm, "mlp", "wo", "kernel"), (hf + "mlp.c_proj.weight",), (f, d), transposed=False),
            vector((lm, "mlp", "wo", "bias"), hf + "mlp.c_proj.bias", (d,)),
        ]
    return rules


def _gpt2_config(m: ml_collections.ConfigDict, vocab: int, max_len: int) -> dict:
    d, h, _, _, f = _dims(m)
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[m.activation]
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=vocab, n_positions=max_len,
                n_embd=d, n_layer=m.num_layers, n_head=h, n_inner=f, activation_function=activation,
                layer_norm_epsilon=m.norm_eps, tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, scale_attn_weights=True, initializer_range=m.init_std)


def _gpt2_fits(m: ml_collections.ConfigDict) -> list[str]:
    wanted = dict(positions="learned", norm="layernorm", use_bias=True, tie_embeddings=True)
    problems = [f"model.{k}={m[k]!r} (GPT-2 needs {v!r})" for k, v in wanted.items() if m[k] != v]
    if m.activation not in ("gelu_tanh", "gelu"):
        problems.append(f"model.activation={m.activation!r} (GPT-2 needs 'gelu_tanh' or 'gelu')")
    if m.num_kv_heads and m.num_kv_heads != m.num_heads:
        problems.append(f"model.num_kv_heads={m.num_kv_heads} (GPT-2 has no grouped-query attention)")
    if (m.head_dim or m.d_model // m.num_heads) * m.num_heads != m.d_model:
        problems.append("model.head_dim * num_heads != d_model (GPT-2 needs them equal)")
    return problems


# --- LLaMA family (LLaMA, Mistral without a sliding window) ----------------------------


def _llama_fields(hf: dict) -> dict:
    _require(hf, hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}")
    _require(hf, not hf.get("attention_bias") and not hf.get("mlp_bias"), "attention_bias or mlp_bias")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    _require(hf, rope_type == "default", f"rope scaling {rope_type!r}")
    window = hf.get("sliding_window")
    _require(hf, window is None or window >= hf["max_position_embeddings"], f"sliding_window={window}")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    return dict(num_layers=hf["num_hidden_layers"], num_heads=heads, d_model=hf["hidden_size"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
                positions="rope", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
                norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), activation="swiglu", use_bias=False,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                num_kv_heads=0 if kv_heads == heads else kv_heads)


def _llama_rules(m: ml_collections.ConfigDict, vocab: int) -> list[Rule]:
    d, h, g, k, f = _dims(m)
    rules = [table(("embed", "embedding"), "model.embed_tokens.weight"),
             vector(("final_norm", "scale"), "model.norm.weight", (d,))]
    if not m.tie_embeddings:
        rules.append(linear(("unembed", "kernel"), ("lm_head.weight",), (d, vocab)))
    for i in range(m.num_layers):
        hf, lm = f"model.layers.{i}.", f"layer_{i}"
        attn = hf + "self_attn."
        if g == h:  # lm fuses q, k and v into one kernel when there is no grouping
            qkv = [linear((lm, "attn", "qkv", "kernel"), tuple(attn + f"{x}_proj.weight" for x in "qkv"),
                          (d, 3, h, k))]
        else:
            qkv = [linear((lm, "attn", "q", "kernel"), (attn + "q_proj.weight",), (d, h, k)),
                   linear((lm, "attn", "kv", "kernel"), (attn + "k_proj.weight", attn + "v_proj.weight"),
                          (d, 2, g, k))]
        rules += qkv + [
            vector((lm, "attn_norm", "scale"), hf + "input_layernorm.weight", (d,)),
            linear((lm, "attn", "out", "kernel"), (attn + "o_proj.weight",), (h, k, d), 2),
            vector((lm, "mlp_norm", "scale"), hf + "post_attention_layernorm.weight", (d,)),
            linear((lm, "mlp", "wi", "kernel"), (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                   (d, 2, f)),
            linear((lm, "mlp", "wo", "kernel"), (hf + "mlp.down_proj.weight",), (f, d)),
        ]
    return rules


def _llama_config(m: ml_collections.ConfigDict, vocab: int, max_len: int) -> dict:
    d, h, g, k, f = _dims(m)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab,
                max_position_embeddings=max_len, hidden_size=d, intermediate_size=f,
                num_hidden_layers=m.num_layers, num_attention_heads=h, num_key_value_heads=g, head_dim=k,
                hidden_act="silu", rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                rope_parameters=dict(rope_type="default", rope_theta=m.rope_theta),
                tie_word_embeddings=bool(m.tie_embeddings), attention_bias=False, mlp_bias=False,
                initializer_range=m.init_std)


def _llama_fits(m: ml_collections.ConfigDict) -> list[str]:
    wanted = dict(positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False)
    return [f"model.{k}={m[k]!r} (LLaMA needs {v!r})" for k, v in wanted.items() if m[k] != v]


def _require(hf: dict, ok: bool, what: str) -> None:
    if not ok:
        raise UsageError(f"the Hugging Face {hf.get('model_type')} checkpoint uses {what}, which lm's "
                          "decoder does not implement. Fix: convert a checkpoint without it.")


ARCHITECTURES = {
    "gpt2": Architecture("GPT2LMHeadModel", "gpt2", _gpt2_fields, lambda hf: hf["n_positions"], _gpt2_rules,
                         _gpt2_config, _gpt2_fits),
    "llama": Architecture("LlamaForCausalLM", "llama", _llama_fields, lambda hf: hf["max_position_embeddings"],
                          _llama_rules, _llama_config, _llama_fits),
}
ARCHITECTURES["mistral"] = dataclasses.replace(ARCHITECTURES["llama"], model_type="mistral")


def architecture_of(hf_config: dict) -> Architecture:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UsageError(f"Hugging Face model_type {model_type!r} (architectures "
                          f"{hf_config.get('architectures')}) is not supported. Fix: convert one of "
                          f"{sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[model_type]


def exportable_architecture(model: ml_collections.ConfigDict) -> Architecture:
    """The Hugging Face architecture an `lm` decoder config can be written as."""
    if model.family != "decoder":
        raise UsageError(f"model.family={model.family!r}: only decoders export to Hugging Face. "
                          "Fix: export a decoder run.")
    reasons = {}
    for name in ("gpt2", "llama"):
        reasons[name] = ARCHITECTURES[name].fits(model)
        if not reasons[name]:
            return ARCHITECTURES[name]
    raise UsageError("this model is neither GPT-2 nor LLaMA shaped: "
                      + "; ".join(f"as {name}: {', '.join(r)}" for name, r in reasons.items())
                      + ". Fix: train with a gpt2 or llama preset's model fields.")


def fold_mup(params: dict, model: ml_collections.ConfigDict) -> dict:
    """A µP decoder's parameters (`lm.model.mup`; layers unstacked) as a standard-
    parametrised decoder's that computes the same logits, for formats without µP's
    multipliers (Hugging Face GPT-2 and LLaMA); `params` itself when `model` is standard.

    Both folds are exact up to float rounding, since each multiplier follows a map whose
    output reaches only it: the queries' 1/sqrt(head_dim) goes into the query kernel (and
    bias), before RoPE's rotation, which is linear; the logits' 1/m goes into the final
    norm's scale (and bias), whose output feeds only the head, so tied and untied
    embeddings both fold. Raises UsageError for a tree without those parameters."""
    if not mup.is_mup(model):
        return params
    out = jax.tree.map(np.array, params)  # copies: the folds below write into `out` alone
    if "scale" not in out.get("final_norm", {}):
        raise UsageError("this µP model has no final_norm/scale to fold its logit multiplier into, so Hugging "
                          "Face's formats cannot express it. Fix: keep it as an lm export (python -m lm.export).")
    for value in out["final_norm"].values():
        _scale_in_place(value, 1.0 / mup.width_multiplier(model), ...)
    query_scale = (model.head_dim or model.d_model // model.num_heads) ** -0.5
    for i in range(model.num_layers):
        attn = out[f"layer_{i}"]["attn"]
        for value in attn.get("qkv", {}).values():  # kernel [D, 3, H, K], bias [3, H, K]: the q slice
            _scale_in_place(value, query_scale, (slice(None),) * (value.ndim - 3) + (0,))
        for value in attn.get("q", {}).values():
            _scale_in_place(value, query_scale, ...)
    return out


def _scale_in_place(value: np.ndarray, factor: float, where) -> None:
    value[where] = (value[where].astype(np.float32) * factor).astype(value.dtype)


def to_lm_params(rules: list[Rule], tensors: dict[str, np.ndarray], expected: dict) -> dict:
    """Nested `lm` params from Hugging Face tensors; every tensor used, every shape checked
    against `expected` (the model's abstract params)."""
    unused = {k for k in tensors if not k.endswith(IGNORED_SUFFIXES)}
    params: dict = {}
    for rule in rules:
        missing = [k for k in rule.hf_keys if k not in tensors]
        if missing:
            raise UsageError(f"the checkpoint lacks {missing} (for lm's {'/'.join(rule.path)}). Fix: check "
                              "that config.json describes these weights.")
        value = rule.to_lm(*(tensors[k] for k in rule.hf_keys))
        want = _get(expected, rule.path).shape
        if value.shape != tuple(want):
            raise UsageError(f"{rule.hf_keys} give {'/'.join(rule.path)} the shape {value.shape}, but the "
                              f"config needs {tuple(want)}. Fix: the weights do not match config.json.")
        _set(params, rule.path, value)
        unused -= set(rule.hf_keys)
    if unused:
        raise UsageError(f"the checkpoint has tensors lm does not use: {sorted(unused)[:5]}. Fix: convert a "
                          "plain causal-LM checkpoint (no task heads or adapters).")
    return params


def to_hf_tensors(rules: list[Rule], params: dict) -> dict[str, np.ndarray]:
    tensors = {}
    for rule in rules:
        for key, value in zip(rule.hf_keys, rule.to_hf(np.asarray(_get(params, rule.path)))):
            tensors[key] = np.ascontiguousarray(value)
    return tensors


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value

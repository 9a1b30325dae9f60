"""Named model shapes, in one table.

`presets.apply(config.model, "gpt2-small")` sets a config's model fields (and returns the
preset's vocabulary size and context, which a recipe may use for its data). Counts are
shown by `python -m lm.presets` (total and non-embedding parameters, training
FLOPs per token), computed abstractly with `jax.eval_shape`: nothing is allocated.
"""

from __future__ import annotations

import ml_collections

from lm.config import schema

# Shared styles, then each preset's own numbers.
_GPT2 = dict(family="decoder", positions="learned", norm="layernorm", activation="gelu_tanh", use_bias=True,
             tie_embeddings=True, vocab_size=50257, max_len=1024)
_BERT = dict(family="encoder", positions="learned", norm="layernorm", activation="gelu", use_bias=True,
             tie_embeddings=True, vocab_size=30522, max_len=512)
_T5 = dict(family="encoder_decoder", positions="rope", norm="rmsnorm", activation="relu", use_bias=False,
           tie_embeddings=True, vocab_size=32128, max_len=512)
_LLAMA = dict(family="decoder", positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False,
              rope_theta=500_000.0)

PRESETS: dict[str, dict] = {
    "tiny": dict(family="decoder", num_layers=2, num_heads=2, d_model=32, d_ff=128, vocab_size=0, max_len=0),
    "gpt2-small": dict(_GPT2, num_layers=12, num_heads=12, d_model=768, d_ff=3072),  # 124M
    "gpt2-medium": dict(_GPT2, num_layers=24, num_heads=16, d_model=1024, d_ff=4096),  # 355M
    "llama-1b": dict(_LLAMA, num_layers=16, num_heads=32, num_kv_heads=8, d_model=2048, d_ff=8192,
                     vocab_size=128256, max_len=2048, tie_embeddings=True),  # Llama 3.2 1B: 1.24B
    "llama3-8b": dict(_LLAMA, num_layers=32, num_heads=32, num_kv_heads=8, d_model=4096, d_ff=14336,
                      vocab_size=128256, max_len=8192, tie_embeddings=False),  # Llama 3 8B: 8.03B
    "bert-base": dict(_BERT, num_layers=12, num_heads=12, d_model=768, d_ff=3072),  # 110M
    "t5-small": dict(_T5, num_layers=6, num_heads=8, d_model=512, d_ff=2048),  # 60M
    "t5-base": dict(_T5, num_layers=12, num_heads=12, d_model=768, d_ff=3072),  # 220M
}

PUBLISHED_PARAMETERS = {"gpt2-small": 124e6, "gpt2-medium": 355e6, "llama-1b": 1.24e9, "llama3-8b": 8.03e9,
                        "bert-base": 110e6, "t5-small": 60e6, "t5-base": 220e6}


def apply(model: ml_collections.ConfigDict, name: str) -> tuple[int, int]:
    """Sets `model`'s fields to preset `name`; returns its (vocab_size, max_len), 0 if unset."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; use one of {', '.join(PRESETS)}")
    settings = dict(PRESETS[name])
    vocab_size, max_len = settings.pop("vocab_size"), settings.pop("max_len")
    for key, value in settings.items():
        model[key] = value
    model.vocab_size = vocab_size
    return vocab_size, max_len


def model_config(name: str):
    """The preset's `ModelConfig` (with its own vocabulary and context)."""
    from lm.model import ModelConfig

    model = schema.get_config().model
    vocab_size, max_len = apply(model, name)
    return ModelConfig.from_config(model, vocab_size or 256, max_len or 64)


def describe(name: str) -> dict:
    """Parameter counts and training FLOPs per token of preset `name`, without allocating it."""
    from lm.model import build
    from lm.model.counting import abstract_params, param_counts, train_flops_per_token

    cfg = model_config(name)
    counts = param_counts(abstract_params(build(cfg), cfg.max_len))
    return {**counts, "train_flops_per_token": train_flops_per_token(cfg, cfg.max_len)}



if __name__ == "__main__":  # the old path of `python -m lm.presets`, kept for existing scripts
    import runpy

    runpy.run_module("lm.presets", run_name="__main__", alter_sys=True)

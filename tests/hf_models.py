"""Tiny random `transformers` models saved locally with a byte-level BPE tokenizer, for
the interop and evaluation tests (no network: everything is built here)."""

import os

import jax
import numpy as np
import pytest

try:
    import torch
    import transformers
except ImportError:  # the default run deselects these tests; `pytest -m interop` needs the extra
    torch = transformers = None

from lm.runs import artifacts
from tests.helpers import REPO

VOCAB = 300
TINY_MODELS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                            eos_token_id=1, bos_token_id=1),
    "llama_gqa": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                                  max_position_embeddings=64, rope_theta=500.0, eos_token_id=1,
                                                  bos_token_id=1, tie_word_embeddings=False),
    "llama_tied_mha": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=4,
                                                       vocab_size=VOCAB, max_position_embeddings=64, eos_token_id=1,
                                                       bos_token_id=1, tie_word_embeddings=True),
}


def save_tokenizer(directory: str) -> None:
    """A byte-level BPE of VOCAB ids trained on the corpus, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(os.path.join(REPO, "lm/data/corpora/tinyshakespeare/input.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()[:2000]
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


def require_interop() -> None:
    if torch is None:
        pytest.fail("the interop tests need torch and transformers. Fix: pip install -e '.[test,interop]'")


def save_hf_model(kind: str, directory: str):
    require_interop()
    torch.manual_seed(0)
    config = TINY_MODELS[kind]()
    model = (transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM)(config).eval()
    with torch.no_grad():  # random norms, so a transposed scale or bias cannot hide
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


def hf_logits(model, tokens_BL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens_BL).long()).logits.numpy()


def lm_logits(path: str, tokens_BL: np.ndarray) -> np.ndarray:
    loaded = artifacts.load(path)
    return np.asarray(loaded.model.apply({"params": loaded.params}, jax.numpy.asarray(tokens_BL)))

"""The same training step in PyTorch, for a side-by-side speed figure on the same machine.

    .venv/bin/pip install torch==2.13.0     # the CPU build; not a dependency of `lm`
    .venv/bin/python bench/torch_reference.py --config=configs/shakespeare_char.py
    .venv/bin/python bench/train_throughput.py --config=configs/shakespeare_char.py

Builds nanoGPT's model at the config's sizes (pre-norm blocks, fused QKV, PyTorch's
`scaled_dot_product_attention` with a causal mask, tied head, learned position table) and
times what nanoGPT's training loop does per step: forward, backward, global-norm clip,
AdamW with the config's betas and weight decay, and the loss fetched to the host. Tokens
are drawn at random from `--vocab_size` ids (a step's time does not depend on them). It
prints ms/step (median after warm-up) and tokens/s in the format of
`bench/train_throughput.py`. Run the two alternately: this VM's speed drifts by 2x over
a day, so only figures taken minutes apart compare.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm.config import parse_flags, validated_config  # noqa: E402
from lm.errors import reject_positional  # noqa: E402
from lm.parallel.runtime import available_cores  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose sizes to use.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed steps first.")
_THREADS = flags.DEFINE_integer("threads", 0, "PyTorch intra-op threads; 0 means one per available core.")
_VOCAB = flags.DEFINE_integer("vocab_size", 65, "Vocabulary size (65: the characters of tiny Shakespeare).")
_COMPILE = flags.DEFINE_bool("compile", False, "Wrap the model in torch.compile (nanoGPT's CPU "
                             "recipe runs without it).")


def import_torch():
    try:
        import torch
    except ImportError:
        sys.exit("bench/torch_reference.py needs PyTorch, which `lm` does not install: "
                 "run `.venv/bin/pip install torch==2.13.0` (the CPU build) first.")
    return torch


def check_supported(model) -> None:
    """Refuses settings this reference does not build, rather than timing another model."""
    wanted = {"family": ("decoder",), "activation": ("gelu", "gelu_tanh", "relu"),
              "norm": ("layernorm", "rmsnorm")}
    for field, allowed in wanted.items():
        if model[field] not in allowed:
            sys.exit(f"config.model.{field}={model[field]!r} is not built by the PyTorch reference; "
                     f"it supports {', '.join(allowed)}. Time this config with bench/train_throughput.py alone.")
    if model.num_kv_heads not in (0, model.num_heads):
        sys.exit("config.model.num_kv_heads differs from num_heads (grouped-query attention), which the "
                 "PyTorch reference does not build; set --config.model.num_kv_heads=0 to compare.")


def build_model(torch, model, vocab_size: int, seq_len: int):
    """nanoGPT's GPT at the config's sizes."""
    nn, F = torch.nn, torch.nn.functional
    d, heads, bias = model.d_model, model.num_heads, model.use_bias
    d_ff = model.d_ff or 4 * d
    norm = (lambda: nn.LayerNorm(d, bias=bias, eps=model.norm_eps)) if model.norm == "layernorm" \
        else (lambda: nn.RMSNorm(d, eps=model.norm_eps))
    act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[model.activation]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_attn, self.norm_mlp = norm(), norm()
            self.qkv, self.out = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
            self.mlp = nn.Sequential(nn.Linear(d, d_ff, bias=bias), act, nn.Linear(d_ff, d, bias=bias))

        def forward(self, x_BLD):
            b, length, _ = x_BLD.shape
            q, k, v = self.qkv(self.norm_attn(x_BLD)).split(d, dim=2)
            q, k, v = (t.view(b, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x_BLD = x_BLD + self.out(y.transpose(1, 2).contiguous().view(b, length, d))
            return x_BLD + self.mlp(self.norm_mlp(x_BLD))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.positions = nn.Embedding(vocab_size, d), nn.Embedding(seq_len, d)
            self.blocks = nn.ModuleList(Block() for _ in range(model.num_layers))
            self.final_norm, self.head = norm(), nn.Linear(d, vocab_size, bias=False)
            if model.tie_embeddings:
                self.embed.weight = self.head.weight

        def forward(self, tokens_BL, targets_BL):
            x_BLD = self.embed(tokens_BL) + self.positions(torch.arange(tokens_BL.shape[1]))
            for block in self.blocks:
                x_BLD = block(x_BLD)
            logits_BLV = self.head(self.final_norm(x_BLD))
            return F.cross_entropy(logits_BLV.reshape(-1, vocab_size), targets_BL.reshape(-1))

    return GPT()


def main(argv):
    reject_positional(argv)
    config = validated_config(_CONFIG.value, "configs/shakespeare_char.py")
    check_supported(config.model)
    torch = import_torch()
    threads = _THREADS.value or available_cores()
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    batch, seq_len, vocab_size = config.train.batch_size, config.data.seq_len, _VOCAB.value
    model = build_model(torch, config.model, vocab_size, seq_len)
    step_model = torch.compile(model) if _COMPILE.value else model
    optim = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                                  weight_decay=optim.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    times = []
    for _ in range(_WARMUP.value + _STEPS.value):
        row_BL = torch.randint(vocab_size, (batch, seq_len + 1), generator=generator)
        tokens_BL, targets_BL = row_BL[:, :-1], row_BL[:, 1:]
        start = time.perf_counter()
        loss = step_model(tokens_BL, targets_BL)
        loss.backward()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    per_step = np.array(times[_WARMUP.value:])
    step_s = float(np.median(per_step))
    parameters = sum(p.numel() for p in model.parameters())
    print(f"config: {config.model.num_layers} layers, d_model {config.model.d_model}, "
          f"{parameters:,} parameters, batch {batch} x {seq_len} tokens")
    print(f"pytorch: {torch.__version__}, {threads} threads, compile={_COMPILE.value}")
    print(f"ms_per_step: {1e3 * step_s:.1f} (median of {len(per_step)}; p10 "
          f"{1e3 * np.percentile(per_step, 10):.1f}, p90 {1e3 * np.percentile(per_step, 90):.1f})")
    print(f"tokens_per_second: {batch * seq_len / step_s:,.0f}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

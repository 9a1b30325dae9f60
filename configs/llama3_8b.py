"""LLaMA 3 8B (8,030,261,248 parameters; Meta's model card: 8.03B) at its 8,192-token
context, laid out for a TPU pod or a GPU cluster: FSDP over every device, bfloat16
compute, scanned layers, rematerialised activations.

The shape: 32 layers, d_model 4,096, grouped-query attention with 32 query and 8
key/value heads of 128, SwiGLU of width 14,336, RMSNorm, RoPE with theta 500,000, an
untied 128,256-token embedding and head (the `llama3-8b` preset of lm/model/presets.py).

The layout: every device holds 1/N of the parameters, gradients and Adam state (FSDP,
ZeRO-3): 16 bytes a parameter in float32 state, 128 GB in all, so 1.9 GiB a chip on 64
chips (a v5p-128 slice). The global batch is 64 rows of 8,192 tokens (524,288 tokens a
step), one row a chip on 64 chips. One row, because attention here is XLA's, which
holds each layer's [B, H, L, L] scores: on 64 fake CPU devices (--topology=cpu:64), 4
rows a chip needed 287.0 GiB of XLA:CPU temporaries per device, one row 73.9 GiB. A fused
attention kernel (splash, below), which never writes the scores, is what lets the batch
grow. On a larger slice keep fsdp=-1 and raise the batch with the chips.

    python -m lm.main --config=configs/llama3_8b.py --compile_only --topology=v5p-128

compiles the train step with the TPU compiler for a v5p-128 slice (64 chips) on any
machine, allocating nothing (seen, in about 2 minutes on 2 cores: 8,030,261,248
parameters; per chip 479.6 MiB of parameters, as much of gradients, 959.3 MiB of Adam
state; the compiler, with splash attention (the TPU's "auto"): arguments 1.41 GiB,
temporaries 37.11 GiB, total 38.52 GiB, so the step fits a v5p chip's 95 GiB at 41%;
with --config.model.attention=xla, temporaries 61.22 GiB, total 62.63 GiB, 66%). Train on your own corpus with
`--config.data.files=...` and a 128,256-piece tokenizer; the embedded Shakespeare is
far too small.

Over two slices with pipeline stages across them (16 layers a stage; only activations
cross the data-centre network), two microbatches of 64 rows in GPipe's schedule:

    python -m lm.main --config=configs/llama3_8b.py --compile_only --topology=v5p-128 --num_slices=2 \
        --config.mesh.dcn_shape.stage=2 --config.train.batch_size=128 --config.eval.batch_size=128 \
        --config.train.microbatches=2

(seen: bubble fraction 0.3333; per chip 271.1 MiB of parameters; the compiler: temporaries
66.18 GiB, total 66.98 GiB, 71% of a v5p chip's HBM. Eight microbatches, bubble 0.1111,
need --config.model.remat=full: 48.60 GiB.)
"""

from lm.configs import base
from lm.model import presets


def get_config():
    config = base.get_config()
    _, max_len = presets.apply(config.model, "llama3-8b")
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    config.model.remat = "dots_with_no_batch_dims_saveable"
    config.data.tokenizer = "sentencepiece"
    config.data.sentencepiece.vocab_size = 128256
    config.data.seq_len = max_len
    config.train.batch_size = 64
    config.train.steps = 100_000
    config.eval.batch_size = 64
    config.optim.lr = 3e-4
    config.optim.final_lr = 3e-5
    config.optim.warmup_steps = 2_000
    config.mesh.shape.update(dict(data=1, fsdp=-1, tensor=1))
    return config

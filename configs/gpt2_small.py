"""GPT-2 small (124M) shaped for a pod: FSDP over every device, bf16 compute, scanned layers.

Check it fits before launching, on any machine, with the TPU compiler (the `[tpu]` extra;
nothing is allocated):

    python -m lm.main --config=configs/gpt2_small.py --compile_only --topology=v5e-16

prints the per-chip memory of the compiled train step (seen: 124,475,904 parameters;
parameters, gradients and Adam state sharded 16 ways: 30.0, 30.0 and 60.1 MiB a chip;
temporaries 9.96 GiB, nearly all activations and logits of 16 rows of 1,024 tokens, so
the step fits a v5e chip's 16 GiB at 63%; splash attention, the TPU's "auto"). The batch
of 512 rows runs as 2 microbatches: 32 rows a chip at once need 19.80 GiB.
`--topology=cpu:64` checks the mesh on 64 fake CPU devices instead (XLA:CPU's figures:
3.21 GiB a device).
Train it on a TPU slice with launch/tpu_pod.sh and your own corpus
(`--config.data.files=...`): the embedded Shakespeare is far too small for GPT-2's
50,257-token SentencePiece vocabulary (the model pads it to 50,304, a multiple of 64).
"""

from lm.configs import base
from lm.model import presets


def get_config():
    config = base.get_config()
    presets.apply(config.model, "gpt2-small")
    config.model.vocab_size = 50304  # 50,257 ids padded to a multiple of 64: even shards, aligned matmuls
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    config.model.remat = "dots_with_no_batch_dims_saveable"
    config.data.tokenizer = "sentencepiece"
    config.data.sentencepiece.vocab_size = 50257
    config.data.seq_len = 1024
    config.train.batch_size = 512
    config.train.microbatches = 2  # 16 rows a chip at once on a v5e-16 (see above)
    config.train.steps = 10_000
    config.eval.batch_size = 512
    config.optim.lr = 6e-4
    config.optim.final_lr = 6e-5
    config.optim.warmup_steps = 700
    config.mesh.shape.update(dict(data=1, fsdp=-1, tensor=1))
    return config

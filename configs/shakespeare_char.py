"""Character-level GPT on tiny Shakespeare: nanoGPT's documented CPU run, setting for setting.

    python -m lm.main --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare_char

4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 steps; AdamW at lr 1e-3
(100 warmup steps, cosine decay to 1e-4), weight decay 0.1, grad clip 1.0, no dropout;
validation every 250 steps on the whole held-out 10% of the text.

Expected: validation loss about 1.88 at step 2000 (nanoGPT's same-size CPU run reaches
1.886), 0.80M parameters, a few minutes on a 2-core CPU, and a sample that looks like
a play: speaker names in capitals, line breaks, Shakespearean words.
"""

from lm.configs import base


def get_config():
    config = base.get_config()
    config.data.tokenizer = "char"
    config.data.seq_len = 64
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.d_model = 128
    config.model.dropout = 0.0
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100
    config.optim.final_lr = 1e-4
    config.optim.weight_decay = 0.1
    config.optim.grad_clip = 1.0
    config.train.steps = 2000
    config.train.batch_size = 12
    config.train.eval_every = 250
    return config

"""An IsoFLOP sweep small enough for a 2-core CPU: 3 compute budgets x 4-5 model sizes (14 runs) of
the character-level Shakespeare model (Chinchilla's Approach 2 in miniature).

    python -m lm.sweep --config=configs/scaling/shakespeare_isoflop.py --workdir=/tmp/isoflop --parallel=2
    python -m lm.fit_scaling --results=/tmp/isoflop/results.csv --plots=/tmp/isoflop/plots

Budgets 5e11, 1e12 and 2e12 training FLOPs; for each, up to 5 sizes log-spaced over 16x
around the size that 200 tokens per parameter would pick (at budgets this small the
character model is best served by far more tokens per parameter than Chinchilla's 20:
centred there, each profile brackets its minimum), with d_model / layers = 16 and
8-dimensional heads, each trained on C / (FLOPs per token) tokens (up to 10 epochs of
the 1M-character corpus). Validation at the end only. Expected on 2
cores with --parallel=2: about 16 minutes; the best models reach validation losses
around 1.9-2.0.
"""

from lm.configs import shakespeare_char
from lm.scaling import designs

BUDGETS = (5e11, 1e12, 2e12)
CHAR_VOCAB = 68  # tiny Shakespeare's 65 characters plus <pad>, <eos>, <unk>: sizes FLOPs per token


def get_config():
    config = shakespeare_char.get_config()
    config.train.eval_every = 0
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 1
    config.sample.max_new_tokens = 50
    return config


def get_sweep():
    return designs.isoflop(get_config(), BUDGETS, sizes=5, span=4.0, tokens_per_parameter=200,
                           vocab_size=CHAR_VOCAB, aspect_ratio=16, head_dim=8)

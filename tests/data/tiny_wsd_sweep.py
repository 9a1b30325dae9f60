"""WSD cooldown branches of the tiny test model (tests/test_sweep.py): one size, budgets of
10 and 20 steps: a stable run of 16 steps keeping steps 8 and 16, and two branches."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_sweep import get_config as tiny_config  # noqa: E402

from lm.scaling import designs  # noqa: E402

TOKENS_PER_STEP = 8 * 16  # batch_size x seq_len


def get_config(variant: str = ""):
    config = tiny_config()
    config.train.update(checkpoint_every=0, log_every=1)
    return config


def get_sweep(variant: str = ""):
    steps = (1, 20) if variant == "inside_warmup" else (10, 20)
    return designs.wsd_branches(get_config(), sizes=[1e4], tokens=[s * TOKENS_PER_STEP for s in steps],
                                aspect_ratio=32, head_dim=16)

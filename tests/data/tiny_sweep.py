"""A three-point sweep of the tiny test model (tests/test_sweep.py): two sizes at one
IsoFLOP budget and a learning-rate variant, a few steps each."""

from lm.configs import shakespeare_char

TINY = {"num_layers": 1, "num_heads": 2, "d_model": 32}


def get_config(variant: str = ""):
    config = shakespeare_char.get_config()
    config.model.update(TINY)
    config.data.seq_len = 16
    config.train.update(batch_size=8, steps=6, log_every=2, eval_every=0, checkpoint_every=2)
    config.optim.warmup_steps = 2
    config.eval.update(batch_size=8, num_batches=2)
    config.sample.max_new_tokens = 8
    config.seed = 1 if variant == "seed1" else config.seed  # the same point names, another run
    return config


def get_sweep(variant: str = ""):
    points = [{"model.d_model": 32, "train.steps": 40, "sweep.budget": 1e9},
              {"model.d_model": 64, "train.steps": 12, "sweep.budget": 1e9},
              {"model.d_model": 32, "train.steps": 40, "optim.lr": 3e-3}]
    if variant == "duplicate":
        points.append(dict(points[0]))
    if variant == "unknown_field":
        points.append({"model.width": 3})
    return points

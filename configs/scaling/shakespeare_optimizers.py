"""Every optimizer on the character-level Shakespeare model (configs/shakespeare_char.py as
it is: 2,000 steps, 100 warmup, cosine to 10% of each run's peak), each over a small learning-rate
sweep: the README's optimizer table.

    python -m lm.sweep --config=configs/scaling/shakespeare_optimizers.py --workdir=/tmp/optimizers --parallel=2
    python bench/optimizer_table.py --workdir=/tmp/optimizers

The second command runs the first (or resumes it) and prints the table: per optimizer, its
best validation loss, the rate that reached it, and every rate tried. Same seed, data order
and model everywhere; validation at the end only, on the whole held-out 10%. 25 runs of
about 2 minutes each on 2 cores. Measured (the README's table): Muon best at 1.578 (0.01),
schedule-free AdamW 1.683, AdamW 1.728 (2e-3; 1.775 at the recipe's 1e-3), Adam 1.732,
Lion 1.754, SGD 1.873, Adafactor 1.946.

Per optimizer, what differs from the recipe:
- adam, sgd: weight decay 0. Theirs is L2 on the gradient (PyTorch's), which at the
  recipe's 0.1 would fight the update; decoupled decay is AdamW's.
- sgd: momentum 0.9 (optim.sgd).
- adafactor: optax's defaults, so its rate is relative to each parameter's RMS.
- muon: the rate swept is the hidden matrices' (Muon's; `optim.groups.matrix.lr_scale` x
  optim.lr), while embeddings, head and norms keep AdamW at the recipe's 1e-3.
- schedule_free_adamw: a constant rate after the warmup (it refuses a decaying schedule).

`get_sweep("quick")` shrinks every run to 20 steps, to check the table's plumbing.
"""

from lm.configs import shakespeare_char

MUON_OTHERS_LR = 1e-3  # AdamW's rate for Muon's non-matrix parameters: the recipe's
# Each optimizer's rates: 2-3x apart around where its authors and optax's docs put them,
# widened where the best fell at an edge (adam, adafactor, muon and schedule-free got a fourth).
RATES = {
    "adamw": (1e-3, 2e-3, 4e-3),
    "adam": (1e-3, 2e-3, 4e-3, 8e-3),
    "sgd": (0.1, 0.3, 1.0),
    "adafactor": (3e-3, 1e-2, 3e-2, 0.1),
    "lion": (1e-4, 3e-4, 1e-3),
    "muon": (0.005, 0.01, 0.02, 0.04),
    "schedule_free_adamw": (1e-3, 2e-3, 4e-3, 8e-3),
}
SETTINGS = {  # what each optimizer changes besides its rate
    "adam": {"optim.weight_decay": 0.0},
    "sgd": {"optim.weight_decay": 0.0},
    "schedule_free_adamw": {"optim.schedule": "constant"},
}


def get_config(arg: str = ""):
    config = shakespeare_char.get_config()
    config.train.eval_every = 0  # the final validation loss only
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 1
    config.sample.max_new_tokens = 50
    return config


def point(name: str, rate: float) -> dict:
    """One run's overrides: `name` at `rate` (for Muon, the hidden matrices' rate)."""
    if name == "muon":
        rates = {"optim.lr": MUON_OTHERS_LR, "optim.groups.matrix.lr_scale": rate / MUON_OTHERS_LR}
    else:
        rates = {"optim.lr": rate}
    # The recipe's cosine ends at 10% of its peak: final_lr is a rate, so it follows optim.lr.
    return {"optim.name": name, **rates, "optim.final_lr": rates["optim.lr"] / 10, **SETTINGS.get(name, {})}


def rate_of(overrides: dict) -> float:
    """The rate a point swept (the inverse of `point`)."""
    return overrides["optim.lr"] * overrides.get("optim.groups.matrix.lr_scale", 1.0)


def get_sweep(arg: str = ""):
    if arg not in ("", "quick"):
        raise ValueError(f"unknown argument {arg!r}: use configs/scaling/shakespeare_optimizers.py or "
                         "configs/scaling/shakespeare_optimizers.py:quick")
    quick = {"train.steps": 20, "optim.warmup_steps": 4, "train.checkpoint_every": 10} if arg else {}
    return [{**point(name, rate), **quick} for name, rates in RATES.items() for rate in rates]

"""WSD cooldown branches against separate cosine runs, on the character-level Shakespeare
model (configs/shakespeare_char.py at a peak rate of 3e-3): token budgets of 1, 2, 3 and
4 x 500 steps.

    python -m lm.sweep --config=configs/scaling/shakespeare_wsd.py:branches --workdir=/tmp/wsd/branches
    python -m lm.sweep --config=configs/scaling/shakespeare_wsd.py:cosine --workdir=/tmp/wsd/cosine

"branches" (lm.scaling.designs.wsd_branches): one stable WSD run of the largest budget,
stopped where its cooldown starts (step 1600), keeping steps 400, 800, 1200 and 1600, and
four cooldown branches of 20% (steps 400-500, 800-1000, 1200-1500, 1600-2000): 2,600 steps
in all. "cosine": four separate warmup + cosine runs of 500 to 2,000 steps: 5,000 steps.
Same seed, data order and warmup everywhere. bench/wsd_branches.py runs both and prints
each budget's two validation losses and the compute ratio (52% by construction).
Expected, as the mean over seeds 0-4 (the README's tables, two machines): every branch at
least as good as its cosine run, better by 0.005-0.021 nats a budget (0.006-0.016 over the
ten pairs of both machines); a single pair can be better by up to 0.028.

The peak rate: Hägele et al. compare schedules each at a tuned rate. The recipe's 1e-3 is
tuned for 2,000 steps of cosine and is far too low for the shorter budgets (cosine at 500
steps: 2.067 at 1e-3, 2.007 at 2e-3, 1.997 at 3e-3, 1.995 at 5e-3, measured), and a
schedule that holds the peak longer gains from it: at 1e-3 every WSD branch beat its
cosine run by 0.039-0.048 nats; at 3e-3 the 500-step pair is 1.995 vs 1.997. Both kinds
use 3e-3, cooling or decaying to a tenth of it.

The argument is "kind[,unit][,shape=S][,seed=N]": `:branches,20` shrinks the budgets to
1-4 x 20 steps (the warmup to a fifth of the unit) for a quick check; `shape` is the
branches' cooldown (1-sqrt, the default, linear or cosine); `seed` (0) is config.seed, for
both kinds alike.
"""

from lm.config.choices import COOLDOWN_SHAPES
from lm.configs import shakespeare_char
from lm.scaling import designs

BUDGETS = (1, 2, 3, 4)  # in units of steps
KINDS = ("branches", "cosine")
DEFAULT_SHAPE = "1-sqrt"  # the schema's cooldown_shape (Hägele et al.'s)
MIN_UNIT = 10  # the shortest budget (1 unit) then has a 2-step warmup (a fifth) and a 2-step cooldown (20%)
USAGE = ("Fix: use branches or cosine, then optionally a step unit, the branches' cooldown shape and a seed, e.g. "
         "configs/scaling/shakespeare_wsd.py:branches,500,shape=linear,seed=1")


def _parse(arg: str) -> dict:
    """"kind[,unit][,shape=S][,seed=N]" -> {"kind", "unit", "shape", "seed"}; ValueError naming the fix."""
    kind, *rest = arg.split(",")
    parsed = {"kind": kind, "unit": 500, "shape": DEFAULT_SHAPE, "seed": 0}
    for i, part in enumerate(rest):
        key, _, value = part.rpartition("=")
        key = key or ("unit" if i == 0 else "")
        if key not in ("unit", "shape", "seed") or (key != "shape" and not value.isdigit()):
            raise ValueError(f"unknown argument {arg!r} (at {part!r}). {USAGE}")
        parsed[key] = value if key == "shape" else int(value)
    if kind not in KINDS or parsed["shape"] not in COOLDOWN_SHAPES or (kind == "cosine" and "shape=" in arg):
        raise ValueError(f"unknown argument {arg!r}. {USAGE}; shape is one of {', '.join(COOLDOWN_SHAPES)}, "
                         "for branches only")
    if parsed["unit"] < MIN_UNIT:
        raise ValueError(f"the argument {arg!r} gives a step unit of {parsed['unit']}, below {MIN_UNIT}, the least "
                         f"that leaves the shortest budget (1 unit) a warmup of a fifth and a cooldown of 20%, each of "
                         f"2 steps at least (the first step of each is at its start's rate, 0 or the peak). "
                         f"Fix: give a unit >= {MIN_UNIT}, e.g. "
                         f"configs/scaling/shakespeare_wsd.py:{kind},20")
    return parsed


def get_config(arg: str = "branches"):
    parsed = _parse(arg)
    unit = parsed["unit"]
    config = shakespeare_char.get_config()
    config.seed = parsed["seed"]
    config.optim.cooldown_shape = parsed["shape"]  # read by the branches' wsd schedule only
    config.optim.lr, config.optim.final_lr = 3e-3, 3e-4  # a tuned rate for every budget (above)
    config.optim.warmup_steps = min(config.optim.warmup_steps, unit // 5)
    config.train.eval_every = 0  # the final validation loss only
    config.train.checkpoint_every = unit
    config.train.keep_checkpoints = 1
    config.sample.max_new_tokens = 50
    return config


def get_sweep(arg: str = "branches"):
    parsed, config = _parse(arg), get_config(arg)
    kind, unit = parsed["kind"], parsed["unit"]
    steps = [k * unit for k in BUDGETS]
    if kind == "cosine":
        return [{"train.steps": s} for s in steps]
    tokens_per_step = config.train.batch_size * config.data.seq_len
    return designs.wsd_branches(config, None, [s * tokens_per_step for s in steps], cooldown_fraction=0.2)

"""µP learning-rate transfer: the same learning-rate sweep at widths 128 and 512 of the
character-level Shakespeare model, under µP and under the standard parametrization.

    python -m lm.sweep --config=configs/scaling/shakespeare_mup.py:mup --workdir=/tmp/mup_lr/mup --parallel=2
    python -m lm.sweep --config=configs/scaling/shakespeare_mup.py:standard --workdir=/tmp/mup_lr/standard \
        --parallel=2

Each sweep trains d_model in WIDTHS x optim.lr in LRS (6 rates 2x apart, 2^-11 to 2^-6)
on configs/shakespeare_char.py shrunk to 2 layers and 200 steps (batch 12 x 64 tokens,
10% warmup, cosine to a tenth of the rate), scored on 4 validation batches of 64 rows.
At width 128 the best rate of such a run was near 2^-7 (probed: 2^-9 2.24, 2^-7 2.18,
2^-5 2.48). Both sweeps (24 points) are sized for a few minutes each on 2 cores with
--parallel=2.
"mup" sets model.parametrization="mup" with mup_base_width=128, so at width 128 both
sweeps train the same model but for the attention scale. bench/mup_lr_transfer.py runs
both and prints each one's validation loss per (rate, width) and the best rate per width.
Expected (issue 23, acceptance 4): under µP the best rate at width 128 is also the best at
512; under the standard parametrization the best rate moves lower at 512. Measured (the
README's µP section): µP's best is 2^-7 at both widths; standard's 2^-8 at 128 and 2^-11
at 512. Both sweeps took about 12 minutes on 2 cores with --parallel=2.

The argument is "parametrization" or "parametrization,steps": `:mup,20` trains 20 steps
per point for a quick check of the machinery (its losses mean little).
"""

from lm.configs import shakespeare_char

WIDTHS = (128, 512)
LRS = tuple(2.0 ** e for e in range(-11, -5))  # 2^-11 (0.00049) .. 2^-6 (0.0156)
BASE_WIDTH = 128  # µP's mup_base_width: the narrow model's width
PARAMETRIZATIONS = ("standard", "mup")


def _parse(arg: str) -> tuple[str, int]:
    parametrization, _, steps = arg.partition(",")
    if parametrization not in PARAMETRIZATIONS or not (steps or "200").isdigit() or int(steps or 200) < 10:
        raise ValueError(f"unknown argument {arg!r}: use standard or mup, optionally with a step count of at "
                         "least 10, e.g. configs/scaling/shakespeare_mup.py:mup,200")
    return parametrization, int(steps or 200)


def get_config(arg: str = "mup"):
    parametrization, steps = _parse(arg)
    config = shakespeare_char.get_config()
    config.model.num_layers = 2
    config.model.parametrization = parametrization
    config.model.mup_base_width = BASE_WIDTH if parametrization == "mup" else 0
    config.train.steps = steps
    config.optim.warmup_steps = steps // 10
    config.train.eval_every = 0  # the final validation loss only
    config.train.checkpoint_every = 0  # one checkpoint, at the end
    config.train.keep_checkpoints = 1
    config.eval.num_batches = 4
    config.sample.max_new_tokens = 0  # no sample
    return config


def get_sweep(arg: str = "mup"):
    _parse(arg)
    return [{"model.d_model": width, "optim.lr": lr, "optim.final_lr": lr / 10} for width in WIDTHS for lr in LRS]

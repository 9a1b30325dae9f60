"""µP coordinate check (Yang et al. 2022, "Tensor Programs V", Section 8 / Figure 5): the
size of each layer's activations after a few steps of training, across widths, under the
standard parametrization and under µP.

    .venv/bin/python bench/mup_coord_check.py

For each width of --widths (d_model; --heads heads, so head_dim grows with the width and
the attention scale matters) the character Shakespeare model (configs/shakespeare_char.py,
--layers layers) trains --steps steps of --optimizer (adamw) through lm's own trainer (the
same data, seed and --lr, a constant rate without warmup), once as
`model.parametrization="standard"` and once as "mup" with `mup_base_width` = --base_width.
After step 1 and after the last step it records, on one fixed batch, the RMS of the
embedding output, each block's attention output, MLP output and residual stream, and the
logits (Flax's capture_intermediates; the model is unchanged). It prints, per
parametrization, the RMS per layer x width and each layer's max/min ratio across widths;
Issue 23 asks for a ratio below 2 for every layer under µP after 10 steps. Widths 64-1024
at the defaults take a few minutes on 2 cores.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from lm.config import ConfigError, parse_flags, validate  # noqa: E402
from lm.config.choices import OPTIMIZERS  # noqa: E402
from lm.configs import shakespeare_char  # noqa: E402
from lm.data import batches  # noqa: E402
from lm.data.corpus import prepare  # noqa: E402
from lm.errors import exit_with_error, quiet_logging, reject_positional  # noqa: E402
from lm.model import ModelConfig  # noqa: E402
from lm.parallel import runtime, sharding  # noqa: E402
from lm.training.trainer import make_trainer  # noqa: E402

MAX_RATIO = 2.0  # issue 23, acceptance 4
PARAMETRIZATIONS = ("standard", "mup")

_WIDTHS = flags.DEFINE_list("widths", ["64", "128", "256", "512", "1024"], "d_model of each model.")
_BASE = flags.DEFINE_integer("base_width", 64, "µP's model.mup_base_width.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 10, "Training steps before the last record.", lower_bound=1)
_LAYERS = flags.DEFINE_integer("layers", 2, "Transformer blocks.", lower_bound=1)
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads at every width.", lower_bound=1)
_LR = flags.DEFINE_float("lr", 1e-2, "The (base) learning rate, constant.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adamw", list(OPTIMIZERS), "optim.name; each has its own µP rate rule "
                               "(lm.config.choices.MUP_RATE_EXPONENTS).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per step.", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per row.", lower_bound=1)


def widths_problem(widths: list[str], heads: int) -> str | None:
    """What is wrong with --widths (each a whole d_model, distinct, a multiple of --heads),
    or None. Checked by absl when the flags are parsed, so a bad value is one line naming
    the bench's flag (lm.config.parse_flags), not a traceback or a --config.model message."""
    if not widths:
        return "lists no width. Fix: give at least one, e.g. --widths=64,128,256."
    bad = [w for w in widths if not w.strip().isdigit() or int(w) < 1]
    if bad:
        return f"has {bad[0]!r}, not a whole d_model >= 1. Fix: give whole widths, e.g. --widths=64,128,256."
    values = [int(w) for w in widths]
    if len(set(values)) < len(values):
        return "lists a width twice. Fix: give each width once."
    off = [w for w in values if w % heads]
    if off:  # each head gets d_model / heads dimensions
        return (f"has width {off[0]}, not a multiple of --heads={heads}. Fix: give multiples of --heads "
                f"(e.g. {heads * max(1, round(off[0] / heads))}), or change --heads.")
    return None


def _check_widths(values: dict) -> bool:
    problem = widths_problem(values["widths"], values["heads"] or 1)
    if problem:
        raise flags.ValidationError(problem)
    return True


flags.register_multi_flags_validator(["widths", "heads"], _check_widths)
flags.register_validator("lr", lambda lr: lr > 0, "must be a learning rate > 0. Fix: e.g. --lr=0.01.")

def run_config(parametrization: str, width: int):
    """The Shakespeare recipe at `width` under `parametrization`, sized by the flags."""
    config = shakespeare_char.get_config()
    m = config.model
    m.num_layers, m.num_heads, m.d_model = _LAYERS.value, _HEADS.value, width
    m.parametrization, m.mup_base_width = parametrization, _BASE.value if parametrization == "mup" else 0
    config.data.seq_len, config.train.batch_size, config.train.steps = _SEQ_LEN.value, _BATCH.value, _STEPS.value
    config.optim.lr, config.optim.schedule, config.optim.warmup_steps = _LR.value, "constant", 0
    config.optim.name = _OPTIMIZER.value
    validate(config)
    return config


def activation_rms(model, params, tokens_BL) -> dict[str, float]:
    """RMS of the recorded activations of `model` on `tokens_BL`, by layer name."""
    _, captured = model.apply({"params": params}, tokens_BL, capture_intermediates=True, mutable=["intermediates"])
    found = captured["intermediates"]
    rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))
    out = {"embedding": rms(found["embed"]["__call__"][0])}
    for i in range(model.cfg.num_layers):
        layer = found[f"layer_{i}"]
        out[f"layer_{i}/attention"] = rms(layer["attn"]["__call__"][0])
        out[f"layer_{i}/mlp"] = rms(layer["mlp"]["__call__"][0])
        out[f"layer_{i}/residual"] = rms(layer["__call__"][0][0])
    out["logits"] = rms(found["__call__"][0])
    return out


def train_and_record(parametrization: str, width: int, corpus, mesh) -> dict[int, dict[str, float]]:
    """{step: activation RMS by layer} after step 1 and after the last step."""
    config = run_config(parametrization, width)
    model_cfg = ModelConfig.for_run(config, corpus.tokenizer.vocab_size)
    trainer = make_trainer(config, model_cfg, mesh, corpus.tokenizer.pad_id, corpus.tokenizer.vocab_size)
    data = batches.iterate(batches.train_data(config, corpus), 1, 2)
    state, records, probe_BL = trainer.init(), {}, None
    for step in range(1, config.train.steps + 1):
        local = next(data)
        if probe_BL is None:  # the first batch's inputs, the same at every width
            probe_BL = jnp.asarray(local["tokens"][:, :-1])
        state, metrics = trainer.step(state, batches.to_global(local, trainer.batch_sharding))
        if step in (1, config.train.steps):
            params = jax.device_get(state.params)
            records[step] = activation_rms(trainer.model, params, probe_BL)
    print(f"  {parametrization} width {width}: loss {float(metrics['loss']):.3f} at step {config.train.steps}",
          flush=True)
    return records


def table(parametrization: str, step: int, by_width: dict[int, dict[str, float]]) -> tuple[list[str], float]:
    """The markdown table (one row per layer: RMS at each width, max/min) and its largest ratio."""
    widths = sorted(by_width)
    lines = [f"{parametrization}, after step {step}: activation RMS per layer and width",
             "| layer | " + " | ".join(str(w) for w in widths) + " | max/min |",
             "|---|" + "---:|" * (len(widths) + 1)]
    worst = 0.0
    for name in by_width[widths[0]]:
        values = np.array([by_width[w][name] for w in widths])
        ratio = float(values.max() / values.min())
        worst = max(worst, ratio)
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + f" | {ratio:.2f} |")
    return lines, worst


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    widths = [int(w) for w in _WIDTHS.value]
    try:  # whatever the flags' checks above let through, as one line
        base_config = run_config("standard", widths[0])
        for p in PARAMETRIZATIONS:
            for w in widths:
                run_config(p, w)
    except ConfigError as e:
        exit_with_error(f"these flags give a model lm refuses: {e}")
    runtime.setup(base_config)
    mesh = sharding.make_mesh(base_config)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = prepare(base_config, os.path.join(tmp, "tokenizer.json"))
    print(f"coordinate check: widths {widths}, {_LAYERS.value} layers, {_HEADS.value} heads, {_STEPS.value} steps "
          f"of {_OPTIMIZER.value} at lr {_LR.value:g} (constant), batch {_BATCH.value} x {_SEQ_LEN.value}, "
          f"µP base width {_BASE.value}",
          flush=True)
    records = {p: {w: train_and_record(p, w, corpus, mesh) for w in widths} for p in PARAMETRIZATIONS}
    worst = {}
    for step in sorted({1, _STEPS.value}):
        for p in PARAMETRIZATIONS:
            lines, worst[p, step] = table(p, step, {w: records[p][w][step] for w in widths})
            print("\n" + "\n".join(lines))
    last = _STEPS.value
    print(f"\nstandard_max_ratio: {worst['standard', last]:.2f} (largest growth of a layer's RMS across widths, "
          f"step {last})")
    print(f"mup_max_ratio: {worst['mup', last]:.2f} (step {last})")
    print(f"mup_every_layer_within_{MAX_RATIO:g}x: {'yes' if worst['mup', last] < MAX_RATIO else 'no'}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

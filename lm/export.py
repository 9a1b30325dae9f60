r"""Export a run's parameters alone, for inference and fine-tuning.

    python -m lm.export --workdir=/tmp/shakespeare_char --output=/tmp/shakespeare_export \
        --dtype=bfloat16

Writes `--output` (a new directory): the parameters of the latest checkpoint (or
`--step`) without optimizer state, in float32 or bfloat16, with the run's config and
tokenizer. `python -m lm.sample --workdir=<export>` and `lm.runs.artifacts.load` read it.
"""

from __future__ import annotations

from absl import app, flags

from lm.config import parse_flags
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional
from lm.parallel import runtime
from lm.runs import artifacts
from lm.training import optim

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
_OUTPUT = flags.DEFINE_string("output", None, "The export's directory; must not exist or be empty.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint to export; default the latest.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(artifacts.EXPORT_DTYPES), "The parameters' dtype in the export.")


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    if not _WORKDIR.value or not _OUTPUT.value:
        exit_with_error("--workdir and --output are required, e.g. --workdir=/tmp/run --output=/tmp/run_export")
    if artifacts.is_export(_WORKDIR.value):
        exit_with_error(f"{_WORKDIR.value} is already an export. Fix: point --workdir at a training workdir.")
    runtime.enable_compilation_cache()
    try:
        info = artifacts.export(_WORKDIR.value, _OUTPUT.value, _STEP.value, _DTYPE.value,
                                      eval_params=optim.eval_params_reader)
    except UsageError as e:
        exit_with_error(str(e))
    print(f"exported step {info['step']}: {info['parameters']:,} parameters in {info['dtype']} to {_OUTPUT.value}",
          flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

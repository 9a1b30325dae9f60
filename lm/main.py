"""Train a language model.

    python -m lm.main --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare

Any config field can be overridden (`--config.train.steps=500`), and a config file may
take an argument (`--config=configs/x.py:small`). Rerunning the same command on the same
workdir resumes from its latest checkpoint. Exit status 2 means the config or the
command line was wrong; the message names the field and the fix.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lm import config as config_lib
from lm import runtime, train
from lm.cli import exit_with_error, quiet_logging, reject_positional

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/shakespeare_char.py (or file.py:arg).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the config.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with config-loading failures turned into one clear message."""
    try:
        rest = flags.FLAGS(argv)
        _ = _CONFIG.value and _CONFIG.value.keys()  # a missing or broken config file fails here
    except flags.Error as e:
        exit_with_error(str(e))
    except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError, ImportError) as e:
        exit_with_error(f"could not load the config ({type(e).__name__}: {e}). Fix: check the "
                        "--config file and the --config.* overrides (fields are listed in configs/base.py).")
    return rest


def load_config():
    """The validated config; exits with the field and the fix if it cannot run."""
    for name in ("config", "workdir"):
        if not flags.FLAGS[name].value:
            exit_with_error(f"--{name} is required. Fix: e.g. python -m lm.main "
                            "--config=configs/shakespeare_char.py --workdir=/tmp/shakespeare")
    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        exit_with_error(str(e))
    return config


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    config = load_config()
    runtime.setup(config)
    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except config_lib.ConfigError as e:
        exit_with_error(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
